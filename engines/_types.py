"""Names of JSON value types for messages to users (uploads, rules)."""

from __future__ import annotations

from numbers import Number


def type_name(value: object) -> str:
    """The JSON name of a parsed value's type: null, boolean, number, string,
    list or object. Integers and fractions are both "number", as in JSON
    (ijson gives fractions as Decimal)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Number):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
