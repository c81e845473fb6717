"""Verbs of the evals app: atomic, jobs sent on commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Count

from engines.evaluation import ARM_SPECS
from engines.facts import FactsError, facts_to_json, validate_facts
from engines.inference import GenerationSettings
from engines.rules import RulesError, rules_to_json, validate_rules
from evals.models import NOTE_MAX, ArmComparison, EvalExample, EvalRun, EvalSuite, Rating
from jobs.actions import check_form_token, check_prompt_fits, create_job
from jobs.models import Job, TeacherEndpoint
from jobs.tasks import enqueue
from workbench.actions import ActionError
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Project, PromptVersion, Variant


@dataclass(frozen=True)
class RunSpec:
    """What answers: a base model, optionally a variant's adapter, optionally a prompt."""

    base_model: FoundationModel
    variant: Variant | None = None
    prompt_version: PromptVersion | None = None
    arm: str = ""


def _same_project(project: Project, *objects: Any) -> None:
    for obj in objects:
        owner = getattr(obj, "project_id", None)
        if owner is None and isinstance(obj, PromptVersion):
            owner = obj.prompt.project_id
        if owner is None and isinstance(obj, DatasetVersion):
            owner = obj.dataset.project_id
        if obj is not None and owner is not None and owner != project.pk:
            raise ActionError(f"{obj} belongs to another project.")


def eval_source(version: DatasetVersion) -> DatasetVersion:
    """The version whose eval split holds the held-out queries: teacher
    answers cover only the train split, so walk up to the upload."""
    current: DatasetVersion | None = version
    while current is not None:
        if current.rows.filter(split=DatasetRow.EVAL).exists():
            return current
        current = current.parent
    return version


@transaction.atomic
def create_suite(
    project: Project,
    user: User | None,
    name: str,
    dataset_version: DatasetVersion,
    *,
    prompt_version: PromptVersion | None = None,
    main_metric: str = "",
    judge: Variant | None = None,
    judge_base: FoundationModel | None = None,
    judge_endpoint: TeacherEndpoint | None = None,
    judge_rubric: str = "",
    lm_eval_tasks: Sequence[str] = (),
    rules: Any = None,
    facts: Any = None,
    max_examples: int | None = None,
) -> EvalSuite:
    """A suite from the eval split of a dataset version (copied, so it never
    changes), or its first `max_examples` rows. Rules and facts default to
    the prompt version's."""
    name = name.strip()
    if not name:
        raise ActionError("An eval suite needs a name.")
    _same_project(project, dataset_version, prompt_version, judge, judge_endpoint)
    if EvalSuite.objects.filter(project=project, name=name).exists():
        raise ActionError(f"There is already a suite named “{name}” in this project.")
    rows = list(
        dataset_version.rows.filter(split=DatasetRow.EVAL).order_by("index").values_list("index", "messages")
    )
    if not rows:
        raise ActionError(f"{dataset_version} has no eval split: upload it with an eval percentage above 0.")
    if max_examples is not None:
        rows = rows[: max(1, max_examples)]
    try:
        rule_list = rules_to_json(
            validate_rules(prompt_version.rules if rules is None and prompt_version else rules or [])
        )
    except RulesError as exc:
        raise ActionError("Invalid rules:\n" + "\n".join(exc.errors)) from exc
    try:
        fact_list = facts_to_json(
            validate_facts(prompt_version.facts if facts is None and prompt_version else facts or [])
        )
    except FactsError as exc:
        raise ActionError("Invalid facts:\n" + "\n".join(exc.errors)) from exc
    if sum(j is not None for j in (judge, judge_base, judge_endpoint)) > 1:
        raise ActionError("Pick one judge: a variant, a base model or an endpoint.")
    if (judge or judge_base or judge_endpoint) and not judge_rubric.strip():
        raise ActionError("A judge needs a rubric: say what a good answer is.")
    unknown = [t for t in lm_eval_tasks if not t.strip()]
    if unknown:
        raise ActionError("An lm-eval task name cannot be empty.")
    has_reference = any(m[-1]["role"] == "assistant" for _, m in rows)
    metric = main_metric or ("all_rules" if rule_list else "rouge_l" if has_reference else "judge")
    suite = EvalSuite.objects.create(
        project=project,
        name=name,
        dataset_version=dataset_version,
        prompt_version=prompt_version,
        rules=rule_list,
        facts=fact_list,
        main_metric=metric,
        judge=judge,
        judge_base=judge_base,
        judge_endpoint=judge_endpoint,
        judge_rubric=judge_rubric,
        lm_eval_tasks=list(lm_eval_tasks),
        created_by=user,
    )
    EvalExample.objects.bulk_create(
        [
            EvalExample(
                suite=suite,
                index=i,
                source_index=index,
                messages=messages[:-1] if messages[-1]["role"] == "assistant" else messages,
                reference=messages[-1]["content"] if messages[-1]["role"] == "assistant" else "",
            )
            for i, (index, messages) in enumerate(rows)
        ]
    )
    return suite


