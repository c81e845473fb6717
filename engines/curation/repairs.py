"""Mechanical repairs: rule kinds that can be fixed by a program are fixed,
and every change is recorded with its before and after."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from engines.rules import Rule, check

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


def _cut_words(text: str, limit: int, keep: Collection[str] = ()) -> str:
    """Whole sentences in order up to `limit` words; a sentence holding a
    phrase in `keep` (a contains rule's text) is kept first, so the cut never
    takes away what another rule requires."""
    if len(text.split()) <= limit:
        return text
    if limit <= 0:
        return ""
    sentences = _sentences(text)
    needed = {i for i, s in enumerate(sentences) if any(k.casefold() in s.casefold() for k in keep)}
    budget = limit - sum(len(sentences[i].split()) for i in needed)
    if budget < 0:
        needed, budget = set(), limit
    chosen: set[int] = set(needed)
    for i, sentence in enumerate(sentences):
        if i in chosen:
            continue
        words = len(sentence.split())
        if words > budget:
            if not needed:
                break  # in order: stop at the first that does not fit
            continue
        chosen.add(i)
        budget -= words
    if chosen:
        return " ".join(sentences[i] for i in sorted(chosen))
    # Not even the first sentence fits: cut it at the limit and close it.
    head = text.split()[:limit]
    return " ".join(head).rstrip(",;:-–") + "."


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
    required = [r.params["text"].strip() for r in rules if r.kind == "contains"]
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
                after = _cut_words(before, room, required)
            elif step == "lowercase":
                after = _lower_outside(before, protected)
            else:
                after = _append_ending(before, rule.params["text"])
            if after != before:
                result.text = after
                result.changes.append(Change(step, rule.name, before, after))
    return result
