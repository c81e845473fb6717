from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from workbench.actions import ActionError
from workbench.actions.projects import add_member, create_project, remove_member
from workbench.forms import MemberForm, ProjectForm
from workbench.models import Membership, Project
from workbench.shortcuts import AuthedHttpRequest, get_project


def _list_page(request: HttpRequest, form: ProjectForm, status: int = 200) -> HttpResponse:
    projects = Project.objects.for_user(request.user).prefetch_related("memberships__user")
    return render(request, "workbench/project_list.html", {"projects": projects, "form": form}, status=status)


@login_required
def project_list(request: AuthedHttpRequest) -> HttpResponse:
    return _list_page(request, ProjectForm())


@login_required
@require_POST
def project_create(request: AuthedHttpRequest) -> HttpResponse:
    form = ProjectForm(request.POST)
    if form.is_valid():
        try:
            project = create_project(
                request.user, form.cleaned_data["name"], form.cleaned_data["description"]
            )
        except ActionError as exc:  # every refusal is about the name
            form.add_error("name", str(exc))
        else:
            messages.success(request, f"Project “{project.name}” created.")
            return redirect(project)
    return _list_page(request, form, status=400)


def _detail_page(
    request: AuthedHttpRequest, project: Project, form: MemberForm, status: int = 200
) -> HttpResponse:
    ctx = {
        "project": project,
        "memberships": project.memberships.select_related("user"),
        "is_owner": project.role_of(request.user) == Membership.OWNER,
        "roles": Membership.ROLES,
        "form": form,
        # A base model served as it is (or with a prompt) is a variant too, but not a fine-tuned one.
        "finetuned": project.variants.exclude(adapter_path="").count(),
    }
    return render(request, "workbench/project_detail.html", ctx, status=status)


@login_required
def project_detail(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    return _detail_page(request, get_project(request, slug), MemberForm())


@login_required
@require_POST
def member_add(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    form = MemberForm(request.POST)
    if form.is_valid():
        try:
            m = add_member(project, request.user, form.cleaned_data["username"], form.cleaned_data["role"])
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"{m.user} added as {m.get_role_display().lower()}.")
            return redirect(project)
    return _detail_page(request, project, form, status=400)


@login_required
@require_POST
def member_remove(request: AuthedHttpRequest, slug: str, membership_id: int) -> HttpResponse:
    project = get_project(request, slug)
    try:
        revoked = remove_member(project, request.user, membership_id)
    except ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Member removed.")
        for note in revoked:
            messages.warning(request, note)
    return redirect(project)