def _generation(value: GenerationSettings | Mapping[str, Any] | None) -> GenerationSettings:
    if isinstance(value, GenerationSettings):
        return value
    # Evals answer short by default: long generations cost minutes per arm on a CPU.
    defaults = {"max_new_tokens": settings.EVAL_MAX_NEW_TOKENS, "batch_size": 16}
    return GenerationSettings.from_dict({**defaults, **(value or {})})


@transaction.atomic
def start_runs(
    project: Project,
    user: User | None,
    suite: EvalSuite,
    specs: Sequence[RunSpec],
    generation: GenerationSettings | Mapping[str, Any] | None = None,
    comparison: ArmComparison | None = None,
    form_token: uuid.UUID | None = None,
) -> list[EvalRun]:
    """Queue eval runs; runs that share a base model and adapter share one
    job (one model load). The first job keeps `form_token`: a form posted
    again with it raises jobs.actions.AlreadyStarted."""
    check_form_token(project, form_token)
    if suite.project_id != project.pk:
        raise ActionError("The suite belongs to another project.")
    if not specs:
        raise ActionError("Choose at least one variant to evaluate.")
    gen = _generation(generation)
    # One job loads one base model and at most one adapter; runs without an
    # adapter join a job of their base (the adapter is switched off for them).
    groups: dict[tuple[int, str], list[RunSpec]] = {}
    for spec in specs:
        _same_project(project, spec.variant, spec.prompt_version)
        if spec.prompt_version is not None:
            check_prompt_fits(spec.prompt_version, spec.base_model)
        if spec.variant is not None:
            groups.setdefault((spec.base_model.pk, spec.variant.adapter_path), []).append(spec)
    for spec in specs:
        if spec.variant is None:
            key = next((k for k in groups if k[0] == spec.base_model.pk), (spec.base_model.pk, ""))
            groups.setdefault(key, []).append(spec)
    runs: list[EvalRun] = []
    for n, group in enumerate(groups.values()):
        job = create_job(
            project,
            form_token if n == 0 else None,
            kind="eval",
            base_model=group[0].base_model,
            params={"generation": gen.to_dict(), "suite": suite.pk},
            created_by=user,
        )
        for spec in group:
            runs.append(
                EvalRun.objects.create(
                    project=project,
                    suite=suite,
                    job=job,
                    comparison=comparison,
                    base_model=spec.base_model,
                    variant=spec.variant,
                    prompt_version=spec.prompt_version,
                    arm=spec.arm,
                    generation=gen.to_dict(),
                    created_by=user,
                )
            )
        enqueue(job)
    return runs


def comparison_generation(
    variant: Variant, generation: GenerationSettings | Mapping[str, Any] | None = None
) -> GenerationSettings:
    """What a variant's four arms answer with: `generation` over its guard
    rails (its teacher's) over the eval defaults."""
    if isinstance(generation, GenerationSettings):
        return generation
    return _generation({**variant.generation, **(generation or {})})


