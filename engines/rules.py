"""Checkable rules of a system prompt, scored on model answers by the evals.

Plain Python: no Django. A rule is stored as JSON,
``{"name": str, "kind": str, ...parameters}``; `validate_rules` turns a list
of those into `Rule` objects (or raises `RulesError` listing every problem),
`check` / `check_all` score an answer and `rules_to_json` writes them back.
`KINDS` describes each kind and its parameters, for forms and documentation.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engines._types import type_name


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "string", "integer", "boolean" or "flags" (a list of names from `choices`)
    help: str
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    params: tuple[Param, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


REGEX_FLAGS: dict[str, re.RegexFlag] = {
    "ignorecase": re.IGNORECASE,
    "multiline": re.MULTILINE,
    "dotall": re.DOTALL,
}

_CASE = Param(
    "case_sensitive", "boolean", "Whether upper and lower case must match (default: yes).",
    required=False, default=True,
)


def _text(help: str) -> Param:
    return Param("text", "string", help)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("starts_with", "The answer starts with the text (leading whitespace is ignored).",
             (_text("Text the answer must start with."), _CASE)),
        Kind("ends_with", "The answer ends with the text (trailing whitespace is ignored).",
             (_text("Text the answer must end with."), _CASE)),
        Kind("contains", "The answer contains the text somewhere.",
             (_text("Text the answer must contain."), _CASE)),
        Kind("not_contains", "The answer does not contain the text anywhere.",
             (_text("Text the answer must not contain."), _CASE)),
        Kind("regex", "A regular expression (Python syntax) is searched for anywhere in the answer.", (
            Param("pattern", "string", "The regular expression, e.g. ^Dear \\w+,"),
            Param("flags", "flags", "Regex flags: ignorecase, multiline (^ and $ match at every line), "
                  "dotall (. matches newlines).", required=False, default=(),
                  choices=tuple(REGEX_FLAGS)),
            Param("must_match", "boolean", "Pass when the pattern is found (yes, the default) or when it is "
                  "not found (no).", required=False, default=True),
        )),
        Kind("max_words", "The answer has at most n words (separated by whitespace).",
             (Param("n", "integer", "The largest number of words allowed (a positive integer)."),)),
        Kind("lowercase", "The answer has no uppercase letters."),
        Kind("no_list_markup", 'No line of the answer starts with a list marker ("-", "*", "+", "•", '
             '"1." or "1)").'),
        Kind("json_valid", "The whole answer is valid JSON (surrounding whitespace is ignored)."),
    )
}

_LIST_LINE = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S", re.MULTILINE)


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
    errors: list[str] = []
    rules: list[Rule] = []
    first_with_name: dict[str, int] = {}
    for number, item in enumerate(data, start=1):
        rule = _validate_one(number, item, errors)
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name.strip():
            if name in first_with_name:
                errors.append(f'rule {number} ("{name}"): duplicate name '
                              f"(rule {first_with_name[name]} has the same name)")
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
    else:
        where = f'{where} ("{name}")'

    kind_name = item.get("kind")
    kind: Kind | None = None
    if "kind" not in item:
        errors.append(f"{where}: missing 'kind'")
    elif not isinstance(kind_name, str):
        errors.append(f"{where}: 'kind' must be a string, got {type_name(kind_name)}")
    elif kind_name not in KINDS:
        close = difflib.get_close_matches(kind_name, KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        errors.append(f"{where}: unknown kind '{kind_name}' (expected one of {', '.join(KINDS)}){hint}")
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
            takes = (f"takes {', '.join(repr(p) for p in kind.param_names)}" if kind.params
                     else "takes no parameters")
            errors.append(f"{where}: unknown parameter {key!r} (kind '{kind.name}' {takes})")
    if kind.name == "regex" and "pattern" in params and "flags" in params:
        try:
            re.compile(params["pattern"], _flags(params["flags"]))
        except re.error as err:
            errors.append(f"{where}: invalid regex {params['pattern']!r}: {err}")
    if len(errors) > count:
        return None
    assert isinstance(name, str)
    return Rule(name, kind.name, _copy(params))


def _check_param(param: Param, value: object) -> str | None:
    label = f"parameter '{param.name}'"
    if param.type == "string":
        if not isinstance(value, str):
            return f"{label} must be a string, got {type_name(value)}"
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
    elif param.type == "flags":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{label} must be a list of flag names, got {type_name(value)}"
        for flag in value:
            if flag not in param.choices:
                return f"{label}: unknown flag {flag!r} (expected {_one_of(param.choices)})"
    return None


def _flags(names: Iterable[str]) -> int:
    flags = 0
    for name in names:
        flags |= REGEX_FLAGS[name]
    return flags


def check(rule: Rule, answer: str) -> bool:
    """Whether the answer follows the rule."""
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
        found = re.search(p["pattern"], answer, _flags(p["flags"])) is not None
        return found == p["must_match"]
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
        verb = {"starts_with": "starts with", "ends_with": "ends with", "contains": "contains",
                "not_contains": "does not contain"}[rule.kind]
        return f"{verb} {json.dumps(p['text'], ensure_ascii=False)}{case}"
    if rule.kind == "regex":
        flags = f" [{', '.join(p['flags'])}]" if p["flags"] else ""
        verb = "matches" if p["must_match"] else "does not match"
        return f"{verb} /{p['pattern']}/{flags}"
    if rule.kind == "max_words":
        return f"at most {p['n']} words"
    return {"lowercase": "no uppercase letters", "no_list_markup": "no list markup",
            "json_valid": "valid JSON"}[rule.kind]
