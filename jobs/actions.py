"""Verbs that start and stop jobs: atomic, tasks sent on commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import RestrictedError
from django.utils import timezone

from engines.curation import CurationSettings, SynthesisSettings
from engines.inference import GenerationSettings
from engines.training import TrainConfig, tokenizers_match
from jobs import fingerprints
from jobs.models import AbsorbPreset, Job, TeacherEndpoint
from jobs.runners.synthesis import ABSORB_COUNT as ABSORB_SYNTHESIS_COUNT
from jobs.runners.synthesis import DEFAULT_COUNT as SYNTHESIS_DEFAULT_COUNT
from jobs.runners.synthesis import KIND as SYNTHESIS_KIND
from jobs.runners.synthesis import MAX_COUNT as SYNTHESIS_MAX_COUNT
from jobs.tasks import enqueue
from workbench import data_quality
from workbench.actions import ActionError
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Project, PromptVersion, Variant
from workbench.prompt_costs import TokenCountError


class AlreadyStarted(ActionError):
    """The form with this token already started `job`: nothing new was queued."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"This form was already submitted: it started {job}.")
        self.job = job


def check_form_token(project: Project, token: uuid.UUID | None) -> None:
    """Raise AlreadyStarted when a job of the project carries the token."""
    if token is None:
        return
    job = Job.objects.filter(project=project, form_token=token).first()
    if job is not None:
        raise AlreadyStarted(job)


def create_job(project: Project, form_token: uuid.UUID | None = None, **fields: Any) -> Job:
    """A job row carrying the form token; the same token posted twice at once
    meets the unique constraint, and the loser is told which job won."""
    check_form_token(project, form_token)
    try:
        with transaction.atomic():  # a savepoint: the caller's transaction survives the conflict
            return Job.objects.create(project=project, form_token=form_token, **fields)
    except IntegrityError:
        job = Job.objects.filter(project=project, form_token=form_token).first() if form_token else None
        if job is None:
            raise
        raise AlreadyStarted(job) from None


def check_prompt_fits(prompt_version: PromptVersion, base_model: FoundationModel) -> None:
    """Refuse a prompt that leaves the model no room for a query and an answer."""
    try:
        reason = prompt_version.too_long_for(base_model)
    except TokenCountError:
        return  # the model's tokenizer cannot be read: the job itself reports that, with the path
    if reason:
        raise ActionError(reason)


def _check(
    project: Project,
    prompt_version: PromptVersion,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
) -> None:
    # Both inputs must belong to the project: ids in a form can be forged.
    if prompt_version.prompt.project_id != project.pk or dataset_version.dataset.project_id != project.pk:
        raise ActionError("The prompt and the dataset must belong to this project.")
    if not dataset_version.rows.filter(split=DatasetRow.TRAIN).exists():
        raise ActionError(f"{dataset_version} has no rows in its train split.")
    check_prompt_fits(prompt_version, base_model)


# What an absorb's teacher generates with unless told otherwise. Small models loop (greedy ones
# most), and the variant keeps these guard rails for its evals and /v1; the n-gram ban covers the
# completion only (engines.inference), so the prompt's phrases stay allowed. On the lumen scenario
# it took the student from 0.42 to 0.70 all-rules on held-out queries (bench/README.md).
ABSORB_GENERATION: dict[str, Any] = {"no_repeat_ngram_size": 4}


def absorb_generation() -> GenerationSettings:
    return GenerationSettings.from_dict(ABSORB_GENERATION)


def _generation(
    value: GenerationSettings | Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None
) -> GenerationSettings:
    if isinstance(value, GenerationSettings):
        return value
    return GenerationSettings.from_dict({**(defaults or {}), **(value or {})})


