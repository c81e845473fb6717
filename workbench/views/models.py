"""Base models, workers and the health check."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRefresh

from workbench.actions import ActionError
from workbench.actions.models import register_base_model, send_ping
from workbench.model_forms import ModelDirectoryForm
from workbench.models import FoundationModel, WorkerHeartbeat, WorkerPing
from workbench.shortcuts import AuthedHttpRequest, current_project


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


def _page(
    request: AuthedHttpRequest, form: ModelDirectoryForm | None = None, status: int = 200, refused: str = ""
) -> HttpResponse:
    ctx = {
        "project": current_project(request),  # keeps the project nav of the project the user came from
        "base_models": FoundationModel.objects.all(),
        "workers": WorkerHeartbeat.objects.all(),
        "pings": WorkerPing.objects.order_by("-created_at")[:5],
        # Base models are shared by every project: only an administrator (staff) adds one.
        "can_register": request.user.is_staff,
        "register_form": form or ModelDirectoryForm(),
        "refused": refused,
    }
    if request.htmx and request.GET.get("fragment") == "workers":
        return render(request, "workbench/models.html#workers", ctx)
    return render(request, "workbench/models.html", ctx, status=status)


@login_required
def models_page(request: AuthedHttpRequest) -> HttpResponse:
    return _page(request)


@login_required
@require_POST
def model_register(request: AuthedHttpRequest) -> HttpResponse:
    """An administrator registers a model folder on the server as a base model."""
    if not request.user.is_staff:
        why = "Only an administrator can register a base model: every project shares them."
        return _page(request, status=403, refused=why)
    form = ModelDirectoryForm(request.POST)
    if form.is_valid():
        d = form.cleaned_data
        try:
            model = register_base_model(
                d["name"], d["path"], f"registered by {request.user.username}", default=d["default"]
            )
        except ActionError as exc:
            form.add_error("path", str(exc))
        else:
            messages.success(request, f"Base model “{model.name}” registered: every project can use it now.")
            return redirect("models")
    return _page(request, form, status=400)


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
