"""Streaming parsing and validation of uploaded datasets.

Plain Python: no Django. Every supported upload format becomes one internal
form per row, ``{"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]}``.

The file is read as a stream of bytes in fixed-size chunks, so memory does
not grow with the file: JSONL, CSV and plain text are read line by line, and
a JSON array is parsed record by record with ijson (its C backend, yajl2_c,
when installed), holding only the record in progress. Every bad row becomes a
`RowError` that says where (line, and for a JSON array also the record; only
the record for an array item that is not an object) and what was wrong. A few
problems stop parsing altogether (`RowError.fatal`): the size and row limits,
a CSV header without the chosen column, a file that is not UTF-8 at all
(UTF-16), and in a JSON array any syntax error (ijson cannot resume after
one) or a record too long to hold, and a file that is one JSON object.

Fields that change what a row means and that no format here can honour
(KTO labels, images, tool calls, DPO rejected answers unless the caller asks
for the chosen ones) reject the row, naming the field; fields that change
nothing (ids, sources) are kept with the row as `Row.extra`. Self-instruct
seed tasks become one row per instance.

Typical use (iterate once, write the good rows out, keep the first errors)::

    reader = DatasetReader(fileobj, "auto", limits=Limits(), filename=name)
    for row in reader:
        out.write(row.to_json() + "\\n")
    if reader.error_count:
        ...  # discard `out`, show reader.errors
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import ijson  # picks its fastest backend installed: yajl2_c (C) with the usual wheels

from engines import jsonguard
from engines._types import type_name

Message = dict[str, str]

FORMATS: dict[str, str] = {
    "chat": 'OpenAI chat: {"messages": [{"role", "content"}, ...]} per line (JSONL) or in a JSON array',
    "alpaca": 'Alpaca: {"instruction", "input", "output"} as a JSON array or JSONL',
    "sharegpt": 'ShareGPT: {"conversations": [{"from", "value"}, ...]} as JSONL or a JSON array',
    "completion": 'OpenAI legacy completions: {"prompt", "completion"} as JSONL or a JSON array',
    "fields": "JSON or JSONL with the query (and answer) fields you name",
    "csv": "CSV with a header row: a query column and optionally an answer column",
    "lines": "Plain text: one query per line",
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
QUERY_COLUMNS = ("query", "question", "prompt", "instruction", "input", "user", "text")
ANSWER_COLUMNS = ("answer", "response", "output", "completion", "assistant", "reply")
HEAD_BYTES = 64 * 1024
MAX_KEPT_ERRORS = 50
MAX_KEPT_FIELDS = 50
MULTIMODAL_FIELDS = ("images", "image", "audios", "audio", "videos", "video")
TOOL_FIELDS = ("tools", "functions", "function_description")
TOOL_REASON = "tool calls need a tool-capable chat template; this workbench's base models have none"
KTO_REASON = ("label: KTO preference data: label false marks an undesirable answer; the workbench trains on "
              "answers it should imitate — remove the rows labelled false or drop the label field")
DPO_REASON = ("chosen/rejected: DPO preference pairs; the workbench trains on one answer per query — "
              "use --use-chosen (upload form: \"use only the chosen answers\") to load the chosen answers "
              "and drop the rejected ones")
# Fields each format reads; any other field of a row is kept with it as `extra`.
_USED_FIELDS = {
    "chat": {"messages"},
    "sharegpt": {"conversations", "system"},
    "alpaca": {"instruction", "input", "output", "system"},
    "completion": {"prompt", "completion"},
}

_BOM = b"\xef\xbb\xbf"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 512 * 1024 * 1024
    max_rows: int = 1_000_000
    # Characters of one row as written in the file (a JSONL line, a JSON array
    # record, a CSV record), not of its message contents.
    max_row_chars: int = 1_000_000
    # Nesting of the JSON, counted from the file's top level: deeper input is
    # refused before any parser sees it (parsers pay for depth in memory).
    max_depth: int = jsonguard.DEFAULT_MAX_DEPTH

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_rows", "max_row_chars", "max_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Row:
    """One accepted row. `line` is the physical line where it starts;
    `record` is its 1-based position in a JSON array (None otherwise)."""

    line: int
    messages: list[Message]
    record: int | None = None
    # Fields of the record no format reads and that change nothing (ids, sources...).
    extra: dict[str, object] | None = None

    def to_json(self) -> str:
        """The row as one JSONL line (without the newline)."""
        return json.dumps({"messages": self.messages}, ensure_ascii=False)

    @property
    def sha(self) -> str:
        return row_sha(self.messages)


@dataclass(frozen=True)
class RowError:
    """A rejected row, or (fatal=True) a problem that stopped parsing.
    line 0 means the whole file rather than one line, or with a record, a
    JSON array item whose line is not tracked (one that is not an object)."""

    line: int
    reason: str
    record: int | None = None
    fatal: bool = False

    def __str__(self) -> str:
        if self.line == 0:
            return self.reason if self.record is None else f"record {self.record}: {self.reason}"
        if self.record is None:
            return f"line {self.line}: {self.reason}"
        return f"line {self.line} (record {self.record}): {self.reason}"


class Validation(NamedTuple):
    row_count: int
    errors: list[RowError]
    error_count: int


def row_sha(messages: Sequence[Message]) -> str:
    """Stable hash of a normalised row, for counting duplicates."""
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- detection -------------------------------------------------------------

_KEY_SNIFF = re.compile(r'"(messages|conversations|instruction|prompt)"\s*:')
_FORMAT_OF_KEY = {"messages": "chat", "conversations": "sharegpt", "instruction": "alpaca", "prompt": "completion"}


def detect_format(head: bytes, filename: str = "", *, records_key: str | None = None,
                  max_depth: int = jsonguard.DEFAULT_MAX_DEPTH) -> str:
    """Guess the format from the first bytes of the file (and its name).
    Returns one of FORMATS; "lines" when nothing else fits. With
    `records_key`, the records are those under that key of a top-level object."""
    ext = filename.lower().rsplit(".", 1)[-1] if "." in filename else ""
    if ext in ("csv", "tsv"):
        return "csv"
    text = head.removeprefix(_BOM).decode("utf-8", "replace").lstrip()
    if records_key is not None and text[:1] == "{":
        text = _records_text(text, records_key)
    if text[:1] in ("{", "["):
        try:
            jsonguard.check(text, max_depth)
        except jsonguard.TooDeep:
            # Nothing here is decoded; the parser refuses the file, naming the line.
            m = _KEY_SNIFF.search(text)
            return _FORMAT_OF_KEY[m.group(1)] if m else "chat"
        guess = _json_guess(text)
        if guess:
            return guess
    if ext in ("json", "jsonl", "ndjson"):
        return "chat"
    if ext == "txt":
        return "lines"
    first_line = _first_line(text)
    cells = next(csv.reader([first_line], delimiter=_delimiter(first_line, filename)), [])
    known = {c.strip().lower() for c in cells} & set(QUERY_COLUMNS)
    if known and (len(cells) > 1 or cells[0].strip().lower() in QUERY_COLUMNS[:3]):
        return "csv"
    return "lines"


def _records_text(text: str, key: str) -> str:
    """The head from the list under `key` on, to guess the format of its records."""
    m = re.search(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:\s*\[", text)
    return text[m.end() - 1 :] if m else text


def _json_guess(text: str) -> str | None:
    """The format of a JSON head already checked against the depth limit."""
    decoder = json.JSONDecoder()
    first: object = None
    try:
        whole, _ = decoder.raw_decode(text)
        if isinstance(whole, list) and not (whole and isinstance(whole[0], dict)):
            return "chat"  # a JSON array, just not of objects: the errors will say so
    except ValueError:
        pass
    try:
        first, _ = decoder.raw_decode(text[1:].lstrip() if text.startswith("[") else text)
    except ValueError:
        pass
    if isinstance(first, dict):
        for key, fmt in _FORMAT_OF_KEY.items():
            if key in first:
                return fmt
        return "chat"  # JSON of an unknown shape: the errors will name the missing field
    # The first record may be cut off at the end of the head.
    m = _KEY_SNIFF.search(text)
    return _FORMAT_OF_KEY[m.group(1)] if m else None


def _first_line(text: str) -> str:
    # "\n", "\r\n" or an old Mac "\r": a line ending left inside would make csv fail.
    return re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]


def looks_binary(head: bytes) -> bool:
    """True for bytes no dataset file has: many NUL bytes, control
    characters and invalid UTF-8 (an executable, an archive, an image). A
    text file with a stray bad byte is not binary: its line is reported."""
    if not head:
        return False
    text = head.decode("utf-8", "replace")
    odd = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f"))
    return odd > max(8, len(text) // 10)


def _delimiter(header_line: str, filename: str) -> str:
    if filename.lower().endswith(".tsv") or ("\t" in header_line and "," not in header_line):
        return "\t"
    if ";" in header_line and "," not in header_line:
        return ";"
    return ","


# --- public API --------------------------------------------------------------


def parse(
    fileobj: BinaryIO,
    fmt: str = "auto",
    *,
    limits: Limits,
    query_column: str | None = None,
    answer_column: str | None = None,
    filename: str = "",
    use_chosen: bool = False,
    records_key: str | None = None,
) -> Iterator[Row | RowError]:
    """Stream the file's rows and errors in file order. After a fatal error
    the stream ends. Reads the first bytes right away (to detect the format).
    With use_chosen, DPO pairs (chosen/rejected) become their chosen answer.
    With records_key, the file is one JSON object and the records are the
    items of the list under that key (read as a stream, like a JSON array)."""
    return _Parser(fileobj, fmt, limits, query_column, answer_column, filename, use_chosen, records_key).events()


class DatasetReader:
    """Iterate once to get the accepted rows; errors are counted as they
    stream by and the first `keep_errors` are kept in `errors`."""

    def __init__(
        self,
        fileobj: BinaryIO,
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
        self._parser = _Parser(fileobj, fmt, limits, query_column, answer_column, filename, use_chosen,
                               records_key)
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
                if len(self.errors) < self.keep_errors or item.fatal:  # the error that stopped parsing is kept
                    self.errors.append(item)
                self.stopped = self.stopped or item.fatal
            else:
                self.row_count += 1
                yield item


def validate(
    fileobj: BinaryIO,
    fmt: str = "auto",
    *,
    limits: Limits,
    query_column: str | None = None,
    answer_column: str | None = None,
    filename: str = "",
    keep_errors: int = MAX_KEPT_ERRORS,
    use_chosen: bool = False,
    records_key: str | None = None,
) -> Validation:
    """Consume the whole stream without keeping rows."""
    reader = DatasetReader(
        fileobj, fmt, limits=limits, query_column=query_column, answer_column=answer_column,
        filename=filename, keep_errors=keep_errors, use_chosen=use_chosen, records_key=records_key,
    )
    for _ in reader:
        pass
    return Validation(reader.row_count, reader.errors, reader.error_count)


# --- internals ---------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _Stop(Exception):
    """Ends parsing with one fatal error."""

    def __init__(self, error: RowError) -> None:
        super().__init__(error.reason)
        self.error = error


class _Bad(Exception):
    """A row is rejected; the message is the reason."""


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


# Fields that make a top-level object a row of some format, not a file of rows.
_ROW_FIELDS = frozenset({"messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                         "chosen", "rejected", "instances"})
_KINDS = {"start_map": "object", "start_array": "list", "string": "string", "number": "number",
          "integer": "number", "double": "number", "boolean": "boolean", "null": "null"}


class _Value:
    """What a top-level key holds: its kind and, for a list, how many items and objects among them."""

    __slots__ = ("kind", "items", "objects")

    def __init__(self, kind: str | None = None) -> None:
        self.kind = kind
        self.items = 0
        self.objects = 0


def _describe(obj: dict[str, object]) -> dict[str, _Value]:
    keys: dict[str, _Value] = {}
    for key, value in obj.items():
        info = keys[key] = _Value(type_name(value))
        if isinstance(value, list):
            info.items = len(value)
            info.objects = sum(isinstance(item, dict) for item in value)
    return keys


def _records_keys(keys: dict[str, _Value]) -> list[tuple[str, _Value]]:
    """The keys holding lists of objects, the longest first."""
    found = [(k, v) for k, v in keys.items() if v.kind == "list" and v.objects]
    return sorted(found, key=lambda kv: -kv[1].objects)


def _a(kind: str) -> str:
    return kind if kind == "null" else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _single_object_error(keys: dict[str, _Value], broken: str = "") -> RowError:
    found = _records_keys(keys)
    if found:
        key, value = found[0]
        shown = _shown(key)
        also = "".join(f'; "{_shown(k)}" holds {v.items:,}' for k, v in found[1:4])
        return RowError(0, f'the file is one JSON object; its records are under the key "{shown}" '
                           f"({value.items:,} items{also}){broken}: load it with records key \"{shown}\" "
                           f"(--records-key {shlex.quote(shown)}; upload form: records key)", fatal=True)
    listed = ", ".join(_shown(k) for k in list(keys)[:10]) + (", ..." if len(keys) > 10 else "")
    return RowError(0, f"the file is a single JSON object with keys {listed or '(none read)'}{broken}; the rows "
                       "must be a JSON array or one object per line (JSONL)", fatal=True)




class _TopLevel:
    """The top level of a JSON text fed in pieces, without building it: the
    kind of the value, and for an object its keys and what each holds.
    yajl's events, no prefixes: memory is the keys; with `max_depth`, the
    pieces pass the depth guard first (a _Stop naming the line)."""

    def __init__(self, max_depth: int | None = None, first_line: int = 1) -> None:
        self.guard = jsonguard.DepthGuard(max_depth, first_line) if max_depth is not None else None
        self.events = ijson.sendable_list()
        self.coro = ijson.basic_parse_coro(self.events)
        self.kind: str | None = None
        self.keys: dict[str, _Value] = {}
        self.closed = False  # the top-level value is complete
        self.trailing = False  # and more follows it
        self.broken = ""  # why the text is not JSON, as " (and ...)"
        self._depth = 0
        self._value: _Value | None = None

    def feed(self, piece: bytes) -> None:
        if self.broken:
            return
        if self.guard is not None:
            try:
                self.guard.feed(piece)
            except jsonguard.TooDeep as deep:
                raise _Stop(RowError(deep.line, deep.reason, fatal=True)) from None
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
        reason = _yajl_error(exc)[0]
        self.trailing = reason == "trailing garbage"
        self.broken = " (and the file ends inside it)" if reason == "premature EOF" else \
            " (and more JSON follows it)" if self.trailing else f" (and it is not valid JSON: {reason})"

    def _walk(self) -> None:
        depth, value = self._depth, self._value
        for event, item in self.events:
            if event == "map_key":
                if depth == 1:
                    value = self.keys[str(item)] = _Value()
                continue
            if event in ("end_map", "end_array"):
                depth -= 1
                self.closed = depth == 0
                continue
            kind = _KINDS.get(event, event)
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


class _ChunkReader:
    """A file-like `read` over an iterator of byte chunks, for ijson."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson reads 0 bytes to learn the type
            return b""
        return next(self._chunks, b"")


