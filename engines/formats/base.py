"""What every part of the reader shares: the limits, an accepted row, a
rejected one, the exceptions that reject a row or stop the parse, and the
small helpers that word their messages."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from engines import jsonguard

Message = dict[str, str]
# Column (or field) names read as the query and as the answer, most likely first.
QUERY_COLUMNS = ("query", "question", "prompt", "instruction", "input", "user", "text")
ANSWER_COLUMNS = ("answer", "response", "output", "completion", "assistant", "reply")


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


def row_sha(messages: Sequence[Message]) -> str:
    """Stable hash of a normalised row, for counting duplicates."""
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class TooLarge(Exception):
    """The file is over Limits.max_bytes."""


class Stop(Exception):
    """Ends parsing with one fatal error."""

    def __init__(self, error: RowError) -> None:
        super().__init__(error.reason)
        self.error = error


class Bad(Exception):
    """A row is rejected; the message is the reason."""


def json_reason(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Invalid control character at", then json's position


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size:,} {unit}"
    return f"{n:,} bytes"


def at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


# Re-reads a broken record to say where it breaks, in json's words; it refuses
# NaN and Infinity as yajl does.
STRICT_JSON = json.JSONDecoder(parse_constant=no_constant)


def shown(text: str) -> str:
    """`text` fit to show in a message: unpaired surrogates as \\udxxx escapes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def a_kind(kind: str) -> str:
    return kind if kind == "null" else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
