from __future__ import annotations

import dataclasses
import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from engines.training import ConfigError, TrainConfig
from jobs import actions
from jobs.models import Job
from workbench.actions import ActionError
from workbench.models import BaseModel, DatasetVersion, PromptVersion, Variant
from workbench.views import get_project

TRAIN_HELP: dict[str, str] = {
    "rank": "LoRA rank r: size of the low-rank update. 8-32 is typical; higher learns more, costs more.",
    "alpha": "LoRA alpha: scales the update (alpha / r). Usually 2 x rank.",
    "dropout": "Dropout on the LoRA layers (0-0.1).",
    "target_modules": "Layers that get an adapter, comma-separated. Default: every attention and MLP projection.",
    "learning_rate": "Peak learning rate. LoRA wants ~1e-4 to 5e-4 (3e-4 works on SmolLM2).",
    "epochs": "Passes over the teacher answers.",
    "max_steps": "Stop after this many optimizer steps (overrides epochs; empty = use epochs).",
    "batch_size": "Examples per step. Lower it when memory runs out.",
    "grad_accum": "Steps to accumulate before an update: effective batch = batch x this.",
    "max_length": "Longest example in tokens; longer ones are truncated (answers first kept).",
    "warmup_ratio": "Share of steps spent warming up the learning rate.",
    "weight_decay": "L2 penalty on the adapter weights.",
    "lr_scheduler": "How the learning rate decays after warm-up: cosine or linear.",
    "seed": "Seed for shuffling and initialisation: same seed, same run.",
    "gradient_checkpointing": "Recompute activations in the backward pass: less memory, ~5-20% slower.",
    "group_by_length": "Batch examples of similar length: less padding, faster.",
    "save_steps": "Checkpoint every N steps; a crashed job resumes from the last one.",
    "save_total_limit": "Checkpoints kept on disk.",
    "logging_steps": "Record loss every N steps.",
    "kl_weight": "Token-level distillation: weight of KL(teacher || student) next to the cross-entropy. "
                 "0 = off. Costs a teacher forward pass (with the prompt) per step.",
    "kl_temperature": "Softmax temperature of the KL term.",
    "device": "auto picks CUDA (bf16), then MPS, then CPU (float32).",
    "bf16": "auto: bf16 on CUDA. true on a CPU with native bf16 (avx512_bf16/AMX) is ~1.5x faster.",
}
GEN_HELP = {
    "max_new_tokens": "Longest teacher answer in tokens; longer answers are cut and flagged.",
    "batch_size": "Queries generated together. The system prompt is encoded once and reused for every batch.",
    "temperature": "0 = greedy (deterministic). Above 0 samples.",
    "keep_existing": "Rows that already have an assistant answer keep it instead of asking the teacher.",
}


