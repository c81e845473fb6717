"""The spec page: paste (or upload) a spec, see its plan, run it; and each
run's page, which follows it to its end. The same spec `manage.py apply`
takes, naming the project's versions instead of files."""

from __future__ import annotations

from typing import Any

import yaml
from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from jobs.models import Job
from serving.models import SpecRun
from serving.pipeline.background import MAX_CHARS, problems_of, read, shown, start
from serving.pipeline.export import absorb_of, export_spec
from serving.pipeline.plan import PlanError
from workbench.models import DatasetVersion, Project, PromptVersion
from workbench.pipeline import SpecError, build_schema
from workbench.shortcuts import AuthedHttpRequest, get_for_project, get_project


class SpecForm(forms.Form):
    text = forms.CharField(
        label="Spec (YAML)",
        required=False,
        max_length=MAX_CHARS,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 26, "spellcheck": "false", "class": "mono"}),
    )
    upload = forms.FileField(label="or upload a spec file", required=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        upload = data.get("upload")
        if upload is not None:
            raw = upload.read(MAX_CHARS * 4 + 1)
            if len(raw) > MAX_CHARS * 4:
                raise forms.ValidationError(f"The spec file is larger than {MAX_CHARS:,} characters.")
            try:
                data["text"] = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line = raw.count(b"\n", 0, exc.start) + 1
                raise forms.ValidationError(f"The spec file is not UTF-8 text (line {line}).") from None
        return data


def starter(project: Project) -> str:
    """A spec to start from: the project's latest prompt and dataset, by version."""
    prompt = PromptVersion.objects.filter(prompt__project=project).order_by("-created_at", "-pk").first()
    data = (
        DatasetVersion.objects.filter(dataset__project=project, state=DatasetVersion.READY)
        .order_by("-created_at", "-pk")
        .first()
    )
    spec = {
        "version": 1,
        "project": project.slug,
        "prompt": {"ref": str(prompt) if prompt else "PROMPT@1"},
        "data": {"train": {"version": str(data) if data else "DATASET@1"}},
        "promote": {"alias": "staging"},
    }
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def _initial(request: AuthedHttpRequest, project: Project) -> tuple[str, str]:
    """The text the page opens with, and where it came from."""
    if job_id := request.GET.get("from", "").strip():
        job = get_for_project(request, project.slug, Job.objects.all(), pk=_int(job_id))
        try:
            return export_spec(project, absorb_of(project, job=job)), f"exported from {job}"
        except PlanError as exc:
            return starter(project), f"{job} cannot be exported: {exc}"
    if run_id := request.GET.get("run", "").strip():
        run = get_for_project(request, project.slug, SpecRun.objects.all(), pk=_int(run_id))
        return run.text, f"the spec of {run}"
    return starter(project), "a start: the project's latest prompt and dataset"


def _int(value: str) -> int:
    return int(value) if value.isdigit() else 0  # 0 matches nothing: a 404


@login_required
def spec_page(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    runs = SpecRun.objects.filter(project=project).select_related("created_by", "waiting_on")[:20]
    ctx: dict = {"project": project, "runs": runs, "max_chars": MAX_CHARS}
    if request.method != "POST":
        text, source = _initial(request, project)
        ctx.update(form=SpecForm(initial={"text": text}), source=source)
        return render(request, "serving/specs.html", ctx)
    form = SpecForm(request.POST, request.FILES)
    ctx["form"] = form
    if not form.is_valid():
        ctx["problems"] = [e for errs in form.errors.values() for e in errs]
        return render(request, _template(request), ctx, status=400)
    text = form.cleaned_data["text"]
    try:
        if request.POST.get("action") == "run":
            run = start(project, request.user, text)
            return redirect("serving_spec_run", slug=project.slug, run_id=run.pk)
        spec, plan = read(project, text)
    except (SpecError, PlanError) as exc:
        ctx["problems"] = problems_of(exc)
        return render(request, _template(request), ctx, status=400)
    ctx["plan"] = shown(spec, plan)
    return render(request, _template(request), ctx)


def _template(request: AuthedHttpRequest) -> str:
    return "serving/_spec_plan.html" if request.headers.get("HX-Request") else "serving/specs.html"


@login_required
def spec_run(request: AuthedHttpRequest, slug: str, run_id: int) -> HttpResponse:
    run = get_for_project(
        request, slug, SpecRun.objects.select_related("project", "created_by", "waiting_on"), pk=run_id
    )
    ctx = {"project": run.project, "run": run}
    if request.headers.get("HX-Request"):
        return render(request, "serving/_spec_run.html", ctx)
    return render(request, "serving/spec_run.html", ctx)


@login_required
@require_POST
def spec_run_advance(request: AuthedHttpRequest, slug: str, run_id: int) -> HttpResponse:
    """Check again: the worker applies the run's spec once more (as a finished job of it would).
    Sent, not done here: an advance may wait up to a minute for a fine-tune's own comparison."""
    from serving.tasks import advance_spec_run  # the task module imports this package

    run = get_for_project(request, slug, SpecRun.objects.all(), pk=run_id)
    if run.is_running:
        advance_spec_run.delay(run.pk)
        messages.info(request, "Sent: the worker applies the spec again now; this page follows it.")
    return redirect("serving_spec_run", slug=slug, run_id=run.pk)


@login_required
def spec_schema(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    get_project(request, slug)
    response = JsonResponse(build_schema(), json_dumps_params={"indent": 2, "ensure_ascii": False})
    response["Content-Disposition"] = 'inline; filename="spec.schema.json"'
    return response
