// Chart helpers shared by the eval, job and Pareto pages (Chart.js 4, vendored in static/vendor).
(function () {
  "use strict";
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

  // A long name cut to fit an axis; the tooltip keeps it whole.
  function short(text, n) {
    text = String(text);
    n = n || 34;
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  // Writes each scatter point's name (raw.label) beside it, kept inside the plot.
  const pointLabels = {
    id: "pointLabels",
    afterDatasetsDraw(chart) {
      const ctx = chart.ctx, area = chart.chartArea;
      ctx.save();
      ctx.font = FONT;
      ctx.textBaseline = "middle";
      // A label that would cover one already written is tried below its point, then left out
      // (the tooltip still names the point): points of reruns often sit on top of each other.
      const taken = [];
      const free = r => taken.every(t => r.x + r.w < t.x || t.x + t.w < r.x || r.y + 12 < t.y || t.y + 12 < r.y);
      chart.data.datasets.forEach((ds, i) => {
        const meta = chart.getDatasetMeta(i);
        if (meta.hidden || ds.pointLabels === false) return;
        meta.data.forEach((el, j) => {
          const raw = ds.data[j];
          if (!raw || !raw.label) return;
          const text = short(raw.label, 28), w = ctx.measureText(text).width;
          const right = el.x + 8 + w <= area.right;
          const x = right ? el.x + 8 : el.x - 8 - w;
          const spot = [el.y - 10, el.y + 10].map(y => ({x, y: Math.min(area.bottom - 6, Math.max(area.top + 6, y)) - 6, w}))
            .find(free);
          if (!spot) return;
          taken.push(spot);
          ctx.textAlign = "left";
          ctx.fillStyle = ds.labelColor || "#374151";
          ctx.fillText(text, spot.x, spot.y + 6);
        });
      });
      ctx.restore();
    },
  };

  // 0 red, 0.5 amber, 1 green: compliance reads at a glance; no value is grey.
  const STOPS = [[0, [220, 38, 38]], [0.5, [245, 158, 11]], [1, [22, 163, 74]]];
  function heatRgb(v) {
    v = Math.max(0, Math.min(1, v));
    for (let i = 1; i < STOPS.length; i++) {
      const [t1, c1] = STOPS[i], [t0, c0] = STOPS[i - 1];
      if (v <= t1) {
        const f = (v - t0) / (t1 - t0);
        return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
      }
    }
    return STOPS[STOPS.length - 1][1];
  }
  function heatColor(v) {
    if (v === null || v === undefined) return "#e5e7eb";
    return `rgb(${heatRgb(v).join(",")})`;
  }

  // Writes each heatmap cell's value (raw.v) in it, in a colour that stays legible.
  const cellValues = {
    id: "cellValues",
    afterDatasetsDraw(chart) {
      const ctx = chart.ctx;
      ctx.save();
      ctx.font = FONT;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      chart.getDatasetMeta(0).data.forEach((el, j) => {
        const raw = chart.data.datasets[0].data[j];
        if (!raw) return;
        const c = el.getCenterPoint();
        const v = raw.v;
        ctx.fillStyle = v === null || v === undefined ? "#6b7280" : v > 0.35 && v < 0.7 ? "#111827" : "#ffffff";
        ctx.fillText(v === null || v === undefined ? "—" : v.toFixed(2), c.x, c.y);
      });
      ctx.restore();
    },
  };

  window.Plots = {short, pointLabels, cellValues, heatColor};
})();
