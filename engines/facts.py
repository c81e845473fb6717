"""Facts checks of a system prompt: does an answer state the facts its
question asks for?

Plain Python: no Django. A facts check is stored as JSON,
``{"name", "question", "expect" | "expect_regex", "source"?}``:
`validate_facts` turns a list of those into `FactCheck` objects (or raises
`FactsError` naming every problem by item), `applicable` picks the checks
whose `question` pattern matches a query, `states` says whether an answer
states one fact and `fact_checks` scores an answer for the evals
("fact:<name>" per applicable fact and "fact_recall"). `propose_facts` drafts
checks from the prompt's own text for the team to accept.

Patterns come from users, so they go through the bounded machinery of
`engines.patterns` (size check, compiled once, matched with a time limit): a
pattern that runs out of time fails its check, it never hangs the caller.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engines._facts_propose import MAX_NAME_CHARS, MAX_SOURCE_CHARS, propose_facts
from engines._types import type_name
from engines.patterns import MAX_PATTERN_CHARS, REGEX_TIMEOUT_S, compiled
from engines.rules import surrogate_problem

__all__ = [
    "MAX_FACTS",
    "FactCheck",
    "FactsError",
    "applicable",
    "asks_a_fact",
    "fact_checks",
    "facts_to_json",
    "propose_facts",
    "states",
    "validate_facts",
]

MAX_FACTS = 500
MAX_EXPECT_CHARS = 1_000
_KEYS = ("name", "question", "expect", "expect_regex", "source")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class FactsError(ValueError):
    """Every problem found in a list of facts checks, each saying which item."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class FactCheck:
    name: str
    question: str  # searched case-insensitively in the query
    expect: str | None = None  # a phrase a correct answer contains (normalised)
    expect_regex: str | None = None  # or a pattern it matches
    source: str = ""  # the prompt's sentence the fact comes from

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "question": self.question}
        if self.expect is not None:
            out["expect"] = self.expect
        else:
            out["expect_regex"] = self.expect_regex
        if self.source:
            out["source"] = self.source
        return out


def _show(value: object, limit: int = 60) -> str:
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _text_problem(key: str, value: object, limit: int, *, may_be_empty: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"'{key}' must be a string, got {type_name(value)}"
    if len(value) > limit:
        return f"'{key}' has {len(value):,} characters; the limit is {limit:,}"
    if problem := surrogate_problem(value):
        return f"'{key}' {problem}"
    if not may_be_empty and not value.strip():
        return f"'{key}' must not be empty"
    return None


def _pattern_problem(key: str, value: object) -> str | None:
    if problem := _text_problem(key, value, MAX_PATTERN_CHARS):
        return problem
    assert isinstance(value, str)
    try:
        compiled(value, re.IGNORECASE)
    except ValueError as err:
        return f"invalid regex in '{key}' {_show(value)}: {err}"
    return None


def validate_facts(data: object) -> list[FactCheck]:
    """Facts checks from their JSON form; raises FactsError listing every problem."""
    if not isinstance(data, list):
        raise FactsError([f"facts must be a list, got {type_name(data)}"])
    if len(data) > MAX_FACTS:
        raise FactsError([f"{len(data):,} facts; the limit is {MAX_FACTS} facts per prompt version"])
    errors: list[str] = []
    facts: list[FactCheck] = []
    first_with_name: dict[str, int] = {}
    for number, item in enumerate(data, start=1):
        fact = _validate_one(number, item, errors)
        if fact is None:
            continue
        if fact.name in first_with_name:
            errors.append(
                f'fact {number} ("{fact.name}"): duplicate name (fact {first_with_name[fact.name]} has the same name)'
            )
            continue
        first_with_name[fact.name] = number
        facts.append(fact)
    if errors:
        raise FactsError(errors)
    return facts


def _validate_one(number: int, item: object, errors: list[str]) -> FactCheck | None:
    where = f"fact {number}"
    if not isinstance(item, dict):
        errors.append(
            f"{where}: expected an object with 'name', 'question' and 'expect', got {type_name(item)}"
        )
        return None
    count = len(errors)
    name = item.get("name")
    if "name" not in item:
        errors.append(f"{where}: missing 'name'")
    elif problem := _text_problem("name", name, MAX_NAME_CHARS):
        errors.append(f"{where}: {problem}")
    elif _CONTROL.search(str(name)):
        errors.append(f"{where}: 'name' must not contain control characters (tabs, newlines)")
    else:
        where = f'{where} ("{name}")'
    for key in item:
        if key not in _KEYS:
            errors.append(
                f"{where}: unknown key {_show(key)} (a fact takes {', '.join(repr(k) for k in _KEYS)})"
            )
    if "question" not in item:
        errors.append(f"{where}: missing 'question' (a regex matched against the user's query)")
    elif problem := _pattern_problem("question", item["question"]):
        errors.append(f"{where}: {problem}")
    has_expect, has_regex = "expect" in item, "expect_regex" in item
    if has_expect == has_regex:
        errors.append(f"{where}: give exactly one of 'expect' (a phrase) and 'expect_regex' (a regex)")
    elif has_expect:
        if problem := _text_problem("expect", item["expect"], MAX_EXPECT_CHARS):
            errors.append(f"{where}: {problem}")
        elif not _normalise(item["expect"]):
            errors.append(f"{where}: 'expect' has nothing left to look for once normalised")
    elif problem := _pattern_problem("expect_regex", item["expect_regex"]):
        errors.append(f"{where}: {problem}")
    if "source" in item and (
        problem := _text_problem("source", item["source"], MAX_SOURCE_CHARS, may_be_empty=True)
    ):
        errors.append(f"{where}: {problem}")
    if len(errors) > count:
        return None
    return FactCheck(
        name=item["name"],
        question=item["question"],
        expect=item.get("expect"),
        expect_regex=item.get("expect_regex"),
        source=item.get("source", ""),
    )


def facts_to_json(facts: Iterable[FactCheck]) -> list[dict[str, Any]]:
    """The JSON form that validate_facts reads back to equal checks."""
    return [fact.to_json() for fact in facts]


# --- scoring ----------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d)[,\u202f\u2009'](?=\d{3}(?!\d))")
_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
)


