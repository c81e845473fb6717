// The playground: one POST per picked model, all at once, each answer read
// from its server-sent events (fetch + ReadableStream: EventSource cannot POST)
// into its own column. Model text is only ever set as textContent.
(function () {
  "use strict";

  function csrf(form) {
    return form.querySelector("input[name=csrfmiddlewaretoken]").value;
  }

  // The picked columns as model specs: a base model carries its system prompt, others ignore it.
  function picks(form) {
    const out = [];
    form.querySelectorAll(".pg-pick").forEach(function (box) {
      const model = box.querySelector(".pg-model");
      const prompt = box.querySelector(".pg-prompt");
      if (!model.value) return;
      let spec = model.value, label = model.selectedOptions[0].textContent;
      if (spec.startsWith("base:") && prompt.value) {
        spec += ":prompt:" + prompt.value;
        label += " + " + prompt.selectedOptions[0].textContent;
      }
      out.push({spec: spec, label: label});
    });
    return out;
  }

  function syncPrompts(form) {
    form.querySelectorAll(".pg-pick").forEach(function (box) {
      box.querySelector(".pg-prompt").disabled = !box.querySelector(".pg-model").value.startsWith("base:");
    });
  }

  function status(column, text, kind) {
    const pill = column.querySelector(".pg-status");
    pill.textContent = text;
    pill.className = "pill pg-status " + (kind || "");
  }

  async function problem(response) {
    try {
      return (await response.json()).error || "HTTP " + response.status;
    } catch (e) {
      return "HTTP " + response.status + (response.status === 404 ? ": not found" : "");
    }
  }

  // Server-sent events from a byte stream: "event: NAME\ndata: JSON\n\n".
  async function* events(response) {
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message", data = "";
        block.split("\n").forEach(function (line) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        });
        yield {name: name, data: JSON.parse(data)};
      }
    }
  }

  function showDone(column, d) {
    const parts = [];
    if (d.prompt_tokens != null) parts.push(d.prompt_tokens + " prompt + " + d.completion_tokens + " completion tokens");
    if (d.ttft_ms != null) parts.push("first token " + d.ttft_ms + " ms");
    parts.push("total " + d.total_ms + " ms");
    if (d.finish_reason === "length") parts.push("cut off at max tokens");
    column.querySelector(".pg-stats").textContent = parts.join(" · ");
    const rules = column.querySelector(".pg-rules");
    if (!d.rules.length) {
      rules.textContent = d.rules_of ? d.rules_of + " has no rules" : "no prompt version to check rules of";
      rules.classList.add("muted");
    } else {
      rules.append("Rules of " + d.rules_of + ": ");
      d.rules.forEach(function (r) {
        const pill = document.createElement("span");
        pill.className = "pill pg-rule " + (r.passed ? "ok" : "bad");
        pill.textContent = (r.passed ? "✓ " : "✗ ") + r.name;
        pill.title = r.rule + (r.reason ? " (" + r.reason + ")" : "");
        rules.append(pill, " ");
      });
    }
    status(column, d.all_rules === false ? "fails a rule" : "done", d.all_rules === false ? "bad" : "ok");
    const save = column.querySelector(".pg-save");
    save.dataset.turn = d.turn;
    save.hidden = false;
  }

  async function answer(form, column, body) {
    // Until the first token (a first request may wait for the model to load), a spinner.
    column.querySelector(".pg-text").setAttribute("aria-busy", "true");
    const response = await fetch(form.dataset.stream, {
      method: "POST", body: body, headers: {"X-CSRFToken": csrf(form)}, credentials: "same-origin",
    });
    if (!response.ok) {
      status(column, "refused", "bad");
      column.querySelector(".pg-text").removeAttribute("aria-busy");
      column.querySelector(".pg-text").textContent = await problem(response);
      return;
    }
    status(column, "streaming", "run");
    const text = column.querySelector(".pg-text");
    for await (const e of events(response)) {
      text.removeAttribute("aria-busy");
      if (e.name === "delta") text.textContent += e.data.text;
      else if (e.name === "done") showDone(column, e.data);
      else if (e.name === "error") {
        status(column, "failed", "bad");
        column.querySelector(".pg-stats").textContent = e.data.message;
      }
    }
    text.removeAttribute("aria-busy");
  }

  async function save(form, column, button) {
    const box = column.querySelector(".pg-save"), out = column.querySelector(".pg-saved");
    const body = new FormData();
    body.append("turn", box.dataset.turn);
    body.append("split", button.dataset.split);
    button.disabled = true;
    const response = await fetch(form.dataset.save, {
      method: "POST", body: body, headers: {"X-CSRFToken": csrf(form)}, credentials: "same-origin",
    });
    if (!response.ok) {
      button.disabled = false;
      out.textContent = await problem(response);
      return;
    }
    const saved = await response.json();
    out.textContent = saved.message + " ";
    const link = document.createElement("a");
    link.href = saved.url;
    link.textContent = "Open " + saved.version;
    out.append(link);
  }

  function send(form) {
    const chosen = picks(form), warn = document.getElementById("pg-problem");
    const message = form.elements.message.value;
    warn.hidden = true;
    if (!chosen.length || !message.trim()) {
      warn.textContent = !chosen.length ? "Pick at least one model." : "Type a message.";
      warn.hidden = false;
      return;
    }
    const answers = document.getElementById("answers"), template = document.getElementById("pg-answer");
    answers.replaceChildren();
    chosen.forEach(function (pick, i) {
      const column = template.content.firstElementChild.cloneNode(true);
      column.querySelector(".pg-label").textContent = pick.label;
      column.querySelectorAll(".pg-save button").forEach(function (button) {
        button.addEventListener("click", function () { save(form, column, button); });
      });
      answers.append(column);
      const body = new FormData(form);
      chosen.forEach(function (p) { body.append("model", p.spec); });
      body.append("column", String(i));
      answer(form, column, body).catch(function (err) {
        status(column, "failed", "bad");
        column.querySelector(".pg-stats").textContent = String(err);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("playground");
    if (!form) return;
    syncPrompts(form);
    form.addEventListener("change", function () { syncPrompts(form); });
    form.addEventListener("submit", function (e) { e.preventDefault(); send(form); });
  });
})();
