"""Checkable rules of a system prompt, scored on model answers by the evals.

Plain Python: no Django. A rule is stored as JSON,
``{"name": str, "kind": str, ...parameters}``; `validate_rules` turns a list
of those into `Rule` objects (or raises `RulesError` listing every problem),
`check` / `check_all` score an answer and `rules_to_json` writes them back.
`KINDS` describes each kind and its parameters, for forms and documentation.

Rules come from users, so every one is bounded: at most `MAX_RULES` per list,
names, texts and patterns have length limits, lone surrogates are refused
(they cannot be stored as UTF-8 nor rendered), and a regex pattern is compiled
when it is validated, refused when it would expand too much, and matched with
a time limit (`REGEX_TIMEOUT_S`): a pattern that runs past it fails that check
with a reason (`outcome`), it never hangs the caller.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engines._types import type_name
from engines.patterns import (
    MAX_PATTERN_CHARS,
    REGEX_FLAGS,
    REGEX_TIMEOUT_S,
    compiled,
    flags_of,
)

MAX_RULES = 100
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 10_000
MAX_INTEGER = 1_000_000_000


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "string", "integer", "boolean" or "flags" (a list of names from `choices`)
    help: str
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] = ()
    max_chars: int = MAX_TEXT_CHARS  # for strings


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    params: tuple[Param, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


_CASE = Param(
    "case_sensitive",
    "boolean",
    "Whether upper and lower case must match (default: yes).",
    required=False,
    default=True,
)


def _text(help: str) -> Param:
    return Param("text", "string", help)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "starts_with",
            "The answer starts with the text (leading whitespace is ignored).",
            (_text("Text the answer must start with."), _CASE),
        ),
        Kind(
            "ends_with",
            "The answer ends with the text (trailing whitespace is ignored).",
            (_text("Text the answer must end with."), _CASE),
        ),
        Kind(
            "contains",
            "The answer contains the text somewhere.",
            (_text("Text the answer must contain."), _CASE),
        ),
        Kind(
            "not_contains",
            "The answer does not contain the text anywhere.",
            (_text("Text the answer must not contain."), _CASE),
        ),
        Kind(
            "regex",
            "A regular expression (Python syntax) is searched for anywhere in the answer.",
            (
                Param(
                    "pattern",
                    "string",
                    "The regular expression, e.g. ^Dear \\w+,",
                    max_chars=MAX_PATTERN_CHARS,
                ),
                Param(
                    "flags",
                    "flags",
                    "Regex flags: ignorecase, multiline (^ and $ match at every line), "
                    "dotall (. matches newlines).",
                    required=False,
                    default=(),
                    choices=tuple(REGEX_FLAGS),
                ),
                Param(
                    "must_match",
                    "boolean",
                    "Pass when the pattern is found (yes, the default) or when it is not found (no).",
                    required=False,
                    default=True,
                ),
            ),
        ),
        Kind(
            "max_words",
            "The answer has at most n words (separated by whitespace).",
            (Param("n", "integer", "The largest number of words allowed (a positive integer)."),),
        ),
        Kind("lowercase", "The answer has no uppercase letters."),
        Kind(
            "no_list_markup",
            'No line of the answer starts with a list marker ("-", "*", "+", "•", "1." or "1)").',
        ),
        Kind("json_valid", "The whole answer is valid JSON (surrounding whitespace is ignored)."),
    )
}

_LIST_LINE = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S", re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_problem(value: str) -> str | None:
    """Why the text cannot be stored (a lone surrogate, which no UTF-8 file,
    database or page can hold), naming the character; None when it can."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"contains a lone surrogate ({ascii(found.group())[1:-1]}) at character {found.start() + 1:,}; "
        f"only valid Unicode text is accepted"
    )


def _show(value: object, limit: int = 60) -> str:
    """A value quoted for a message: ASCII-escaped and cut short, so a hostile
    value is never echoed whole or unrenderable."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class RulesError(ValueError):
    """Every problem found in a list of rules, each saying which rule."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    # Every parameter of the kind, defaults filled in.
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, **_copy(self.params)}


def _copy(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in params.items()}


