"""Objectives instead of settings: a spec with `objectives` and `search` is
applied as a small search. Trial 1 is the spec's own settings; later ones are
asked of Optuna's TPE sampler (seeded) over the searched settings. Each trial
is a plan and an apply without the promotion, so a step an earlier trial ran
with the same inputs is reused by its fingerprint (a training-only change
reuses the teacher's answers). The search stops at the first trial that meets
every objective, when the next trial's estimate no longer fits the budget or
the budget is spent, or after max_trials; then the best trial (the smallest
shortfall, the earliest on a tie) is promoted when the spec promotes and it
meets every objective.

The search is a pure function of its finished trials: the sampler is seeded
and the budget is charged when a trial ends. So the browser's run (which
applies the spec again each time a job ends) replays the finished trials from
their reused steps, asks the same next trial, and charges the time each trial
really ended at (its comparison's end), not the time of the replay."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna

from engines.curation import CurationSettings
from engines.training import TrainConfig
from evals.models import ArmComparison
from serving.pipeline.lookups import PlanError, lm_eval_tasks
from serving.pipeline.plan import Plan, make_plan
from serving.pipeline.run import Follow, Outcome, Say, apply_plan
from workbench.models import Project
from workbench.pipeline import Spec
from workbench.pipeline.schema import DEFAULT_SPACE, OBJECTIVES

# Objectives on a share or a difference are short by their gap; latency and tokens by their gap's
# share of the bound (0.5 s over a 1 s bound weighs as 0.5 of all-rules).
RELATIVE = ("max_latency_p50", "max_prompt_tokens")


@dataclass
class Trial:
    number: int
    settings: dict[str, Any]
    metrics: dict[str, float | None] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)
    shortfall: float = float("inf")
    seconds: float = 0.0
    estimate: float = 0.0
    reused: list[str] = field(default_factory=list)
    variant: int | None = None
    comparison: int | None = None
    same_as: int | None = None  # the settings of an earlier trial, asked again: not run again

    @property
    def met(self) -> bool:
        return self.shortfall == 0.0

    @property
    def measured(self) -> dict[str, float | None]:
        """The metrics by plain name ("all_rules", not the objective's "min_all_rules")."""
        return {k.split("_", 1)[1]: v for k, v in self.metrics.items()}

    def verdict(self) -> str:
        got = ", ".join(f"{k} {v:.3g}" for k, v in self.measured.items() if v is not None)
        return f"{got or 'nothing measured'}: " + (
            "meets every objective" if self.met else "short: " + "; ".join(self.unmet)
        )


@dataclass
class Search:
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""
    best: Trial | None = None
    outcome: Outcome | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [asdict(t) | {"met": t.met, "measured": t.measured} for t in self.trials],
            "stopped": self.stopped,
            "best": self.best.number if self.best else None,
        }

    def text(self) -> str:
        lines = ["search:"]
        for t in self.trials:
            shown = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in t.settings.items())
            if t.same_as is not None:
                lines.append(f"  trial {t.number}: {shown}: the settings of trial {t.same_as} again")
                continue
            reused = f", reused {', '.join(t.reused)}" if t.reused else ""
            lines.append(f"  trial {t.number}: {shown}: {t.verdict()} ({t.seconds:.0f} s{reused})")
        lines.append(f"  stopped: {self.stopped}")
        if self.best is not None:
            lines.append(f"  best: trial {self.best.number} (variant #{self.best.variant})")
        return "\n".join(lines)


def measure(comparison: ArmComparison) -> dict[str, float | None]:
    """What each objective reads, from the four-arm comparison."""
    runs = {r.arm: r for r in comparison.runs.all()}
    student = runs.get("student")
    h = comparison.headline or {}

    def value(name: str) -> float | None:
        m = student.metric(name) if student is not None else None
        v = (m or {}).get("value")
        return float(v) if isinstance(v, int | float) else None

    summary = student.summary if student is not None else {}
    retained = (h.get("retained") or {}).get("value")
    drops = [-(d or {}).get("value", 0.0) for d in (h.get("lm_eval") or {}).values()]
    latency = (summary.get("latency") or {}).get("p50")
    tokens = summary.get("prompt_tokens")
    return {
        "min_all_rules": value("all_rules"),
        "min_retained": float(retained) if isinstance(retained, int | float) else None,
        "min_fact_recall": value("fact_recall"),
        "max_skills_drop": max(drops) if drops else None,
        "max_latency_p50": float(latency) if isinstance(latency, int | float) else None,
        "max_prompt_tokens": float(tokens) if isinstance(tokens, int | float) else None,
    }


