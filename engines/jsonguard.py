"""Bounded JSON: nesting is checked on the raw bytes before any parser sees them.

Parsers pay for depth: the stdlib's recursive decoder raises RecursionError on
a 100,000-deep array, and ijson builds a prefix string per level, so its memory
grows with the square of the depth (a 400 KB upload of brackets took 17 GB).
`DepthGuard` reads the bytes as they stream past, in C-speed steps (escapes dropped, all
but quotes and brackets deleted, the brackets outside strings summed with
`accumulate`), and
raises `TooDeep` naming the line as soon as the nesting passes the limit.

    guard = DepthGuard(limit=32)
    for chunk in chunks:
        guard.feed(chunk)          # raises TooDeep(line=..., limit=...)
        parser.send(chunk)

`loads(text)` is `json.loads` behind the same guard, for request bodies and
small files read whole.
"""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

DEFAULT_MAX_DEPTH = 32
_SLICE = 16 * 1024

# What is left of a string from a given position (the slow walk that finds the line).
_STRING_TAIL = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}')
# Opening brackets become 2, closing ones 0: the running sum minus the index is the depth.
_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


class TooDeep(ValueError):
    """The JSON nests deeper than the limit; `line` is 1-based."""

    def __init__(self, line: int, limit: int) -> None:
        self.line = line
        self.limit = limit
        super().__init__(f"line {line}: JSON nested more than {limit} levels deep (the limit is {limit})")

    @property
    def reason(self) -> str:
        """The message without the line, for callers that say where themselves."""
        return f"JSON nested more than {self.limit} levels deep (the limit is {self.limit})"


class DepthGuard:
    """Tracks the nesting of a JSON byte stream fed in pieces of any size."""

    def __init__(self, limit: int = DEFAULT_MAX_DEPTH, first_line: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.limit = limit
        self.depth = 0
        self.line = first_line  # line at the start of the next piece
        self._in_string = False
        self._escape = False

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        # In slices: each step copies its input a few times, so memory stays a few slices.
        view = memoryview(piece)
        for i in range(0, len(view), _SLICE):
            self._feed(bytes(view[i : i + _SLICE]))

    def _feed(self, data: bytes) -> None:
        start_state = (self.depth, self._in_string, self._escape)
        body = data[1:] if self._escape else data  # the byte a trailing backslash escaped
        stripped = body.rstrip(b"\\")
        escape = (len(body) - len(stripped)) % 2 == 1
        if escape:
            body = body[:-1]
        # Escapes pair from the left, so dropping "\\\\" then '\\"' leaves only the quotes that
        # open or close strings; then everything but quotes and brackets goes, and every other
        # piece between quotes is outside a string.
        marks = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_MARKS)
        pieces = marks.split(b'"')
        structural = b"".join(pieces[1 if self._in_string else 0 :: 2])
        in_string = self._in_string ^ (len(pieces) % 2 == 0)
        depth = self.depth
        if structural:
            steps = structural.translate(_STEP)
            deepest = depth + max(map(operator.sub, accumulate(steps), count(1)))
            depth += 2 * steps.count(2) - len(steps)
            if deepest > self.limit:
                raise TooDeep(self._line_of_excess(data, start_state), self.limit)
        self.depth = max(depth, 0)
        self._in_string = in_string
        self._escape = escape
        self.line += data.count(b"\n")

    def _line_of_excess(self, data: bytes, state: tuple[int, bool, bool]) -> int:
        """The exact line where the limit was passed (a slow walk, only on failure)."""
        depth, in_string, escape = state
        pos = 0
        n = len(data)
        while pos < n:
            if in_string:
                pos, in_string, escape = _string_end(data, pos, escape)
                continue
            byte = data[pos]
            if byte == 0x22:  # "
                in_string = True
            elif byte in (0x5B, 0x7B):  # [ {
                depth += 1
                if depth > self.limit:
                    return self.line + data.count(b"\n", 0, pos)
            elif byte in (0x5D, 0x7D):
                depth -= 1
            pos += 1
        return self.line


def _string_end(data: bytes, pos: int, escape: bool) -> tuple[int, bool, bool]:
    """From inside a string at `pos`: (next position, still in a string, escape pending)."""
    if escape:
        pos += 1
        if pos >= len(data):
            return len(data), True, False
    match = _STRING_TAIL.match(data, pos)
    end = match.end() if match else pos
    if end >= len(data):
        return len(data), True, False
    if data[end] == 0x22:
        return end + 1, False, False
    return len(data), True, True  # a backslash that ends the piece


def check(data: str | bytes, limit: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise TooDeep when `data` nests deeper than `limit`."""
    guard = DepthGuard(limit)
    guard.feed(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)


def loads(data: str | bytes, limit: int = DEFAULT_MAX_DEPTH) -> Any:
    """`json.loads` that refuses nesting deeper than `limit` (TooDeep, a ValueError)
    before decoding anything."""
    check(data, limit)
    return json.loads(data)
