"""Checks on the values of a parsed JSON record: objects, strings, lists, the
order of turns, and text PostgreSQL can store (no unpaired surrogates).
Each failure is a Bad naming the field."""

from __future__ import annotations

from collections.abc import Collection

from engines._types import type_name
from engines.formats.base import Bad, Message, at, shown

NO_USER_TURN = "no user turn (a row must contain at least one user message)"


def as_object(obj: object, where: str = "") -> dict[str, object]:
    if not isinstance(obj, dict):
        raise Bad(at(where, f"expected a JSON object, got {type_name(obj)}"))
    return obj


def field_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_text(value: str, where: str) -> str:
    """`value`, unless it holds an unpaired surrogate (a JSON escape such as
    \\ud800 alone): not Unicode, so PostgreSQL and any UTF-8 export refuse it."""
    if not value.isascii():  # the common case costs one scan
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise Bad(
                f"{where} holds an unpaired surrogate \\u{ord(value[err.start]):04x} (not valid Unicode)"
            ) from None
    return value


def check_value(value: object, where: str) -> None:
    """Every string of a parsed JSON value, keys included (its depth is bounded by the guard)."""
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"the field name {field_path(where, shown(key))}")
            check_value(item, field_path(where, shown(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]")


def extra_fields(row: dict[str, object], used: Collection[str]) -> dict[str, object] | None:
    """The fields of a row that no format reads, kept with it."""
    extra = {k: v for k, v in row.items() if k not in used and v is not None}
    if extra:
        check_value(extra, "")
    return extra or None


def optional_string(obj: dict[str, object], key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise Bad(f"{field_path(where, key)}: expected a string, got {type_name(value)}")
    if value is not None and not value.isascii():  # the hot path: no call, no path built
        check_text(value, field_path(where, key))
    return value


def required_string(obj: dict[str, object], key: str, where: str = "") -> str:
    if key not in obj:
        raise Bad(at(where, f"missing field '{key}'") + ("" if where else found_keys(obj)))
    value = obj[key]
    if not isinstance(value, str):
        raise Bad(f"{field_path(where, key)}: expected a string, got {type_name(value)}")
    if not value.isascii():
        check_text(value, field_path(where, key))
    return value


def text_field(obj: dict[str, object], key: str, where: str = "") -> str:
    value = required_string(obj, key, where)
    if not value.strip():
        raise Bad(f"{field_path(where, key)}: empty content")
    return value


def found_keys(obj: dict[str, object]) -> str:
    keys = list(obj)[:10]
    return f" (found {', '.join(repr(k) for k in keys)})" if keys else " (the object is empty)"


def list_field(obj: dict[str, object], key: str) -> list[object]:
    if key not in obj:
        raise Bad(f"missing field '{key}'{found_keys(obj)}")
    value = obj[key]
    if not isinstance(value, list):
        raise Bad(f"{key}: expected a list, got {type_name(value)}")
    return value


def check_turns(messages: list[Message], field: str) -> list[Message]:
    if not any(m["role"] == "user" for m in messages):
        raise Bad(NO_USER_TURN)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise Bad(f"{field}[{i}]: a system message may only come first")
    i = 1 if messages[0]["role"] == "system" else 0
    if messages[i]["role"] != "user":
        raise Bad(f"{field}[{i}]: the conversation must start with a user message, not {messages[i]['role']}")
    return messages
