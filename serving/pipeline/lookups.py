"""The lookups of the eval and promote steps, shared by the plan and the
run: what the held-out comparison measures (its part of the eval's
fingerprint), the suite a spec asks for, the comparison already made, and
the gate the spec sets on its alias."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings

from engines.inference import GenerationSettings
from evals.actions import comparison_generation, eval_source
from evals.models import ArmComparison, EvalSuite
from jobs import fingerprints
from jobs.models import Job, TeacherEndpoint
from serving.models import Alias
from workbench.models import DatasetVersion, FoundationModel, Project, Variant
from workbench.pipeline import Spec

if TYPE_CHECKING:
    from serving.pipeline.plan import Plan


class PlanError(Exception):
    """The spec names something the workbench does not have, or a file it refuses."""


GATE_FIELDS = Alias.GATE_FIELDS


def judge(plan: Plan) -> tuple[FoundationModel | None, TeacherEndpoint | None, str]:
    section = plan.spec.section("eval").get("judge") or {}
    if not section:
        return None, None, ""
    if "endpoint" in section:
        found = (
            TeacherEndpoint.objects.filter(project=plan.project, name=section["endpoint"]).first()
            if plan.project
            else None
        )
        if found is None:
            raise PlanError(
                f"{plan.spec.where('eval', 'judge', 'endpoint')}: no teacher endpoint {section['endpoint']!r} in the project"
            )
        return None, found, section["rubric"]
    model = FoundationModel.objects.filter(name=section["model"]).first()
    if model is None:
        raise PlanError(
            f"{plan.spec.where('eval', 'judge', 'model')}: no registered model {section['model']!r}"
        )
    return model, None, section["rubric"]


def lm_eval_tasks(plan: Plan) -> list[str]:
    tasks = plan.spec.section("eval").get("lm_eval_tasks")
    return list(settings.EVAL_AUTO_LM_EVAL_TASKS if tasks is None else tasks)


def suite_identity(plan: Plan) -> dict[str, Any]:
    """What the comparison measures on, as content: part of the eval's fingerprint."""
    model, endpoint, rubric = judge(plan)
    return {
        "eval_rows": plan.eval_rows,
        "prompt": plan.prompt,
        "judge": fingerprints.model_identity(model) if model else (endpoint.identity if endpoint else None),
        "rubric": rubric,
        "lm_eval_tasks": lm_eval_tasks(plan),
    }


def eval_fingerprint(plan: Plan, generation: GenerationSettings) -> str:
    return fingerprints.digest(
        {
            "step": "eval",
            "finetune": plan.finetune_fp,
            "suite": suite_identity(plan),
            "generation": generation.to_dict(),
        }
    )


def suite_matches(plan: Plan, suite: EvalSuite, source: DatasetVersion) -> bool:
    model, endpoint, rubric = judge(plan)
    metric = plan.spec.section("eval").get("main_metric")
    return (
        suite.dataset_version_id == source.pk
        and suite.prompt_version_id == (plan.prompt_version.pk if plan.prompt_version else None)
        and suite.judge_base_id == (model.pk if model else None)
        and suite.judge_endpoint_id == (endpoint.pk if endpoint else None)
        and suite.judge_id is None
        and suite.judge_rubric == rubric
        and list(suite.lm_eval_tasks) == lm_eval_tasks(plan)
        and (metric is None or suite.main_metric == metric)
    )


def teacher_input(plan: Plan) -> DatasetVersion | None:
    """The version the teacher answers (once it exists): the train rows with
    the held-out set's as the eval split, or the train version with its own."""
    assert plan.train is not None
    return plan.combined if plan.heldout is not None else plan.train.version


def eval_source_of(plan: Plan) -> DatasetVersion | None:
    version = teacher_input(plan)
    return eval_source(version) if version is not None else None


def find_suite(plan: Plan, source: DatasetVersion | None) -> EvalSuite | None:
    if source is None or plan.prompt_version is None:
        return None
    candidates = EvalSuite.objects.filter(
        project=plan.project, dataset_version=source, prompt_version=plan.prompt_version
    )
    return next((s for s in candidates.order_by("pk") if suite_matches(plan, s, source)), None)


def find_finetune(project: Project, fingerprint: str) -> Job | None:
    """The fine-tune that makes this, unless its variant was deleted since (then: train again)."""
    job = fingerprints.find(project.pk, "finetune", fingerprint)
    if job is not None and job.status == Job.SUCCEEDED and job.variant_id is None:
        return None
    return job


def find_eval(plan: Plan, variant: Variant) -> tuple[str, ArmComparison | None]:
    """The variant's comparison this spec asks for: stamped with its
    fingerprint, or (not yet stamped) one on a matching suite with the same
    generation settings, e.g. the one the fine-tune started by itself."""
    generation = comparison_generation(variant, plan.spec.section("eval").get("generation"))
    fp = eval_fingerprint(plan, generation)
    job = fingerprints.find(variant.project_id, "eval", fp)
    found = job.comparisons.order_by("-pk").first() if job is not None else None
    if found is None:
        for comparison in (
            ArmComparison.objects.filter(variant=variant).select_related("job", "suite").order_by("-pk")
        ):
            job = comparison.job
            if job is None or job.status in (Job.FAILED, Job.CANCELLED):
                continue
            if fingerprints.digest(job.params.get("generation")) != fingerprints.digest(generation.to_dict()):
                continue
            if suite_matches(plan, comparison.suite, comparison.suite.dataset_version):
                found = comparison
                break
    return fp, found


def unset(value: Any) -> bool:
    return value is None or value is False


def wanted_gate(spec: Spec, alias: Alias | None) -> dict[str, Any] | None:
    """The alias's gate as the spec says it (None: the spec leaves the gate as it is)."""
    section = (spec.promote or {}).get("gate")
    if section is None:
        return None
    wanted = {k: section.get(k, False if k == "fact_recall_vs_teacher" else None) for k in GATE_FIELDS}
    wanted["log_requests"] = section.get("log_requests", alias.log_requests if alias else False)
    return wanted


def gate_changes(plan: Plan, alias: Alias | None, suite: EvalSuite | None) -> dict[str, Any]:
    """The gate fields the spec sets that the alias does not have yet."""
    wanted = wanted_gate(plan.spec, alias)
    if wanted is None:
        return {}
    if alias is None:
        return {k: v for k, v in wanted.items() if not unset(v)} | {"gating_suite": "the held-out suite"}
    changed = {k: v for k, v in wanted.items() if getattr(alias, k) != v}
    if suite is None or alias.gating_suite_id != suite.pk:
        changed["gating_suite"] = str(suite) if suite else "this spec's held-out suite"
    return changed
