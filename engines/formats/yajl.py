"""The yajl error locator: ijson (yajl2_c) reports a syntax error with a
reason and a context line but no offset; these read the reason back and find
where in the bytes fed the error is, so an error names its line and column."""

from __future__ import annotations

import ast
from collections.abc import Iterator


def yajl_error(exc: Exception) -> tuple[str, bool, bytes | None]:
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


def error_offset(context: bytes, piece: bytes) -> int | None:
    """Where in `piece` yajl's context line puts the error; None unless
    exactly one place fits. yajl pads the (up to 30) bytes before the error
    with spaces to 40 and shows newlines as spaces."""
    shown = piece.replace(b"\n", b" ").replace(b"\r", b" ")
    before, after = context[:40], context[40:]
    fits: list[int] = []
    for o in find_all(shown, after) if after else iter([len(shown)]):
        if (
            len(after) == min(30, len(shown) - o)
            and before == b" " * (40 - min(o, 30)) + shown[max(0, o - 30) : o]
        ):
            fits.append(o)
            if len(fits) > 1:
                return None
    return fits[0] if fits else None


def find_all(data: bytes, sub: bytes) -> Iterator[int]:
    i = data.find(sub)
    while i >= 0:
        yield i
        i = data.find(sub, i + 1)


WORD = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-.")


def token_start(piece: bytes, end: int, reason: str, lexical: bool) -> int:
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
    while start > 0 and last in WORD and piece[start - 1] in WORD:
        start -= 1
    return start
