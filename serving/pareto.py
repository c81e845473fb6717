"""The Pareto view of one prompt: every variant trained from any version of
it, and the base model without and with the prompt as reference points,
placed by quality (all rules, prompt effect retained, judge score) against
latency and prompt tokens per request, all read from each variant's latest
four-arm comparison. The frontier is the points no other point beats on
all three at once; the recommended variant is the fastest frontier variant
that passes an alias's gate, with one click to the promote flow."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import HttpResponse
from django.shortcuts import render

from engines.evaluation import FLOOR, STUDENT, TEACHER
from evals.models import ArmComparison, EvalRun
from jobs.models import Job
from serving import actions
from serving.gate import Verdict, evaluate_gate
from serving.models import Alias
from workbench.models import Project, Prompt, Variant
from workbench.shortcuts import AuthedHttpRequest, get_for_project

# What "quality" can mean on this page, and the range of its axis.
QUALITIES = {
    "all_rules": "All rules",
    "retained": "Prompt effect retained",
    "judge": "Judge score (1-10)",
}
AXES: dict[str, dict[str, float]] = {
    "all_rules": {"min": 0.0, "max": 1.0},
    # A ratio: 0 is the base without the prompt, 1 the base with it; a student can land outside.
    "retained": {"suggestedMin": 0.0, "suggestedMax": 1.0},
    "judge": {"min": 1.0, "max": 10.0},
}


# --- the frontier: plain Python --------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` = (quality, latency, tokens) is at least as good as `b` on all
    three (higher quality, lower latency, fewer tokens) and better on one."""
    no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return no_worse and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])


def frontier(points: Sequence[Sequence[float] | None]) -> list[int]:
    """Indices of the points no other point dominates, in their order.
    A point with a measure missing (None) is on no frontier and beats none."""
    known = [(i, p) for i, p in enumerate(points) if p is not None]
    return [i for i, p in known if not any(dominates(q, p) for j, q in known if j != i)]


# --- the points of a prompt ------------------------------------------------------------------


@dataclass
class Point:
    label: str
    quality: dict[str, float | None]
    latency: float | None
    tokens: float | None
    variant: Variant | None = None  # None: a reference point (the base without or with the prompt)
    comparison: ArmComparison | None = None
    run: EvalRun | None = None
    on_frontier: bool = False
    verdict: Verdict | None = None
    value: float | None = None  # the quality the page ranks by
    measured: bool = False  # quality, latency and tokens all known

    def measures(self, quality: str) -> tuple[float, float, float] | None:
        q = self.quality.get(quality)
        if q is None or self.latency is None or self.tokens is None:
            return None
        return (q, self.latency, self.tokens)


def _value(run: EvalRun, name: str) -> float | None:
    m = run.metric(name) or {}
    v = m.get("value")
    return float(v) if isinstance(v, (int, float)) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _point(label: str, run: EvalRun, retained: float | None, **kw: Any) -> Point:
    return Point(
        label=label,
        quality={"all_rules": _value(run, "all_rules"), "retained": retained, "judge": _value(run, "judge")},
        latency=_number((run.summary.get("latency") or {}).get("p50")),
        tokens=_number(run.summary.get("prompt_tokens")),
        run=run,
        **kw,
    )


def latest_comparisons(variants: Sequence[Variant]) -> dict[int, ArmComparison]:
    """Each variant's latest finished four-arm comparison that has a headline."""
    finished = Q(job__isnull=True) | Q(job__status=Job.SUCCEEDED)
    latest: dict[int, ArmComparison] = {}
    for c in (
        ArmComparison.objects.filter(finished, variant__in=variants)
        .select_related("suite", "variant__base_model", "variant__prompt_version")
        .order_by("-created_at", "-id")
    ):
        if c.variant_id not in latest and "retained" in c.headline:
            latest[c.variant_id] = c
    return latest


def prompt_points(prompt: Prompt) -> list[Point]:
    """The prompt's trained variants (their students, served without the
    prompt) and, from their latest comparisons, the base model without the
    prompt and with each version the variants learned from. Three queries."""
    variants = list(
        Variant.objects.filter(project=prompt.project, prompt_version__prompt=prompt)
        .exclude(adapter_path="")
        .select_related("base_model", "prompt_version")
    )
    comparisons = latest_comparisons(variants)
    runs: dict[tuple[int, str], EvalRun] = {}
    for run in EvalRun.objects.filter(comparison__in=comparisons.values()).select_related(
        "base_model", "prompt_version"
    ):
        if run.comparison_id is not None:
            runs[(run.comparison_id, run.arm)] = run
    points: list[Point] = []
    references: dict[tuple[Any, ...], Point] = {}
    # Newest comparison first: a reference point is read from the latest run of its kind.
    for c in sorted(comparisons.values(), key=lambda c: (c.created_at, c.pk), reverse=True):
        student = runs.get((c.pk, STUDENT))
        if student is not None:
            retained = _number((c.headline.get("retained") or {}).get("value"))
            points.append(_point(c.variant.name, student, retained, variant=c.variant, comparison=c))
        floor, teacher = runs.get((c.pk, FLOOR)), runs.get((c.pk, TEACHER))
        if floor is not None and ("floor", floor.base_model_id) not in references:
            # By its definition the floor retains none of the prompt's effect, the teacher all of it.
            label = f"{floor.base_model.name}, no prompt"
            references["floor", floor.base_model_id] = _point(label, floor, 0.0, comparison=c)
        if teacher is not None:
            key = ("teacher", teacher.base_model_id, teacher.prompt_version_id)
            if key not in references:
                label = f"{teacher.base_model.name} + {teacher.prompt_version or 'prompt'}"
                references[key] = _point(label, teacher, 1.0, comparison=c)
    return sorted(points, key=lambda p: p.label) + list(references.values())


