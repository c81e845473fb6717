"""The promotion gate: may this candidate take this alias? Every check
carries the number it measured and the bar it was held to, so the verdict
can be shown before the user confirms and kept in the audit row."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from django.db.models import Q

from evals.models import ArmComparison, EvalRun, EvalSuite, metric_label
from jobs.models import Job
from serving.models import Alias
from workbench.models import Variant


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    suite: str | None = None
    suite_id: int | None = None
    run_id: int | None = None
    comparison_id: int | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "suite": self.suite,
            "suite_id": self.suite_id,
            "run_id": self.run_id,
            "comparison_id": self.comparison_id,
            "checks": [asdict(c) for c in self.checks],
        }

    def explain(self) -> str:
        """One line per check, for messages and the command line."""
        lines = []
        for c in self.checks:
            lines.append(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def latest_run(suite: EvalSuite, variant: Variant) -> EvalRun | None:
    """The variant's latest finished run on the suite, answering as it is
    served: an adapter variant through its adapter, a base or prompted
    variant as its base model (a run of the base alone counts), and with
    the prompt exactly when the variant is served with it."""
    if variant.adapter_path:
        who = Q(variant=variant)
    else:
        who = Q(variant=variant) | Q(variant__isnull=True, base_model_id=variant.base_model_id)
    prompt = (
        Q(prompt_version_id=variant.prompt_version_id)
        if variant.prepend_prompt and variant.prompt_version_id
        else Q(prompt_version__isnull=True)
    )
    finished = Q(job__isnull=True) | Q(job__status=Job.SUCCEEDED)
    return (
        EvalRun.objects.filter(who, prompt, finished, suite=suite, summary__complete=True)
        .order_by("-created_at", "-id")
        .first()
    )


def latest_comparison(suite: EvalSuite, variant: Variant) -> ArmComparison | None:
    """The latest four-arm comparison of the variant on the suite that has
    a headline (a comparison still running has none yet)."""
    for comparison in ArmComparison.objects.filter(suite=suite, variant=variant).select_related("job"):
        if comparison.job is not None and comparison.job.status != Job.SUCCEEDED:
            continue
        if "retained" in comparison.headline:
            return comparison
    return None


def _metric(run: EvalRun | None, name: str) -> float | None:
    m = run.metric(name) if run is not None else None
    value = m.get("value") if m else None
    return float(value) if isinstance(value, (int, float)) else None


SKILLS_TASK = "general_skills"


def _skills_check(bar: float, suite: EvalSuite, comparison: ArmComparison | None) -> Check:
    """General skills lost to absorption: the student - floor paired difference
    on the suite's general_skills lm-eval task; the drop is its negative."""
    name = "general skills drop"
    if comparison is None:
        return Check(name, False, None, bar, f"no four-arm comparison for this variant on “{suite}”")
    diff = (comparison.headline.get("lm_eval") or {}).get(SKILLS_TASK) or {}
    value = diff.get("value")
    if not isinstance(value, (int, float)):
        if SKILLS_TASK not in suite.lm_eval_tasks:
            why = f"no {SKILLS_TASK} result: add the {SKILLS_TASK} task to the gating suite “{suite}”"
        elif diff:
            why = f"no {SKILLS_TASK} estimate: {diff.get('note') or 'no value'}"
        else:
            why = f"no {SKILLS_TASK} result (did the floor and student lm-eval runs finish?)"
        return Check(name, False, None, bar, f"comparison {comparison.pk}: {why}")
    drop = -float(value)
    ok = drop <= bar + 1e-12
    return Check(
        name,
        ok,
        drop,
        bar,
        f"comparison {comparison.pk}: student − floor on {SKILLS_TASK} {_fmt(value)} "
        f"[{_fmt(diff.get('low'))}, {_fmt(diff.get('high'))}]; drop {_fmt(drop)} "
        f"{'≤' if ok else '>'} largest allowed {_fmt(bar)}",
    )


