"""Verbs that change several rows: atomic, with side effects sent on commit."""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from workbench.models import BaseModel, Membership, Project, WorkerPing


class ActionError(Exception):
    """A user-caused error; the message is shown as is."""


@transaction.atomic
def create_project(user: AbstractBaseUser, name: str, description: str = "") -> Project:
    name = name.strip()
    if not name:
        raise ActionError("A project needs a name.")
    project = Project.objects.create(
        name=name, slug=Project.unique_slug(name), description=description, created_by=user
    )
    Membership.objects.create(project=project, user=user, role=Membership.OWNER)
    return project


@transaction.atomic
def add_member(project: Project, actor: AbstractBaseUser, username: str, role: str) -> Membership:
    if project.role_of(actor) != Membership.OWNER:
        raise ActionError("Only an owner can add members.")
    if role not in dict(Membership.ROLES):
        raise ActionError(f"Unknown role '{role}'.")
    user = get_user_model().objects.filter(username=username.strip()).first()
    if user is None:
        raise ActionError(f"No user named '{username}'.")
    membership, created = Membership.objects.get_or_create(project=project, user=user, defaults={"role": role})
    if not created:
        raise ActionError(f"{username} is already a member.")
    return membership


@transaction.atomic
def remove_member(project: Project, actor: AbstractBaseUser, membership_id: int) -> None:
    if project.role_of(actor) != Membership.OWNER:
        raise ActionError("Only an owner can remove members.")
    membership = project.memberships.filter(pk=membership_id).first()
    if membership is None:
        raise ActionError("No such member.")
    owners = project.memberships.filter(role=Membership.OWNER)
    if membership.role == Membership.OWNER and owners.count() == 1:
        raise ActionError("A project keeps at least one owner.")
    membership.delete()


@transaction.atomic
def send_ping(queue: str = "default") -> WorkerPing:
    from workbench.tasks import answer_ping

    if queue not in ("default", "gpu"):
        raise ActionError(f"Unknown queue '{queue}'.")
    ping = WorkerPing.objects.create(queue=queue)
    transaction.on_commit(lambda: answer_ping.apply_async(args=[ping.pk], queue=queue))
    return ping


def count_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers, without loading weights."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for dim in st.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


@transaction.atomic
def register_base_model(name: str, path: Path, source: str, default: bool = False) -> BaseModel:
    """Register (or update) a local safetensors model directory."""
    from engines.provisioning import is_model_dir

    path = path.resolve()
    if not is_model_dir(path):
        raise ActionError(
            f"{path} is not a model directory: it needs config.json and *.safetensors weights "
            "(pickled .bin weights are not loaded)."
        )
    if not (path / "tokenizer_config.json").is_file():
        raise ActionError(f"{path} has no tokenizer (tokenizer_config.json).")
    if default:
        BaseModel.objects.filter(is_default=True).exclude(name=name).update(is_default=False)
    model, _ = BaseModel.objects.update_or_create(
        name=name,
        defaults={"path": str(path), "source": source, "parameters": count_parameters(path),
                  "is_default": default or not BaseModel.objects.exclude(name=name).exists()},
    )
    return model
