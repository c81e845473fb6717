"""A rejection-sampling round on the student: which of its own answers to
train on next.

After the adapter is trained, the student (no prompt, as served) samples
answers to the train queries; each sample is checked as curation checks the
teacher's (the prompt's rules after repairs, and the facts checks that apply
to the query). A row trains on the student's best sample when that sample
passes every rule, states at least as many of the asked facts as the
row's current answer and says at least half as much beyond the rules'
required texts; otherwise the row keeps its answer. The last guard matters:
a small student's cheapest passing answer is the required greeting and
sign-off around nothing, and training on it teaches exactly that. The student then
trains a little more on that mix: its own passing answers are closer to what
it can say than the teacher's, and nothing it keeps is worse by the checks.

Plain Python: no Django, no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.curation import last_user_text, repair
from engines.facts import FactCheck, applicable, states
from engines.rules import Rule, check_all

# Why a row kept its current answer.
NO_SAMPLE = "no usable sample"  # every sample empty, or cut at the token limit
FAILS_RULE = "no sample passes every rule"
FEWER_FACTS = "fewer facts than the current answer"
THINNER = "says less than the current answer"
# A sample must say at least this share of what the current answer says beyond the required texts.
BODY_SHARE = 0.5
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Choice:
    """What one row trains on after the round, and why."""

    answer: str  # the student's sample once repaired, or the row's current answer
    student: bool  # the student's own answer replaced the current one
    sample: int | None  # which sample, when the student's
    reason: str  # why the current answer stayed ("" when replaced)
    facts: int  # applicable facts checks the kept answer passes
    facts_before: int  # ... and the current answer passed
    asked: int  # facts checks that apply to the query
    rules_before: bool  # the current answer passes every rule
    rules_after: bool  # the kept answer passes every rule


def choose_answer(
    query: str,
    current: str,
    samples: Sequence[str],
    rules: Sequence[Rule],
    facts: Sequence[FactCheck] = (),
    *,
    repairs: Sequence[str] = (),
    finish_reasons: Sequence[str] | None = None,
) -> Choice:
    """The answer row `query` trains on: the student's sample passing the most
    checks (rules first, then facts; ties: the most of the current answer's
    words, more rules passed before repairs, the shorter, the first) if it
    passes every rule and at least as many fact checks as `current`; else
    `current`. A sample that is empty, cut at the token limit and not
    shortened by a repair, or saying less than half of what `current` says
    beyond the rules' required texts, is never taken."""
    asked = applicable(facts, query) if facts else []

    def fact_count(text: str) -> int:
        return sum(states(f, text) for f in asked)

    before = fact_count(current)
    current_ok = all(check_all(rules, current).values())
    kept = Choice(current, False, None, NO_SAMPLE, before, before, len(asked), current_ok, current_ok)
    reasons = list(finish_reasons) if finish_reasons is not None else ["stop"] * len(samples)
    said = _body(current, rules)
    least = math.ceil(BODY_SHARE * len(said))
    candidates: list[tuple[tuple[int, int, float, int, int, int], int, str, bool]] = []
    thin = False
    for i, sample in enumerate(samples):
        fixed = repair(sample, rules, enabled=repairs) if rules else None
        text = fixed.text if fixed is not None else sample
        if not text.strip() or (reasons[i] == "length" and not (fixed and fixed.changes)):
            continue
        body = _body(text, rules)
        if len(body) < least or not body:
            thin = True
            continue
        checks = check_all(rules, text)  # after repairs, as curation checks
        raw = sum(check_all(rules, sample).values())
        shared = len(set(body) & set(said)) / len(set(said)) if said else 0.0
        key = (-sum(checks.values()), -fact_count(text), -shared, -raw, len(text), i)
        candidates.append((key, i, text, all(checks.values())))
    if not candidates:
        return dataclasses.replace(kept, reason=THINNER) if thin else kept
    key, index, text, passes = min(candidates)
    if not passes:
        return dataclasses.replace(kept, reason=FAILS_RULE)
    facts_after = -key[1]
    if facts_after < before:
        return dataclasses.replace(kept, reason=FEWER_FACTS)
    return Choice(text, True, index, "", facts_after, before, len(asked), current_ok, True)


