"""Rule compliance of a dataset version's answers: which rules each row
fails, and the report of how each curation step moved the pass rates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from engines.curation import pass_rates
from engines.rules import Rule, RulesError, check_all, validate_rules
from workbench.models import DatasetRow, DatasetVersion

Messages = list[dict[str, str]]


def rules_of(version: DatasetVersion) -> list[Rule]:
    """The checkable rules the version's answers are held to (kept in its
    meta by the teacher run that made it); none for plain uploads."""
    try:
        return validate_rules(version.meta.get("rules") or [])
    except RulesError:
        return []


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


def train_answers(version: DatasetVersion) -> list[str]:
    rows = version.rows.filter(split=DatasetRow.TRAIN).values_list("messages", flat=True)
    return [a for a in (answer_of(m) for m in rows.iterator(chunk_size=2000)) if a is not None]


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


def failing_share(version: DatasetVersion) -> tuple[float, dict[str, int]] | None:
    """Share of train rows whose answer fails at least one of the version's
    rules, and how many rows fail each rule; None without rules."""
    if not version.meta.get("rules"):
        return None
    rows = version.rows.filter(split=DatasetRow.TRAIN).values_list("failing", flat=True)
    total, failing, by_rule = 0, 0, {}
    for names in rows.iterator(chunk_size=2000):
        total += 1
        failing += bool(names)
        for name in names:
            by_rule[name] = by_rule.get(name, 0) + 1
    return (failing / total if total else 0.0), by_rule


def warning(version: DatasetVersion, limit: float) -> str | None:
    """A sentence for the team when too many training answers fail a rule."""
    share = failing_share(version)
    if share is None or share[0] <= limit:
        return None
    worst = ", ".join(f"{name}: {n}" for name, n in sorted(share[1].items(), key=lambda kv: -kv[1]))
    return (f"{share[0]:.0%} of the training answers in {version} fail a checkable rule ({worst}); the student "
            f"learns what the data shows. Review them, or train anyway.")
