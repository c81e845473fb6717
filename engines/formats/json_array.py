"""A top-level JSON array (or, with a records key, the list under that key of
one top-level object) read record by record with ijson, in bounded memory;
syntax errors are explained by json where a record is at hand, else located
from yajl's context (engines.formats.yajl)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ijson

from engines import jsonguard
from engines.formats.base import STRICT_JSON, Row, RowError, Stop, a_kind, json_reason, shown
from engines.formats.source import utf8_cut, utf8_reason
from engines.formats.specs import SPECS
from engines.formats.toplevel import TopLevel, records_keys
from engines.formats.yajl import error_offset, token_start, yajl_error

if TYPE_CHECKING:
    from engines.formats.reader import Parser

_BLANKS = " \t\r\n"
# What starts a surrogate escape (\\ud800-\\udfff) or, rarely, text like "\\\\ud": a record
# that holds one is decoded again, so a false match costs time, not truth.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")


def _line_start(data: bytes, lines: int) -> int:
    """Where the line `lines` lines after the first of `data` starts."""
    pos = 0
    for _ in range(lines):
        pos = data.index(b"\n", pos) + 1
    return pos


def _record_chars(data: bytes) -> int:
    """Characters of a record's text, less what follows its closing bracket
    in `data` (a comma, the array's end, blanks)."""
    text = data.decode("utf-8", "replace").rstrip(_BLANKS)
    if text.endswith((",", "]")):
        text = text[:-1].rstrip(_BLANKS)
    return len(text)


class JsonArray:
    """Reads a top-level JSON array with ijson, record by record.

    The bytes go to ijson in pieces that each start at a "{" (or at a chunk
    boundary), so the first object ijson creates after a record ended (its
    `map_type` hook) is the next record, and that record starts where the
    piece does: record start lines and sizes cost one find() per object, not
    a look at every byte. Items that are not objects are errors anyway; their
    line is not tracked, only their number.

    Memory: the chunk, the record in progress (built by ijson; its bytes from
    earlier chunks are kept, to measure it or to explain a syntax error in
    it) and nothing else. A record still open max_row_bytes past its start
    stops parsing: ijson cannot skip it.

    Every chunk passes the depth guard before ijson sees any of it (ijson's
    memory grows with the square of the depth). Surrogate escapes (\\udxxx)
    are hidden from ijson (yajl turns a lone one into "?" or fails) and the
    few records that hold one are decoded again by json, which keeps them.

    With `records_key`, the records are the items of the list under that key
    of a top-level object, read the same way.
    """

    def __init__(self, parser: Parser, records_key: str | None = None) -> None:
        self.parser = parser
        self.records_key = records_key
        self.container = "the JSON array" if records_key is None else "the JSON object"
        # Watches the top level until the key's value starts (then it must be a list).
        self.top: TopLevel | None = None if records_key is None else TopLevel()
        self.escapes: list[int] = []  # file offsets of surrogate escapes not yet behind a record
        self.start: int | None = None  # file offset of the object record in progress
        self.started = False  # a record started in the piece just fed
        self.start_line = self.start_col = 0  # where it starts, once known
        self.kept: list[bytes] = []  # its bytes in earlier chunks
        self.done: list[tuple[object, int | None]] = []  # records the last piece completed, and their start
        self.records = 0
        self.last_done = 0  # end of the piece in which the last record ended
        self.piece_start = 0
        self.chunk = b""
        self.base = 0  # file offset of chunk[0]
        # Line and column (characters before it on its line) at file offset `counted`.
        self.counted = 0
        self.line, self.col = 1, 0

    # ijson calls these two while a piece is fed.

    def new_map(self) -> dict[str, object]:
        if self.start is None:
            self.start = self.piece_start
            self.started = True
        return {}

    def send(self, record: object) -> None:
        self.done.append((record, self.start))
        self.start = None

    def events(self) -> Iterator[Row | RowError]:
        prefix = "item" if self.records_key is None else f"{self.records_key}.item"
        coro = ijson.items_coro(self, prefix, map_type=self.new_map)
        guard = jsonguard.DepthGuard(self.parser.limits.max_depth)
        carry = b""
        for data in self.parser.src.chunks():
            first_line = guard.line
            try:
                guard.feed(data)
            except jsonguard.TooDeep as deep:
                # The lines before the one too deep are within the limit: their records come first.
                safe = _line_start(data, deep.line - first_line)
                if safe:
                    yield from self._feed(coro, carry + data[:safe])
                raise Stop(RowError(deep.line, deep.reason, fatal=True)) from None
            if carry:
                data = carry + data
            cut = utf8_cut(data)  # pieces hold whole characters: columns and UTF-8 errors are exact
            back = data.rfind(b"\\", max(cut - 2, 0), cut)
            if back >= 0:
                cut = back  # and whole "\\u" escape starts, for the surrogate check
            carry = data[cut:]
            if cut:
                yield from self._feed(coro, data[:cut] if carry else data)
        if carry:  # the file ends inside a character
            yield from self._feed(coro, carry)
        end = self.base + len(self.chunk)
        try:
            coro.close()
        except (ijson.JSONError, ValueError) as exc:
            yield from self._records(end)
            raise Stop(self._end_error(exc)) from None
        yield from self._records(end)

    def _feed(self, coro: Any, chunk: bytes) -> Iterator[Row | RowError]:
        self.base += len(self.chunk)
        self.chunk = chunk
        base, n = self.base, len(chunk)
        fed = chunk
        if b"\\ud" in chunk or b"\\uD" in chunk:
            # Same length, no surrogate: offsets, lines and columns stay exact.
            self.escapes += [base + m.start() for m in _SURROGATE_ESCAPE.finditer(chunk)]
            fed = _SURROGATE_ESCAPE.sub(b"\\\\u0", chunk)
        if self.top is not None:
            self._watch_top(fed)
        send, find = coro.send, fed.find
        pos = 0
        while pos < n:  # the hot loop: one turn per object
            end = find(b"{", pos + 1)
            if end < 0:
                end = n
            self.piece_start = base + pos
            try:
                send(fed[pos:end])
            except (ijson.JSONError, ValueError) as exc:
                self._note_start()
                yield from self._records(base + end)
                raise Stop(self._syntax_error(exc, pos, end)) from None
            if self.started:
                self._note_start()
            if self.done:
                yield from self._records(base + end)
            pos = end
        self._advance(base + n)
        # Checked once a chunk: memory grows by at most a chunk in between.
        max_row_bytes = self.parser.max_row_bytes
        if self.start is not None:
            self.kept.append(chunk[max(self.start - base, 0) :])
            if base + n - self.start > max_row_bytes:
                raise Stop(self._too_long(self.start_line))
        elif base + n - self.last_done > max_row_bytes:
            raise Stop(self._too_long(0))

    def _note_start(self) -> None:
        if self.started:
            self.started = False
            self.start_line, self.start_col = self._advance(self.piece_start)

    def _advance(self, offset: int) -> tuple[int, int]:
        """Line and column (characters before it on its line) of `offset`,
        which lies in the current chunk, not before the last one asked for."""
        chunk, a, b = self.chunk, self.counted - self.base, offset - self.base
        nl = chunk.rfind(b"\n", a, b)
        if nl < 0:
            self.col += len(chunk[a:b].decode("utf-8", "replace"))
        else:
            self.line += chunk.count(b"\n", a, nl + 1)
            self.col = len(chunk[nl + 1 : b].decode("utf-8", "replace"))
        self.counted = offset
        return self.line, self.col

    def _record_bytes(self, start: int, end: int) -> bytes:
        """The bytes of the record from `start` up to `end` (in the current chunk)."""
        here = self.chunk[max(start - self.base, 0) : end - self.base]
        return b"".join([*self.kept, here]) if self.kept else here

    def _records(self, piece_end: int) -> Iterator[Row | RowError]:
        """The records the last piece (which ends at `piece_end`) completed."""
        parser = self.parser
        max_chars = parser.limits.max_row_chars
        for record, start in self.done:
            self.records += 1
            parser.count()
            if start is None or not isinstance(record, dict):
                yield from parser.rows(record, 0, self.records)
            elif (
                piece_end - start > max_chars
                and _record_chars(self._record_bytes(start, piece_end)) > max_chars
            ):
                yield RowError(self.start_line, f"record is {parser.too_long}", self.records)
            else:
                if self.escapes and self.escapes[0] < piece_end:
                    record = self._decoded(start, piece_end, record)
                yield from parser.rows(record, self.start_line, self.records)
            if start is not None:
                self.kept = []
        if self.escapes and self.escapes[0] < piece_end:
            self.escapes = [e for e in self.escapes if e >= piece_end]
        self.done.clear()
        self.last_done = piece_end

    def _decoded(self, start: int, end: int, record: object) -> object:
        """The record as json reads it: it holds surrogate escapes, which yajl cannot read."""
        try:
            return STRICT_JSON.raw_decode(self._record_bytes(start, end).decode("utf-8"))[0]
        except (ValueError, RecursionError):  # the bytes passed ijson and the depth guard: not expected
            return record

    def _watch_top(self, piece: bytes) -> None:
        """Until the value under the records key starts: stop if there is no such key or its value is no list."""
        top = self.top
        assert top is not None and self.records_key is not None
        top.feed(piece)
        key = shown(self.records_key)
        value = top.keys.get(self.records_key)
        if value is not None and value.kind is not None:
            self.top = None
            if value.kind != "list":
                raise Stop(
                    RowError(
                        0,
                        f'the value under the records key "{key}" is {a_kind(value.kind)}, not a '
                        "list of records",
                        fatal=True,
                    )
                )
        elif top.closed:
            found = ", ".join(f'"{shown(k)}"' for k in list(top.keys)[:10]) or "none"
            hint = records_keys(top.keys)
            also = f'; the records look to be under "{shown(hint[0][0])}"' if hint else ""
            raise Stop(
                RowError(0, f'no key "{key}" in the top-level object (its keys: {found}){also}', fatal=True)
            )
        elif top.broken:
            self.top = None  # the syntax error is ijson's to report, where it is

    def _too_long(self, line: int) -> RowError:
        return RowError(
            line,
            f"record is {self.parser.too_long} (a JSON array cannot be read past it)",
            self.records + 1,
            fatal=True,
        )

    def _syntax_error(self, exc: Exception, pos: int, end: int) -> RowError:
        """Why ijson stopped in chunk[pos:end], and where."""
        reason, lexical, context = yajl_error(exc)
        record = self.records + 1
        piece = self.chunk[pos:end]
        if self.start is not None:
            # Inside an object record: its bytes are at hand, json says where it breaks.
            data = self._record_bytes(self.start, self.base + end)
            line, col = self.start_line, self.start_col
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                return RowError(line, utf8_reason(data, err, line, start_column=col), record, fatal=True)
            try:
                STRICT_JSON.raw_decode(text)
            except json.JSONDecodeError as err:
                column = err.colno + (col if err.lineno == 1 else 0)
                where = f"line {line + err.lineno - 1}, column {column}"
                return RowError(line, f"invalid JSON: {json_reason(err)} ({where})", record, fatal=True)
            except (ValueError, RecursionError):
                pass  # what json takes and yajl does not (NaN): yajl's words below
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as err:
            line, col = self._advance(self.base + pos)
            return RowError(
                line + piece.count(b"\n", 0, err.start), utf8_reason(piece, err, start_column=col), fatal=True
            )
        offset = error_offset(context, piece) if context is not None else None
        if offset is not None:
            offset = token_start(piece, offset, reason, lexical)
        line, col = self._advance(self.base + pos + (offset or 0))
        where = f"line {line}" if offset is None else f"line {line}, column {col + 1}"
        if self.start is not None:
            return RowError(self.start_line, f"invalid JSON: {reason} ({where})", record, fatal=True)
        if reason == "trailing garbage":
            return RowError(line, f"unexpected data after the end of {self.container}", fatal=True)
        # The usual slips between records; not sure signs of them inside an
        # item that is not an object, which is rare (and an error anyway).
        found = piece[offset] if offset is not None and offset < len(piece) else None
        if self.records and found == ord("{") and reason.startswith("after array element"):
            return RowError(line, f"expected ',' or ']' after record {self.records}, found '{{'", fatal=True)
        if self.records and found == ord("]") and reason.startswith("unallowed token"):
            return RowError(line, f"trailing comma after record {self.records}", fatal=True)
        return RowError(
            line, f"invalid JSON: {reason}" + ("" if offset is None else f" (column {col + 1})"), fatal=True
        )

    def _end_error(self, exc: Exception) -> RowError:
        """ijson's complaint at the end of the file."""
        reason, _, _ = yajl_error(exc)
        line, _ = self._advance(self.base + len(self.chunk))
        if self.start is not None:
            return RowError(
                self.start_line,
                "the file ends inside this record (an unclosed string, object or list)",
                self.records + 1,
                fatal=True,
            )
        if reason == "premature EOF":
            return RowError(
                line, f"{self.container} is not closed (file ends after record {self.records})", fatal=True
            )
        if reason == "trailing garbage":
            return RowError(line, f"unexpected data after the end of {self.container}", fatal=True)
        return RowError(line, f"invalid JSON: {reason}", fatal=True)


# --- normalisation -----------------------------------------------------------


def records_under_key(parser: Parser, key: str) -> Iterator[Row | RowError]:
    """The records in the list under `key` of a file that is one JSON object, read like a JSON array."""
    if SPECS[parser.format].layout != "json":
        raise Stop(
            RowError(
                0,
                f'a records key ("{shown(key)}") applies to a JSON file that is one object; '
                f"format {parser.format} has no keys",
                fatal=True,
            )
        )
    start = parser.head.lstrip()[:1]
    if start == b"[":
        raise Stop(
            RowError(
                0,
                f"the file is a JSON array, not one JSON object: its records are read without a "
                f'records key ("{shown(key)}" was given)',
                fatal=True,
            )
        )
    if start not in (b"{", b""):
        raise Stop(
            RowError(
                0,
                f'with a records key ("{shown(key)}") the file must be one JSON object '
                "holding the records in a list under that key",
                fatal=True,
            )
        )
    return JsonArray(parser, key).events()