class _RecordAbort(Exception):
    """Raised from inside csv.reader's line source to give up on a record."""


def _json_reason(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Invalid control character at", then json's position


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size:,} {unit}"
    return f"{n:,} bytes"


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _utf8_reason(
    data: bytes,
    err: UnicodeDecodeError,
    first_line: int | None = None,
    *,
    start_column: int = 0,
    name_line: bool = False,
) -> str:
    """Why `data` is not UTF-8. With `first_line` (the line `data` starts on),
    the reason names the line when the bad byte is not on the first one;
    `start_column` is where `data` starts on its first line."""
    nl = data.rfind(b"\n", 0, err.start)
    offset = data.count(b"\n", 0, err.start)
    column = len(data[nl + 1 : err.start].decode("utf-8", "replace")) + 1 + (0 if offset else start_column)
    on = f" on line {first_line + offset}" if first_line is not None and (offset or name_line) else ""
    return f"not valid UTF-8{on} (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8"


class _Source:
    """Buffered reader over a binary file that counts bytes against the limit.
    Only `read(n)` is needed from the file object."""

    def __init__(self, fileobj: BinaryIO, max_bytes: int) -> None:
        self._file = fileobj
        self._max_bytes = max_bytes
        self.buf = bytearray()
        self.pos = 0
        self.bytes_read = 0
        self._eof = False
        self._over = False

    def read_chunk(self) -> bytes:
        """The next chunk of the file, counted against the limit; b"" at
        the end. Bypasses `buf`: for parsers that buffer on their own."""
        if self._over:
            raise _TooLarge
        if self._eof:
            return b""
        data = self._file.read(_CHUNK)
        if not data:
            self._eof = True
            return b""
        self.bytes_read += len(data)
        if self.bytes_read > self._max_bytes:
            self._over = True
            raise _TooLarge
        return data

    def fill(self) -> bool:
        """Append one chunk, dropping the consumed bytes (before `pos`) first.
        False at the end of the file."""
        data = self.read_chunk()
        if not data:
            return False
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data
        return True

    def chunks(self) -> Iterator[bytes]:
        """The rest of the file: what is buffered, then chunk by chunk."""
        rest = bytes(self.buf[self.pos :])
        self.buf.clear()
        self.pos = 0
        if rest:
            yield rest
        while data := self.read_chunk():
            yield data

    def peek(self, n: int) -> bytes:
        try:
            while len(self.buf) - self.pos < n and self.fill():
                pass
        except _TooLarge:
            pass  # raised again by the next fill, once the head has been parsed
        return bytes(self.buf[self.pos : self.pos + n])

    def _line_end(self, start: int, end: int) -> int:
        """Index just past the first line ending ("\n", "\r\n" or a lone
        "\r", as old Mac files have) in buf[start:end], or -1. A "\r" that
        ends the buffer waits for the next byte, which may be its "\n"."""
        lf = self.buf.find(b"\n", start, end)
        cr = self.buf.find(b"\r", start, lf if lf >= 0 else end)
        if cr < 0:
            return lf + 1 if lf >= 0 else -1
        if cr + 1 >= len(self.buf):
            if not self._eof:
                return -2  # need more bytes to know
            return cr + 1
        return cr + 2 if self.buf[cr + 1] == ord("\n") else cr + 1

    def readline(self, limit: int) -> tuple[bytes, bool]:
        """The next line with its line ending, at most `limit` bytes. Returns
        (line, complete); complete is False when the line was cut at `limit`.
        b"" means the end of the file."""
        while True:
            end = min(len(self.buf), self.pos + limit)
            i = self._line_end(self.pos, end)
            if i >= 0:
                line = bytes(self.buf[self.pos : i])
                self.pos = i
                return line, True
            if i == -1 and len(self.buf) - self.pos >= limit:
                line = bytes(self.buf[self.pos : self.pos + limit])
                self.pos += limit
                return line, False
            if not self.fill():
                self._eof = True
                if self._line_end(self.pos, len(self.buf)) >= 0:
                    continue
                line = bytes(self.buf[self.pos :])
                self.pos = len(self.buf)
                return line, True

    def skip_line(self, sink: Any = None) -> None:
        """Discard up to and including the next line ending; `sink`, when
        given, is called with each piece discarded."""
        while True:
            i = self._line_end(self.pos, len(self.buf))
            if i >= 0:
                if sink is not None:
                    sink(bytes(self.buf[self.pos : i]))
                self.pos = i
                return
            if i == -1:
                if sink is not None:
                    sink(bytes(self.buf[self.pos :]))
                self.pos = len(self.buf)
            if not self.fill():
                self._eof = True
                if self._line_end(self.pos, len(self.buf)) < 0:
                    self.pos = len(self.buf)
                    return