def shortfall(objectives: dict[str, float], metrics: dict[str, float | None]) -> tuple[float, list[str]]:
    """How far the metrics are from the objectives (0: every one met), and what is short."""
    total, unmet = 0.0, []
    for name, bound in objectives.items():
        got = metrics.get(name)
        what = name.split("_", 1)[1]
        if got is None:
            total += 1.0
            unmet.append(f"{what} not measured")
            continue
        gap = (bound - got) if name.startswith("min_") else (got - bound)
        if gap > 1e-12:
            total += gap / bound if name in RELATIVE and bound > 0 else gap
            sign = ">=" if name.startswith("min_") else "<="
            unmet.append(f"{what} {got:.3g} (wants {sign} {bound:g})")
    return total, unmet


def space_of(spec: Spec) -> dict[str, list[Any]]:
    """The values to try per searched setting; the spec's own value is one of them (trial 1)."""
    space = {k: list(v) for k, v in (spec.section("search").get("space") or DEFAULT_SPACE).items()}
    own = own_settings(spec, space)
    for key, value in own.items():
        if value not in space[key]:
            space[key].insert(0, value)
    return space


def own_settings(spec: Spec, space: dict[str, list[Any]]) -> dict[str, Any]:
    training = TrainConfig.from_dict(spec.training).to_dict()
    curation = spec.curation if isinstance(spec.curation, dict) else {}
    curated = {**CurationSettings().to_dict(), **curation}
    out = {}
    for key in space:
        section, _, name = key.partition(".")
        out[key] = training.get(name) if section == "training" else curated.get(name)
    return out


def with_settings(spec: Spec, settings: dict[str, Any], promote: bool = False) -> Spec:
    """A copy of the spec with the trial's settings (and without its promotion, but for the pick)."""
    data = copy.deepcopy(spec.data)
    data.pop("search", None)
    data.pop("objectives", None)
    if not promote:
        data.pop("promote", None)
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if not isinstance(data.get(section), dict):
            data[section] = {}
        data[section][name] = value
    return Spec(spec.name, spec.folder, data, spec._root, spec.checked_prompt)


def note(spec: Spec) -> str | None:
    """What a search spec does after the plan shown (trial 1); None for a plain spec."""
    if "search" not in spec.data:
        return None
    wanted = spec.section("search")
    return (
        f"then a search of up to {wanted.get('max_trials', 8)} trials within "
        f"{wanted['budget_minutes']:g} minutes, until one meets every objective "
        f"({', '.join(spec.section('objectives'))}); the plan above is trial 1"
    )


def check(spec: Spec, first: Plan) -> None:
    """Objectives that this spec could never measure are refused before anything runs."""
    objectives = spec.section("objectives")
    if "max_skills_drop" in objectives and not lm_eval_tasks(first):
        raise PlanError(
            f"{spec.where('objectives', 'max_skills_drop')}: no general-skills task runs "
            "(eval.lm_eval_tasks is empty), so the drop cannot be measured"
        )
    if "min_fact_recall" in objectives:
        facts = first.prompt_version.facts if first.prompt_version is not None else None
        if not facts and not (first.new_prompt and first.new_prompt.facts):
            raise PlanError(
                f"{spec.where('objectives', 'min_fact_recall')}: the prompt has no facts checks, "
                "so fact recall cannot be measured"
            )
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown:
        raise PlanError(f"unknown objectives: {', '.join(sorted(unknown))}")


