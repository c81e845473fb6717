"""Shared by the eval commands: wait for jobs, print a leaderboard."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from django.core.management.base import CommandError, OutputWrapper

from evals.models import EvalRun, metric_label
from jobs.models import Job


def wait(jobs: Sequence[Job], out: OutputWrapper, poll: float = 1.0) -> None:
    """Follow jobs to their end with a one-line progress display; fail if one fails."""

    def draw(polled: Job) -> None:
        p = polled.current_progress
        detail = f"{p.done:.0f}/{'?' if p.total is None else f'{p.total:.0f}'} {p.unit}" if p else ""
        out.write(f"\r{polled} {polled.percent:3d}% {detail} {polled.status}".ljust(90), ending="")
        out.flush()
        if polled.is_terminal:
            out.write("")

    for job in jobs:
        job.wait(poll=poll, on_poll=draw)
        if job.status != Job.SUCCEEDED:
            raise CommandError(f"{job} {job.status}: {job.error or 'see the job log'}")


def run_json(run: EvalRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "label": run.label,
        "arm": run.arm or None,
        "variant": run.variant_id,
        "base_model": run.base_model.name,
        "prompt_version": str(run.prompt_version) if run.prompt_version else None,
        "status": run.status,
        "metrics": run.summary.get("metrics", {}),
        "prompt_tokens": run.summary.get("prompt_tokens"),
        "latency": run.summary.get("latency"),
        "seconds_per_example": run.summary.get("seconds_per_example"),
    }


def table(runs: Sequence[EvalRun], metric: str) -> str:
    """The runs ranked by `metric`, with every other metric beside it."""
    names = sorted(
        {k for r in runs for k in (r.summary.get("metrics") or {})},
        key=lambda n: (n != metric, n != "all_rules", n != "fact_recall", n),
    )
    ranked = sorted(runs, key=lambda r: -((r.metric(metric) or {}).get("value") or -1))
    head = ["run", *[metric_label(n) for n in names], "prompt tok", "p50 s"]
    rows = [head]
    for r in ranked:
        cells = [r.label[:48]]
        for n in names:
            m = r.metric(n) or {}
            cells.append(
                "—" if m.get("value") is None else f"{m['value']:.3f} [{m['low']:.2f},{m['high']:.2f}]"
            )
        cells.append(f"{r.summary.get('prompt_tokens', 0):.0f}")
        p50 = (r.summary.get("latency") or {}).get("p50")
        cells.append("—" if p50 is None else f"{p50:.2f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