class _Parser:
    def __init__(
        self,
        fileobj: BinaryIO,
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
        self.src = _Source(fileobj, limits.max_bytes)
        head = self.src.peek(HEAD_BYTES)
        self.utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))
        if head.startswith(_BOM):
            self.src.pos += len(_BOM)
            head = head[len(_BOM) :]
        self.head = head
        self.binary = not self.utf16 and looks_binary(head)
        self.format = fmt if fmt != "auto" else "lines" if self.binary else detect_format(
            head, filename, records_key=self.records_key, max_depth=limits.max_depth)
        if fmt == "auto" and query_column is not None:
            if self.format == "lines":
                self.format = "csv"  # naming a column says it is a table
            elif self.format != "csv":
                self.format = "fields"  # JSON or JSONL: the named fields hold the query and answer
        self.use_chosen = use_chosen
        self.kept_fields: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.warnings: list[str] = []
        if fmt == "lines" and not self.binary and not self.utf16:
            self._warn_if_jsonl(head)
        self.records = 0
        # Bytes of one row as read: up to 4 bytes per character, plus "\r\n".
        self.max_row_bytes = limits.max_row_chars * 4 + 2
        self.too_long = f"longer than the {limits.max_row_chars:,}-character limit"

    def count(self) -> None:
        self.records += 1
        if self.records > self.limits.max_rows:
            raise _Stop(RowError(0, f"more than {self.limits.max_rows:,} rows (limit)", fatal=True))

    def events(self) -> Iterator[Row | RowError]:
        errors = 0
        try:
            if self.utf16:
                raise _Stop(RowError(0, "the file is UTF-16 encoded; save it as UTF-8", fatal=True))
            if self.binary:
                raise _Stop(RowError(0, f"{self.filename or 'the file'} looks like a binary file (control or "
                                        "unreadable bytes throughout its start), not text: upload chat JSONL, Alpaca or "
                                        "ShareGPT JSON, CSV, or plain text with one query per line", fatal=True))
            if self.records_key is not None:
                source = self._records_under_key()
            elif self.format == "csv":
                source = self._csv()
            elif self.format == "lines":
                source = self._lines()
            elif self.head.lstrip()[:1] == b"[":
                source = self._json_array()
            else:
                self._refuse_single_object()
                source = self._jsonl()
            for item in source:
                if isinstance(item, RowError):
                    errors += 1
                yield item
        except _TooLarge:
            yield RowError(0, f"file is larger than the {_human_bytes(self.limits.max_bytes)} limit", fatal=True)
            return
        except _Stop as stop:
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

    # --- plain text and JSON Lines ---

    def _text_lines(self, describe_long_first_line: bool = False) -> Iterator[tuple[int, str] | RowError]:
        """(line number, text without its line ending) of every line that is
        not blank, counted as a row; errors for lines too long or not UTF-8.
        With describe_long_first_line, a first line too long that is the
        whole file and one JSON object holding the records is refused as such."""
        line_no = 0
        seen = False
        while True:
            raw, complete = self.src.readline(self.max_row_bytes)
            if not raw:
                return
            line_no += 1
            first = not seen and not raw.isspace()
            seen = seen or first
            long_object = describe_long_first_line and first and raw.lstrip()[:1] == b"{"
            if not complete:
                if long_object:
                    self._refuse_long_records_object(raw, line_no, rest=True)
                else:
                    self.src.skip_line()
                self.count()
                yield RowError(line_no, f"line is {self.too_long}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                self.count()
                yield RowError(line_no, _utf8_reason(raw, err))
                continue
            text = text.removesuffix("\n").removesuffix("\r")
            if not text.strip():
                continue
            self.count()
            if len(text) > self.limits.max_row_chars:
                if long_object:
                    self._refuse_long_records_object(raw, line_no)
                yield RowError(line_no, f"line is {self.too_long}")
            else:
                yield line_no, text

    def _refuse_long_records_object(self, raw: bytes, line_no: int, rest: bool = False) -> None:
        """A first line too long to be a row: stop if it is the whole file and one
        object holding the records. With `rest`, the line goes on past `raw`."""
        walker = _TopLevel(self.limits.max_depth, line_no)
        walker.feed(raw)
        if rest:
            self.src.skip_line(walker.feed)
        walker.close()
        if walker.closed and not walker.trailing and self._rest_is_blank():
            self._refuse_records_object(walker.keys)

    def _lines(self) -> Iterator[Row | RowError]:
        for item in self._text_lines():
            if isinstance(item, RowError):
                yield item
            elif "\x00" in item[1]:
                yield RowError(item[0], "line contains a NUL byte (is this a binary file?)")
            else:
                yield Row(item[0], [{"role": "user", "content": item[1]}])

    def _jsonl(self) -> Iterator[Row | RowError]:
        max_depth = self.limits.max_depth
        first = 0
        for item in self._text_lines(describe_long_first_line=True):
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
                    raise _Stop(RowError(line_no + deep.line - 1, deep.reason, fatal=True)) from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield RowError(line_no, f"invalid JSON: {_json_reason(err)} (column {err.colno})")
            except ValueError as err:  # e.g. an integer with too many digits
                yield RowError(line_no, f"invalid JSON: {err}")
            else:
                if line_no == first and isinstance(obj, dict) and self._rest_is_blank():
                    self._refuse_records_object(_describe(obj))
                yield from self._rows(obj, line_no)

    def _rows(self, obj: object, line: int, record: int | None = None) -> Iterator[Row | RowError]:
        """The row (or, for self-instruct seed tasks, rows) of one parsed JSON
        record, or why it is rejected."""
        try:
            row = _object(obj)
            _refuse_meaning_fields(row)
            if "chosen" in row or "rejected" in row:
                if not self.use_chosen:
                    raise _Bad(DPO_REASON)
                messages, used = _from_chosen(row)
                self.notes["preference pairs: only the chosen answers were loaded; the rejected answers "
                           "were dropped"] = None
                rows = [messages]
            elif isinstance(row.get("instances"), list):
                rows = _from_instances(row)
                used = {"instruction", "instances", "system"}
                self.notes["self-instruct seed tasks: each instance became a row (query: the instruction "
                           "and the instance input; answer: the instance output)"] = None
            elif self.format == "fields":
                messages, used = _from_fields(row, self.query_column or "", self.answer_column)
                rows = [messages]
            else:
                read, used = _READERS.get(self.format, _READERS["chat"])
                rows = [read(row)]
            # Whatever a format reads passed _check_text; this keeps any
            # future path from storing text PostgreSQL and exports refuse.
            for messages in rows:
                for i, m in enumerate(messages):
                    if not m["content"].isascii():
                        _check_text(m["content"], f"messages[{i}].content")
            extra = _extra_fields(row, used)
        except _Bad as bad:
            reason = str(bad)
            if reason.startswith("missing field '") and isinstance(obj, dict):
                reason += _how_to_load(obj)
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

    def _warn_if_jsonl(self, head: bytes) -> None:
        lines = head.decode("utf-8", "replace").splitlines()
        if len(head) >= HEAD_BYTES:
            lines = lines[:-1]  # may be cut off
        lines = [ln for ln in lines if ln.strip()][:20]
        objects = 0
        for ln in lines:
            try:
                objects += isinstance(jsonguard.loads(ln, self.limits.max_depth), dict)
            except ValueError:
                pass
        if lines and objects * 2 > len(lines):
            self.warnings.append(
                f"{objects} of the first {len(lines)} lines are JSON objects: the file looks like JSONL, but with "
                "format 'lines' every line is stored as raw JSON text; to read its fields, upload it with "
                "format auto (--format auto) or name the fields (--query-column/--answer-column)"
            )

    def _rest_is_blank(self) -> bool:
        """Nothing but blanks after the current position (looks ahead, reads nothing)."""
        rest = self.src.peek(HEAD_BYTES)
        return len(rest) < HEAD_BYTES and not rest.strip()

    def _is_row(self, keys: dict[str, _Value]) -> bool:
        """Whether a top-level object with these keys reads as a row of some format."""
        return bool(keys.keys() & _ROW_FIELDS) or (self.query_column is not None and self.query_column in keys)

    def _refuse_records_object(self, keys: dict[str, _Value]) -> None:
        """Stop on a file that is one object holding its records in a list
        (not a row): name the key and how to load it."""
        if not self._is_row(keys) and _records_keys(keys):
            raise _Stop(_single_object_error(keys))

    def _refuse_single_object(self) -> None:
        """A file that is one JSON object (pretty-printed over many lines,
        e.g. {"data": [...]}) is neither a JSON array nor JSONL: say so once
        instead of an error for each of its lines. (One on a single line is
        found by _jsonl: it may be a JSONL file of one row.)"""
        text = self.head.decode("utf-8", "replace").lstrip()
        if not text.startswith("{"):
            return
        max_depth = self.limits.max_depth
        first = _first_line(text)
        try:
            if isinstance(jsonguard.loads(first, max_depth), dict):
                return  # JSONL
        except ValueError:
            pass
        try:
            # Depth summed over the whole head: lines of JSONL cut short add up, so
            # too deep here is no verdict (the lines, or the walk below, give one).
            jsonguard.check(text, max_depth)
            whole, end = _JSON.raw_decode(text)
        except ValueError:
            whole, end = None, 0
        if isinstance(whole, dict):
            if text[end:].strip():
                return  # more than one object: per-line errors tell more
            raise _Stop(_single_object_error(_describe(whole)))
        if first.rstrip().endswith(("{", "[", ",", ":")) and len(self.head) >= HEAD_BYTES \
                and not _json_object_line(text, max_depth):
            # Cut off at the end of the head: read the top level as a stream.
            walker = _TopLevel(max_depth)
            for chunk in self.src.chunks():
                walker.feed(chunk)
                if walker.broken:
                    break
            walker.close()
            raise _Stop(_single_object_error(walker.keys, walker.broken))

    def _records_under_key(self) -> Iterator[Row | RowError]:
        key = self.records_key
        assert key is not None
        if self.format in ("csv", "lines"):
            raise _Stop(RowError(0, f"a records key (\"{_shown(key)}\") applies to a JSON file that is one object; "
                                    f"format {self.format} has no keys", fatal=True))
        start = self.head.lstrip()[:1]
        if start == b"[":
            raise _Stop(RowError(0, f"the file is a JSON array, not one JSON object: its records are read without a "
                                    f"records key (\"{_shown(key)}\" was given)", fatal=True))
        if start not in (b"{", b""):
            raise _Stop(RowError(0, f"with a records key (\"{_shown(key)}\") the file must be one JSON object "
                                    "holding the records in a list under that key", fatal=True))
        return _JsonArray(self, key).events()

    # --- JSON array ---

    def _json_array(self) -> Iterator[Row | RowError]:
        return _JsonArray(self).events()

    # --- CSV ---

    def _csv(self) -> Iterator[Row | RowError]:
        delimiter = _delimiter(_first_line(self.head.decode("utf-8", "replace")), self.filename)
        lines = _CsvLines(self)
        reader = csv.reader(lines, delimiter=delimiter)
        # csv's own per-field limit (131072 by default) would cut in before ours.
        if csv.field_size_limit() < self.limits.max_row_chars:
            csv.field_size_limit(self.limits.max_row_chars)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (_RecordAbort, csv.Error) as err:
            raise _Stop(RowError(1, f"header: {lines.problem or err}", fatal=True)) from None
        if lines.problem:
            raise _Stop(RowError(1, f"header: {lines.problem}", fatal=True))
        names = [h.strip() for h in header]
        qi, ai = self._csv_columns(names)
        while True:
            lines.start_record()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (_RecordAbort, csv.Error) as err:
                self.count()
                reason = lines.problem or f"invalid CSV: {err}"
                yield RowError(lines.record_line, reason)
                reader = csv.reader(lines, delimiter=delimiter)
                continue
            if not any(c.strip() for c in cells):
                continue
            self.count()
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

    def _csv_columns(self, names: list[str]) -> tuple[int, int | None]:
        listed = ", ".join(repr(n) for n in names)
        lowered = [n.lower() for n in names]

        def find(wanted: str) -> int:
            if wanted.strip() in names:
                return names.index(wanted.strip())
            if wanted.strip().lower() in lowered:
                return lowered.index(wanted.strip().lower())
            raise _Stop(RowError(1, f"no column {wanted!r} in the header (columns: {listed}); name one of them "
                                    "with --query-column/--answer-column (upload form: query/answer column)",
                                 fatal=True))

        if self.query_column is not None:
            qi = find(self.query_column)
        else:
            guesses = [lowered.index(g) for g in QUERY_COLUMNS if g in lowered]
            if guesses:
                qi = guesses[0]
            elif len(names) == 1:
                qi = 0
            else:
                raise _Stop(RowError(
                    1,
                    f"cannot tell which column holds the queries; choose one of the columns ({listed}) "
                    "with --query-column (upload form: query column)",
                    fatal=True,
                ))
        ai: int | None = None
        if self.answer_column is not None:
            ai = find(self.answer_column)
            if ai == qi:
                raise _Stop(RowError(1, f"column {names[qi]!r} cannot be both the query and the answer",
                                     fatal=True))
        else:
            ai = next((lowered.index(g) for g in ANSWER_COLUMNS if g in lowered and lowered.index(g) != qi),
                      None)
        return qi, ai


class _CsvLines:
    """The physical lines fed to csv.reader: counts lines, notes the first
    problem of the current record, and aborts a record that grows past the
    size limit (an unclosed quote would otherwise swallow the whole file)."""

    def __init__(self, parser: _Parser) -> None:
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
            self.problem = self.problem or _utf8_reason(
                raw, err, self.line, name_line=self.line != self.record_line)
            text = raw.decode("utf-8", "replace")
        self.record_chars += len(text.rstrip("\r\n"))
        if self.record_chars > self.parser.limits.max_row_chars:
            self.problem = self.problem or f"row is {self.parser.too_long}"
            raise _RecordAbort
        if "\x00" in text:
            self.problem = self.problem or "row contains a NUL byte (is this a binary file?)"
        return text


# --- JSON array ----------------------------------------------------------------

_BLANKS = " \t\r\n"


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


# Re-reads a broken record to say where it breaks, in json's words; it refuses
# NaN and Infinity as yajl does.
_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _utf8_cut(data: bytes) -> int:
    """len(data), or where a character cut off at the end of `data` starts."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte < 0x80:
            return n
        if byte >= 0xC0:
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n - back if back < size else n
    return n


def _yajl_error(exc: Exception) -> tuple[str, bool, bytes | None]:
    """ijson's reason for a syntax error, whether yajl's lexer (not its
    parser) raised it, and yajl's context line, which shows up to 30 bytes
    either side of the error, the error at index 40."""
    text = str(exc)
    raw: bytes = text.encode("utf-8", "surrogateescape")
    if text[:2] in ("b'", 'b"'):  # the context cut a character in two: ijson gives the repr
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, bytes):
            raw = value
    lines = raw.split(b"\n")
    reason = lines[0].decode("utf-8", "replace")
    lexical = reason.startswith("lexical error: ")
    for prefix in ("parse error: ", "lexical error: "):
        reason = reason.removeprefix(prefix)
    context = lines[1] if len(lines) > 2 and lines[2].strip().startswith(b"(right here)") else None
    return reason.rstrip("."), lexical, context


def _error_offset(context: bytes, piece: bytes) -> int | None:
    """Where in `piece` yajl's context line puts the error; None unless
    exactly one place fits. yajl pads the (up to 30) bytes before the error
    with spaces to 40 and shows newlines as spaces."""
    shown = piece.replace(b"\n", b" ").replace(b"\r", b" ")
    before, after = context[:40], context[40:]
    fits: list[int] = []
    for o in _find_all(shown, after) if after else iter([len(shown)]):
        if len(after) == min(30, len(shown) - o) and before == b" " * (40 - min(o, 30)) + shown[max(0, o - 30) : o]:
            fits.append(o)
            if len(fits) > 1:
                return None
    return fits[0] if fits else None


def _find_all(data: bytes, sub: bytes) -> Iterator[int]:
    i = data.find(sub)
    while i >= 0:
        yield i
        i = data.find(sub, i + 1)


_WORD = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-.")


def _token_start(piece: bytes, end: int, reason: str, lexical: bool) -> int:
    """Where the offending token starts, given yajl's offset: the parser's
    points past that token, the lexer's at the bad byte (past it for a byte
    that starts no token)."""
    if lexical:
        return end - 1 if reason == "invalid char in json text" and end else end
    if end == 0:
        return 0
    last = piece[end - 1]
    if last == ord('"'):  # back to the opening quote: the nearest one not escaped
        i = end - 1
        while (i := piece.rfind(b'"', 0, i)) >= 0:
            if (i - len(piece[:i].rstrip(b"\\"))) % 2 == 0:
                return i
        return end - 1  # the string opened in an earlier piece
    start = end - 1
    while start > 0 and last in _WORD and piece[start - 1] in _WORD:
        start -= 1
    return start


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


class _JsonArray:
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

    def __init__(self, parser: _Parser, records_key: str | None = None) -> None:
        self.parser = parser
        self.records_key = records_key
        self.container = "the JSON array" if records_key is None else "the JSON object"
        # Watches the top level until the key's value starts (then it must be a list).
        self.top: _TopLevel | None = None if records_key is None else _TopLevel()
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
                raise _Stop(RowError(deep.line, deep.reason, fatal=True)) from None
            if carry:
                data = carry + data
            cut = _utf8_cut(data)  # pieces hold whole characters: columns and UTF-8 errors are exact
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
            raise _Stop(self._end_error(exc)) from None
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
                raise _Stop(self._syntax_error(exc, pos, end)) from None
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
                raise _Stop(self._too_long(self.start_line))
        elif base + n - self.last_done > max_row_bytes:
            raise _Stop(self._too_long(0))

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
                yield from parser._rows(record, 0, self.records)
            elif piece_end - start > max_chars and _record_chars(self._record_bytes(start, piece_end)) > max_chars:
                yield RowError(self.start_line, f"record is {parser.too_long}", self.records)
            else:
                if self.escapes and self.escapes[0] < piece_end:
                    record = self._decoded(start, piece_end, record)
                yield from parser._rows(record, self.start_line, self.records)
            if start is not None:
                self.kept = []
        if self.escapes and self.escapes[0] < piece_end:
            self.escapes = [e for e in self.escapes if e >= piece_end]
        self.done.clear()
        self.last_done = piece_end

    def _decoded(self, start: int, end: int, record: object) -> object:
        """The record as json reads it: it holds surrogate escapes, which yajl cannot read."""
        try:
            return _JSON.raw_decode(self._record_bytes(start, end).decode("utf-8"))[0]
        except (ValueError, RecursionError):  # the bytes passed ijson and the depth guard: not expected
            return record

    def _watch_top(self, piece: bytes) -> None:
        """Until the value under the records key starts: stop if there is no such key or its value is no list."""
        top = self.top
        assert top is not None and self.records_key is not None
        top.feed(piece)
        key = _shown(self.records_key)
        value = top.keys.get(self.records_key)
        if value is not None and value.kind is not None:
            self.top = None
            if value.kind != "list":
                raise _Stop(RowError(0, f'the value under the records key "{key}" is {_a(value.kind)}, not a '
                                        "list of records", fatal=True))
        elif top.closed:
            found = ", ".join(f'"{_shown(k)}"' for k in list(top.keys)[:10]) or "none"
            hint = _records_keys(top.keys)
            also = f'; the records look to be under "{_shown(hint[0][0])}"' if hint else ""
            raise _Stop(RowError(0, f'no key "{key}" in the top-level object (its keys: {found}){also}',
                                 fatal=True))
        elif top.broken:
            self.top = None  # the syntax error is ijson's to report, where it is

    def _too_long(self, line: int) -> RowError:
        return RowError(line, f"record is {self.parser.too_long} (a JSON array cannot be read past it)",
                        self.records + 1, fatal=True)

    def _syntax_error(self, exc: Exception, pos: int, end: int) -> RowError:
        """Why ijson stopped in chunk[pos:end], and where."""
        reason, lexical, context = _yajl_error(exc)
        record = self.records + 1
        piece = self.chunk[pos:end]
        if self.start is not None:
            # Inside an object record: its bytes are at hand, json says where it breaks.
            data = self._record_bytes(self.start, self.base + end)
            line, col = self.start_line, self.start_col
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                return RowError(line, _utf8_reason(data, err, line, start_column=col), record, fatal=True)
            try:
                _JSON.raw_decode(text)
            except json.JSONDecodeError as err:
                column = err.colno + (col if err.lineno == 1 else 0)
                where = f"line {line + err.lineno - 1}, column {column}"
                return RowError(line, f"invalid JSON: {_json_reason(err)} ({where})", record, fatal=True)
            except (ValueError, RecursionError):
                pass  # what json takes and yajl does not (NaN): yajl's words below
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as err:
            line, col = self._advance(self.base + pos)
            return RowError(line + piece.count(b"\n", 0, err.start), _utf8_reason(piece, err, start_column=col),
                            fatal=True)
        offset = _error_offset(context, piece) if context is not None else None
        if offset is not None:
            offset = _token_start(piece, offset, reason, lexical)
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
        return RowError(line, f"invalid JSON: {reason}" + ("" if offset is None else f" (column {col + 1})"),
                        fatal=True)

    def _end_error(self, exc: Exception) -> RowError:
        """ijson's complaint at the end of the file."""
        reason, _, _ = _yajl_error(exc)
        line, _ = self._advance(self.base + len(self.chunk))
        if self.start is not None:
            return RowError(self.start_line, "the file ends inside this record (an unclosed string, object or list)",
                            self.records + 1, fatal=True)
        if reason == "premature EOF":
            return RowError(line, f"{self.container} is not closed (file ends after record {self.records})",
                            fatal=True)
        if reason == "trailing garbage":
            return RowError(line, f"unexpected data after the end of {self.container}", fatal=True)
        return RowError(line, f"invalid JSON: {reason}", fatal=True)