def _training(value: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    return value if isinstance(value, TrainConfig) else TrainConfig.from_dict(value or {})


def teacher_generation(value: GenerationSettings | Mapping[str, Any] | None) -> GenerationSettings:
    """What an absorb's teacher generates with: `value` over ABSORB_GENERATION."""
    return _generation(value, ABSORB_GENERATION)


def _curation(
    prompt_version: PromptVersion,
    value: CurationSettings | Mapping[str, Any] | bool | None,
) -> dict[str, Any] | None:
    return resolve_curation(bool(prompt_version.rules), value)


def resolve_curation(
    has_rules: bool, value: CurationSettings | Mapping[str, Any] | bool | None
) -> dict[str, Any] | None:
    """What the teacher job curates with: on by default when the prompt has
    checkable rules (False or None turns it off)."""
    if value is False or value is None or not has_rules:
        return None
    if value is True:
        return CurationSettings().to_dict()
    try:
        settings = value if isinstance(value, CurationSettings) else CurationSettings.from_dict(dict(value))
    except (TypeError, ValueError) as exc:
        raise ActionError(f"Curation settings: {exc}") from exc
    return settings.to_dict()


def check_teacher(base_model: FoundationModel, teacher_model: FoundationModel, train: TrainConfig) -> None:
    """Any registered model can teach (answers are text, so SFT works across
    tokenizers); the KL term compares token distributions and needs the same
    tokenizer."""
    if train.kl_weight <= 0 or teacher_model.pk == base_model.pk:
        return
    try:
        same = tokenizers_match(base_model.path, teacher_model.path)
    except (OSError, ValueError) as exc:
        raise ActionError(
            f"Cannot compare the tokenizers of {base_model.name} and {teacher_model.name}: {exc}"
        ) from exc
    if not same:
        raise ActionError(
            f"KL needs a teacher that shares the student's tokenizer: {teacher_model.name} and "
            f"{base_model.name} tokenize differently. Set kl_weight to 0 to train on its answers."
        )


def default_keep_existing(dataset_version: DatasetVersion) -> bool:
    """Whether an absorb keeps the answers rows already have unless told:
    yes, but not on captured traffic, whose answers are what was served
    (the model being replaced), so the teacher answers those again."""
    return not dataset_version.captured


@transaction.atomic
def start_absorb(
    project: Project,
    user: User | None,
    prompt_version: PromptVersion,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
    generation: GenerationSettings | Mapping[str, Any] | None = None,
    training: TrainConfig | Mapping[str, Any] | None = None,
    *,
    keep_existing: bool | None = None,
    review_first: bool = False,
    teacher_model: FoundationModel | None = None,
    curation: CurationSettings | Mapping[str, Any] | bool | None = True,
    passing_only: bool = True,
    form_token: uuid.UUID | None = None,
    teacher_endpoint: TeacherEndpoint | None = None,
    evaluation: Mapping[str, Any] | None = None,
    data_check: float | None = None,
    synthesis: int | Mapping[str, Any] | bool | None = None,
) -> tuple[Job, Job | None]:
    """Queue teacher generation and (unless the team reviews the answers
    first) the fine-tune that trains on them once the teacher finishes.
    The teacher is `teacher_model` (default: the student's base) WITH the
    prompt; its answers are curated when the prompt has rules (`curation`),
    and the fine-tune learns only from those that pass every rule
    (`passing_only`, while enough do). Rows that already end with an answer
    keep it (`keep_existing`), except, unless told, on captured traffic
    (default_keep_existing). With `teacher_endpoint` an
    OpenAI-compatible server of the project answers instead (its answers
    are text: no KL term). `evaluation` is the four-arm eval after the
    fine-tune (see eval_params). With `data_check` (a share), the fine-tune
    waits for confirmation when more than that share of the teacher's
    answers fail a checkable rule (see hold_for_data_check). With
    `synthesis` (see synthesis_request) the teacher first writes questions
    about the prompt (a synthesis job, `teacher.depends_on`) and then answers
    them with the data's own. A `form_token` some job already
    carries raises AlreadyStarted (a resubmitted form starts nothing).
    Bad settings raise SettingsError / ConfigError naming each field."""
    check_form_token(project, form_token)
    if keep_existing is None:
        keep_existing = default_keep_existing(dataset_version)
    teacher_model = teacher_model or base_model
    _check(project, prompt_version, dataset_version, base_model)
    gen, train = teacher_generation(generation), _training(training)
    params: dict[str, Any] = {}
    if teacher_endpoint is not None:
        check_endpoint(project, teacher_endpoint, teacher_model, base_model, train)
        params["teacher_endpoint"] = teacher_endpoint.snapshot()
    else:
        check_prompt_fits(prompt_version, teacher_model)
        check_teacher(base_model, teacher_model, train)
    curated = _curation(prompt_version, curation)
    asked = synthesis_request(synthesis)
    synthesizer = None
    if asked is not None:
        synthesizer = _create_synthesis(
            project,
            user,
            prompt_version,
            dataset_version,
            teacher_model,
            *asked,
            teacher_endpoint,
            form_token,
            then_teacher=True,
        )
    prompt = fingerprints.version_identity(prompt_version)
    teacher_fp = fingerprints.teacher_fingerprint(
        prompt,
        # What synthesis_identity will say of the version the synthesis job stores.
        f"synthesis:{synthesizer.params[fingerprints.KEY]}"
        if synthesizer is not None
        else fingerprints.queries_identity(dataset_version),
        fingerprints.teacher_identity(teacher_model, teacher_endpoint),
        gen.to_dict(),
        curated,
        keep_existing,
    )
    teacher = create_job(
        project,
        None if synthesizer is not None else form_token,
        kind="teacher",
        base_model=teacher_model,
        prompt_version=prompt_version,
        # The synthesis job sets the version it stores when it finishes.
        dataset_version=None if synthesizer is not None else dataset_version,
        depends_on=synthesizer,
        params={
            "generation": gen.to_dict(),
            "keep_existing": keep_existing,
            "curation": curated,
            **params,
            fingerprints.KEY: teacher_fp,
        },
        teacher_endpoint=teacher_endpoint,
        created_by=user,
    )
    finetune = None
    if not review_first:
        finetune = Job.objects.create(
            project=project,
            kind="finetune",
            base_model=base_model,
            prompt_version=prompt_version,
            depends_on=teacher,
            params={
                "train": train.to_dict(),
                "teacher_model": teacher_model.pk,
                "passing_only": passing_only,
                **eval_params(evaluation),
                **({"data_check": float(data_check)} if data_check is not None else {}),
                fingerprints.KEY: fingerprints.finetune_fingerprint(
                    f"teacher:{teacher_fp}",
                    prompt,
                    fingerprints.model_identity(base_model),
                    train.to_dict(),
                    passing_only,
                    fingerprints.model_identity(teacher_model),
                ),
            },
            created_by=user,
        )
    enqueue(synthesizer or teacher)
    return teacher, finetune


def eval_params(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A fine-tune's {"eval": {...}} param: whether its variant's four arms run
    when it finishes ("auto"), their answer length ("max_new_tokens") and at
    most how many held-out queries they answer ("max_examples", None: all).
    Nothing given: nothing stored, and the settings decide when it finishes."""
    if not value:
        return {}
    unknown = set(value) - {"auto", "max_new_tokens", "max_examples"}
    if unknown:
        raise ActionError(f"Unknown eval settings: {', '.join(sorted(unknown))}.")
    out: dict[str, Any] = {}
    if value.get("auto") is not None:
        out["auto"] = bool(value["auto"])
    for name in ("max_new_tokens", "max_examples"):
        n = value.get(name)
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ActionError(f"eval {name} must be a whole number of at least 1, got {n!r}.")
        out[name] = n
    return {"eval": out}


@transaction.atomic
def start_finetune(
    project: Project,
    user: User | None,
    prompt_version: PromptVersion,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
    training: TrainConfig | Mapping[str, Any] | None = None,
    *,
    passing_only: bool = True,
    form_token: uuid.UUID | None = None,
    teacher_model: FoundationModel | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Job:
    """Train on a dataset version that already holds the answers (teacher
    answers after review, or a dataset uploaded with answers); with
    `passing_only`, on those not flagged as failing a rule while enough are.
    `teacher_model` is the model a KL term compares with (as start_absorb's)."""
    check_form_token(project, form_token)
    _check(project, prompt_version, dataset_version, base_model)
    train = _training(training)
    if not _has_answers(dataset_version):
        raise ActionError(f"{dataset_version} has no assistant answers: run the teacher first.")
    params: dict[str, Any] = {
        "train": train.to_dict(),
        "passing_only": passing_only,
        **eval_params(evaluation),
    }
    if teacher_model is not None:
        check_teacher(base_model, teacher_model, train)
        params["teacher_model"] = teacher_model.pk
    params[fingerprints.KEY] = fingerprints.finetune_fingerprint(
        fingerprints.data_identity(dataset_version),
        fingerprints.version_identity(prompt_version),
        fingerprints.model_identity(base_model),
        train.to_dict(),
        passing_only,
        fingerprints.model_identity(teacher_model or base_model),
    )
    job = create_job(
        project,
        form_token,
        kind="finetune",
        base_model=base_model,
        prompt_version=prompt_version,
        dataset_version=dataset_version,
        params=params,
        created_by=user,
    )
    enqueue(job)
    return job


def _has_answers(version: DatasetVersion, train_only: bool = True) -> bool:
    rows = version.rows.filter(split=DatasetRow.TRAIN) if train_only else version.rows.all()
    return any(m[-1]["role"] == "assistant" for m in rows.values_list("messages", flat=True)[:50])


@transaction.atomic
def start_supervised(
    project: Project,
    user: User | None,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
    training: TrainConfig | Mapping[str, Any] | None = None,
    *,
    validation_version: DatasetVersion | None = None,
    init_variant: Variant | None = None,
    params: Mapping[str, Any] | None = None,
) -> Job:
    """A plain supervised fine-tune on the rows as given (their own system
    messages included), with no prompt to absorb: the /v1/fine_tuning API's
    "supervised" method. The validation rows' loss is measured after each
    epoch; with `init_variant` training continues from that variant's adapter;
    every epoch's adapter is kept as a checkpoint. `params` (the API's own
    fields) are stored with the job."""
    for version in (dataset_version, validation_version):
        if version is not None and version.dataset.project_id != project.pk:
            raise ActionError("The dataset must belong to this project.")
    if init_variant is not None and (
        init_variant.project_id != project.pk or init_variant.base_model_id != base_model.pk
    ):
        raise ActionError("The model to continue from must be a variant of this project on the same base.")
    if not dataset_version.rows.filter(split=DatasetRow.TRAIN).exists():
        raise ActionError(f"{dataset_version} has no rows in its train split.")
    if not _has_answers(dataset_version):
        raise ActionError(
            f"{dataset_version} has no assistant answers to learn from: each row must end with one."
        )
    if validation_version is not None and not _has_answers(validation_version, train_only=False):
        raise ActionError(f"The validation data {validation_version} has no assistant answers.")
    train = _training(training)
    job = Job.objects.create(
        project=project,
        kind="finetune",
        base_model=base_model,
        dataset_version=dataset_version,
        params={
            **dict(params or {}),
            "train": train.to_dict(),
            "passing_only": False,
            "epoch_checkpoints": True,
            "validation_version": validation_version.pk if validation_version is not None else None,
            "init_variant": init_variant.pk if init_variant is not None else None,
        },
        created_by=user,
    )
    enqueue(job)
    return job


def synthesis_request(value: int | Mapping[str, Any] | bool | None) -> tuple[int, SynthesisSettings] | None:
    """An absorb's synthesis step as asked: None / False / 0 for none, True
    for the default count, a count, or {"count": N, ...SynthesisSettings}."""
    if value is None or value is False or value == 0:
        return None
    if value is True:
        return ABSORB_SYNTHESIS_COUNT, SynthesisSettings()
    if isinstance(value, Mapping):
        rest = dict(value)
        count = rest.pop("count", ABSORB_SYNTHESIS_COUNT)
        return _synthesis_count(count), _synthesis_settings(rest)
    return _synthesis_count(value), SynthesisSettings()


def _synthesis_count(count: Any) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= SYNTHESIS_MAX_COUNT:
        raise ActionError(
            f"The number of queries to synthesise must be from 1 to {SYNTHESIS_MAX_COUNT}, got {count!r}."
        )
    return count


def _synthesis_settings(settings: SynthesisSettings | Mapping[str, Any] | None) -> SynthesisSettings:
    if isinstance(settings, SynthesisSettings):
        return settings
    try:
        return SynthesisSettings.from_dict(dict(settings) if settings is not None else None)
    except (TypeError, ValueError) as exc:
        raise ActionError(f"Synthesis settings: {exc}") from exc


def _create_synthesis(
    project: Project,
    user: User | None,
    prompt_version: PromptVersion,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
    count: int,
    settings: SynthesisSettings,
    teacher_endpoint: TeacherEndpoint | None,
    form_token: uuid.UUID | None,
    then_teacher: bool,
) -> Job:
    if prompt_version.prompt.project_id != project.pk or dataset_version.dataset.project_id != project.pk:
        raise ActionError("The prompt and the dataset must belong to this project.")
    if teacher_endpoint is not None and teacher_endpoint.project_id != project.pk:
        raise ActionError("The teacher endpoint must belong to this project.")
    params: dict[str, Any] = {"count": count, "synthesis": settings.to_dict()}
    if then_teacher:  # keeping no question still stores a version, the one the teacher answers
        params["then_teacher"] = True
    if teacher_endpoint is not None:
        params["teacher_endpoint"] = teacher_endpoint.snapshot()
    params[fingerprints.KEY] = fingerprints.synthesis_fingerprint(
        fingerprints.version_identity(prompt_version),
        fingerprints.train_digest(dataset_version),
        fingerprints.eval_digest(dataset_version),
        fingerprints.teacher_identity(base_model, teacher_endpoint),
        count,
        settings.to_dict(),
    )
    return create_job(
        project,
        form_token,
        kind=SYNTHESIS_KIND,
        base_model=base_model,
        prompt_version=prompt_version,
        dataset_version=dataset_version,
        teacher_endpoint=teacher_endpoint,
        params=params,
        created_by=user,
    )


@transaction.atomic
def start_synthesis(
    project: Project,
    user: User | None,
    prompt_version: PromptVersion,
    dataset_version: DatasetVersion,
    base_model: FoundationModel,
    count: int = SYNTHESIS_DEFAULT_COUNT,
    settings: SynthesisSettings | dict[str, Any] | None = None,
    *,
    teacher_endpoint: TeacherEndpoint | None = None,
    form_token: uuid.UUID | None = None,
    then_teacher: bool = False,
) -> Job:
    """Queue a synthesis job: `base_model` (or `teacher_endpoint`) writes up
    to `count` questions about the prompt version's sections and facts; its
    output is a new version of the dataset with them added. Unless
    `then_teacher` (a teacher answers the version next), a job that keeps no
    question fails and stores nothing."""
    check_form_token(project, form_token)
    job = _create_synthesis(
        project,
        user,
        prompt_version,
        dataset_version,
        base_model,
        _synthesis_count(count),
        _synthesis_settings(settings),
        teacher_endpoint,
        form_token,
        then_teacher,
    )
    enqueue(job)
    return job


def check_endpoint(
    project: Project,
    endpoint: TeacherEndpoint,
    teacher_model: FoundationModel,
    base_model: FoundationModel,
    train: TrainConfig,
) -> None:
    # An id in a form can be forged: the endpoint must be this project's.
    if endpoint.project_id != project.pk:
        raise ActionError("The teacher endpoint must belong to this project.")
    if teacher_model.pk != base_model.pk:
        raise ActionError("Choose a teacher model or a teacher endpoint, not both.")
    if train.kl_weight > 0:
        raise ActionError(
            f"KL distillation needs the teacher's token distributions, which endpoint {endpoint.name} does not "
            "give: set kl_weight to 0 to train on its answers."
        )


@transaction.atomic
def create_teacher_endpoint(project: Project, user: User | None, **fields: Any) -> TeacherEndpoint:
    """A teacher endpoint of the project, validated as a form would (a bad
    URL or a name the project already uses raises ValidationError)."""
    endpoint = TeacherEndpoint(project=project, created_by=user, **fields)
    endpoint.full_clean()
    endpoint.save()
    return endpoint


@transaction.atomic
def delete_teacher_endpoint(endpoint: TeacherEndpoint) -> None:
    """Delete an endpoint no queued or running job waits to ask (finished
    jobs keep what they recorded of it)."""
    busy = endpoint.jobs.filter(status__in=Job.ACTIVE).first()
    if busy is not None:
        raise ActionError(
            f"{busy} is {busy.status} with endpoint {endpoint.name}: cancel it or let it finish first."
        )
    try:
        endpoint.delete()
    except RestrictedError as exc:
        names = ", ".join(sorted(f"“{obj}”" for obj in exc.restricted_objects))
        raise ActionError(
            f"Eval suite(s) {names} judge with endpoint {endpoint.name}: give them another judge first."
        ) from exc


# What the first try recorded of its own run, not of the inputs; a retried fine-tune that waited
# for confirmation of its data ("held") is that confirmation, so it is checked no more.
RETRIED = ("teacher_usage", "held", "data_check")


def hold_for_data_check(teacher: Job) -> list[Job]:
    """When a teacher succeeds: each fine-tune waiting for its answers with a
    `data_check` share is held (cancelled before it starts, with the reason in
    its params) when more than that share of the answers fail a checkable
    rule, the same check the absorb form makes before a fine-tune only. Its
    page offers to review the answers or to train anyway (a retry)."""
    version = teacher.output_dataset
    if teacher.kind != "teacher" or version is None:
        return []
    held = []
    for dep in teacher.dependents.filter(kind="finetune", status=Job.QUEUED):
        share = dep.params.get("data_check")
        if not isinstance(share, int | float):
            continue
        warn = data_quality.warning(version, float(share))
        if not warn:
            continue
        params = {**dep.params, "held": warn}
        Job.objects.filter(pk=dep.pk, status=Job.QUEUED).update(params=params, dataset_version=version)
        dep.refresh_from_db()
        if dep.mark_cancelled(f"waiting for confirmation: {warn}"):
            held.append(dep)
    return held


@transaction.atomic
def retry_job(job: Job, user: User | None) -> Job:
    """A failed or cancelled synthesis, teacher or fine-tune job, queued again
    as a new job with the same inputs (terminal states never change); the
    jobs that waited for it and were cancelled with it (and those that waited
    for them) wait for the new one. A teacher asks only for the answers its
    project's response cache lacks, so work finished before the failure is
    not paid for twice."""
    if job.status not in (Job.FAILED, Job.CANCELLED):
        raise ActionError(f"{job} is {job.status}: only a failed or cancelled job can be retried.")
    if job.kind not in ("teacher", "finetune", SYNTHESIS_KIND):
        raise ActionError(f"{job.label} jobs are not retried from here.")
    if job.depends_on is not None and job.depends_on.status != Job.SUCCEEDED:
        raise ActionError(f"{job} waits for {job.depends_on}, which did not succeed: retry that one.")
    again = _again(
        job,
        user,
        job.depends_on,
        job.dataset_version,
        {k: v for k, v in job.params.items() if k not in RETRIED},
    )
    again.append_log(f"retry of {job}")
    enqueue(again)
    return again


def _again(
    job: Job, user: User | None, after: Job | None, data: DatasetVersion | None, params: dict[str, Any]
) -> Job:
    again = Job.objects.create(
        project=job.project,
        kind=job.kind,
        base_model=job.base_model,
        prompt_version=job.prompt_version,
        dataset_version=data,
        depends_on=after,
        teacher_endpoint=job.teacher_endpoint,
        params=params,
        created_by=user,
    )
    for dep in job.dependents.filter(status=Job.CANCELLED):
        # A teacher or a synthesis job hands the version it stores on to the jobs waiting for it.
        takes_output = job.kind in ("teacher", SYNTHESIS_KIND)
        _again(dep, user, again, None if takes_output else dep.dataset_version, dep.params)
    return again


def cancel_job(job: Job) -> bool:
    """Cancel a queued or running job (the jobs waiting for it are cancelled
    when it ends). False, and nothing changes, for a job that already ended."""
    return job.request_cancel()


@transaction.atomic
def save_preset(project: Project, user: User | None, name: str, values: Mapping[str, Any]) -> AbsorbPreset:
    """Save the absorb form's settings under `name` (replacing the project's preset of that name)."""
    preset, _ = AbsorbPreset.objects.update_or_create(
        project=project,
        name=name,
        defaults={"values": dict(values), "created_by": user, "updated_at": timezone.now()},
    )
    return preset


def delete_preset(preset: AbsorbPreset) -> None:
    preset.delete()
