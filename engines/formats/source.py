"""The byte source: the upload read in fixed-size chunks, counted against the
size limit, and cut into lines ("\n", "\r\n" or a lone "\r") of bounded
length; and how to say that bytes are not UTF-8."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from engines.formats.base import TooLarge

# Bytes read ahead to detect the format and to recognise a file that is one JSON object.
HEAD_BYTES = 64 * 1024
BOM = b"\xef\xbb\xbf"
CHUNK = 64 * 1024


def utf8_reason(
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


class ByteReader(Protocol):
    """All a Source needs of its file: a binary file, or a wrapper counting what is read."""

    def read(self, n: int = -1, /) -> bytes: ...


class Source:
    """Buffered reader over a binary file that counts bytes against the limit.
    Only `read(n)` is needed from the file object."""

    def __init__(self, fileobj: ByteReader, max_bytes: int) -> None:
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
            raise TooLarge
        if self._eof:
            return b""
        data = self._file.read(CHUNK)
        if not data:
            self._eof = True
            return b""
        self.bytes_read += len(data)
        if self.bytes_read > self._max_bytes:
            self._over = True
            raise TooLarge
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
        except TooLarge:
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


def utf8_cut(data: bytes) -> int:
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
