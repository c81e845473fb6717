"""Choosing among a query's samples, and the text answers must open with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engines.rules import Rule, check_all


def opening(rules: Sequence[Rule]) -> str | None:
    """The text every answer must start with (the longest starts_with rule),
    or None. Leading whitespace is dropped: the rule ignores it."""
    texts = [r.params["text"].lstrip() for r in rules if r.kind == "starts_with"]
    return max(texts, key=len) if texts else None


def pick_best(
    samples: Sequence[str],
    rules: Sequence[Rule],
    judge_scores: Sequence[float | None] | None = None,
) -> tuple[int, list[int]]:
    """Index of the sample that passes the most rules (ties: the higher judge
    score, then the shortest, then the first), and each sample's pass count."""
    if not samples:
        raise ValueError("no samples to pick from")
    passed = [sum(check_all(rules, s).values()) for s in samples]

    def key(i: int) -> tuple[int, float, int, int]:
        judge = judge_scores[i] if judge_scores is not None and judge_scores[i] is not None else 0.0
        return (-passed[i], -float(judge or 0.0), len(samples[i]), i)

    return min(range(len(samples)), key=key), passed


def pass_rates(answers: Sequence[str], rules: Sequence[Rule]) -> dict[str, Any]:
    """Share of answers passing each rule and all of them (a data report row)."""
    total = len(answers)
    if total == 0:
        return {"rows": 0, "all_rules": None, "rules": {r.name: None for r in rules}}
    checks = [check_all(rules, a) for a in answers]
    return {
        "rows": total,
        "all_rules": sum(all(c.values()) for c in checks) / total,
        "rules": {r.name: sum(c[r.name] for c in checks) / total for r in rules},
    }
