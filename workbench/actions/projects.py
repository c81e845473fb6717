"""Projects and their members."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from workbench.actions import ActionError
from workbench.models import Membership, Project
from workbench.signals import member_removed


def _name_taken(name: str) -> ActionError | None:
    existing = Project.objects.filter(name__iexact=name).first()
    if existing is None:
        return None
    return ActionError(
        f"A project named “{existing.name}” already exists (names are unique, ignoring case); "
        "choose another name."
    )


@transaction.atomic
def create_project(user: User, name: str, description: str = "") -> Project:
    """A new project, its creator its owner. Names are unique, ignoring case."""
    name = name.strip()
    if not name:
        raise ActionError("A project needs a name.")
    if taken := _name_taken(name):
        raise taken
    try:
        with transaction.atomic():  # a savepoint: the same name created at the same moment
            project = Project.objects.create(
                name=name, slug=Project.unique_slug(name), description=description, created_by=user
            )
    except IntegrityError as exc:
        if taken := _name_taken(name):
            raise taken from exc
        raise
    Membership.objects.create(project=project, user=user, role=Membership.OWNER)
    return project


@transaction.atomic
def add_member(project: Project, actor: User, username: str, role: str) -> Membership:
    if project.role_of(actor) != Membership.OWNER:
        raise ActionError("Only an owner can add members.")
    if role not in dict(Membership.ROLES):
        raise ActionError(f"Unknown role '{role}'.")
    user = get_user_model().objects.filter(username=username.strip()).first()
    if user is None:
        raise ActionError(f"No user named '{username}'.")
    membership, created = Membership.objects.get_or_create(
        project=project, user=user, defaults={"role": role}
    )
    if not created:
        raise ActionError(f"{username} is already a member.")
    return membership


@transaction.atomic
def remove_member(project: Project, actor: User, membership_id: int) -> list[str]:
    """Remove the member; what they held in the project through the apps
    above (their API keys) goes with them. Returns what those apps report
    they revoked, for the owner."""
    if project.role_of(actor) != Membership.OWNER:
        raise ActionError("Only an owner can remove members.")
    membership = project.memberships.filter(pk=membership_id).first()
    if membership is None:
        raise ActionError("No such member.")
    owners = project.memberships.filter(role=Membership.OWNER)
    if membership.role == Membership.OWNER and owners.count() == 1:
        raise ActionError("A project keeps at least one owner.")
    user = membership.user
    membership.delete()
    replies = member_removed.send(sender=Membership, project=project, user=user, actor=actor)
    return [reply for _receiver, reply in replies if reply]
