"""Rule compliance of a dataset version's answers: which rules each row
fails, and the report of how each curation step moved the pass rates."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engines.curation import pass_rates
from engines.rules import Rule, RulesError, check_all, validate_rules
from workbench.models import DatasetRow, DatasetRowQuerySet, DatasetVersion

Messages = list[dict[str, str]]
log = logging.getLogger(__name__)


class StoredRulesError(Exception):
    """The rules kept with a version no longer validate: checking against
    "no rules" instead would let every answer pass."""


def rules_of(version: DatasetVersion) -> list[Rule]:
    """The checkable rules the version's answers are held to (kept in its
    meta by the teacher run that made it); none for plain uploads."""
    try:
        return validate_rules(version.meta.get("rules") or [])
    except RulesError as exc:
        log.warning("the rules stored with %s (pk %s) are invalid: %s", version, version.pk, exc)
        raise StoredRulesError(
            f"The rules stored with {version} are no longer valid ({exc}); answers cannot "
            f"be checked against them."
        ) from exc


@dataclass(frozen=True)
class FailingCounts:
    rows: int
    failing: int  # rows failing at least one rule
    by_rule: dict[str, int]

    @property
    def share(self) -> float:
        return self.failing / self.rows if self.rows else 0.0


def failing_counts(rows: DatasetRowQuerySet, rule_names: Iterable[str]) -> FailingCounts:
    """How many of `rows` fail a rule, in all and per rule: the one count the
    review page and the data-quality warning (absorb form, fine-tune log)
    read; pass `rows.unresolved()` for the rows a passing-only fine-tune
    leaves out. Counted in SQL, one query per rule (a version may hold
    hundreds of thousands of failing rows)."""
    return FailingCounts(
        rows.count(),
        rows.exclude(failing=[]).count(),
        {name: rows.failing_rule(name).count() for name in rule_names},
    )


def answer_of(messages: Messages) -> str | None:
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None


def failing(rules: Sequence[Rule], messages: Messages) -> list[str]:
    answer = answer_of(messages)
    if answer is None or not rules:
        return []
    return [name for name, ok in check_all(rules, answer).items() if not ok]


def step(name: str, answers: Sequence[str], rules: Sequence[Rule]) -> dict[str, Any]:
    """One row of the report: the pass rate of each rule and of all of them."""
    return {"step": name, **pass_rates(answers, rules)}


def with_human_edits(parent: DatasetVersion, rows: Iterable[Messages]) -> dict[str, Any] | None:
    """The parent's report plus a "human edits" step measured on `rows` (the
    reviewed version's train answers), or None when the parent had none."""
    quality = parent.meta.get("quality")
    rules = rules_of(parent)
    if not quality or not rules:
        return None
    answers = [a for a in (answer_of(m) for m in rows) if a is not None]
    steps = [s for s in quality["steps"] if s["step"] != "human edits"]
    return {**quality, "steps": [*steps, step("human edits", answers, rules)]}


def final_compliance(version: DatasetVersion | None) -> float | None:
    """All-rules pass rate of the training answers as they stand (the last
    step of the report): the ceiling a student trained on them can reach."""
    if version is None or not version.meta.get("quality"):
        return None
    return version.meta["quality"]["steps"][-1].get("all_rules")


def failing_share(version: DatasetVersion) -> FailingCounts | None:
    """How many train rows fail each of the version's rules; None without rules."""
    if not version.meta.get("rules"):
        return None
    names = [r.get("name", "") for r in version.meta["rules"] if isinstance(r, dict)]
    return failing_counts(version.rows.filter(split=DatasetRow.TRAIN), names)


def warning(version: DatasetVersion, limit: float) -> str | None:
    """A sentence for the team when too many training answers fail a rule."""
    counts = failing_share(version)
    if counts is None or counts.share <= limit:
        return None
    worst = ", ".join(
        f"{name}: {n}" for name, n in sorted(counts.by_rule.items(), key=lambda kv: -kv[1]) if n
    )
    return (
        f"{counts.share:.0%} of the training answers in {version} fail a checkable rule ({worst}); the student "
        f"learns what the data shows. Review them, or train anyway."
    )
