"""Base models, workers and the health check."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRefresh

from workbench.actions import ActionError
from workbench.actions.models import send_ping
from workbench.models import FoundationModel, WorkerHeartbeat, WorkerPing
from workbench.shortcuts import AuthedHttpRequest, current_project


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@login_required
def models_page(request: AuthedHttpRequest) -> HttpResponse:
    ctx = {
        "project": current_project(request),  # keeps the project nav of the project the user came from
        "base_models": FoundationModel.objects.all(),
        "workers": WorkerHeartbeat.objects.all(),
        "pings": WorkerPing.objects.order_by("-created_at")[:5],
    }
    if request.htmx and request.GET.get("fragment") == "workers":
        return render(request, "workbench/models.html#workers", ctx)
    return render(request, "workbench/models.html", ctx)


@login_required
@require_POST
def ping_workers(request: AuthedHttpRequest) -> HttpResponse:
    try:
        send_ping(request.POST.get("queue", "default"))
    except ActionError as exc:
        messages.error(request, str(exc))
    if request.htmx:
        return HttpResponseClientRefresh()
    return redirect("models")


@login_required
def ping_status(request: AuthedHttpRequest, ping_id: int) -> HttpResponse:
    ping = get_object_or_404(WorkerPing, pk=ping_id)
    return render(request, "workbench/models.html#ping", {"ping": ping})
