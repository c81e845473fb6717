"""JSON Lines: one record a line, checked against the depth limit before json
reads it; a file that is one object holding its records is refused as such."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engines import jsonguard
from engines.formats.base import Row, RowError, Stop, json_reason
from engines.formats.lines import text_lines
from engines.formats.toplevel import describe, refuse_records_object, rest_is_blank

if TYPE_CHECKING:
    from engines.formats.reader import Parser


def jsonl_rows(parser: Parser) -> Iterator[Row | RowError]:
    """JSON Lines: one JSON record a line, each parsed alone (a bad line costs only its row)."""
    max_depth = parser.limits.max_depth
    first = 0
    for item in text_lines(parser, describe_long_first_line=True):
        if not first:
            first = item.line if isinstance(item, RowError) else item[0]
        if isinstance(item, RowError):
            yield item
            continue
        line_no, text = item
        # Counting brackets is cheap and bounds the depth: only lines with
        # many are walked by the guard.
        if text.count("[") + text.count("{") > max_depth:
            try:
                jsonguard.check(text, max_depth)
            except jsonguard.TooDeep as deep:
                raise Stop(RowError(line_no + deep.line - 1, deep.reason, fatal=True)) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield RowError(line_no, f"invalid JSON: {json_reason(err)} (column {err.colno})")
        except ValueError as err:  # e.g. an integer with too many digits
            yield RowError(line_no, f"invalid JSON: {err}")
        else:
            if line_no == first and isinstance(obj, dict) and rest_is_blank(parser.src):
                refuse_records_object(describe(obj), parser.query_column)
            yield from parser.rows(obj, line_no)
