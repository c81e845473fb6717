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

The package's modules: base (limits, rows, errors), source (the byte
source), detect, specs (one spec per format, in a table), policy (the
refusals), values (checks on record values), lines, jsonl, csv, json_array
(with yajl, the error locator), toplevel (a file that is one JSON object),
reader (the dispatch and DatasetReader). Only the names below are public.

Typical use (iterate once, write the good rows out, keep the first errors)::

    reader = DatasetReader(fileobj, "auto", limits=Limits(), filename=name)
    for row in reader:
        out.write(row.to_json() + "\\n")
    if reader.error_count:
        ...  # discard `out`, show reader.errors
"""

from engines.formats.base import Limits, Row, RowError
from engines.formats.detect import detect_format
from engines.formats.reader import MAX_KEPT_ERRORS, DatasetReader
from engines.formats.source import HEAD_BYTES, ByteReader
from engines.formats.specs import FORMATS

__all__ = [
    "FORMATS",
    "HEAD_BYTES",
    "MAX_KEPT_ERRORS",
    "ByteReader",
    "DatasetReader",
    "Limits",
    "Row",
    "RowError",
    "detect_format",
]
