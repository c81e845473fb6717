from __future__ import annotations

from django.core.management.base import CommandError

from workbench.models import Dataset, DatasetVersion, FoundationModel, Project


def project_by_slug(slug: str) -> Project:
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        known = ", ".join(Project.objects.values_list("slug", flat=True)[:20]) or "none"
        raise CommandError(f"No project '{slug}' (projects: {known}).")
    return project


def dataset_version_by_ref(project: Project, ref: str) -> DatasetVersion:
    """A dataset version named NAME (its latest) or NAME@N."""
    name, _, number = ref.partition("@")
    dataset = Dataset.objects.filter(project=project, name=name).first()
    version = (
        (dataset.versions.filter(number=int(number)).first() if number.isdigit() else dataset.latest)
        if dataset
        else None
    )
    if version is None:
        raise CommandError(f"No dataset '{ref}' in project {project.slug}.")
    return version


def base_model_by_name(name: str | None) -> FoundationModel:
    """The registered model called `name`, or the default one when None."""
    base = (
        FoundationModel.objects.filter(name=name).first()
        if name
        else FoundationModel.objects.filter(is_default=True).first()
    )
    if base is None:
        raise CommandError("No such base model; run `python manage.py provision_model` first.")
    return base
