"""CSV with a header row, read record by record: a record may span lines (a
quoted newline) but not past the row limit, so an unclosed quote costs one
row, not the file."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engines.formats.base import ANSWER_COLUMNS, QUERY_COLUMNS, Row, RowError, Stop
from engines.formats.detect import csv_delimiter, first_line_of
from engines.formats.source import utf8_reason

if TYPE_CHECKING:
    from engines.formats.reader import Parser


class _RecordAbort(Exception):
    """Raised from inside csv.reader's line source to give up on a record."""

    # --- CSV ---


class _CsvLines:
    """The physical lines fed to csv.reader: counts lines, notes the first
    problem of the current record, and aborts a record that grows past the
    size limit (an unclosed quote would otherwise swallow the whole file)."""

    def __init__(self, parser: Parser) -> None:
        self.parser = parser
        self.line = 0
        self.record_line = 1
        self.record_chars = 0
        self.problem: str | None = None

    def start_record(self) -> None:
        self.record_line = self.line + 1
        self.record_chars = 0
        self.problem = None

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        src = self.parser.src
        raw, complete = src.readline(self.parser.max_row_bytes)
        if not raw:
            raise StopIteration
        self.line += 1
        if not complete:
            src.skip_line()
            self.problem = self.problem or f"row is {self.parser.too_long}"
            raise _RecordAbort
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            # Name the line when it is not the one the record starts on.
            self.problem = self.problem or utf8_reason(
                raw, err, self.line, name_line=self.line != self.record_line
            )
            text = raw.decode("utf-8", "replace")
        self.record_chars += len(text.rstrip("\r\n"))
        if self.record_chars > self.parser.limits.max_row_chars:
            self.problem = self.problem or f"row is {self.parser.too_long}"
            raise _RecordAbort
        if "\x00" in text:
            self.problem = self.problem or "row contains a NUL byte (is this a binary file?)"
        return text


def csv_rows(parser: Parser) -> Iterator[Row | RowError]:
    """CSV (or TSV, or ;-separated) with a header: one row a record, from the query (and answer) column."""
    delimiter = csv_delimiter(first_line_of(parser.head.decode("utf-8", "replace")), parser.filename)
    lines = _CsvLines(parser)
    reader = csv.reader(lines, delimiter=delimiter)
    # csv's own per-field limit (131072 by default) would cut in before ours.
    if csv.field_size_limit() < parser.limits.max_row_chars:
        csv.field_size_limit(parser.limits.max_row_chars)
    try:
        header = next(reader)
    except StopIteration:
        return
    except (_RecordAbort, csv.Error) as err:
        raise Stop(RowError(1, f"header: {lines.problem or err}", fatal=True)) from None
    if lines.problem:
        raise Stop(RowError(1, f"header: {lines.problem}", fatal=True))
    names = [h.strip() for h in header]
    qi, ai = _columns(names, parser.query_column, parser.answer_column)
    while True:
        lines.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except (_RecordAbort, csv.Error) as err:
            parser.count()
            reason = lines.problem or f"invalid CSV: {err}"
            yield RowError(lines.record_line, reason)
            reader = csv.reader(lines, delimiter=delimiter)
            continue
        if not any(c.strip() for c in cells):
            continue
        parser.count()
        if lines.problem:
            yield RowError(lines.record_line, lines.problem)
        elif len(cells) != len(names):
            yield RowError(
                lines.record_line,
                f"row has {len(cells)} fields but the header has {len(names)}",
            )
        elif not cells[qi].strip():
            yield RowError(lines.record_line, f"column {names[qi]!r}: empty query")
        else:
            messages = [{"role": "user", "content": cells[qi]}]
            if ai is not None and cells[ai].strip():
                messages.append({"role": "assistant", "content": cells[ai]})
            yield Row(lines.record_line, messages)


def _columns(names: list[str], query_column: str | None, answer_column: str | None) -> tuple[int, int | None]:
    """The indexes of the query column and of the answer column (if any): named, or guessed from the header."""
    listed = ", ".join(repr(n) for n in names)
    lowered = [n.lower() for n in names]

    def find(wanted: str) -> int:
        if wanted.strip() in names:
            return names.index(wanted.strip())
        if wanted.strip().lower() in lowered:
            return lowered.index(wanted.strip().lower())
        raise Stop(
            RowError(
                1,
                f"no column {wanted!r} in the header (columns: {listed}); name one of them "
                "as the query column or the answer column",
                fatal=True,
            )
        )

    if query_column is not None:
        qi = find(query_column)
    else:
        guesses = [lowered.index(g) for g in QUERY_COLUMNS if g in lowered]
        if guesses:
            qi = guesses[0]
        elif len(names) == 1:
            qi = 0
        else:
            raise Stop(
                RowError(
                    1,
                    f"cannot tell which column holds the queries; name one of the columns ({listed}) "
                    "as the query column",
                    fatal=True,
                )
            )
    ai: int | None = None
    if answer_column is not None:
        ai = find(answer_column)
        if ai == qi:
            raise Stop(
                RowError(1, f"column {names[qi]!r} cannot be both the query and the answer", fatal=True)
            )
    else:
        ai = next((lowered.index(g) for g in ANSWER_COLUMNS if g in lowered and lowered.index(g) != qi), None)
    return qi, ai
