"""What curation is set to do, one query's result, and the data report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.curation.adaptive import Checker, Early, repaired_verdict
from engines.curation.repairs import REPAIRS, repair
from engines.curation.select import pass_rates, pick_best
from engines.inference import BOUNDS
from engines.rules import Rule, outcomes

_BOUND = {b.setting: b for b in BOUNDS if b.setting in ("temperature", "top_p")}


@dataclass(frozen=True)
class CurationSettings:
    """How teacher answers are curated. The defaults are what the workbench
    does when a prompt has checkable rules."""

    best_of: int = 2  # samples per query in each round
    # Rounds of best_of samples: later rounds ask only the queries with no passing sample yet.
    rounds: int = 3
    reminders: bool = True  # later rounds remind the teacher of what the best sample still fails
    # Later rounds open an answer lacking a required phrase (a contains rule) with it; the model writes the rest.
    phrases: bool = True
    # Later rounds open an answer missing a fact its query asks for (facts checks) with the prompt's sentence stating it.
    fact_sentences: bool = True
    # Round one asks this many queries first; what they meet too rarely (a required phrase, the facts)
    # opens the other answers from round one on instead of costing a round (0: later rounds only).
    probe: int = 16
    passages: int = 3  # prompt passages relevant to the query shown beside it (0: none)
    temperature: float = 0.7  # sampling for best-of-N (N=1 keeps the generation settings)
    top_p: float = 0.95
    prefill: bool = True
    repairs: tuple[str, ...] = tuple(REPAIRS)

    FIELDS = (
        "best_of",
        "rounds",
        "reminders",
        "phrases",
        "fact_sentences",
        "probe",
        "passages",
        "temperature",
        "top_p",
        "prefill",
        "repairs",
    )

    def __post_init__(self) -> None:
        errors = []
        for name, low, high in (("best_of", 1, 16), ("rounds", 1, 8), ("probe", 0, 256), ("passages", 0, 10)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                errors.append(f"{name} must be a whole number from {low} to {high}, got {value!r}")
        for name in ("reminders", "phrases", "fact_sentences", "prefill"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        # The samples are generated with these: the generation bounds are theirs.
        for name in ("temperature", "top_p"):
            problem = _BOUND[name].error(getattr(self, name))
            if problem:
                errors.append(f"{name} {problem}")
        unknown = [r for r in self.repairs if r not in REPAIRS]
        if unknown:
            errors.append(f"unknown repair(s) {', '.join(unknown)} (known: {', '.join(REPAIRS)})")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def max_samples(self) -> int:
        return self.best_of * self.rounds

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CurationSettings:
        data = dict(data or {})
        if "repairs" in data:
            data["repairs"] = tuple(data["repairs"])
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise ValueError(f"unknown curation setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.FIELDS}
        out["repairs"] = list(self.repairs)
        return out


@dataclass
class Curated:
    """One query's final answer and how it was made."""

    text: str
    raw: str  # the first sample, as generated
    first_pick: str  # the best of the first round, before repairs
    picked: str  # the best of every round, before repairs
    record: dict[str, Any]
    failing: list[str]
    extra: dict[str, bool] = field(default_factory=dict)  # the extra checks (facts) of the final answer


