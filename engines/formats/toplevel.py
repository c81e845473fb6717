"""A file that is one JSON object rather than rows: what its top level holds
(read as a stream, without building it) and the refusal that names the key
holding the records and how to load them (records key)."""

from __future__ import annotations

import re

import ijson

from engines import jsonguard
from engines._types import type_name
from engines.formats.base import STRICT_JSON, RowError, Stop, shown
from engines.formats.detect import first_line_of
from engines.formats.source import HEAD_BYTES, Source
from engines.formats.specs import RECORD_FIELDS
from engines.formats.yajl import yajl_error


def _json_object_line(text: str, max_depth: int) -> bool:
    """True when one of the first lines after the first is a whole JSON
    object (JSONL with a broken first line, not a pretty-printed object)."""
    for line in re.split(r"\r\n|\r|\n", text)[1:6]:
        try:
            if isinstance(jsonguard.loads(line, max_depth), dict):
                return True
        except ValueError:
            pass
    return False


KINDS = {
    "start_map": "object",
    "start_array": "list",
    "string": "string",
    "number": "number",
    "integer": "number",
    "double": "number",
    "boolean": "boolean",
    "null": "null",
}


class KeyInfo:
    """What a top-level key holds: its kind and, for a list, how many items and objects among them."""

    __slots__ = ("kind", "items", "objects")

    def __init__(self, kind: str | None = None) -> None:
        self.kind = kind
        self.items = 0
        self.objects = 0


def describe(obj: dict[str, object]) -> dict[str, KeyInfo]:
    keys: dict[str, KeyInfo] = {}
    for key, value in obj.items():
        info = keys[key] = KeyInfo(type_name(value))
        if isinstance(value, list):
            info.items = len(value)
            info.objects = sum(isinstance(item, dict) for item in value)
    return keys


def records_keys(keys: dict[str, KeyInfo]) -> list[tuple[str, KeyInfo]]:
    """The keys holding lists of objects, the longest first."""
    found = [(k, v) for k, v in keys.items() if v.kind == "list" and v.objects]
    return sorted(found, key=lambda kv: -kv[1].objects)


def single_object_error(keys: dict[str, KeyInfo], broken: str = "") -> RowError:
    found = records_keys(keys)
    if found:
        key, value = found[0]
        name = shown(key)
        also = "".join(f'; "{shown(k)}" holds {v.items:,}' for k, v in found[1:4])
        return RowError(
            0,
            f'the file is one JSON object; its records are under the key "{name}" '
            f'({value.items:,} items{also}){broken}: load it with records key "{name}"',
            fatal=True,
        )
    listed = ", ".join(shown(k) for k in list(keys)[:10]) + (", ..." if len(keys) > 10 else "")
    return RowError(
        0,
        f"the file is a single JSON object with keys {listed or '(none read)'}{broken}; the rows "
        "must be a JSON array or one object per line (JSONL)",
        fatal=True,
    )