def _normalise(text: str) -> str:
    """Case folded, whitespace runs collapsed, thousands separators and a
    trailing period dropped, typographic quotes and dashes made plain."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    text = _THOUSANDS.sub("", " ".join(text.split()))
    return text.rstrip(".").rstrip()


def _search(pattern: str, text: str, timeout: float) -> bool | None:
    """Whether the pattern is found; None when it ran out of time (or a
    stored pattern is refused by today's limits): no verdict."""
    try:
        return compiled(pattern, re.IGNORECASE).search(text, timeout=timeout) is not None
    except (TimeoutError, ValueError):
        return None


def _asks(fact: FactCheck, query: str, timeout: float) -> bool | None:
    return _search(fact.question, query, timeout)


def applicable(facts: Iterable[FactCheck], query: str, timeout: float = REGEX_TIMEOUT_S) -> list[FactCheck]:
    """The facts whose `question` matches the query, and those whose question
    pattern could not decide in time (they are scored, and fail)."""
    return [fact for fact in facts if _asks(fact, query, timeout) is not False]


def asks_a_fact(facts: Iterable[FactCheck], query: str, timeout: float = REGEX_TIMEOUT_S) -> bool:
    """Whether some fact's `question` surely matches the query (one that runs out of time does not)."""
    return any(_asks(fact, query, timeout) is True for fact in facts)


def states(fact: FactCheck, answer: str, timeout: float = REGEX_TIMEOUT_S) -> bool:
    """Whether the answer states the fact. `expect` is found as a whole phrase
    (no letter or digit glued on either side: "12 euros" is not in "112
    euros") after normalising both; `expect_regex` is searched in the answer.
    A pattern that runs out of time fails."""
    if fact.expect_regex is not None:
        return _search(fact.expect_regex, answer, timeout) is True
    assert fact.expect is not None
    needle = _normalise(fact.expect)
    if not needle:
        return False
    phrase = re.compile(
        ("(?<![^\\W_])" if needle[0].isalnum() else "")
        + re.escape(needle)
        + ("(?![^\\W_])" if needle[-1].isalnum() else "")
    )
    return phrase.search(_normalise(answer)) is not None


def fact_checks(
    facts: Sequence[FactCheck], query: str, answer: str, timeout: float = REGEX_TIMEOUT_S
) -> dict[str, float]:
    """The metrics of one answer: "fact:<name>" (1.0 or 0.0) per fact the query
    asks for and "fact_recall" (1.0 when every one is stated); empty when no
    fact applies. A fact whose question pattern ran out of time on the query
    fails: it could not be decided, and a silent skip would flatter the run."""
    out: dict[str, float] = {}
    for fact in facts:
        asked = _asks(fact, query, timeout)
        if asked is False:
            continue
        out[f"fact:{fact.name}"] = float(asked is True and states(fact, answer, timeout))
    if out:
        out["fact_recall"] = float(all(v == 1.0 for v in out.values()))
    return out