# --- normalisation -----------------------------------------------------------


def _object(obj: object, where: str = "") -> dict[str, object]:
    if not isinstance(obj, dict):
        raise _Bad(_at(where, f"expected a JSON object, got {type_name(obj)}"))
    return obj


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(text: str) -> str:
    """`text` fit to show in a message: unpaired surrogates as \\udxxx escapes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(value: str, where: str) -> str:
    """`value`, unless it holds an unpaired surrogate (a JSON escape such as
    \\ud800 alone): not Unicode, so PostgreSQL and any UTF-8 export refuse it."""
    if not value.isascii():  # the common case costs one scan
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Bad(f"{where} holds an unpaired surrogate \\u{ord(value[err.start]):04x} (not valid Unicode)") \
                from None
    return value


def _check_value(value: object, where: str) -> None:
    """Every string of a parsed JSON value, keys included (its depth is bounded by the guard)."""
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"the field name {_path(where, _shown(key))}")
            _check_value(item, _path(where, _shown(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")


def _extra_fields(row: dict[str, object], used: set[str]) -> dict[str, object] | None:
    """The fields of a row that no format reads, kept with it."""
    extra = {k: v for k, v in row.items() if k not in used and v is not None}
    if extra:
        _check_value(extra, "")
    return extra or None


def _optional_string(obj: dict[str, object], key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{_path(where, key)}: expected a string, got {type_name(value)}")
    if value is not None and not value.isascii():  # the hot path: no call, no path built
        _check_text(value, _path(where, key))
    return value


def _required_string(obj: dict[str, object], key: str, where: str = "") -> str:
    if key not in obj:
        raise _Bad(_at(where, f"missing field '{key}'") + ("" if where else _found_keys(obj)))
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{_path(where, key)}: expected a string, got {type_name(value)}")
    if not value.isascii():
        _check_text(value, _path(where, key))
    return value


def _content(obj: dict[str, object], key: str, where: str = "") -> str:
    value = _required_string(obj, key, where)
    if not value.strip():
        raise _Bad(f"{_path(where, key)}: empty content")
    return value


def _found_keys(obj: dict[str, object]) -> str:
    keys = list(obj)[:10]
    return f" (found {', '.join(repr(k) for k in keys)})" if keys else " (the object is empty)"


def _list(obj: dict[str, object], key: str) -> list[object]:
    if key not in obj:
        raise _Bad(f"missing field '{key}'{_found_keys(obj)}")
    value = obj[key]
    if not isinstance(value, list):
        raise _Bad(f"{key}: expected a list, got {type_name(value)}")
    return value


def _check_turns(messages: list[Message], field: str) -> list[Message]:
    if not any(m["role"] == "user" for m in messages):
        raise _Bad("no user turn (a row must contain at least one user message)")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise _Bad(f"{field}[{i}]: a system message may only come first")
    i = 1 if messages[0]["role"] == "system" else 0
    if messages[i]["role"] != "user":
        raise _Bad(f"{field}[{i}]: the conversation must start with a user message, not {messages[i]['role']}")
    return messages


def _refuse_meaning_fields(row: dict[str, object]) -> None:
    """Fields no format here reads and that change what a row means:
    loading the row without them would teach the wrong thing."""
    for key in TOOL_FIELDS:
        if row.get(key):
            raise _Bad(f"{key}: {TOOL_REASON}")
    chat = row.get("chat")
    if isinstance(chat, str) and ("<functioncall>" in chat or "FUNCTION RESPONSE" in chat):
        raise _Bad(f"chat: glaive-style function calling: {TOOL_REASON}")
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if not isinstance(turns, list):
            continue
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                continue
            for call in ("tool_calls", "function_call"):
                if turn.get(call):
                    raise _Bad(f"{key}[{i}].{call}: {TOOL_REASON}")
            role = turn.get("role", turn.get("from"))
            if isinstance(role, str) and role.lower() in ("tool", "function", "function_call", "observation",
                                                          "ipython"):
                raise _Bad(f"{key}[{i}]: a {role!r} turn: {TOOL_REASON}")
    if isinstance(row.get("label"), bool):
        raise _Bad(KTO_REASON)
    for key in MULTIMODAL_FIELDS:
        if row.get(key):
            raise _Bad(f"{key}: multimodal rows: the base models here read text only — drop the {key} field "
                       "and any <image> placeholders, or the rows that need them")


def _how_to_load(obj: dict[str, object]) -> str:
    """What would load a row whose format field is missing."""
    keys = [k for k in obj if isinstance(obj[k], str)]
    lowered = {k.lower(): k for k in keys}
    query = next((lowered[c] for c in QUERY_COLUMNS if c in lowered), keys[0] if keys else None)
    answer = next((lowered[c] for c in ANSWER_COLUMNS if c in lowered and lowered[c] != query), None)
    hint = ("; supported formats: chat (messages), alpaca (instruction/input/output), sharegpt (conversations), "
            "completion (prompt/completion) — choose with --format, or name the fields with ")
    option = "--query-column/--answer-column" if query is None else \
        f"--query-column {_shown(query)}" + (f" --answer-column {_shown(answer)}" if answer else "")
    return hint + option + " (upload form: query/answer column)"


def _text_parts(parts: list[object], where: str) -> str:
    """OpenAI multi-part content: the text parts joined with a newline."""
    texts: list[str] = []
    for j, item in enumerate(parts):
        part = _object(item, f"{where}[{j}]")
        kind = part.get("type")
        if kind != "text":
            raise _Bad(f"{where}[{j}]: a part of type {kind!r}; only text parts can be loaded (the base models "
                       "here read text only)")
        texts.append(_required_string(part, "text", f"{where}[{j}]"))
    text = "\n".join(texts)
    if not text.strip():
        raise _Bad(f"{where}: empty content")
    return text


def _from_chat(obj: object) -> list[Message]:
    row = _object(obj)
    out: list[Message] = []
    items = _list(row, "messages")
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        message = _object(item, where)
        role = _required_string(message, "role", where)
        if role not in ROLES:
            raise _Bad(f"{where}.role: unknown role {role!r} (expected system, user or assistant)")
        value = message.get("content")
        if role == "assistant" and i == len(items) - 1 and i > 0 and isinstance(value, str) and not value.strip():
            break  # an empty last answer: a query-only row
        if isinstance(value, list):
            out.append({"role": role, "content": _text_parts(value, f"{where}.content")})
        else:
            out.append({"role": role, "content": _content(message, "content", where)})
    if not out:
        raise _Bad("no user turn (a row must contain at least one user message)")
    return _check_turns(out, "messages")


def _from_completion(obj: object) -> list[Message]:
    row = _object(obj)
    out: list[Message] = [{"role": "user", "content": _content(row, "prompt")}]
    completion = _optional_string(row, "completion")
    if completion and completion.strip():
        out.append({"role": "assistant", "content": completion})
    return out


def _from_fields(row: dict[str, object], query: str, answer: str | None) -> tuple[list[Message], set[str]]:
    out: list[Message] = [{"role": "user", "content": _content(row, query)}]
    if answer is not None:
        out.append({"role": "assistant", "content": _content(row, answer)})
        return out, {query, answer}
    return out, {query}


def _from_chosen(row: dict[str, object]) -> tuple[list[Message], set[str]]:
    """A DPO pair read as its chosen answer: the prompt from prompt/question/
    instruction, or the chosen conversation's turns before its last answer."""
    chosen = row.get("chosen")
    used = {"chosen", "rejected", "system"}
    system = _optional_string(row, "system")
    out: list[Message] = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt_key = next((k for k in ("prompt", "question", "instruction") if k in row), None)
    if prompt_key is not None:
        used.add(prompt_key)
    if isinstance(chosen, str):
        if prompt_key is None:
            raise _Bad("chosen: a chosen answer without a prompt (expected a prompt, question or instruction "
                       "field)")
        prompt = row[prompt_key]
        if isinstance(prompt, list):
            out += _from_chat({"messages": prompt})
        else:
            out.append({"role": "user", "content": _content(row, prompt_key)})
        if not chosen.strip():
            raise _Bad("chosen: empty content")
        out.append({"role": "assistant", "content": _check_text(chosen, "chosen")})
        return out, used
    if not isinstance(chosen, list):
        raise _Bad(f"chosen: expected a string or a list of messages, got {type_name(chosen)}")
    prompt_turns: list[Message] = []
    roles = [m.get("role") for m in chosen if isinstance(m, dict) and m.get("role") != "system"]
    if roles[:1] == ["user"]:
        pass  # the chosen conversation holds its prompt (UltraFeedback): the prompt field repeats it
    elif prompt_key is not None and isinstance(row[prompt_key], list):
        prompt_turns = _from_chat({"messages": row[prompt_key]})
    elif prompt_key is not None:
        prompt_turns = [{"role": "user", "content": _content(row, prompt_key)}]
    turns = _from_chat({"messages": [*[dict(m) for m in prompt_turns], *chosen]}) if prompt_turns else \
        _from_chat({"messages": chosen})
    if turns[-1]["role"] != "assistant":
        raise _Bad("chosen: the chosen conversation has no answer")
    return out + turns if not (out and turns[0]["role"] == "system") else turns, used


