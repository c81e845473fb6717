"""Scoring one answer: rule checks, reference metrics (exact match, chrF,
ROUGE-L) and agreement with the teacher's answer."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.rules import Rule, outcomes

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation (any Unicode
    punctuation, not only ASCII), no articles a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    # rouge_score's tokenizer keeps only ASCII letters and digits: text in
    # other scripts scores 0, so read ROUGE-L with chrF beside it.
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), 0-1."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    """chrF (character n-gram F-score, sacrebleu's defaults), scaled to 0-1."""
    from sacrebleu import sentence_chrf

    return float(sentence_chrf(answer, [reference]).score) / 100.0


@dataclass
class ExampleScore:
    rules: dict[str, bool]
    all_rules: bool | None  # None when there are no rules
    exact_match: float | None  # reference metrics are None without a reference
    chrf: float | None
    rouge_l: float | None
    agreement: float | None  # ROUGE-L F1 with the teacher's answer; None without one
    # Why a failed rule check could not be decided (a pattern that ran out of time), by rule name.
    rule_errors: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat metric names -> values, only the metrics present."""
        out: dict[str, float] = {}
        if self.all_rules is not None:
            out["all_rules"] = float(self.all_rules)
        for name, passed in self.rules.items():
            out[f"rule:{name}"] = float(passed)
        for name in ("exact_match", "chrf", "rouge_l", "agreement"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def score_example(
    answer: str,
    *,
    rules: Sequence[Rule] = (),
    reference: str | None = None,
    teacher: str | None = None,
) -> ExampleScore:
    """Score one answer: its rule checks, against a reference answer (exact
    match after `normalize_answer`, chrF, ROUGE-L F1) and against the
    teacher's answer to the same query. Agreement is ROUGE-L F1 with the
    teacher: word overlap in order, cheap and symmetric; it says how close the
    student stays to what it was trained to imitate, not whether either is right."""
    results = outcomes(rules, answer) if rules else {}
    checks = {name: o.passed for name, o in results.items()}
    score = ExampleScore(
        rules=checks,
        all_rules=all(checks.values()) if checks else None,
        exact_match=None,
        chrf=None,
        rouge_l=None,
        agreement=None,
        rule_errors={name: o.reason for name, o in results.items() if o.reason},
    )
    if reference is not None:
        score.exact_match = float(normalize_answer(answer) == normalize_answer(reference))
        score.chrf = chrf(answer, reference)
        score.rouge_l = rouge_l(answer, reference)
    if teacher is not None:
        score.agreement = rouge_l(answer, teacher)
    return score
