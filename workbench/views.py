from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRefresh

from workbench import actions
from workbench.models import BaseModel, Membership, Project, WorkerHeartbeat, WorkerPing


def get_project(request: HttpRequest, slug: str) -> Project:
    """The one way views find a project: 404 unless the user is a member."""
    return get_object_or_404(Project.objects.for_user(request.user), slug=slug)


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@login_required
def project_list(request: HttpRequest) -> HttpResponse:
    projects = Project.objects.for_user(request.user).prefetch_related("memberships__user")
    return render(request, "workbench/project_list.html", {"projects": projects})


@login_required
@require_POST
def project_create(request: HttpRequest) -> HttpResponse:
    try:
        project = actions.create_project(
            request.user, request.POST.get("name", ""), request.POST.get("description", "")
        )
    except actions.ActionError as exc:
        messages.error(request, str(exc))
        return redirect("project_list")
    messages.success(request, f"Project “{project.name}” created.")
    return redirect(project)


@login_required
def project_detail(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    ctx = {
        "project": project,
        "memberships": project.memberships.select_related("user"),
        "is_owner": project.role_of(request.user) == Membership.OWNER,
        "roles": Membership.ROLES,
    }
    return render(request, "workbench/project_detail.html", ctx)


@login_required
@require_POST
def member_add(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    try:
        m = actions.add_member(
            project, request.user, request.POST.get("username", ""), request.POST.get("role", "member")
        )
        messages.success(request, f"{m.user} added as {m.get_role_display().lower()}.")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect(project)


@login_required
@require_POST
def member_remove(request: HttpRequest, slug: str, membership_id: int) -> HttpResponse:
    project = get_project(request, slug)
    try:
        actions.remove_member(project, request.user, membership_id)
        messages.success(request, "Member removed.")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect(project)


@login_required
def models_page(request: HttpRequest) -> HttpResponse:
    ctx = {
        "base_models": BaseModel.objects.all(),
        "workers": WorkerHeartbeat.objects.all(),
        "pings": WorkerPing.objects.order_by("-created_at")[:5],
    }
    if request.htmx and request.GET.get("fragment") == "workers":
        return render(request, "workbench/models.html#workers", ctx)
    return render(request, "workbench/models.html", ctx)


@login_required
@require_POST
def ping_workers(request: HttpRequest) -> HttpResponse:
    try:
        actions.send_ping(request.POST.get("queue", "default"))
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    if request.htmx:
        return HttpResponseClientRefresh()
    return redirect("models")


@login_required
def ping_status(request: HttpRequest, ping_id: int) -> HttpResponse:
    ping = get_object_or_404(WorkerPing, pk=ping_id)
    return render(request, "workbench/models.html#ping", {"ping": ping})