def _from_instances(row: dict[str, object]) -> list[list[Message]]:
    """Self-instruct seed tasks: one row per instance."""
    instruction = _content(row, "instruction")
    system = _optional_string(row, "system")
    rows: list[list[Message]] = []
    instances = row["instances"]
    assert isinstance(instances, list)
    if not instances:
        raise _Bad("instances: the list is empty")
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        instance = _object(item, where)
        extra = _optional_string(instance, "input", where)
        output = _optional_string(instance, "output", where)
        out: list[Message] = [{"role": "system", "content": system}] if system and system.strip() else []
        query = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        out.append({"role": "user", "content": query})
        if output and output.strip():
            out.append({"role": "assistant", "content": output})
        rows.append(out)
    return rows


def _from_sharegpt(obj: object) -> list[Message]:
    row = _object(obj)
    out: list[Message] = []
    system = _optional_string(row, "system")
    if system and system.strip():
        out.append({"role": "system", "content": system})
    turns = _list(row, "conversations")
    for i, item in enumerate(turns):
        where = f"conversations[{i}]"
        turn = _object(item, where)
        speaker = _required_string(turn, "from", where)
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise _Bad(f"{where}.from: unknown role {speaker!r} (expected system, human or gpt)")
        value = turn.get("value")
        if role == "assistant" and i == len(turns) - 1 and out and isinstance(value, str) and not value.strip():
            break  # an empty last answer: a query-only row
        out.append({"role": role, "content": _content(turn, "value", where)})
    if not out:
        raise _Bad("no user turn (a row must contain at least one user message)")
    return _check_turns(out, "conversations")


def _from_alpaca(obj: object) -> list[Message]:
    row = _object(obj)
    instruction = _content(row, "instruction")
    extra = _optional_string(row, "input")
    output = _optional_string(row, "output")
    system = _optional_string(row, "system")
    out: list[Message] = []
    if system and system.strip():
        out.append({"role": "system", "content": system})
    query = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    out.append({"role": "user", "content": query})
    if output and output.strip():
        out.append({"role": "assistant", "content": output})
    return out


# Format -> (reader of one record, the fields it reads); "fields" needs the caller's names.
_READERS: dict[str, tuple[Any, set[str]]] = {
    "chat": (_from_chat, _USED_FIELDS["chat"]),
    "alpaca": (_from_alpaca, _USED_FIELDS["alpaca"]),
    "sharegpt": (_from_sharegpt, _USED_FIELDS["sharegpt"]),
    "completion": (_from_completion, _USED_FIELDS["completion"]),
}
