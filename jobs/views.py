from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from jobs import actions
from jobs.actions import AlreadyStarted
from jobs.forms import (
    DATA_ERRORS,
    AbsorbForm,
    PresetForm,
    SynthesisForm,
    TeacherEndpointForm,
    initial_from_job,
    preset_initial,
    preset_values,
)
from jobs.models import AbsorbPreset, Job, JobPoint, TeacherEndpoint
from workbench.actions import ActionError
from workbench.forms import with_form_token
from workbench.models import Project, Variant
from workbench.shortcuts import AuthedHttpRequest, get_project


def _list_context(
    project: Project, form: AbsorbForm, preset_form: PresetForm | None = None, loaded: str = ""
) -> dict[str, Any]:
    # Eval runs and comparisons point at their job from the evals app: followed by name, not imported.
    jobs = project.jobs.select_related(
        "prompt_version__prompt",
        "dataset_version__dataset",
        "base_model",
        "variant",
        "output_dataset__dataset",
    ).prefetch_related(
        "eval_runs__project",
        "eval_runs__suite__project",
        "eval_runs__variant",
        "eval_runs__base_model",
        "eval_runs__prompt_version__prompt",
        "comparisons__variant",
        "comparisons__project",
    )[:100]
    return {
        "project": project,
        "form": form,
        "jobs": jobs,
        "variants": project.variants.select_related("base_model", "prompt_version__prompt")[:20],
        "polling": any(j.status in Job.ACTIVE for j in jobs),
        "presets": AbsorbPreset.objects.filter(project=project),
        "preset_form": preset_form or PresetForm(),
        "loaded": loaded,
    }


def _id(raw: str) -> int:
    """A row id from a query string; anything else (or too long for the database) finds nothing."""
    return int(raw) if raw.isdigit() and len(raw) < 10 else 0


