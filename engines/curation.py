"""Training data better than the prompted teacher's raw answers.

Small models follow long prompts badly, and a student copies its teacher, so
the data sets the student's ceiling. Three plain steps raise it, each
explicit and recorded:

- best-of-N: of several sampled answers keep the one passing the most
  checkable rules (`pick_best`);
- prefilled openings: where a rule fixes how an answer begins, the answer
  starts with that text and the model continues it (`opening`);
- repairs: rule kinds that can be fixed mechanically are fixed, and every
  change is recorded with its before and after (`repair`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.inference import BOUNDS
from engines.rules import Rule, check, check_all, outcomes

_BOUND = {b.setting: b for b in BOUNDS if b.setting in ("temperature", "top_p")}

# The repairs, in the order they run: content first, then length, then case,
# and the fixed sign-off last so that no other repair can cut or change it.
# The max_words repair cuts to this share of the limit, not to the limit.
MAX_WORDS_TARGET = 0.75

REPAIRS: dict[str, str] = {
    "not_contains": "drop each sentence that contains the forbidden text",
    "no_list_markup": "turn list items into sentences",
    "max_words": "cut at a sentence boundary to 3/4 of the word limit (leaving room for a fixed ending)",
    "lowercase": "lowercase everything outside protected phrases",
    "ends_with": "append the required ending",
}

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+", re.MULTILINE)


@dataclass(frozen=True)
class Change:
    repair: str  # a key of REPAIRS
    rule: str  # the rule's name
    before: str
    after: str

    def to_dict(self) -> dict[str, str]:
        return {"repair": self.repair, "rule": self.rule, "before": self.before, "after": self.after}


@dataclass
class Repaired:
    text: str
    changes: list[Change] = field(default_factory=list)

    @property
    def repairs(self) -> list[str]:
        return [c.repair for c in self.changes]


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


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _drop_sentences(text: str, needle: str, case_sensitive: bool) -> str:
    def has(s: str) -> bool:
        return needle in s if case_sensitive else needle.casefold() in s.casefold()

    kept: list[str] = []
    for line in text.split("\n"):
        sentences = _sentences(line)
        if not sentences:
            kept.append(line)
            continue
        kept.append(" ".join(s for s in sentences if not has(s)))
    out = "\n".join(kept)
    out = re.sub(r"\n{3,}", "\n\n", out).strip()
    # A needle inside a sentence boundary survives sentence dropping: remove it.
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.sub(re.escape(needle), "", out, flags=flags).strip()


def _unlist(text: str) -> str:
    out: list[str] = []
    prev_item = False
    for line in text.split("\n"):
        item = _LIST_ITEM.match(line)
        if not item:
            out.append(line)
            prev_item = False
            continue
        body = line[item.end() :].strip()
        if body and body[-1] not in ".!?:;…":
            body += "."
        # Items join the line before them, so the list reads as one paragraph.
        if out and out[-1].strip():
            prev = out[-1].rstrip()
            if prev[-1] not in ".!?:;…":
                prev += "." if prev_item else ":"
            out[-1] = f"{prev} {body}"
        else:
            out.append(body)
        prev_item = True
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _cut_words(text: str, limit: int) -> str:
    if len(text.split()) <= limit:
        return text
    if limit <= 0:
        return ""
    kept = ""
    for sentence in _sentences(text):
        candidate = f"{kept} {sentence}".strip() if kept else sentence
        if len(candidate.split()) > limit:
            break
        kept = candidate
    if kept:
        return kept
    # Not even the first sentence fits: cut it at the limit and close it.
    words = text.split()[:limit]
    return " ".join(words).rstrip(",;:-–") + "."


def _protected_spans(text: str, phrases: Collection[str]) -> list[tuple[int, int]]:
    spans = []
    for phrase in phrases:
        for m in re.finditer(re.escape(phrase), text):
            spans.append((m.start(), m.end()))
    return spans


def _lower_outside(text: str, phrases: Collection[str]) -> str:
    spans = sorted(_protected_spans(text, phrases))
    out, pos = [], 0
    for start, end in spans:
        if start < pos:
            continue
        out.append(text[pos:start].lower())
        out.append(text[start:end])
        pos = end
    out.append(text[pos:].lower())
    return "".join(out)


def _append_ending(text: str, ending: str) -> str:
    # The rule compares the ending with its leading whitespace kept: append it raw.
    ending = ending.rstrip()
    stripped = text.rstrip()
    if not stripped:
        return ending.strip()
    return stripped + ("" if ending[:1].isspace() else " ") + ending


def repair(answer: str, rules: Sequence[Rule], enabled: Collection[str] | None = None) -> Repaired:
    """Fix what can be fixed mechanically, recording every change.

    `enabled` names the repairs to run (keys of REPAIRS; None: all). A repair
    runs only for a rule the answer fails at that point, so an answer that
    already passes is returned unchanged."""
    steps = [name for name in REPAIRS if enabled is None or name in enabled]
    unknown = set(enabled or ()) - set(REPAIRS)
    if unknown:
        raise ValueError(f"unknown repair(s): {', '.join(sorted(unknown))} (known: {', '.join(REPAIRS)})")
    endings = [r for r in rules if r.kind == "ends_with"]
    reserve = max((len(r.params["text"].split()) for r in endings), default=0)
    # Phrases the rules require verbatim keep their case and are never cut.
    protected = [
        r.params["text"].strip()
        for r in rules
        if r.kind in ("starts_with", "ends_with", "contains") and r.params["case_sensitive"]
    ]
    result = Repaired(answer)
    for step in steps:
        for rule in rules:
            if rule.kind != step:
                continue
            before = result.text
            if step == "max_words":
                # An ending still to be appended needs its words under the limit too.
                ending = reserve if "ends_with" in steps and not all(check(e, before) for e in endings) else 0
                if len(before.split()) <= rule.params["n"] - ending:
                    continue
                # Cut well under the limit: a student's answer lengths scatter around its data's.
                room = max(1, math.floor(rule.params["n"] * MAX_WORDS_TARGET) - ending)
            elif check(rule, before):
                continue
            if step == "not_contains":
                after = _drop_sentences(before, rule.params["text"], rule.params["case_sensitive"])
            elif step == "no_list_markup":
                after = _unlist(before)
            elif step == "max_words":
                after = _cut_words(before, room)
            elif step == "lowercase":
                after = _lower_outside(before, protected)
            else:
                after = _append_ending(before, rule.params["text"])
            if after != before:
                result.text = after
                result.changes.append(Change(step, rule.name, before, after))
    return result


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


@dataclass(frozen=True)
class CurationSettings:
    """How teacher answers are curated. The defaults are what the workbench
    does when a prompt has checkable rules."""

    best_of: int = 4
    temperature: float = 0.7  # sampling for best-of-N (N=1 keeps the generation settings)
    top_p: float = 0.95
    prefill: bool = True
    repairs: tuple[str, ...] = tuple(REPAIRS)

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.best_of, int) or isinstance(self.best_of, bool) or not 1 <= self.best_of <= 16:
            errors.append(f"best_of must be a whole number from 1 to 16, got {self.best_of!r}")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CurationSettings:
        data = dict(data or {})
        if "repairs" in data:
            data["repairs"] = tuple(data["repairs"])
        unknown = set(data) - {"best_of", "temperature", "top_p", "prefill", "repairs"}
        if unknown:
            raise ValueError(f"unknown curation setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_of": self.best_of,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "prefill": self.prefill,
            "repairs": list(self.repairs),
        }


@dataclass
class Curated:
    """One query's final answer and how it was made."""

    text: str
    raw: str  # the first sample, as generated
    picked: str  # the best-of-N pick, before repairs
    record: dict[str, Any]
    failing: list[str]


