"""How views find what they show: every project-scoped object is looked up
through the projects the user is a member of, so a non-member gets a 404."""

from __future__ import annotations

from typing import Any, TypeVar

from django.contrib.auth.models import User
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from django_htmx.middleware import HtmxDetails

from workbench.models import Project

M = TypeVar("M", bound=Model)


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


class AuthedHttpRequest(HtmxHttpRequest):
    """The request of a @login_required page: its user is signed in, never anonymous."""

    user: User


LAST_PROJECT = "workbench_last_project"


def get_project(request: HttpRequest, slug: str) -> Project:
    """The one way views find a project: 404 unless the user is a member.
    The project is remembered in the session, so pages outside any project
    (Models & serving) keep the project nav of the one the user came from."""
    project = get_object_or_404(Project.objects.for_user(request.user), slug=slug)
    session = getattr(request, "session", None)  # none on an API request
    if session is not None and session.get(LAST_PROJECT) != project.slug:
        session[LAST_PROJECT] = project.slug
    return project


def current_project(request: HttpRequest) -> Project | None:
    """The project a page outside any project belongs with: ?project=SLUG,
    else the last project the user opened; None when neither is (still) theirs."""
    session = getattr(request, "session", None)
    slug = request.GET.get("project") or (session.get(LAST_PROJECT) if session is not None else None)
    if not slug:
        return None
    return Project.objects.for_user(request.user).filter(slug=slug).first()


def get_for_project(
    request: HttpRequest, slug: str, queryset: QuerySet[M], project_field: str = "project", **lookup: Any
) -> M:
    """An object of the member's project `slug`: 404 unless it belongs to that
    project (through `project_field`, e.g. "dataset__project" for a version)."""
    project = get_project(request, slug)
    return get_object_or_404(queryset, **{project_field: project}, **lookup)