class TopLevel:
    """The top level of a JSON text fed in pieces, without building it: the
    kind of the value, and for an object its keys and what each holds.
    yajl's events, no prefixes: memory is the keys; with `max_depth`, the
    pieces pass the depth guard first (a Stop naming the line)."""

    def __init__(self, max_depth: int | None = None, first_line: int = 1) -> None:
        self.guard = jsonguard.DepthGuard(max_depth, first_line) if max_depth is not None else None
        self.events = ijson.sendable_list()
        self.coro = ijson.basic_parse_coro(self.events)
        self.kind: str | None = None
        self.keys: dict[str, KeyInfo] = {}
        self.closed = False  # the top-level value is complete
        self.trailing = False  # and more follows it
        self.broken = ""  # why the text is not JSON, as " (and ...)"
        self._depth = 0
        self._value: KeyInfo | None = None

    def feed(self, piece: bytes) -> None:
        if self.broken:
            return
        if self.guard is not None:
            try:
                self.guard.feed(piece)
            except jsonguard.TooDeep as deep:
                raise Stop(RowError(deep.line, deep.reason, fatal=True)) from None
        try:
            self.coro.send(piece)
        except (ijson.JSONError, ValueError) as exc:
            self._fail(exc)
        self._walk()

    def close(self) -> None:
        if self.broken:
            return
        try:
            self.coro.close()
        except (ijson.JSONError, ValueError) as exc:
            self._fail(exc)
        self._walk()

    def _fail(self, exc: Exception) -> None:
        reason = yajl_error(exc)[0]
        self.trailing = reason == "trailing garbage"
        self.broken = (
            " (and the file ends inside it)"
            if reason == "premature EOF"
            else " (and more JSON follows it)"
            if self.trailing
            else f" (and it is not valid JSON: {reason})"
        )

    def _walk(self) -> None:
        depth, value = self._depth, self._value
        for event, item in self.events:
            if event == "map_key":
                if depth == 1:
                    value = self.keys[str(item)] = KeyInfo()
                continue
            if event in ("end_map", "end_array"):
                depth -= 1
                self.closed = depth == 0
                continue
            kind = KINDS.get(event, event)
            if depth == 0:
                self.kind = kind
            elif depth == 1 and value is not None and self.kind == "object":
                value.kind = kind
            elif depth == 2 and value is not None and value.kind == "list":
                value.items += 1
                value.objects += kind == "object"
            if event in ("start_map", "start_array"):
                depth += 1
        self.events.clear()
        self._depth, self._value = depth, value


def rest_is_blank(src: Source) -> bool:
    """Nothing but blanks after the current position (looks ahead, reads nothing)."""
    rest = src.peek(HEAD_BYTES)
    return len(rest) < HEAD_BYTES and not rest.strip()


def _is_row(keys: dict[str, KeyInfo], query_column: str | None) -> bool:
    """Whether a top-level object with these keys reads as a row of some format."""
    return bool(keys.keys() & RECORD_FIELDS) or (query_column is not None and query_column in keys)


def refuse_records_object(keys: dict[str, KeyInfo], query_column: str | None) -> None:
    """Stop on a file that is one object holding its records in a list
    (not a row): name the key and how to load it."""
    if not _is_row(keys, query_column) and records_keys(keys):
        raise Stop(single_object_error(keys))


def refuse_single_object(head: bytes, src: Source, max_depth: int) -> None:
    """A file that is one JSON object (pretty-printed over many lines,
    e.g. {"data": [...]}) is neither a JSON array nor JSONL: say so once
    instead of an error for each of its lines. (One on a single line is
    found by the JSONL reader: it may be a JSONL file of one row.)"""
    text = head.decode("utf-8", "replace").lstrip()
    if not text.startswith("{"):
        return
    first = first_line_of(text)
    try:
        if isinstance(jsonguard.loads(first, max_depth), dict):
            return  # JSONL
    except ValueError:
        pass
    try:
        # Depth summed over the whole head: lines of JSONL cut short add up, so
        # too deep here is no verdict (the lines, or the walk below, give one).
        jsonguard.check(text, max_depth)
        whole, end = STRICT_JSON.raw_decode(text)
    except ValueError:
        whole, end = None, 0
    if isinstance(whole, dict):
        if text[end:].strip():
            return  # more than one object: per-line errors tell more
        raise Stop(single_object_error(describe(whole)))
    if (
        first.rstrip().endswith(("{", "[", ",", ":"))
        and len(head) >= HEAD_BYTES
        and not _json_object_line(text, max_depth)
    ):
        # Cut off at the end of the head: read the top level as a stream.
        walker = TopLevel(max_depth)
        for chunk in src.chunks():
            walker.feed(chunk)
            if walker.broken:
                break
        walker.close()
        raise Stop(single_object_error(walker.keys, walker.broken))


def refuse_long_records_object(
    src: Source, raw: bytes, line_no: int, max_depth: int, query_column: str | None, rest: bool = False
) -> None:
    """A first line too long to be a row: stop if it is the whole file and one
    object holding the records. With `rest`, the line goes on past `raw`."""
    walker = TopLevel(max_depth, line_no)
    walker.feed(raw)
    if rest:
        src.skip_line(walker.feed)
    walker.close()
    if walker.closed and not walker.trailing and rest_is_blank(src):
        refuse_records_object(walker.keys, query_column)