class Optimizer:
    """The search; `plan` and `run` are the workbench's own (a test may replace them).
    `ended(outcome)`: the seconds of the budget spent when that trial ended (default: the clock
    since the search began); `project`: the project the spec is applied to (the browser's)."""

    def __init__(
        self,
        spec: Spec,
        run: Callable[[Plan], Outcome],
        say: Say,
        clock: Callable[[], float] = time.monotonic,
        ended: Callable[[Outcome], float] | None = None,
        project: Project | None = None,
    ) -> None:
        self.spec, self.run_plan, self.say, self.clock = spec, run, say, clock
        self.ended, self.project = ended, project
        search = spec.section("search")
        self.objectives: dict[str, float] = {k: float(v) for k, v in spec.section("objectives").items()}
        self.budget = float(search["budget_minutes"]) * 60
        self.max_trials = int(search.get("max_trials", 8))
        self.seed = int(search.get("seed", 0))

    def plan(self, settings: dict[str, Any], promote: bool = False) -> Plan:
        return make_plan(with_settings(self.spec, settings, promote), self.project)

    def check(self, first: Plan) -> None:
        check(self.spec, first)

    def search(self) -> Search:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = space_of(self.spec)
        study = optuna.create_study(
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=min(4, self.max_trials)),
        )
        study.enqueue_trial(own_settings(self.spec, space))
        out = Search()
        began = self.clock()
        spent = 0.0
        seen: dict[str, Trial] = {}
        for number in range(1, self.max_trials + 1):
            asked = study.ask()
            settings = {key: asked.suggest_categorical(key, choices) for key, choices in space.items()}
            trial = Trial(number, settings)
            earlier = seen.get(repr(sorted(settings.items())))
            if earlier is not None:
                trial.same_as, trial.shortfall = earlier.number, earlier.shortfall
                study.tell(asked, earlier.shortfall)
                out.trials.append(trial)
                continue
            plan = self.plan(settings)
            if number == 1:
                self.check(plan)
            trial.estimate = plan.seconds
            trial.reused = [s.name for s in plan.steps if s.action == "reuse" and s.job]
            left = self.budget - spent
            if number > 1 and trial.estimate > left:
                study.tell(asked, state=optuna.trial.TrialState.FAIL)
                out.stopped = (
                    f"budget: trial {number} would take about {trial.estimate:.0f} s, "
                    f"{max(0.0, left):.0f} s of the budget are left"
                )
                break
            self.say(f"trial {number}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
            outcome = self.run_plan(plan)
            ended = self.clock() - began if self.ended is None else self.ended(outcome)
            trial.seconds, spent = max(0.0, ended - spent), max(spent, ended)
            if outcome.comparison is not None:
                trial.metrics = measure(outcome.comparison)
                trial.comparison = outcome.comparison.pk
            trial.variant = outcome.variant.pk if outcome.variant is not None else None
            trial.shortfall, trial.unmet = shortfall(self.objectives, trial.metrics)
            study.tell(asked, trial.shortfall)
            out.trials.append(trial)
            seen[repr(sorted(settings.items()))] = trial
            self.say(f"trial {number}: " + trial.verdict())
            if trial.met:
                out.stopped = f"trial {number} meets every objective"
                break
            if spent >= self.budget:
                out.stopped = f"budget: {self.budget:.0f} s spent after trial {number}"
                break
        else:
            out.stopped = f"tried {self.max_trials} trials (max_trials) without meeting every objective"
        ran = [t for t in out.trials if t.same_as is None and t.variant is not None]
        out.best = min(ran, key=lambda t: (t.shortfall, t.number)) if ran else None
        return out


def optimize(
    spec: Spec,
    user: Any,
    say: Say,
    follow: Follow,
    project: Project | None = None,
    ended: Callable[[Outcome], float] | None = None,
) -> Search:
    """Search, then promote the best trial when it meets every objective and the spec promotes
    (its steps are all reused). A best trial short of an objective is reported, not promoted."""
    optimizer = Optimizer(
        spec, lambda plan: apply_plan(plan, user, say, follow), say, ended=ended, project=project
    )
    result = optimizer.search()
    best = result.best
    if best is not None:
        promote = spec.promote is not None and best.met
        result.outcome = apply_plan(optimizer.plan(best.settings, promote=promote), user, say, follow)
        if spec.promote is not None and not best.met:
            result.outcome.promoted = False
            result.outcome.message = (
                f"not promoted: no trial met every objective; the best, trial {best.number}, is short: "
                + "; ".join(best.unmet)
            )
    return result
