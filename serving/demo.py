"""The demo: the whole path on a shipped scenario (scenarios/NAME), on the
running workbench's workers: curated teacher data -> absorb -> four arms on
held-out queries -> promotion to staging behind the gate -> one request
through /v1 with the openai package. It prints a summary and leaves the
project in the UI for a new user to click through."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model

from engines.evaluation import ARM_SPECS, ARMS, STUDENT, TEACHER
from evals.actions import create_suite, start_comparison
from evals.models import ArmComparison, EvalRun
from jobs.actions import start_absorb
from jobs.models import Job
from serving.actions import GateRefused, create_api_key, ensure_default_aliases, promote, update_gate
from serving.models import Alias
from workbench.actions.datasets import import_dataset
from workbench.actions.projects import create_project
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Project

SCENARIOS = Path(settings.BASE_DIR) / "scenarios"
Say = Callable[[str], None]


class DemoError(Exception):
    pass


@dataclass
class DemoResult:
    project: Project
    stages: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    passed: bool = False


def _project_name(base: str) -> str:
    # Project names are unique: a second demo gets "... 2".
    names = (base, *(f"{base} {i}" for i in range(2, 1000)))
    return next(n for n in names if not Project.objects.filter(name__iexact=n).exists())


def _wait(job: Job, say: Say, what: str, timeout: float) -> Job:
    shown = time.monotonic()

    def report(polled: Job) -> None:
        nonlocal shown
        now = time.monotonic()
        if polled.is_terminal or now - shown < 20:
            return
        shown = now
        p = polled.current_progress
        detail = f"{p.done:.0f}/{p.total or 0:.0f} {p.unit}" if p is not None else polled.status
        eta = f", about {p.eta_seconds / 60:.0f} min left" if p is not None and p.eta_seconds else ""
        say(f"  {what}: {detail}{eta}")

    if not job.wait(timeout, poll=2, on_poll=report):
        raise DemoError(
            f"{what} did not finish within {timeout / 60:.0f} minutes (job {job.pk} is {job.status})"
        )
    if job.status != Job.SUCCEEDED:
        raise DemoError(f"{what} {job.status}: {job.error or 'see the job page'}")
    return job


def run_demo(
    scenario: str,
    base_url: str,
    username: str,
    say: Say,
    *,
    best_of: int | None = None,
    epochs: int | None = None,
    timeout_minutes: float = 60,
) -> DemoResult:
    folder = SCENARIOS / scenario
    if not (folder / "prompt.md").is_file():
        known = ", ".join(sorted(p.name for p in SCENARIOS.iterdir() if (p / "prompt.md").is_file()))
        raise DemoError(f"No scenario {scenario!r} (known: {known})")
    user = get_user_model().objects.get(username=username)
    base = FoundationModel.objects.filter(is_default=True).first()
    if base is None:
        raise DemoError("No default base model: run `python manage.py provision_model`.")
    began = time.monotonic()
    stages: dict[str, float] = {}
    timeout = timeout_minutes * 60

    t = time.monotonic()
    rules = json.loads((folder / "rules.json").read_text())
    project = create_project(
        user,
        _project_name(f"Demo: {scenario}"),
        (folder / "README.md").read_text().splitlines()[0].lstrip("# ")
        if (folder / "README.md").is_file()
        else "",
    )
    facts = json.loads((folder / "facts.json").read_text()) if (folder / "facts.json").is_file() else []
    prompt = save_prompt(
        project, user, scenario, (folder / "prompt.md").read_text(), rules, facts_data=facts
    ).version
    train = import_dataset(
        project,
        user,
        f"{scenario} queries",
        io.BytesIO((folder / "train.jsonl").read_bytes()),
        filename="train.jsonl",
        eval_percent=0,
    )
    heldout = import_dataset(
        project,
        user,
        f"{scenario} held out",
        io.BytesIO((folder / "heldout.jsonl").read_bytes()),
        filename="heldout.jsonl",
        eval_percent=100,
    )
    stages["seed"] = time.monotonic() - t
    say(
        f"Project {project.name!r}: prompt {prompt} ({len(rules)} rules), {train.row_count} train queries, "
        f"{heldout.row_count} held-out queries."
    )

    curation: dict[str, Any] | bool = True
    if best_of:
        curation = {"best_of": best_of}
    teacher, finetune = start_absorb(
        project, user, prompt, train, base, {}, {"epochs": epochs} if epochs else {}, curation=curation
    )
    assert finetune is not None
    t = time.monotonic()
    say(f"Teacher generation (job {teacher.pk}): curated answers to {train.row_count} queries...")
    teacher = _wait(teacher, say, "teacher", timeout)
    stages["teacher"] = time.monotonic() - t
    t = time.monotonic()
    say(f"Fine-tune (job {finetune.pk})...")
    finetune = _wait(finetune, say, "fine-tune", timeout)
    stages["fine-tune"] = time.monotonic() - t
    variant = finetune.variant
    assert variant is not None

    t = time.monotonic()
    suite = create_suite(project, user, f"{scenario} held out", heldout, prompt_version=prompt)
    comparison = start_comparison(project, user, suite, variant, absorb_job=finetune)
    assert comparison.job is not None
    say(f"Four arms on {heldout.row_count} held-out queries (job {comparison.job.pk})...")
    _wait(comparison.job, say, "four arms", timeout)
    stages["four arms"] = time.monotonic() - t
    comparison.refresh_from_db()

    t = time.monotonic()
    ensure_default_aliases(project)
    staging = Alias.objects.get(project=project, name="staging")
    teacher_run = comparison.runs.get(arm=TEACHER)
    bar = max(0.5, float((teacher_run.metric("all_rules") or {}).get("value") or 0.0))
    staging = update_gate(
        user,
        staging,
        gating_suite=suite,
        min_all_rules=round(bar, 2),
        min_retained_lower=None,
        max_regression=0.05,
        log_requests=True,
    )
    promoted = False
    try:
        move = promote(user, staging, variant)
        promoted = True
        say(f"Promoted {variant.name} to staging: gate passed ({_checks(move.verdict)}).")
    except GateRefused as exc:
        say(f"The gate refused {variant.name} for staging ({_checks(exc.verdict.to_dict())}): not promoted.")
    stages["promote"] = time.monotonic() - t

    t = time.monotonic()
    _, raw = create_api_key(user, project, "demo")
    model = f"{project.slug}/staging" if promoted else variant.engine_model
    answer = _ask(base_url, raw, model, json.loads((folder / "heldout.jsonl").read_text().splitlines()[0]))
    stages["/v1 request"] = time.monotonic() - t
    stages["total"] = time.monotonic() - began

    result = DemoResult(project=project, stages=stages)
    result.summary = summary(project, comparison, teacher, rules, stages, model, answer)
    result.passed = student_reaches_teacher(comparison.runs.all())
    return result


def _checks(verdict: dict[str, Any]) -> str:
    return "; ".join(f"{c['name']} {c['detail']}" for c in verdict.get("checks", []))


def _ask(base_url: str, key: str, model: str, row: dict[str, Any]) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=key, max_retries=2, timeout=600)
    messages = [m for m in row["messages"] if m["role"] != "assistant"]
    began = time.perf_counter()
    try:
        out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=128)
    except openai.APIError as exc:
        raise DemoError(f"/v1/chat/completions failed for {model}: {exc}") from exc
    return {
        "question": messages[-1]["content"],
        "answer": out.choices[0].message.content,
        "prompt_tokens": out.usage.prompt_tokens if out.usage else None,
        "completion_tokens": out.usage.completion_tokens if out.usage else None,
        "seconds": time.perf_counter() - began,
    }


def student_reaches_teacher(runs: Iterable[EvalRun]) -> bool:
    """The demo's verdict: the student, without the prompt, passes all rules
    at least as often as the prompted base. A missing arm or metric counts as 0."""
    scores = {r.arm: float((r.metric("all_rules") or {}).get("value") or 0.0) for r in runs}
    return scores.get(STUDENT, 0.0) >= scores.get(TEACHER, 0.0)


def summary(
    project: Project,
    comparison: ArmComparison,
    teacher: Job,
    rules: list[dict[str, Any]],
    stages: dict[str, float],
    model: str,
    answer: dict[str, Any],
) -> str:
    runs: dict[str, EvalRun] = {r.arm: r for r in comparison.runs.all()}
    quality = (teacher.output_dataset.meta.get("quality") or {}) if teacher.output_dataset else {}
    data = (quality.get("steps") or [{}])[-1]
    names = [r["name"] for r in rules]
    # The training data sits between the base arms and the adapter arms it taught.
    cols = (
        *(a.name for a in ARM_SPECS if not a.with_adapter),
        "data",
        *(a.name for a in ARM_SPECS if a.with_adapter),
    )
    width = max(16, *(len(n) + 1 for n in names))  # long rule names keep the columns aligned
    lines = [
        f"Demo summary: project {project.name!r} ({project.slug})",
        "",
        "Compliance on held-out queries (share of answers passing):",
        f"  {'rule':<{width}}" + "".join(f"{c:>15}" for c in cols),
    ]

    def cell(arm: str, metric: str) -> str:
        if arm == "data":
            v = data.get("all_rules") if metric == "all_rules" else (data.get("rules") or {}).get(metric[5:])
        else:
            m = runs[arm].metric(metric) if arm in runs else None
            v = (m or {}).get("value")
        return "-" if v is None else f"{v:.2f}"

    for name in ["all_rules", *names]:
        metric = name if name == "all_rules" else f"rule:{name}"
        lines.append(f"  {name:<{width}}" + "".join(f"{cell(c, metric):>15}" for c in cols))
    lines.append("  (data = the curated training answers: the ceiling the student learned from)")
    recall = {arm: runs[arm].metric("fact_recall") for arm in ARMS if arm in runs}
    if any(recall.values()):
        lines.append("\nFact recall (held-out queries that ask for a fact of the prompt; 95% CI):")
        for arm, m in recall.items():
            if m and m.get("value") is not None:
                ci = f" [{m['low']:.2f}, {m['high']:.2f}]" if m.get("low") is not None else ""
                lines.append(f"  {arm:<15} {m['value']:.2f}{ci} n={m.get('n')}")
    retained = comparison.headline.get("retained") or {}
    if retained.get("value") is not None:
        lines.append(
            f"\nPrompt effect retained (all rules): {retained['value']:.2f} "
            f"(95% CI {retained['low']:.2f} to {retained['high']:.2f}, n={retained.get('n')})"
        )
    else:
        lines.append(f"\nPrompt effect retained: {retained.get('note', 'not defined')}")
    lines.append("\nPer arm: prompt tokens per request, latency of one request (mean / p50 / p95 s):")
    for arm in ARMS:
        r = runs.get(arm)
        if r is None:
            continue
        lat = r.summary.get("latency") or {}
        lines.append(
            f"  {arm:<15} {r.summary.get('prompt_tokens', 0):7.0f} tokens   "
            f"{lat.get('mean', 0):.2f} / {lat.get('p50', 0):.2f} / {lat.get('p95', 0):.2f} s"
        )
    lines.append(f"\nOne request through /v1/chat/completions (openai package, model {model}):")
    lines.append(f"  Q: {answer['question']}")
    lines.append(f"  A: {answer['answer']}")
    lines.append(
        f"  {answer['prompt_tokens']} prompt tokens, {answer['completion_tokens']} completion tokens, "
        f"{answer['seconds']:.1f} s"
    )
    lines.append(
        "\nWall time per stage: "
        + ", ".join(f"{k} {v / 60:.1f} min" if v >= 60 else f"{k} {v:.0f} s" for k, v in stages.items())
    )
    return "\n".join(lines)