def curate(
    samples: Sequence[str], rules: Sequence[Rule], settings: CurationSettings, opening: str | None = None
) -> Curated:
    """Pick the best sample and repair it; the record says which sample won,
    each sample's rule count, the opening used and every repair made."""
    best, passed = pick_best(samples, rules)
    fixed = repair(samples[best], rules, enabled=settings.repairs)
    final = outcomes(rules, fixed.text)
    failing = [name for name, o in final.items() if not o.passed]
    record: dict[str, Any] = {
        "samples": len(samples),
        "picked": best,
        "passed": passed,
        "repairs": [c.to_dict() for c in fixed.changes],
    }
    undecided = {name: o.reason for name, o in final.items() if o.reason}
    if undecided:  # e.g. a pattern that ran out of time: the check failed, and this says why
        record["rule_errors"] = undecided
    if opening:
        record["opening"] = opening
    return Curated(text=fixed.text, raw=samples[0], picked=samples[best], record=record, failing=failing)


def quality_report(
    curated: Sequence[Curated], rules: Sequence[Rule], settings: CurationSettings, opening: str | None
) -> dict[str, Any]:
    """Pass rates of the answers after each step: the first sample (with the
    opening when prefilled), the best-of-N pick, the repairs."""
    steps = [
        {
            "step": "raw (first sample" + (", prefilled)" if opening else ")"),
            **pass_rates([c.raw for c in curated], rules),
        }
    ]
    if settings.best_of > 1:
        steps.append(
            {"step": f"best of {settings.best_of}", **pass_rates([c.picked for c in curated], rules)}
        )
    if settings.repairs:
        steps.append({"step": "repairs", **pass_rates([c.text for c in curated], rules)})
    return {
        "rule_names": [r.name for r in rules],
        "steps": steps,
        "settings": {**settings.to_dict(), "opening": opening},
    }