def curate(
    samples: Sequence[str],
    rules: Sequence[Rule],
    settings: CurationSettings,
    opening: str | None = None,
    *,
    rounds: Sequence[int] | None = None,
    extra: Checker | None = None,
    invented: Callable[[str], list[str]] | None = None,
) -> Curated:
    """Pick the sample that passes the most checks once repaired (rules, then
    the extra checks; ties: fewer figures `invented` finds in it once
    repaired (money, times the prompt never states), more rules passed as
    generated, the shorter, the first) and repair it; the record says which sample won, each
    sample's count, the round it came from, the opening used and every repair."""
    if not samples:
        raise ValueError("no samples to curate")
    rounds = list(rounds) if rounds is not None else [0] * len(samples)
    judged = [repaired_verdict(s, rules, settings.repairs, extra) for s in samples]
    verdicts = [checks for _, checks in judged]
    rule_names = {r.name for r in rules}
    _, raw_passed = pick_best(samples, rules)
    made_up = [len(invented(fixed)) if invented is not None else 0 for fixed, _ in judged]

    def key(i: int) -> tuple[int, int, int, int, int, int]:
        v = verdicts[i]
        rules_ok = sum(ok for name, ok in v.items() if name in rule_names)
        return (-rules_ok, -(sum(v.values()) - rules_ok), made_up[i], -raw_passed[i], len(samples[i]), i)

    best = min(range(len(samples)), key=key)
    first_round = [i for i, r in enumerate(rounds) if r == 0] or [0]
    first_best = min(first_round, key=lambda i: (-raw_passed[i], len(samples[i]), i))
    fixed = repair(samples[best], rules, enabled=settings.repairs)
    final = outcomes(rules, fixed.text)
    failing = [name for name, o in final.items() if not o.passed]
    checks = extra(fixed.text) if extra is not None else {}
    record: dict[str, Any] = {
        "samples": len(samples),
        "picked": best,
        "passed": [sum(v.values()) for v in verdicts],
        "repairs": [c.to_dict() for c in fixed.changes],
    }
    if any(rounds):
        record["rounds"] = rounds
    if checks:
        record["facts"] = checks
    figures = invented(fixed.text) if invented is not None else []
    if figures:
        record["invented_figures"] = figures
    undecided = {name: o.reason for name, o in final.items() if o.reason}
    if undecided:  # e.g. a pattern that ran out of time: the check failed, and this says why
        record["rule_errors"] = undecided
    if opening:
        record["opening"] = opening
    return Curated(
        text=fixed.text,
        raw=samples[0],
        first_pick=samples[first_best],
        picked=samples[best],
        record=record,
        failing=failing,
        extra=checks,
    )


def quality_report(
    curated: Sequence[Curated],
    rules: Sequence[Rule],
    settings: CurationSettings,
    opening: str | None,
    costs: Sequence[dict[str, Any]] = (),
    early: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pass rates of the answers after each stage: the first sample (with the
    opening when prefilled), the best of the first round, the best of every
    round (reminders and resampling), the repairs; each stage's cost in
    samples and seconds where `costs` (one per round) says it. `early`
    (Early.to_json of round one's probe) says what round one prefilled after it."""

    def rates(texts: list[str], stage_costs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        row = pass_rates(texts, rules)
        if stage_costs:
            row["samples"] = sum(c["samples"] for c in stage_costs)
            row["seconds"] = round(sum(c["seconds"] for c in stage_costs), 1)
        return row

    first, later = [c for c in costs if c["round"] == 0], [c for c in costs if c["round"] > 0]
    first_step = "raw (first sample" + (", prefilled" if opening else "")
    probe = Early.from_json(early) if early else None
    if probe:
        first_step += (
            f"; after a probe of {probe.probed} queries, {' and '.join(probe.prefilled())} prefilled"
        )
    steps = [{"step": first_step + ")", **rates([c.raw for c in curated])}]
    if settings.best_of > 1:
        steps.append({"step": f"best of {settings.best_of}", **rates([c.first_pick for c in curated], first)})
    elif first:
        steps[0].update(
            samples=sum(c["samples"] for c in first), seconds=round(sum(c["seconds"] for c in first), 1)
        )
    if settings.rounds > 1:
        label = "reminders and resampling" if settings.reminders else "resampling"
        prefilled = [
            what
            for what, on in (
                ("required phrases", settings.phrases),
                ("fact sentences", settings.fact_sentences and any(c.extra for c in curated)),
            )
            if on
        ]
        if settings.reminders and prefilled:
            label += ", " + " and ".join(prefilled) + " prefilled"
        steps.append(
            {
                "step": f"{label} (up to {settings.rounds} rounds, {settings.max_samples} samples)",
                **rates([c.picked for c in curated], later),
                # Later rounds ask subsets of round two's queries: those are the distinct queries.
                "queries": max((c["queries"] for c in later), default=0),
            }
        )
    if settings.repairs:
        steps.append({"step": "repairs", **rates([c.text for c in curated])})
    with_facts = [c for c in curated if c.extra]
    facts = (
        {"rows": len(with_facts), "stated": sum(all(c.extra.values()) for c in with_facts) / len(with_facts)}
        if with_facts
        else None
    )
    report = {
        "rule_names": [r.name for r in rules],
        "steps": steps,
        "facts": facts,
        "settings": {**settings.to_dict(), "opening": opening},
    }
    if early:
        report["early"] = early
    return report
