from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import CommandError

from serving.models import Alias
from workbench.models import Project, Variant


def alias_by_name(project: Project, name: str) -> Alias:
    alias = Alias.objects.filter(project=project, name=name).select_related("project", "variant").first()
    if alias is None:
        known = ", ".join(project.aliases.values_list("name", flat=True)) or "none"
        raise CommandError(f"No alias '{name}' in project {project.slug} (aliases: {known}).")
    return alias


def variant_by_id(project: Project, variant_id: int) -> Variant:
    variant = project.variants.filter(pk=variant_id).select_related("base_model").first()
    if variant is None:
        raise CommandError(
            f"No variant {variant_id} in project {project.slug} (list_variants --project "
            f"{project.slug} shows them)."
        )
    return variant


def user_by_name(username: str | None) -> User | None:
    if not username:
        return None
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"No user '{username}'.")
    return user
