"""The reader: detects the format, dispatches on the file's layout (JSON,
CSV, plain lines) and turns each JSON record into a row through its format's
spec, the refusal policy and the value checks; DatasetReader counts and
keeps the errors as they stream by."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from engines._types import type_name
from engines.formats.base import Bad, Limits, Row, RowError, Stop, TooLarge, human_bytes
from engines.formats.csv import csv_rows
from engines.formats.detect import detect_format, jsonl_warning, looks_binary
from engines.formats.json_array import JsonArray, records_under_key
from engines.formats.jsonl import jsonl_rows
from engines.formats.lines import plain_lines
from engines.formats.policy import refuse_meaning_fields
from engines.formats.source import BOM, HEAD_BYTES, ByteReader, Source
from engines.formats.specs import (
    CHOSEN_NOTE,
    FORMATS,
    INSTANCES_NOTE,
    SPECS,
    how_to_load,
    read_chat,
    read_chosen,
    read_instances,
)
from engines.formats.toplevel import refuse_single_object
from engines.formats.values import as_object, check_text, extra_fields

MAX_KEPT_ERRORS = 50
MAX_KEPT_FIELDS = 50


class DatasetReader:
    """Iterate once to get the accepted rows; errors are counted as they
    stream by and the first `keep_errors` are kept in `errors`."""

    def __init__(
        self,
        fileobj: ByteReader,
        fmt: str = "auto",
        *,
        limits: Limits,
        query_column: str | None = None,
        answer_column: str | None = None,
        filename: str = "",
        keep_errors: int = MAX_KEPT_ERRORS,
        use_chosen: bool = False,
        records_key: str | None = None,
    ) -> None:
        self._parser = Parser(
            fileobj, fmt, limits, query_column, answer_column, filename, use_chosen, records_key
        )
        self.format: str = self._parser.format
        self.keep_errors = keep_errors
        self.row_count = 0
        self.error_count = 0
        self.errors: list[RowError] = []
        self.stopped = False  # a fatal error ended parsing early
        self._started = False

    @property
    def ok(self) -> bool:
        return self._started and self.error_count == 0

    @property
    def kept_fields(self) -> list[str]:
        """Names of the extra fields kept with the rows (first MAX_KEPT_FIELDS)."""
        return list(self._parser.kept_fields)

    @property
    def notes(self) -> list[str]:
        """What the reader did beyond reading rows as they are (expanded, dropped)."""
        return list(self._parser.notes)

    @property
    def warnings(self) -> list[str]:
        """Doubts about the chosen format that do not stop the import."""
        return list(self._parser.warnings)

    def __iter__(self) -> Iterator[Row]:
        if self._started:
            raise RuntimeError("a DatasetReader can be iterated only once")
        self._started = True
        for item in self._parser.events():
            if isinstance(item, RowError):
                self.error_count += 1
                if (
                    len(self.errors) < self.keep_errors or item.fatal
                ):  # the error that stopped parsing is kept
                    self.errors.append(item)
                self.stopped = self.stopped or item.fatal
            else:
                self.row_count += 1
                yield item


class Parser:
    """One pass over one file: detects the format, then yields its rows and errors in file order."""

    def __init__(
        self,
        fileobj: ByteReader,
        fmt: str,
        limits: Limits,
        query_column: str | None,
        answer_column: str | None,
        filename: str,
        use_chosen: bool = False,
        records_key: str | None = None,
    ) -> None:
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
        if records_key is not None and not isinstance(records_key, str):
            raise ValueError(f"records_key must be a string, got {type_name(records_key)}")
        self.records_key = records_key or None
        self.limits = limits
        self.query_column = query_column
        self.answer_column = answer_column
        self.filename = filename
        self.src = Source(fileobj, limits.max_bytes)
        head = self.src.peek(HEAD_BYTES)
        self.utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))
        if head.startswith(BOM):
            self.src.pos += len(BOM)
            head = head[len(BOM) :]
        self.head = head
        self.binary = not self.utf16 and looks_binary(head)
        self.format = (
            fmt
            if fmt != "auto"
            else "lines"
            if self.binary
            else detect_format(head, filename, records_key=self.records_key, max_depth=limits.max_depth)
        )
        if fmt == "auto" and query_column is not None:
            if self.format == "lines":
                self.format = "csv"  # naming a column says it is a table
            elif self.format != "csv":
                self.format = "fields"  # JSON or JSONL: the named fields hold the query and answer
        self.use_chosen = use_chosen
        self.kept_fields: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.warnings: list[str] = []
        self.spec = SPECS[self.format]
        # How one JSON record is read (a file of another layout has none: its records are never JSON).
        self.read = self.spec.read or read_chat
        if fmt == "lines" and not self.binary and not self.utf16:
            warning = jsonl_warning(head, limits.max_depth)
            if warning:
                self.warnings.append(warning)
        self.records = 0
        # Bytes of one row as read: up to 4 bytes per character, plus "\r\n".
        self.max_row_bytes = limits.max_row_chars * 4 + 2
        self.too_long = f"longer than the {limits.max_row_chars:,}-character limit"

    def count(self) -> None:
        self.records += 1
        if self.records > self.limits.max_rows:
            raise Stop(RowError(0, f"more than {self.limits.max_rows:,} rows (limit)", fatal=True))

    def events(self) -> Iterator[Row | RowError]:
        errors = 0
        try:
            if self.utf16:
                raise Stop(RowError(0, "the file is UTF-16 encoded; save it as UTF-8", fatal=True))
            if self.binary:
                raise Stop(
                    RowError(
                        0,
                        f"{self.filename or 'the file'} looks like a binary file (control or "
                        "unreadable bytes throughout its start), not text: upload chat JSONL, Alpaca or "
                        "ShareGPT JSON, CSV, or plain text with one query per line",
                        fatal=True,
                    )
                )
            if self.records_key is not None:
                source = records_under_key(self, self.records_key)
            else:
                source = _LAYOUTS[self.spec.layout](self)
            for item in source:
                if isinstance(item, RowError):
                    errors += 1
                yield item
        except TooLarge:
            yield RowError(
                0, f"file is larger than the {human_bytes(self.limits.max_bytes)} limit", fatal=True
            )
            return
        except Stop as stop:
            yield stop.error
            return
        except RecursionError:  # the depth guard should make this unreachable: still never a crash
            yield RowError(0, "the file is nested too deeply to parse", fatal=True)
            return
        except MemoryError:
            yield RowError(0, "the file needs more memory to parse than this server has", fatal=True)
            return
        if self.records == 0 and errors == 0:
            empty = self.src.bytes_read == 0
            yield RowError(0, "the file is empty" if empty else "the file contains no rows", fatal=True)

    def rows(self, obj: object, line: int, record: int | None = None) -> Iterator[Row | RowError]:
        """The row (or, for self-instruct seed tasks, rows) of one parsed JSON
        record, or why it is rejected."""
        try:
            row = as_object(obj)
            refuse_meaning_fields(row, self.use_chosen)
            if "chosen" in row or "rejected" in row:
                messages, used = read_chosen(row)
                self.notes[CHOSEN_NOTE] = None
                rows = [messages]
            elif isinstance(row.get("instances"), list):
                rows, used = read_instances(row)
                self.notes[INSTANCES_NOTE] = None
            else:
                messages, used = self.read(row, self.query_column, self.answer_column)
                rows = [messages]
            # Whatever a format reads passed check_text; this keeps any
            # future path from storing text PostgreSQL and exports refuse.
            for messages in rows:
                for i, m in enumerate(messages):
                    if not m["content"].isascii():
                        check_text(m["content"], f"messages[{i}].content")
            extra = extra_fields(row, used)
        except Bad as bad:
            reason = str(bad)
            if reason.startswith("missing field '") and isinstance(obj, dict):
                reason += how_to_load(obj)
            yield RowError(line, reason, record)
            return
        if extra:
            for key in extra:
                if len(self.kept_fields) >= MAX_KEPT_FIELDS:
                    break
                self.kept_fields.setdefault(key, None)
        for i, messages in enumerate(rows):
            if i:
                self.count()
            yield Row(line, messages, record, extra)


def _json(parser: Parser) -> Iterator[Row | RowError]:
    """A JSON array, or else JSON Lines (a file that is one object is refused first)."""
    if parser.head.lstrip()[:1] == b"[":
        return JsonArray(parser).events()
    refuse_single_object(parser.head, parser.src, parser.limits.max_depth)
    return jsonl_rows(parser)


# A spec's layout -> how its file is read.
_LAYOUTS: dict[str, Callable[[Parser], Iterator[Row | RowError]]] = {
    "json": _json,
    "csv": csv_rows,
    "lines": plain_lines,
}
