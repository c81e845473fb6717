"""The model names the fine-tuning API gives: `ft:BASE:PROJECT:SUFFIX:ftjob-ID`
for a fine-tune's variant (OpenAI's shape, usable in /v1/chat/completions
and listed by /v1/models) and `...:ckpt-step-N` for an earlier epoch's
checkpoint. Any finished fine-tune has one, whether the API or the UI started it."""

from __future__ import annotations

import re
from typing import Any

from jobs.models import Job
from workbench.models import Project, Variant

JOB_ID = re.compile(r"ftjob-(\d{1,18})")
CHECKPOINT = re.compile(r"ckpt-step-(\d{1,12})")


def model_name(job: Job) -> str | None:
    """The fine-tuned model's name, once the job made its variant."""
    if job.variant_id is None or job.base_model is None:
        return None
    return f"ft:{job.base_model.name}:{job.project.slug}:{job.params.get('suffix') or ''}:ftjob-{job.pk}"


def checkpoints(job: Job) -> list[dict[str, Any]]:
    """The job's epoch checkpoints, oldest first: step, epoch, losses, variant and model name."""
    name = model_name(job)
    if name is None or job.variant is None:
        return []
    metrics = job.variant.metrics or {}
    if not metrics.get("epoch_log"):  # trained before epochs were logged, or refined: the final adapter
        steps = metrics.get("steps")
        return [
            {"step": steps, "train_loss": job.variant.final_loss, "variant": job.variant_id, "model": name}
        ]
    out = []
    for entry in metrics["epoch_log"]:
        if isinstance(entry, dict) and entry.get("variant") and isinstance(entry.get("step"), int):
            final = entry["variant"] == job.variant_id
            out.append({**entry, "model": name if final else f"{name}:ckpt-step-{entry['step']}"})
    return out


def resolve(project: Project, name: str) -> Variant | None:
    """The variant an ft: name of this project stands for, or None."""
    parts = name.split(":")
    step = None
    if len(parts) > 5 and (m := CHECKPOINT.fullmatch(parts[-1])):
        step, parts = int(m.group(1)), parts[:-1]
    job_id = JOB_ID.fullmatch(parts[-1])
    if len(parts) < 5 or parts[0] != "ft" or job_id is None:
        return None
    job = (
        Job.objects.select_related("project", "base_model", "variant")
        .filter(project=project, kind="finetune", pk=int(job_id.group(1)), variant__isnull=False)
        .first()
    )
    if job is None or model_name(job) != ":".join(parts):
        return None
    if step is None:
        return job.variant
    entry = next((c for c in checkpoints(job) if c["step"] == step), None)
    if entry is None:
        return None
    return (
        Variant.objects.select_related("base_model", "prompt_version")
        .filter(pk=entry["variant"], project=project)
        .first()
    )


def entries(project: Project) -> list[dict[str, Any]]:
    """/v1/models entries for the project's fine-tuned models and their checkpoints."""
    out = []
    jobs = Job.objects.filter(project=project, kind="finetune", variant__isnull=False)
    for job in jobs.select_related("project", "base_model", "variant").order_by("pk"):
        for c in checkpoints(job) or [{"variant": job.variant_id, "model": model_name(job)}]:
            out.append({"id": c["model"], "variant": f"variant-{c['variant']}", "job": f"ftjob-{job.pk}"})
    return out
