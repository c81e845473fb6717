"""Text read line by line: the lines of a file (bounded, UTF-8 checked, each
counted as a row) and format lines, one query a line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engines.formats.base import Row, RowError
from engines.formats.source import utf8_reason
from engines.formats.toplevel import refuse_long_records_object

if TYPE_CHECKING:
    from engines.formats.reader import Parser


def text_lines(
    parser: Parser, describe_long_first_line: bool = False
) -> Iterator[tuple[int, str] | RowError]:
    """(line number, text without its line ending) of every line that is
    not blank, counted as a row; errors for lines too long or not UTF-8.
    With describe_long_first_line, a first line too long that is the
    whole file and one JSON object holding the records is refused as such."""
    line_no = 0
    seen = False
    while True:
        raw, complete = parser.src.readline(parser.max_row_bytes)
        if not raw:
            return
        line_no += 1
        first = not seen and not raw.isspace()
        seen = seen or first
        long_object = describe_long_first_line and first and raw.lstrip()[:1] == b"{"
        if not complete:
            if long_object:
                refuse_long_records_object(
                    parser.src, raw, line_no, parser.limits.max_depth, parser.query_column, rest=True
                )
            else:
                parser.src.skip_line()
            parser.count()
            yield RowError(line_no, f"line is {parser.too_long}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            parser.count()
            yield RowError(line_no, utf8_reason(raw, err))
            continue
        text = text.removesuffix("\n").removesuffix("\r")
        if not text.strip():
            continue
        parser.count()
        if len(text) > parser.limits.max_row_chars:
            if long_object:
                refuse_long_records_object(
                    parser.src, raw, line_no, parser.limits.max_depth, parser.query_column
                )
            yield RowError(line_no, f"line is {parser.too_long}")
        else:
            yield line_no, text


def plain_lines(parser: Parser) -> Iterator[Row | RowError]:
    """Format lines: each line that is not blank is one query."""
    for item in text_lines(parser):
        if isinstance(item, RowError):
            yield item
        elif "\x00" in item[1]:
            yield RowError(item[0], "line contains a NUL byte (is this a binary file?)")
        else:
            yield Row(item[0], [{"role": "user", "content": item[1]}])
