"""Training curves: the loss, validation loss and learning rate of a
fine-tune from its stored points, and the curves of several fine-tunes of
a project on one chart."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render

from jobs.models import Job, JobPoint
from workbench.models import Project
from workbench.shortcuts import AuthedHttpRequest, get_project

MAX_JOBS = 8
# The point key of each series; the trainer stores the learning rate as "lr".
SERIES = {"loss": ("loss",), "valid_loss": ("valid_loss",), "lr": ("lr", "learning_rate")}


def series(points: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each curve, oldest first. A resumed attempt logs
    again from its checkpoint's step: its points replace the later ones the
    failed attempt had logged, so each curve goes forward in steps."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in SERIES}
    for p in points:
        step = p.get("step")
        if not isinstance(step, int):
            continue
        for name, keys in SERIES.items():
            value = next((p[k] for k in keys if isinstance(p.get(k), (int, float))), None)
            if value is None:
                continue
            curve = out[name]
            while curve and curve[-1][0] >= step:
                curve.pop()
            curve.append((step, float(value)))
    return out


class CurvesForm(forms.Form):
    job = forms.ModelMultipleChoiceField(
        queryset=Job.objects.none(),
        required=False,
        label="Fine-tunes",
        error_messages={
            "invalid_choice": "Job %(value)s is not a fine-tune of this project.",
            "invalid_pk_value": "“%(pk)s” is not a job number.",
        },
    )

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["job"]
        assert isinstance(field, forms.ModelMultipleChoiceField)
        self.jobs = (
            Job.objects.filter(project=project, kind="finetune")
            .select_related("variant")
            .only("pk", "kind", "status", "created_at", "variant__name", "project_id")
        )
        field.queryset = self.jobs

    def clean_job(self) -> list[Job]:
        jobs = sorted(self.cleaned_data["job"], key=lambda j: j.pk)
        if len(jobs) > MAX_JOBS:
            raise forms.ValidationError(f"Pick at most {MAX_JOBS} fine-tunes ({len(jobs)} picked).")
        return jobs


def curve_name(job: Job) -> str:
    return f"#{job.pk} {job.variant.name}" if job.variant_id and job.variant else f"fine-tune #{job.pk}"


@login_required
def curves(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """?job=1&job=2: the loss curves of those fine-tunes of the project on
    one chart (validation loss as dots, learning rates on a second chart)."""
    project = get_project(request, slug)
    form = CurvesForm(project, request.GET)
    ctx: dict[str, Any] = {
        "project": project,
        "form": form,
        "max_jobs": MAX_JOBS,
        "choices": list(form.jobs),
        "picked": set(request.GET.getlist("job")),
    }
    if not form.is_valid():
        return render(request, "jobs/curves.html", ctx, status=400)
    jobs: list[Job] = form.cleaned_data["job"]
    by_job: dict[int, list[dict[str, Any]]] = {j.pk: [] for j in jobs}
    for job_id, data in (
        JobPoint.objects.filter(job__in=jobs).order_by("job", "seq").values_list("job_id", "data")
    ):
        if isinstance(data, dict):
            by_job[job_id].append(data)
    chart = [{"job": j.pk, "name": curve_name(j), **series(by_job[j.pk])} for j in jobs]
    ctx.update(
        {
            "jobs": jobs,
            "chart": json.dumps(chart).replace("<", "\\u003c"),
        }
    )
    return render(request, "jobs/curves.html", ctx)
