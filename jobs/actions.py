"""Verbs that start and stop jobs: atomic, tasks sent on commit."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from engines.training import ConfigError, TrainConfig
from jobs.models import Job
from jobs.runner import enqueue
from workbench.actions import ActionError
from workbench.models import BaseModel, DatasetRow, DatasetVersion, Project, PromptVersion

GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "batch_size": 16, "temperature": 0.0,
                                       "keep_existing": True}


def _check(project: Project, prompt_version: PromptVersion, dataset_version: DatasetVersion) -> None:
    # Both inputs must belong to the project: ids in a form can be forged.
    if prompt_version.prompt.project_id != project.pk or dataset_version.dataset.project_id != project.pk:
        raise ActionError("The prompt and the dataset must belong to this project.")
    if not dataset_version.rows.filter(split=DatasetRow.TRAIN).exists():
        raise ActionError(f"{dataset_version} has no rows in its train split.")


def generation_params(data: dict[str, Any] | None) -> dict[str, Any]:
    params = {**GENERATION_DEFAULTS, **(data or {})}
    unknown = sorted(set(params) - set(GENERATION_DEFAULTS) - {"seed"})
    if unknown:
        raise ActionError(f"Unknown generation setting(s): {', '.join(unknown)}.")
    try:
        if not 1 <= int(params["max_new_tokens"]) <= 4096:
            raise ActionError("max_new_tokens must be between 1 and 4096.")
        if not 1 <= int(params["batch_size"]) <= 256:
            raise ActionError("batch_size must be between 1 and 256.")
        if float(params["temperature"]) < 0:
            raise ActionError("temperature must be 0 (greedy) or more.")
    except (TypeError, ValueError) as exc:
        raise ActionError(f"Invalid generation setting: {exc}") from exc
    return params


def train_params(data: dict[str, Any] | None) -> dict[str, Any]:
    """Validated TrainConfig values (raises ConfigError naming each bad field)."""
    return TrainConfig.from_dict(data or {}).to_dict()


@transaction.atomic
def start_absorb(
    project: Project, user: AbstractBaseUser | None, prompt_version: PromptVersion,
    dataset_version: DatasetVersion, base_model: BaseModel, generation: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None, review_first: bool = False,
) -> tuple[Job, Job | None]:
    """Queue teacher generation and (unless the team reviews the answers
    first) the fine-tune that trains on them once the teacher finishes."""
    _check(project, prompt_version, dataset_version)
    gen = generation_params(generation)
    train = train_params(training)
    teacher = Job.objects.create(project=project, kind=Job.TEACHER, base_model=base_model,
                                 prompt_version=prompt_version, dataset_version=dataset_version,
                                 params=gen, created_by=user)
    finetune = None
    if not review_first:
        finetune = Job.objects.create(project=project, kind=Job.FINETUNE, base_model=base_model,
                                      prompt_version=prompt_version, depends_on=teacher,
                                      params={"train": train}, created_by=user)
    enqueue(teacher)
    return teacher, finetune


@transaction.atomic
def start_finetune(
    project: Project, user: AbstractBaseUser | None, prompt_version: PromptVersion,
    dataset_version: DatasetVersion, base_model: BaseModel, training: dict[str, Any] | None = None,
) -> Job:
    """Train on a dataset version that already holds the answers (teacher
    answers after review, or a dataset uploaded with answers)."""
    _check(project, prompt_version, dataset_version)
    train = train_params(training)
    has_answers = dataset_version.rows.filter(split=DatasetRow.TRAIN).exists() and any(
        m[-1]["role"] == "assistant"
        for m in dataset_version.rows.filter(split=DatasetRow.TRAIN).values_list("messages", flat=True)[:50]
    )
    if not has_answers:
        raise ActionError(f"{dataset_version} has no assistant answers: run the teacher first.")
    job = Job.objects.create(project=project, kind=Job.FINETUNE, base_model=base_model,
                             prompt_version=prompt_version, dataset_version=dataset_version,
                             params={"train": train}, created_by=user)
    enqueue(job)
    return job


def cancel_job(job: Job) -> None:
    job.request_cancel()
    job.append_log("cancel requested")
    for dep in job.dependents.filter(status=Job.QUEUED):
        dep.mark_cancelled(f"cancelled with {job}")


__all__ = ["ConfigError", "cancel_job", "start_absorb", "start_finetune"]