@transaction.atomic
def start_comparison(
    project: Project,
    user: User | None,
    suite: EvalSuite,
    variant: Variant,
    *,
    absorb_job: Job | None = None,
    generation: GenerationSettings | Mapping[str, Any] | None = None,
    form_token: uuid.UUID | None = None,
) -> ArmComparison:
    """The four arms of an absorbed variant on one suite, in one job. All
    four answer with the variant's guard rails (its teacher's), so the
    student is measured as it is served and the arms stay comparable."""
    check_form_token(project, form_token)
    if variant.project_id != project.pk:
        raise ActionError("The variant belongs to another project.")
    prompt = suite.prompt_version or variant.prompt_version
    if prompt is None:
        raise ActionError("The four arms need the prompt that was absorbed: give the suite a prompt version.")
    if not variant.adapter_path:
        raise ActionError(
            f"{variant} has no adapter: the four arms compare an absorbed adapter with its base."
        )
    comparison = ArmComparison.objects.create(
        project=project, suite=suite, variant=variant, absorb_job=absorb_job
    )
    base = variant.base_model
    specs = [
        RunSpec(base, variant if arm.with_adapter else None, prompt if arm.with_prompt else None, arm.name)
        for arm in sorted(ARM_SPECS, key=lambda a: a.run_order)
    ]
    runs = start_runs(
        project,
        user,
        suite,
        specs,
        comparison_generation(variant, generation),
        comparison=comparison,
        form_token=form_token,
    )
    comparison.job = runs[0].job
    comparison.save(update_fields=["job"])
    return comparison


def suite_for_variant(
    variant: Variant, user: User | None = None, max_examples: int | None = None
) -> EvalSuite | None:
    """The suite that holds out the queries of the data a variant learned
    from (made on first use), or None when that data has no eval split.
    With `max_examples`, a suite of at most that many of them (the first)."""
    if variant.dataset_version is None:
        return None
    source = eval_source(variant.dataset_version)
    held_out = source.rows.filter(split=DatasetRow.EVAL).count()
    if not held_out:
        return None
    want = min(held_out, max_examples) if max_examples else held_out
    existing = (
        EvalSuite.objects.filter(
            project=variant.project, dataset_version=source, prompt_version=variant.prompt_version
        )
        .annotate(size=Count("examples"))
        .filter(size=want)
        .order_by("pk")
        .first()
    )
    if existing is not None:
        return existing
    name = f"{source} held out"
    if want < held_out:
        name += f" (first {want} of {held_out})"
    if variant.prompt_version is not None:
        name += f" · {variant.prompt_version}"
    n = 1
    base = name
    while EvalSuite.objects.filter(project=variant.project, name=name).exists():
        n += 1
        name = f"{base} ({n})"
    return create_suite(
        variant.project,
        user,
        name,
        source,
        prompt_version=variant.prompt_version,
        lm_eval_tasks=settings.EVAL_AUTO_LM_EVAL_TASKS,
        max_examples=want,
    )


@transaction.atomic
def rate(
    user: User,
    run_a: EvalRun,
    run_b: EvalRun,
    example: EvalExample,
    choice: str,
    *,
    pass_a: bool | None = None,
    pass_b: bool | None = None,
    note: str = "",
    blind: bool = False,
) -> Rating:
    """One person's verdict on one example of two runs, in the runs' own
    terms (a blind rating is mapped back from the sides shown before this)."""
    if choice not in dict(Rating.CHOICES):
        raise ActionError(f"Unknown rating {choice!r}: use a, b or tie.")
    if not (run_a.suite_id == run_b.suite_id == example.suite_id):
        raise ActionError("Both runs and the example must belong to the same suite.")
    if run_a.pk == run_b.pk:
        raise ActionError("Rate two different runs.")
    if len(note) > NOTE_MAX:
        raise ActionError(f"The note is longer than {NOTE_MAX:,} characters.")
    rating, _ = Rating.objects.update_or_create(
        run_a=run_a,
        run_b=run_b,
        example=example,
        user=user,
        defaults={"choice": choice, "pass_a": pass_a, "pass_b": pass_b, "note": note, "blind": blind},
    )
    return rating