def train_fields(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    values = values or {}
    fields = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        value = values.get(f.name, default)
        kind = ("bool" if isinstance(default, bool) else "list" if isinstance(default, list)
                else "choice" if f.name in ("lr_scheduler", "device", "bf16") else "number")
        fields.append({"name": f.name, "value": ",".join(value) if isinstance(value, list) else value,
                       "kind": kind, "help": TRAIN_HELP.get(f.name, ""),
                       "choices": {"lr_scheduler": ["cosine", "linear"], "device": ["auto", "cpu", "cuda", "mps"],
                                   "bf16": ["auto", "true", "false"]}.get(f.name, [])})
    return fields


def parse_train_form(post: Any) -> dict[str, Any]:
    """Form strings -> typed TrainConfig values (validated by TrainConfig)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        raw = post.get(f"t_{f.name}")
        if isinstance(default, bool):
            out[f.name] = post.get(f"t_{f.name}") == "on"
        elif raw is None or raw == "":
            continue
        elif isinstance(default, list):
            out[f.name] = [x.strip() for x in raw.split(",") if x.strip()]
        elif f.name == "bf16":
            out[f.name] = {"true": True, "false": False}.get(raw, raw)
        elif isinstance(default, int) or f.name == "max_steps":
            out[f.name] = int(raw) if raw.lstrip("-").isdigit() else raw
        elif isinstance(default, float):
            try:
                out[f.name] = float(raw)
            except ValueError:
                out[f.name] = raw
        else:
            out[f.name] = raw
    return out


def _form_context(project: Any, **extra: Any) -> dict[str, Any]:
    prompts = PromptVersion.objects.filter(prompt__project=project).select_related("prompt")
    datasets = DatasetVersion.objects.filter(dataset__project=project).select_related("dataset")
    return {"project": project, "prompt_versions": prompts, "dataset_versions": datasets,
            "base_models": BaseModel.objects.all(), "train_fields": train_fields(extra.pop("train_values", None)),
            "gen_help": GEN_HELP, "gen": actions.GENERATION_DEFAULTS, **extra}


@login_required
def job_list(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    jobs = project.jobs.select_related("prompt_version__prompt", "dataset_version__dataset", "base_model",
                                       "variant", "output_dataset__dataset")[:100]
    ctx = _form_context(project, jobs=jobs, variants=project.variants.select_related("base_model")[:20],
                        preselect=request.GET.get("dataset_version", ""),
                        polling=any(j.status in Job.ACTIVE for j in jobs))
    if request.htmx and request.htmx.target == "job-table":
        return render(request, "jobs/job_list.html#job-table", ctx)
    return render(request, "jobs/job_list.html", ctx)


def _inputs(request: HttpRequest, project: Any) -> tuple[PromptVersion, DatasetVersion, BaseModel]:
    pv = get_object_or_404(PromptVersion, pk=request.POST.get("prompt_version"), prompt__project=project)
    dv = get_object_or_404(DatasetVersion, pk=request.POST.get("dataset_version"), dataset__project=project)
    bm = get_object_or_404(BaseModel, pk=request.POST.get("base_model"))
    return pv, dv, bm


@login_required
@require_POST
def absorb_start(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    mode = request.POST.get("mode", "absorb")
    training = parse_train_form(request.POST)
    try:
        pv, dv, bm = _inputs(request, project)
        if mode == "finetune":
            job = actions.start_finetune(project, request.user, pv, dv, bm, training)
            messages.success(request, f"{job} queued.")
            return redirect(job)
        generation = {
            "max_new_tokens": request.POST.get("g_max_new_tokens") or 256,
            "batch_size": request.POST.get("g_batch_size") or 8,
            "temperature": request.POST.get("g_temperature") or 0,
            "keep_existing": request.POST.get("g_keep_existing") == "on",
        }
        teacher, finetune = actions.start_absorb(project, request.user, pv, dv, bm, generation, training,
                                                 review_first=request.POST.get("review_first") == "on")
    except ConfigError as exc:
        ctx = _form_context(project, jobs=project.jobs.all()[:100], train_values=training,
                            config_errors=exc.errors, error="Fix the highlighted training settings.")
        return render(request, "jobs/job_list.html", ctx, status=400)
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect("job_list", slug)
    note = " Then review its answers and start the fine-tune." if finetune is None else \
        f" {finetune} starts when it finishes."
    messages.success(request, f"{teacher} queued.{note}")
    return redirect(teacher)


def _get_job(request: HttpRequest, slug: str, job_id: int) -> Job:
    project = get_project(request, slug)
    return get_object_or_404(Job.objects.select_related("project", "prompt_version__prompt", "base_model"),
                             pk=job_id, project=project)


@login_required
def job_detail(request: HttpRequest, slug: str, job_id: int) -> HttpResponse:
    job = _get_job(request, slug, job_id)
    ctx = {"project": job.project, "job": job, "history_json": json.dumps(job.history)}
    if request.htmx and request.htmx.target == "job-live":
        return render(request, "jobs/job_detail.html#live", ctx)
    return render(request, "jobs/job_detail.html", ctx)


@login_required
def job_status(request: HttpRequest, slug: str, job_id: int) -> JsonResponse:
    """Machine-readable state, for scripts and the loss chart."""
    job = _get_job(request, slug, job_id)
    return JsonResponse({"id": job.pk, "kind": job.kind, "status": job.status, "attempts": job.attempts,
                         "progress": job.progress, "history": job.history, "error": job.error,
                         "variant": job.variant_id, "output_dataset": job.output_dataset_id})


@login_required
@require_POST
def job_cancel(request: HttpRequest, slug: str, job_id: int) -> HttpResponse:
    job = _get_job(request, slug, job_id)
    actions.cancel_job(job)
    messages.info(request, f"{job}: cancel requested." if job.status == Job.RUNNING else f"{job} cancelled.")
    return redirect(job)


@login_required
def variant_detail(request: HttpRequest, slug: str, variant_id: int) -> HttpResponse:
    project = get_project(request, slug)
    variant = get_object_or_404(Variant.objects.select_related("base_model", "prompt_version__prompt",
                                                               "dataset_version__dataset"),
                                pk=variant_id, project=project)
    return render(request, "jobs/variant_detail.html", {"project": project, "variant": variant,
                                                         "jobs": variant.jobs.all()})