def evaluate_gate(alias: Alias, candidate: Variant) -> Verdict:
    suite = alias.gating_suite
    if suite is None:
        return Verdict(True, [Check("gating suite", True, detail="no gating suite: nothing to check")])
    checks: list[Check] = []
    run = latest_run(suite, candidate)
    served = (
        "with its prompt" if candidate.prepend_prompt and candidate.prompt_version_id else "without a prompt"
    )
    if run is None:
        checks.append(
            Check(
                "eval run",
                False,
                detail=f"{candidate} has no finished eval run on “{suite}” "
                f"({served}): evaluate it on that suite first",
            )
        )
    else:
        checks.append(
            Check(
                "eval run",
                True,
                detail=f"run {run.pk} of {run.created_at:%Y-%m-%d %H:%M} "
                f"({run.summary.get('examples', '?')} examples)",
            )
        )
    no_run = f"no finished run on “{suite}”"

    if alias.min_all_rules is not None:
        value = _metric(run, "all_rules")
        if run is None:
            checks.append(Check("all-rules compliance", False, None, alias.min_all_rules, no_run))
        elif value is None:
            checks.append(
                Check(
                    "all-rules compliance",
                    False,
                    None,
                    alias.min_all_rules,
                    f"run {run.pk} has no all-rules result (does the suite have rules?)",
                )
            )
        else:
            ok = value >= alias.min_all_rules
            checks.append(
                Check(
                    "all-rules compliance",
                    ok,
                    value,
                    alias.min_all_rules,
                    f"{_fmt(value)} {'≥' if ok else '<'} minimum {_fmt(alias.min_all_rules)}",
                )
            )

    comparison: ArmComparison | None = None
    if alias.min_retained_lower is not None:
        comparison = latest_comparison(suite, candidate)
        name = "prompt effect retained (lower bound)"
        if comparison is None:
            checks.append(
                Check(
                    name,
                    False,
                    None,
                    alias.min_retained_lower,
                    f"no four-arm comparison for this variant on “{suite}”",
                )
            )
        else:
            retained = comparison.headline.get("retained") or {}
            low = retained.get("low")
            if not isinstance(low, (int, float)):
                note = retained.get("note") or "no confidence interval"
                checks.append(
                    Check(name, False, None, alias.min_retained_lower, f"comparison {comparison.pk}: {note}")
                )
            else:
                ok = low >= alias.min_retained_lower
                checks.append(
                    Check(
                        name,
                        ok,
                        float(low),
                        alias.min_retained_lower,
                        f"comparison {comparison.pk}: {_fmt(retained.get('value'))} "
                        f"[{_fmt(low)}, {_fmt(retained.get('high'))}]; lower bound {_fmt(low)} "
                        f"{'≥' if ok else '<'} minimum {_fmt(alias.min_retained_lower)}",
                    )
                )

    if alias.min_fact_recall is not None:
        value = _metric(run, "fact_recall")
        if run is None:
            checks.append(Check("fact recall", False, None, alias.min_fact_recall, no_run))
        elif value is None:
            checks.append(
                Check(
                    "fact recall",
                    False,
                    None,
                    alias.min_fact_recall,
                    f"run {run.pk} has no fact recall (does the suite have facts checks, and do its "
                    "queries ask for any?)",
                )
            )
        else:
            ok = value >= alias.min_fact_recall
            checks.append(
                Check(
                    "fact recall",
                    ok,
                    value,
                    alias.min_fact_recall,
                    f"{_fmt(value)} {'≥' if ok else '<'} minimum {_fmt(alias.min_fact_recall)}",
                )
            )

    if alias.fact_recall_vs_teacher:
        comparison = comparison or latest_comparison(suite, candidate)
        name = "fact recall vs teacher"
        diff = (comparison.headline.get("fact_recall_vs_teacher") if comparison else None) or {}
        value = diff.get("value")
        if comparison is None:
            checks.append(
                Check(name, False, None, 0.0, f"no four-arm comparison for this variant on “{suite}”")
            )
        elif not isinstance(value, (int, float)):
            note = diff.get("note") or "no fact recall in its headline (does the suite have facts checks?)"
            checks.append(Check(name, False, None, 0.0, f"comparison {comparison.pk}: {note}"))
        else:
            # Paired over the same queries: the student states the facts at least as often as the teacher.
            ok = value >= -1e-12
            arms = comparison.headline.get("fact_recall") or {}
            student = (arms.get("student") or {}).get("value")
            teacher = (arms.get("teacher") or {}).get("value")
            checks.append(
                Check(
                    name,
                    ok,
                    float(value),
                    0.0,
                    f"comparison {comparison.pk}: student {_fmt(student)} vs teacher {_fmt(teacher)}; "
                    f"student − teacher {_fmt(value)} [{_fmt(diff.get('low'))}, {_fmt(diff.get('high'))}] "
                    f"{'≥' if ok else '<'} 0",
                )
            )

    if alias.max_skills_drop is not None:
        comparison = comparison or latest_comparison(suite, candidate)
        checks.append(_skills_check(alias.max_skills_drop, suite, comparison))

    if alias.max_regression is not None:
        metric = suite.main_metric
        name = f"{metric_label(metric)} vs holder"
        holder = alias.variant
        value = _metric(run, metric)
        if holder is None:
            checks.append(Check(name, True, value, None, "no current holder"))
        elif holder.pk == candidate.pk:
            checks.append(Check(name, True, value, value, f"{candidate} already holds {alias.name}"))
        else:
            held = _metric(latest_run(suite, holder), metric)
            if held is None:
                checks.append(
                    Check(
                        name,
                        True,
                        value,
                        None,
                        f"the holder {holder} has no {metric_label(metric)} result on “{suite}”: "
                        "nothing to compare",
                    )
                )
            elif value is None:
                checks.append(
                    Check(
                        name,
                        False,
                        None,
                        held - alias.max_regression,
                        no_run if run is None else f"run {run.pk} has no {metric_label(metric)} result",
                    )
                )
            else:
                floor = held - alias.max_regression
                ok = value >= floor - 1e-12
                checks.append(
                    Check(
                        name,
                        ok,
                        value,
                        floor,
                        f"candidate {_fmt(value)} vs holder {holder} {_fmt(held)}, at most "
                        f"{_fmt(alias.max_regression)} worse allowed: "
                        f"{_fmt(value)} {'≥' if ok else '<'} {_fmt(floor)}",
                    )
                )

    return Verdict(
        all(c.passed for c in checks),
        checks,
        suite=suite.name,
        suite_id=suite.pk,
        run_id=run.pk if run else None,
        comparison_id=comparison.pk if comparison else None,
    )
