from __future__ import annotations

from django.core.management.base import CommandError

from workbench.models import Project


def project_by_slug(slug: str) -> Project:
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        known = ", ".join(Project.objects.values_list("slug", flat=True)[:20]) or "none"
        raise CommandError(f"No project '{slug}' (projects: {known}).")
    return project
