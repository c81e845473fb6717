"""The request log page of a project: logged /v1 requests, filtered by alias,
and "capture" of the selected ones into a dataset version."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from serving.capture import capture, parse_ids
from serving.models import Alias, RequestLog
from workbench.actions import ActionError
from workbench.models import Dataset
from workbench.shortcuts import AuthedHttpRequest, get_project

PAGE_SIZE = 50


@login_required
def request_log(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    logs = RequestLog.objects.filter(project=project).select_related(
        "alias", "variant", "captured_into__dataset"
    )
    alias_name = request.GET.get("alias", "")
    if alias_name:
        logs = logs.filter(alias__name=alias_name)
    page = Paginator(logs, PAGE_SIZE).get_page(request.GET.get("page"))
    ctx = {
        "project": project,
        "page": page,
        "alias_name": alias_name,
        "aliases": Alias.objects.filter(project=project),
        "logging_aliases": Alias.objects.filter(project=project, log_requests=True),
        "datasets": Dataset.objects.filter(project=project),
        "nav_active": "serving_requests",
    }
    return render(request, "serving/request_log.html", ctx)


@login_required
@require_POST
def request_capture(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    dataset_id = request.POST.get("dataset", "").strip()
    try:
        ids = parse_ids(request.POST.getlist("log"), "Selected request")
        [dataset_pk] = parse_ids([dataset_id], "Dataset") if dataset_id else [None]
    except ActionError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    dataset = Dataset.objects.filter(project=project, pk=dataset_pk).first() if dataset_pk else None
    back = reverse("request_log", args=[project.slug])
    if dataset_pk and dataset is None:
        messages.error(request, "That dataset does not exist in this project.")
        return redirect(back)
    try:
        version = capture(
            project,
            request.user,
            ids,
            dataset=dataset,
            name=request.POST.get("name", ""),
            append=request.POST.get("append") == "on",
        )
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(back)
    messages.success(request, f"Captured {len(ids)} request(s) into {version} ({version.row_count} rows).")
    return redirect(version.get_absolute_url())