def recommend(points: Sequence[Point]) -> Point | None:
    """The fastest frontier variant whose verdict passed (ties: fewer prompt
    tokens, then higher quality is left to the frontier: equal speed and
    tokens on the frontier means equal quality)."""
    passing = [
        p
        for p in points
        if p.on_frontier and p.variant is not None and p.verdict is not None and p.verdict.passed
    ]
    return min(passing, key=lambda p: (p.latency or 0.0, p.tokens or 0.0, p.label), default=None)


def objective(alias: Alias) -> str:
    """The bars of the alias's gate, in words."""
    if alias.gating_suite is None:
        return f"{alias.name} has no gate set, so every variant meets it"
    bars = []
    if alias.min_all_rules is not None:
        bars.append(f"all rules ≥ {alias.min_all_rules:g}")
    if alias.min_retained_lower is not None:
        bars.append(f"prompt effect retained, lower bound ≥ {alias.min_retained_lower:g}")
    if alias.min_fact_recall is not None:
        bars.append(f"fact recall ≥ {alias.min_fact_recall:g}")
    if alias.fact_recall_vs_teacher:
        bars.append("fact recall at least the teacher's")
    if alias.max_skills_drop is not None:
        bars.append(f"general skills drop ≤ {alias.max_skills_drop:g}")
    if alias.max_regression is not None:
        bars.append(f"at most {alias.max_regression:g} worse than the current holder")
    listed = "; ".join(bars) if bars else "an eval run on it"
    return f"the gate of {alias.name} on “{alias.gating_suite}”: {listed}"


@dataclass
class ParetoView:
    quality: str
    points: list[Point]
    alias: Alias | None
    recommended: Point | None
    objective: str
    chart: dict[str, Any] = field(default_factory=dict)


def build(prompt: Prompt, quality: str, alias: Alias | None) -> ParetoView:
    points = prompt_points(prompt)
    for p in points:
        p.value = p.quality.get(quality)
        p.measured = p.measures(quality) is not None
    for i in frontier([p.measures(quality) for p in points]):
        points[i].on_frontier = True
        if alias is not None and points[i].variant is not None:
            variant = points[i].variant
            assert variant is not None
            points[i].verdict = evaluate_gate(alias, variant)
    chart = {
        "quality": quality,
        "quality_label": QUALITIES[quality],
        "axis": AXES.get(quality, {}),
        "points": [
            {
                "label": p.label,
                "q": p.quality.get(quality),
                "latency": p.latency,
                "tokens": p.tokens,
                "frontier": p.on_frontier,
                "reference": p.variant is None,
            }
            for p in points
            if p.quality.get(quality) is not None
        ],
    }
    return ParetoView(
        quality=quality,
        points=points,
        alias=alias,
        recommended=recommend(points),
        objective=objective(alias) if alias is not None else "",
        chart=chart,
    )


# --- the page --------------------------------------------------------------------------------


class ParetoForm(forms.Form):
    quality = forms.ChoiceField(choices=list(QUALITIES.items()), required=False, label="Quality")
    alias = forms.ChoiceField(choices=[], required=False, label="Objective: the gate of")

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = {
            a.name: a for a in Alias.objects.filter(project=project).select_related("gating_suite")
        }
        field = self.fields["alias"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(name, name) for name in self.aliases]

    def default_alias(self) -> Alias | None:
        """The alias asked for; else production's gate, else the first alias with a gate, else any."""
        name = self.cleaned_data.get("alias") or ""
        if name:
            return self.aliases[name]
        gated = [a for a in self.aliases.values() if a.gating_suite_id]
        production = self.aliases.get("production")
        if production is not None and production.gating_suite_id:
            return production
        return gated[0] if gated else production or next(iter(self.aliases.values()), None)


def _json(data: Any) -> str:
    return json.dumps(data).replace("<", "\\u003c")


@login_required
def pareto(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    prompt = get_for_project(request, slug, Prompt.objects.select_related("project"), pk=prompt_id)
    actions.ensure_default_aliases(prompt.project)
    form = ParetoForm(prompt.project, request.GET)
    ctx: dict[str, Any] = {"project": prompt.project, "prompt": prompt, "form": form}
    if not form.is_valid():
        return render(request, "serving/pareto.html", ctx, status=400)
    quality = form.cleaned_data["quality"] or "all_rules"
    view = build(prompt, quality, form.default_alias())
    ctx.update({"view": view, "chart": _json(view.chart), "quality_label": QUALITIES[quality]})
    return render(request, "serving/pareto.html", ctx)
