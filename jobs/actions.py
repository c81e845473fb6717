"""Verbs that start and stop jobs: atomic, tasks sent on commit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from engines.inference import GenerationSettings
from engines.training import TrainConfig
from jobs.models import Job
from jobs.tasks import enqueue
from workbench.actions import ActionError
from workbench.models import BaseModel, DatasetRow, DatasetVersion, Project, PromptVersion


def check_prompt_fits(prompt_version: PromptVersion, base_model: BaseModel) -> None:
    """Refuse a prompt that leaves the model no room for a query and an answer."""
    try:
        reason = prompt_version.too_long_for(base_model)
    except (OSError, ValueError):
        return  # the model's tokenizer cannot be read: the job itself reports that, with the path
    if reason:
        raise ActionError(reason)


def _check(project: Project, prompt_version: PromptVersion, dataset_version: DatasetVersion,
           base_model: BaseModel) -> None:
    # Both inputs must belong to the project: ids in a form can be forged.
    if prompt_version.prompt.project_id != project.pk or dataset_version.dataset.project_id != project.pk:
        raise ActionError("The prompt and the dataset must belong to this project.")
    if not dataset_version.rows.filter(split=DatasetRow.TRAIN).exists():
        raise ActionError(f"{dataset_version} has no rows in its train split.")
    check_prompt_fits(prompt_version, base_model)


def _generation(value: GenerationSettings | Mapping[str, Any] | None) -> GenerationSettings:
    return value if isinstance(value, GenerationSettings) else GenerationSettings.from_dict(value)


def _training(value: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    return value if isinstance(value, TrainConfig) else TrainConfig.from_dict(value or {})


@transaction.atomic
def start_absorb(
    project: Project, user: AbstractBaseUser | None, prompt_version: PromptVersion,
    dataset_version: DatasetVersion, base_model: BaseModel,
    generation: GenerationSettings | Mapping[str, Any] | None = None,
    training: TrainConfig | Mapping[str, Any] | None = None, *,
    keep_existing: bool = True, review_first: bool = False,
) -> tuple[Job, Job | None]:
    """Queue teacher generation and (unless the team reviews the answers
    first) the fine-tune that trains on them once the teacher finishes.
    Bad settings raise SettingsError / ConfigError naming each field."""
    _check(project, prompt_version, dataset_version, base_model)
    gen, train = _generation(generation), _training(training)
    teacher = Job.objects.create(project=project, kind="teacher", base_model=base_model,
                                 prompt_version=prompt_version, dataset_version=dataset_version,
                                 params={"generation": gen.to_dict(), "keep_existing": keep_existing},
                                 created_by=user)
    finetune = None
    if not review_first:
        finetune = Job.objects.create(project=project, kind="finetune", base_model=base_model,
                                      prompt_version=prompt_version, depends_on=teacher,
                                      params={"train": train.to_dict()}, created_by=user)
    enqueue(teacher)
    return teacher, finetune


@transaction.atomic
def start_finetune(
    project: Project, user: AbstractBaseUser | None, prompt_version: PromptVersion,
    dataset_version: DatasetVersion, base_model: BaseModel,
    training: TrainConfig | Mapping[str, Any] | None = None,
) -> Job:
    """Train on a dataset version that already holds the answers (teacher
    answers after review, or a dataset uploaded with answers)."""
    _check(project, prompt_version, dataset_version, base_model)
    train = _training(training)
    sample = dataset_version.rows.filter(split=DatasetRow.TRAIN).values_list("messages", flat=True)[:50]
    if not any(m[-1]["role"] == "assistant" for m in sample):
        raise ActionError(f"{dataset_version} has no assistant answers: run the teacher first.")
    job = Job.objects.create(project=project, kind="finetune", base_model=base_model,
                             prompt_version=prompt_version, dataset_version=dataset_version,
                             params={"train": train.to_dict()}, created_by=user)
    enqueue(job)
    return job


def cancel_job(job: Job) -> bool:
    """Cancel a queued or running job (the jobs waiting for it are cancelled
    when it ends). False, and nothing changes, for a job that already ended."""
    return job.request_cancel()
