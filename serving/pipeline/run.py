"""Applying a plan: each step through the workbench's own actions (save a
prompt version, import a dataset, start_synthesis, start_absorb / start_finetune, the
four-arm comparison, the gated promotion), following the jobs to their end.
A step the plan reuses is not touched; a job still running is followed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from engines.inference import SettingsError
from engines.training import ConfigError
from evals.actions import create_suite, eval_source, start_comparison
from evals.models import ArmComparison, EvalSuite
from jobs import fingerprints
from jobs.actions import start_absorb, start_finetune, start_synthesis
from jobs.models import Job
from jobs.runners.synthesis import KIND as SYNTHESIS_KIND
from serving.actions import GateRefused, create_alias, ensure_default_aliases, promote, update_gate
from serving.models import Alias
from serving.pipeline.lookups import (
    PlanError,
    find_eval,
    find_finetune,
    find_suite,
    gate_changes,
    judge,
    lm_eval_tasks,
    teacher_input,
    wanted_gate,
)
from serving.pipeline.plan import DataPart, Plan
from workbench.actions import ActionError
from workbench.actions.datasets import DatasetRejected, import_dataset, with_held_out
from workbench.actions.projects import create_project
from workbench.actions.prompts import save_prompt
from workbench.models import DatasetVersion, Project, Variant

Say = Callable[[str], None]
Follow = Callable[[Job], None]  # to the job's end; raises when it did not succeed
AUTO_EVAL_WAIT = 60.0  # seconds a finished fine-tune is given to start its own comparison


@dataclass
class Outcome:
    variant: Variant | None = None
    comparison: ArmComparison | None = None
    promoted: bool | None = None  # None: the spec promotes nothing
    verdict: dict[str, Any] | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "variant": None
            if self.variant is None
            else {
                "id": self.variant.pk,
                "name": self.variant.name,
                "adapter_path": self.variant.adapter_path,
            },
            "comparison": None
            if c is None
            else {"id": c.pk, "suite": str(c.suite), "job": c.job_id, "headline": c.headline},
            "promoted": self.promoted,
            "verdict": self.verdict,
            "message": self.message,
        }


def apply_plan(plan: Plan, user: User | None, say: Say, follow: Follow) -> Outcome:
    try:
        return _apply(plan, user, say, follow)
    except (ActionError, ConfigError, SettingsError) as exc:
        raise PlanError(str(exc)) from exc


def _apply(plan: Plan, user: User | None, say: Say, follow: Follow) -> Outcome:
    spec = plan.spec
    if plan.project is None:
        if user is None:
            raise PlanError(
                f"{spec.where('project')}: there is no project {spec.project!r}: pass --user NAME to create "
                "it (NAME owns it)"
            )
        plan.project = create_project(user, spec.project)
        say(f"project: created {plan.project.name} ({plan.project.slug})")
    project = plan.project
    if plan.new_prompt is not None:
        checked = plan.new_prompt
        name = spec.section("prompt")["name"]
        saved = save_prompt(
            project, user, name, checked.text, checked.rules, f"from {spec.name}", checked.facts
        )
        plan.prompt_version = saved.version
        say(f"prompt: saved {saved.version}" if saved.created else f"prompt: {saved.version} unchanged")
    assert plan.prompt_version is not None and plan.train is not None and plan.base is not None
    for part in (plan.train, plan.heldout):
        if part is not None and part.version is None:
            part.version = _import(plan, part, user)
            label = "training data" if part.role == "train" else "held-out data"
            say(f"{label}: imported {part.version} ({part.version.row_count:,} rows)")
    if plan.heldout is not None and plan.combined is None:
        assert plan.train.version is not None and plan.heldout.version is not None
        plan.combined = with_held_out(plan.train.version, plan.heldout.version, user)
        say(f"data: {plan.combined} holds the training queries and the held-out ones as its eval split")
    data = teacher_input(plan)
    assert data is not None
    if plan.comparison is None and plan.suite is None:
        plan.suite = find_suite(plan, eval_source(data)) or _suite(plan, eval_source(data), user)
        say(f"eval: suite {plan.suite}")
    finetune = _train(plan, _synthesize(plan, data, user, say, follow), user, say, follow)
    finetune.refresh_from_db()
    variant = finetune.variant
    if variant is None:
        raise PlanError(f"{finetune} made no variant")
    comparison = _evaluate(plan, finetune, variant, user, say, follow)
    outcome = Outcome(variant, comparison)
    if spec.promote is not None:
        _promote(plan, comparison.suite, variant, user, outcome, say)
    return outcome


def _import(plan: Plan, part: DataPart, user: User | None) -> DatasetVersion:
    assert plan.project is not None and part.path is not None and part.content is not None
    data = plan.spec.section("data")
    try:
        with part.path.open("rb") as f:
            version = import_dataset(
                plan.project,
                user,
                part.name,
                f,
                filename=part.path.name,
                fmt=data.get("format", "auto"),
                query_column=data.get("query_column"),
                answer_column=data.get("answer_column"),
                eval_percent=part.eval_percent,
                seed=part.seed,
            )
    except DatasetRejected as exc:
        raise PlanError(f"{part.where}: {part.path.name}: {exc}") from None
    if version.sha256 != part.content.sha256:  # the file changed since the plan read it
        raise PlanError(f"{part.where}: {part.path.name} changed while it was imported: apply again")
    return version


def _suite(plan: Plan, source: DatasetVersion, user: User | None) -> EvalSuite:
    assert plan.project is not None and plan.prompt_version is not None
    model, endpoint, rubric = judge(plan)
    base = f"{source} held out · {plan.prompt_version}"
    name, n = base, 1
    while EvalSuite.objects.filter(project=plan.project, name=name).exists():
        n += 1
        name = f"{base} ({n})"
    return create_suite(
        plan.project,
        user,
        name,
        source,
        prompt_version=plan.prompt_version,
        main_metric=plan.spec.section("eval").get("main_metric", ""),
        judge_base=model,
        judge_endpoint=endpoint,
        judge_rubric=rubric,
        lm_eval_tasks=lm_eval_tasks(plan),
    )


def _stamped(plan: Plan, step: str, job: Job, say: Say) -> None:
    want = plan.step(step).fingerprint
    plan.step(step).job = job.pk
    if job.params.get(fingerprints.KEY) != want:  # the plan and the actions disagree: a bug, not the user's
        say(f"warning: {job}'s fingerprint differs from the plan's: the next apply will run it again")


def _synthesize(
    plan: Plan, data: DatasetVersion, user: User | None, say: Say, follow: Follow
) -> DatasetVersion:
    """What the teacher answers: `data`, or with the spec's synthesis the version its job
    stores (the job found by its fingerprint, or started and followed here)."""
    if plan.synthesis is None or plan.teacher_job is not None or plan.finetune_job is not None:
        return data
    project = plan.project
    assert project is not None and plan.prompt_version is not None and plan.teacher_model is not None
    job = plan.synthesis_job
    if job is None:
        with _locked(project):
            job = fingerprints.find(project.pk, SYNTHESIS_KIND, plan.synthesis_fp)
            if job is None:
                job = start_synthesis(
                    project,
                    user,
                    plan.prompt_version,
                    data,
                    plan.teacher_model,
                    plan.synthesis["count"],
                    plan.synthesis["settings"],
                    teacher_endpoint=plan.endpoint,
                    then_teacher=True,
                )
                say(f"synthesis: started {job}")
    _stamped(plan, "synthesis", job, say)
    made = _output(job, "synthesis", "stored no queries", say, follow)
    say(f"synthesis: the teacher answers {made} ({made.row_count:,} rows)")
    return made


def _output(job: Job, step: str, missing: str, say: Say, follow: Follow) -> DatasetVersion:
    """The dataset version `job` stores, once followed to its end."""
    if not job.is_terminal:
        say(f"{step}: following {job}")
        follow(job)
    job.refresh_from_db()
    if job.output_dataset is None:
        raise PlanError(f"{job} {missing}")
    return job.output_dataset


def _train(plan: Plan, data: DatasetVersion, user: User | None, say: Say, follow: Follow) -> Job:
    spec, project = plan.spec, plan.project
    assert project is not None and plan.prompt_version is not None and plan.base is not None
    if plan.finetune_job is not None:
        if not plan.finetune_job.is_terminal:
            if plan.teacher_job is not None and not plan.teacher_job.is_terminal:
                say(f"teacher: following {plan.teacher_job}")
                follow(plan.teacher_job)
            say(f"fine-tune: following {plan.finetune_job}")
            follow(plan.finetune_job)
        return plan.finetune_job
    teacher, finetune = plan.teacher_job, None
    if teacher is None:
        with _locked(project):  # another apply of the same spec may have started it since the plan
            teacher = fingerprints.find(project.pk, "teacher", plan.teacher_fp)
            if teacher is None:
                teacher, finetune = start_absorb(
                    project,
                    user,
                    plan.prompt_version,
                    data,
                    plan.base,
                    spec.section("teacher").get("generation"),
                    spec.training,
                    teacher_model=plan.teacher_model,
                    curation=spec.curation,
                    passing_only=spec.passing_only,
                    teacher_endpoint=plan.endpoint,
                )
        if finetune is not None:
            _stamped(plan, "teacher", teacher, say)
            say(f"teacher: started {teacher}; fine-tune {finetune} waits for it")
            follow(teacher)
        else:
            plan.step("teacher").job = teacher.pk
            say(f"teacher: {teacher} was started by another apply since the plan: following it")
    if finetune is None:
        answers = _output(teacher, "teacher", "left no answers to train on", say, follow)
        with _locked(project):
            finetune = find_finetune(project, plan.finetune_fp)
            if finetune is None:
                finetune = start_finetune(
                    project,
                    user,
                    plan.prompt_version,
                    answers,
                    plan.base,
                    spec.training,
                    passing_only=spec.passing_only,
                    teacher_model=plan.teacher_model,
                )
    _stamped(plan, "fine-tune", finetune, say)
    say(f"fine-tune: {finetune}")
    follow(finetune)
    return finetune


def _evaluate(
    plan: Plan, finetune: Job, variant: Variant, user: User | None, say: Say, follow: Follow
) -> ArmComparison:
    comparison = plan.comparison
    if comparison is None:
        fp, comparison = find_eval(plan, variant)
        if comparison is None and _may_start_its_own(finetune):
            deadline = time.monotonic() + AUTO_EVAL_WAIT
            while comparison is None and time.monotonic() < deadline and not _said_eval(finetune):
                time.sleep(0.5)
            fp, comparison = find_eval(plan, variant)
        if comparison is None:
            assert plan.project is not None and plan.suite is not None
            with _locked(plan.project):
                fp, comparison = find_eval(plan, variant)
                if comparison is None:
                    comparison = start_comparison(
                        plan.project,
                        user,
                        plan.suite,
                        variant,
                        absorb_job=finetune,
                        generation=plan.spec.section("eval").get("generation"),
                    )
                    say(f"eval: started the four-arm comparison #{comparison.pk} on {plan.suite}")
        else:
            say(f"eval: the fine-tune's four-arm comparison #{comparison.pk} on {comparison.suite}")
        assert comparison.job is not None
        fingerprints.stamp(comparison.job, fp)
        plan.step("eval").fingerprint = fp
    assert comparison.job is not None
    plan.step("eval").job = comparison.job_id
    if not comparison.job.is_terminal:
        follow(comparison.job)
    comparison.refresh_from_db()
    return comparison


@contextmanager
def _locked(project: Project) -> Iterator[None]:
    """Between finding a step's job by its fingerprint and starting it, no
    other apply of the project does the same (both would start the step)."""
    with transaction.atomic():
        Project.objects.select_for_update().filter(pk=project.pk).first()
        yield


def _may_start_its_own(finetune: Job) -> bool:
    """A fine-tune that just ended starts its comparison itself (evals.signals)."""
    recent = (
        finetune.finished_at is not None and (timezone.now() - finetune.finished_at).total_seconds() < 300
    )
    return bool(settings.AUTO_EVAL) and recent


def _said_eval(finetune: Job) -> bool:
    """The fine-tune's log says what became of its comparison."""
    log = Job.objects.filter(pk=finetune.pk).values_list("log", flat=True).first() or ""
    return "] eval: " in log


def _promote(
    plan: Plan, suite: EvalSuite, variant: Variant, user: User | None, outcome: Outcome, say: Say
) -> None:
    section = plan.spec.promote
    assert section is not None and plan.project is not None
    ensure_default_aliases(plan.project)
    alias = Alias.objects.filter(project=plan.project, name=section["alias"]).first() or create_alias(
        user, plan.project, section["alias"]
    )
    wanted = wanted_gate(plan.spec, alias)
    if wanted is not None and gate_changes(plan, alias, suite):
        alias = update_gate(user, alias, gating_suite=suite, **wanted)
        say(f"promote: the gate of {alias.model_name} is now the spec's, on {suite}")
    if alias.variant_id == variant.pk:
        outcome.promoted = True
        outcome.message = f"{alias.model_name} already points at {variant} (#{variant.pk})"
        return
    try:
        move = promote(user, alias, variant)
    except GateRefused as exc:
        outcome.promoted, outcome.verdict = False, exc.verdict.to_dict()
        outcome.message = str(exc)
        return
    outcome.promoted, outcome.verdict = True, move.verdict
    outcome.message = f"{alias.model_name} -> {variant} (#{variant.pk}), gate passed"