def _one_of(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def validate_rules(data: object) -> list[Rule]:
    """Rules from their JSON form; raises RulesError listing every problem."""
    if not isinstance(data, list):
        raise RulesError([f"rules must be a list, got {type_name(data)}"])
    if len(data) > MAX_RULES:
        raise RulesError([f"{len(data):,} rules; the limit is {MAX_RULES} rules per prompt version"])
    errors: list[str] = []
    rules: list[Rule] = []
    first_with_name: dict[str, int] = {}
    for number, item in enumerate(data, start=1):
        rule = _validate_one(number, item, errors)
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name.strip() and _name_problem(name) is None:
            if name in first_with_name:
                errors.append(
                    f'rule {number} ("{name}"): duplicate name '
                    f"(rule {first_with_name[name]} has the same name)"
                )
                continue
            first_with_name[name] = number
        if rule is not None:
            rules.append(rule)
    if errors:
        raise RulesError(errors)
    return rules


def _validate_one(number: int, item: object, errors: list[str]) -> Rule | None:
    where = f"rule {number}"
    if not isinstance(item, dict):
        errors.append(f"{where}: expected an object with 'name' and 'kind', got {type_name(item)}")
        return None
    count = len(errors)
    name = item.get("name")
    if "name" not in item:
        errors.append(f"{where}: missing 'name'")
    elif not isinstance(name, str):
        errors.append(f"{where}: 'name' must be a string, got {type_name(name)}")
    elif not name.strip():
        errors.append(f"{where}: 'name' must not be empty")
    elif problem := _name_problem(name):
        errors.append(f"{where}: 'name' {problem}")
    else:
        where = f'{where} ("{name}")'
    for key in item:
        if not isinstance(key, str) or _SURROGATE.search(key) or len(key) > MAX_NAME_CHARS:
            errors.append(f"{where}: invalid key {_show(key)} (keys are short names without lone surrogates)")
            return None

    kind_name = item.get("kind")
    kind: Kind | None = None
    if "kind" not in item:
        errors.append(f"{where}: missing 'kind'")
    elif not isinstance(kind_name, str):
        errors.append(f"{where}: 'kind' must be a string, got {type_name(kind_name)}")
    elif kind_name not in KINDS:
        close = difflib.get_close_matches(kind_name, KINDS, n=1) if len(kind_name) <= MAX_NAME_CHARS else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        errors.append(f"{where}: unknown kind {_show(kind_name)} (expected one of {', '.join(KINDS)}){hint}")
    else:
        kind = KINDS[kind_name]
    if kind is None:
        return None

    params: dict[str, Any] = {}
    for param in kind.params:
        if param.name not in item:
            if param.required:
                errors.append(f"{where}: missing parameter '{param.name}'")
            else:
                params[param.name] = list(param.default) if param.type == "flags" else param.default
            continue
        problem = _check_param(param, item[param.name])
        if problem:
            errors.append(f"{where}: {problem}")
        else:
            params[param.name] = item[param.name]
    for key in item:
        if key not in ("name", "kind") and key not in kind.param_names:
            takes = (
                f"takes {', '.join(repr(p) for p in kind.param_names)}"
                if kind.params
                else "takes no parameters"
            )
            errors.append(f"{where}: unknown parameter {_show(key)} (kind '{kind.name}' {takes})")
    if kind.name == "regex" and "pattern" in params and "flags" in params:
        try:
            compiled(params["pattern"], flags_of(params["flags"]))
        except ValueError as err:
            errors.append(f"{where}: invalid regex {_show(params['pattern'])}: {err}")
    if len(errors) > count:
        return None
    assert isinstance(name, str)
    return Rule(name, kind.name, _copy(params))


def _name_problem(name: str) -> str | None:
    if len(name) > MAX_NAME_CHARS:
        return f"has {len(name):,} characters; the limit is {MAX_NAME_CHARS}"
    return surrogate_problem(name)


def _check_param(param: Param, value: object) -> str | None:
    label = f"parameter '{param.name}'"
    if param.type == "string":
        if not isinstance(value, str):
            return f"{label} must be a string, got {type_name(value)}"
        if len(value) > param.max_chars:
            return f"{label} has {len(value):,} characters; the limit is {param.max_chars:,}"
        if problem := surrogate_problem(value):
            return f"{label} {problem}"
        if not value.strip():
            return f"{label} must not be empty"
    elif param.type == "boolean":
        if not isinstance(value, bool):
            return f"{label} must be true or false, got {type_name(value)}"
    elif param.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{label} must be a positive integer, got {type_name(value)}"
        if value < 1:
            return f"{label} must be a positive integer, got {value}"
        if value > MAX_INTEGER:
            return f"{label} must be at most {MAX_INTEGER:,}"
    elif param.type == "flags":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{label} must be a list of flag names, got {type_name(value)}"
        for flag in value:
            if flag not in param.choices:
                return f"{label}: unknown flag {_show(flag)} (expected {_one_of(param.choices)})"
    return None


def compile_pattern(pattern: str, flags: Iterable[str] = ()) -> None:
    """Raise ValueError saying why the pattern would be refused (syntax, size)."""
    unknown = [f for f in flags if f not in REGEX_FLAGS]
    if unknown:
        raise ValueError(f"unknown flag {_show(unknown[0])} (expected {_one_of(REGEX_FLAGS)})")
    compiled(pattern, flags_of(flags))


@dataclass(frozen=True)
class Outcome:
    """One check of one answer: passed, or failed with `reason` set when the
    check could not be decided (a pattern that ran out of time)."""

    passed: bool
    reason: str = ""


def outcome(rule: Rule, answer: str, timeout: float = REGEX_TIMEOUT_S) -> Outcome:
    """Whether the answer follows the rule; a regex that takes longer than
    `timeout` seconds on the answer fails the check with a reason."""
    if rule.kind == "regex":
        p = rule.params
        try:
            found = compiled(p["pattern"], flags_of(p["flags"])).search(answer, timeout=timeout) is not None
        except TimeoutError:
            return Outcome(
                False,
                f"pattern took longer than {timeout:g} s on this answer, so the check fails; "
                f"simplify the pattern (nested repeats such as (a+)+ backtrack without end)",
            )
        except ValueError as err:  # a stored pattern refused by today's limits
            return Outcome(False, f"invalid pattern: {err}")
        return Outcome(found == p["must_match"])
    return Outcome(check(rule, answer))


def outcomes(rules: Iterable[Rule], answer: str, timeout: float = REGEX_TIMEOUT_S) -> dict[str, Outcome]:
    """Rule name -> the outcome of its check on the answer."""
    return {rule.name: outcome(rule, answer, timeout) for rule in rules}


def check(rule: Rule, answer: str) -> bool:
    """Whether the answer follows the rule (a regex that runs out of time fails)."""
    p = rule.params
    if rule.kind in ("starts_with", "ends_with", "contains", "not_contains"):
        text, subject = p["text"], answer
        if not p["case_sensitive"]:
            text, subject = text.casefold(), subject.casefold()
        if rule.kind == "starts_with":
            return bool(subject.lstrip().startswith(text.lstrip()))
        if rule.kind == "ends_with":
            return bool(subject.rstrip().endswith(text.rstrip()))
        if rule.kind == "contains":
            return text in subject
        return text not in subject
    if rule.kind == "regex":
        return outcome(rule, answer).passed
    if rule.kind == "max_words":
        return len(answer.split()) <= p["n"]
    if rule.kind == "lowercase":
        return not any(ch.isupper() for ch in answer)
    if rule.kind == "no_list_markup":
        return _LIST_LINE.search(answer) is None
    if rule.kind == "json_valid":
        try:
            json.loads(answer)
        except (ValueError, RecursionError):
            return False
        return True
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def check_all(rules: Iterable[Rule], answer: str) -> dict[str, bool]:
    """Rule name -> whether the answer follows it."""
    return {rule.name: check(rule, answer) for rule in rules}


def rules_to_json(rules: Iterable[Rule]) -> list[dict[str, Any]]:
    """The JSON form that validate_rules reads back to equal rules."""
    return [rule.to_json() for rule in rules]


def describe(rule: Rule) -> str:
    """A short human description, e.g. for a results table header."""
    p = rule.params
    case = "" if p.get("case_sensitive", True) else " (any case)"
    if rule.kind in ("starts_with", "ends_with", "contains", "not_contains"):
        verb = {
            "starts_with": "starts with",
            "ends_with": "ends with",
            "contains": "contains",
            "not_contains": "does not contain",
        }[rule.kind]
        return f"{verb} {json.dumps(p['text'], ensure_ascii=False)}{case}"
    if rule.kind == "regex":
        flags = f" [{', '.join(p['flags'])}]" if p["flags"] else ""
        verb = "matches" if p["must_match"] else "does not match"
        return f"{verb} /{p['pattern']}/{flags}"
    if rule.kind == "max_words":
        return f"at most {p['n']} words"
    return {
        "lowercase": "no uppercase letters",
        "no_list_markup": "no list markup",
        "json_valid": "valid JSON",
    }[rule.kind]