@login_required
def job_list(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    preselect = request.GET.get("dataset_version", "")
    initial = {"dataset_version": preselect, "mode": "finetune"} if preselect else {}
    if request.GET.get("prompt_version"):
        # Re-absorbing a stale variant: its new prompt needs new teacher answers.
        initial.update(
            {k: v for k in ("prompt_version", "base_model") if (v := request.GET.get(k))}, mode="absorb"
        )
    loaded = ""
    preset_id, job_id = request.GET.get("preset", ""), request.GET.get("from_job", "")
    if preset_id:
        preset = get_object_or_404(AbsorbPreset, pk=_id(preset_id), project=project)
        initial = preset_initial(preset, AbsorbForm(project))
        loaded = f"Preset “{preset.name}” loaded: choose the prompt and the data, check, then start."
    elif job_id:
        source = get_object_or_404(Job, pk=_id(job_id), project=project, kind__in=("teacher", "finetune"))
        initial = initial_from_job(source)
        loaded = f"The settings of {source} are loaded: change what you want, then start again."
    form = AbsorbForm(project, initial=with_form_token(initial))
    ctx = _list_context(project, form, loaded=loaded)
    if request.htmx and request.htmx.target == "job-table":
        return render(request, "jobs/job_list.html#job-table", ctx)
    return render(request, "jobs/job_list.html", ctx)


@login_required
@require_POST
def absorb_start(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    form = AbsorbForm(project, request.POST)
    if not form.is_valid():
        return render(request, "jobs/job_list.html", _list_context(project, form), status=400)
    data = form.cleaned_data
    token = data.get("form_token")
    try:
        if data["mode"] == "finetune":
            job = actions.start_finetune(
                project,
                request.user,
                data["prompt_version"],
                data["dataset_version"],
                data["base_model"],
                form.training,
                passing_only=data["passing_only"],
                form_token=token,
                evaluation=form.evaluation,
            )
            messages.success(request, f"{job} queued.")
            return redirect(job)
        teacher, finetune = actions.start_absorb(
            project,
            request.user,
            data["prompt_version"],
            data["dataset_version"],
            data["base_model"],
            form.generation,
            form.training,
            keep_existing=data["keep_existing"],
            review_first=data["review_first"],
            teacher_model=data.get("teacher_model"),
            evaluation=form.evaluation,
            teacher_endpoint=data.get("teacher_endpoint"),
            curation=form.curation,
            passing_only=data["passing_only"],
            form_token=token,
            data_check=form.data_check,
            synthesis=form.synthesis,
        )
    except AlreadyStarted as exc:
        messages.info(request, f"{exc} Nothing new was queued.")
        return redirect(exc.job)
    except ActionError as exc:
        form.add_error(None, str(exc))
        return render(request, "jobs/job_list.html", _list_context(project, form), status=400)
    note = (
        " Then review its answers and start the fine-tune."
        if finetune is None
        else f" {finetune} starts when it finishes."
    )
    first = teacher.depends_on
    if first is not None:
        messages.success(request, f"{first} queued; {teacher} answers its questions and the data's.{note}")
        return redirect(first)
    messages.success(request, f"{teacher} queued.{note}")
    return redirect(teacher)


@login_required
@require_POST
def preset_save(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """Save the absorb form's settings as a named preset of the project: the
    form validates them (its checks of the chosen data aside)."""
    project = get_project(request, slug)
    form = AbsorbForm(project, request.POST)
    preset_form = PresetForm(request.POST)
    form.is_valid()
    settings_ok = all(name in DATA_ERRORS for name in form.errors)
    if not preset_form.is_valid() or not settings_ok:
        if not settings_ok:
            form.add_error(None, "The preset was not saved: fix the highlighted settings first.")
        return render(
            request, "jobs/job_list.html", _list_context(project, form, preset_form=preset_form), status=400
        )
    preset = actions.save_preset(
        project, request.user, preset_form.cleaned_data["preset_name"], preset_values(form)
    )
    messages.success(request, f"Preset “{preset.name}” saved.")
    return redirect(f"{reverse('job_list', args=[project.slug])}?preset={preset.pk}")


@login_required
@require_POST
def preset_delete(request: AuthedHttpRequest, slug: str, preset_id: int) -> HttpResponse:
    project = get_project(request, slug)
    preset = get_object_or_404(AbsorbPreset, pk=preset_id, project=project)
    actions.delete_preset(preset)
    messages.success(request, f"Preset “{preset.name}” deleted.")
    return redirect("job_list", slug=project.slug)


@login_required
def synthesize(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """GET: the form (the dataset and prompt versions preselected from ?dataset_version, ?prompt_version);
    POST: queue a synthesis job and go to it."""
    project = get_project(request, slug)
    if request.method != "POST":
        initial = {k: request.GET.get(k, "") for k in ("dataset_version", "prompt_version")}
        form = SynthesisForm(project, initial=with_form_token(initial))
        return render(request, "jobs/synthesize.html", {"project": project, "form": form})
    form = SynthesisForm(project, request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            job = actions.start_synthesis(
                project,
                request.user,
                data["prompt_version"],
                data["dataset_version"],
                data["base_model"],
                data["count"],
                form_token=data.get("form_token"),
            )
        except AlreadyStarted as exc:
            messages.info(request, f"{exc} Nothing new was queued.")
            return redirect(exc.job)
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"{job} queued: its queries are added to a new version for review.")
            return redirect(job)
    return render(request, "jobs/synthesize.html", {"project": project, "form": form}, status=400)


def _get_job(request: HttpRequest, slug: str, job_id: int) -> Job:
    project = get_project(request, slug)
    return get_object_or_404(
        Job.objects.select_related("project", "prompt_version__prompt", "base_model"),
        pk=job_id,
        project=project,
    )


def _after(request: HttpRequest) -> int:
    raw = request.GET.get("after", "0")
    return int(raw) if raw.isdigit() else 0


@login_required
def job_detail(request: AuthedHttpRequest, slug: str, job_id: int) -> HttpResponse:
    """The job page; its htmx poll sends `after` (the last point it has) and
    gets back the live fragment with only the newer curve points."""
    job = _get_job(request, slug, job_id)
    live = bool(request.htmx and request.htmx.target == "job-live")
    points = JobPoint.after(job, _after(request) if live else 0)
    last_seq = points[-1]["seq"] if points else _after(request) if live else 0
    # The points go inside a <script> element: no "<" may end it early.
    ctx = {
        "project": job.project,
        "job": job,
        "points_json": json.dumps(points).replace("<", "\\u003c"),
        "last_seq": last_seq,
        "dependents": job.dependents.all(),
    }
    if live:
        return render(request, "jobs/job_detail.html#live", ctx)
    return render(request, "jobs/job_detail.html", ctx)


@login_required
def job_status(request: AuthedHttpRequest, slug: str, job_id: int) -> JsonResponse:
    """Machine-readable state, for scripts; `?after=N` returns only newer curve points."""
    job = _get_job(request, slug, job_id)
    return JsonResponse(
        {
            "id": job.pk,
            "kind": job.kind,
            "status": job.status,
            "attempts": job.attempts,
            "progress": job.progress,
            "points": JobPoint.after(job, _after(request)),
            "error": job.error,
            "variant": job.variant_id,
            "output_dataset": job.output_dataset_id,
        }
    )


@login_required
@require_POST
def job_cancel(request: AuthedHttpRequest, slug: str, job_id: int) -> HttpResponse:
    job = _get_job(request, slug, job_id)
    if not actions.cancel_job(job):
        messages.info(request, f"{job} already {job.status}; nothing to cancel.")
    else:
        messages.info(
            request, f"{job}: cancel requested." if job.status == Job.RUNNING else f"{job} cancelled."
        )
    return redirect(job)


@login_required
@require_POST
def job_retry(request: AuthedHttpRequest, slug: str, job_id: int) -> HttpResponse:
    job = _get_job(request, slug, job_id)
    try:
        again = actions.retry_job(job, request.user)
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(job)
    messages.success(request, f"{again} queued: a retry of {job}.")
    return redirect(again)


def _endpoints_page(
    request: HttpRequest, project: Project, form: TeacherEndpointForm, status: int = 200
) -> HttpResponse:
    endpoints = TeacherEndpoint.objects.filter(project=project).select_related("created_by")
    ctx = {"project": project, "form": form, "endpoints": endpoints}
    return render(request, "jobs/teacher_endpoints.html", ctx, status=status)


@login_required
def teacher_endpoints(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """GET: the project's teacher endpoints and a form; POST: a new one."""
    project = get_project(request, slug)
    if request.method != "POST":
        return _endpoints_page(request, project, TeacherEndpointForm(project, initial=with_form_token()))
    form = TeacherEndpointForm(project, request.POST)
    if not form.is_valid():
        return _endpoints_page(request, project, form, status=400)
    fields = {k: v for k, v in form.cleaned_data.items() if k != "form_token"}
    try:
        endpoint = actions.create_teacher_endpoint(project, request.user, **fields)
    except ValidationError as exc:  # a race on the name, past the form's check
        form.add_error(None, exc)
        return _endpoints_page(request, project, form, status=400)
    messages.success(request, f"Teacher endpoint {endpoint.name} added.")
    return redirect("teacher_endpoints", slug=project.slug)


@login_required
@require_POST
def teacher_endpoint_delete(request: AuthedHttpRequest, slug: str, endpoint_id: int) -> HttpResponse:
    project = get_project(request, slug)
    endpoint = get_object_or_404(TeacherEndpoint, pk=endpoint_id, project=project)
    try:
        actions.delete_teacher_endpoint(endpoint)
    except ActionError as exc:
        messages.error(request, str(exc))
        return _endpoints_page(request, project, TeacherEndpointForm(project, initial=with_form_token()), 409)
    messages.success(request, f"Teacher endpoint {endpoint.name} deleted.")
    return redirect("teacher_endpoints", slug=project.slug)


@login_required
def variant_detail(request: AuthedHttpRequest, slug: str, variant_id: int) -> HttpResponse:
    project = get_project(request, slug)
    variant = get_object_or_404(
        Variant.objects.select_related("base_model", "prompt_version__prompt", "dataset_version__dataset"),
        pk=variant_id,
        project=project,
    )
    adapter = Path(variant.adapter_path) if variant.adapter_path else None
    files = (
        [{"name": f.name, "size": f.stat().st_size} for f in sorted(adapter.iterdir()) if f.is_file()]
        if adapter and adapter.is_dir()
        else []
    )
    return render(
        request,
        "jobs/variant_detail.html",
        {
            "project": project,
            "variant": variant,
            "jobs": variant.jobs.all(),
            "adapter_files": files,
            # Reverse relations from the evals app, followed by name (jobs does not import evals).
            "comparisons": variant.comparisons.select_related("suite__project", "job__project", "project"),
            "eval_runs": variant.eval_runs.select_related(
                "suite__project", "job__project", "project", "variant", "base_model", "prompt_version__prompt"
            ),
        },
    )