def _body(text: str, rules: Sequence[Rule]) -> list[str]:
    """The answer's words beyond the texts its rules require (an opening, a
    sign-off, a required phrase), case folded."""
    folded = text.casefold()
    for rule in rules:
        if rule.kind in ("starts_with", "ends_with", "contains"):
            literal = rule.params["text"].strip().casefold()
            if literal:
                folded = folded.replace(literal, " ")
    return _WORD.findall(folded)


@dataclass
class RefineReport:
    """The round's figures, for the job's log and the variant's metrics."""

    rows: int = 0
    student: int = 0  # rows now the student's own passing answer
    kept: dict[str, int] = field(default_factory=dict)  # rows that kept their answer, by reason
    samples: int = 0  # samples checked
    fact_rows: int = 0  # rows whose query asks a fact
    facts_stated_before: int = 0  # of those, rows whose answer states every asked fact
    facts_stated_after: int = 0
    all_rules_before: int = 0  # rows whose answer passes every rule
    all_rules_after: int = 0

    def add(self, choice: Choice, samples: int) -> None:
        self.rows += 1
        self.samples += samples
        if choice.student:
            self.student += 1
        else:
            self.kept[choice.reason] = self.kept.get(choice.reason, 0) + 1
        if choice.asked:
            self.fact_rows += 1
            self.facts_stated_before += choice.facts_before == choice.asked
            self.facts_stated_after += choice.facts == choice.asked
        self.all_rules_before += choice.rules_before
        self.all_rules_after += choice.rules_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "student": self.student,
            "kept": dict(self.kept),
            "samples": self.samples,
            "fact_rows": self.fact_rows,
            "facts_stated_before": self.facts_stated_before,
            "facts_stated_after": self.facts_stated_after,
            "all_rules_before": self.all_rules_before,
            "all_rules_after": self.all_rules_after,
        }

    def summary(self) -> str:
        """One log line: 'refine: 212 of 300 rows now the student's own passing answer; ...'."""
        parts = [f"refine: {self.student} of {self.rows} rows now the student's own passing answer"]
        parts += [f"{n} kept their answer ({why})" for why, n in sorted(self.kept.items())]
        if self.rows:
            parts.append(f"all rules {self.all_rules_before} -> {self.all_rules_after} rows")
        if self.fact_rows:
            parts.append(
                f"every asked fact stated {self.facts_stated_before} -> {self.facts_stated_after} "
                f"of {self.fact_rows} rows asking one"
            )
        return "; ".join(parts)


def refine_examples(
    examples: Sequence[dict[str, Any]],
    samples: Sequence[Sequence[str]],
    rules: Sequence[Rule],
    facts: Sequence[FactCheck] = (),
    *,
    repairs: Sequence[str] = (),
    finish_reasons: Sequence[Sequence[str]] | None = None,
) -> tuple[list[dict[str, Any]], RefineReport]:
    """The training examples after the round (same order; a replaced row
    keeps its messages and prompt and gets the student's answer, marked
    the student's answer) and the round's report. `samples[i]` are example i's."""
    if len(samples) != len(examples):
        raise ValueError(f"{len(samples)} groups of samples for {len(examples)} examples")
    out: list[dict[str, Any]] = []
    report = RefineReport()
    for i, (example, group) in enumerate(zip(examples, samples, strict=True)):
        choice = choose_answer(
            # "query": the user's own words where the messages carry the prompt's passages.
            example.get("query") or last_user_text(example["messages"]),
            example["answer"],
            group,
            rules,
            facts,
            repairs=repairs,
            finish_reasons=finish_reasons[i] if finish_reasons is not None else None,
        )
        report.add(choice, len(group))
        out.append({**example, "answer": choice.answer} if choice.student else dict(example))
    return out, report
