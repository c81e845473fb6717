"""Format detection from the head of the file (and its name), and the
doubts about a chosen format worth a warning."""

from __future__ import annotations

import csv
import json
import re

from engines import jsonguard
from engines.formats.base import QUERY_COLUMNS
from engines.formats.source import BOM, HEAD_BYTES
from engines.formats.specs import FORMAT_OF_KEY

_KEY_SNIFF = re.compile('"(' + "|".join(map(re.escape, FORMAT_OF_KEY)) + r')"\s*:')


def detect_format(
    head: bytes,
    filename: str = "",
    *,
    records_key: str | None = None,
    max_depth: int = jsonguard.DEFAULT_MAX_DEPTH,
) -> str:
    """Guess the format from the first bytes of the file (and its name).
    Returns one of FORMATS; "lines" when nothing else fits. With
    `records_key`, the records are those under that key of a top-level object."""
    ext = filename.lower().rsplit(".", 1)[-1] if "." in filename else ""
    if ext in ("csv", "tsv"):
        return "csv"
    text = head.removeprefix(BOM).decode("utf-8", "replace").lstrip()
    if records_key is not None and text[:1] == "{":
        text = _records_text(text, records_key)
    if text[:1] in ("{", "["):
        try:
            jsonguard.check(text, max_depth)
        except jsonguard.TooDeep:
            # Nothing here is decoded; the parser refuses the file, naming the line.
            m = _KEY_SNIFF.search(text)
            return FORMAT_OF_KEY[m.group(1)] if m else "chat"
        guess = _json_guess(text)
        if guess:
            return guess
    if ext in ("json", "jsonl", "ndjson"):
        return "chat"
    if ext == "txt":
        return "lines"
    first_line = first_line_of(text)
    cells = next(csv.reader([first_line], delimiter=csv_delimiter(first_line, filename)), [])
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
        for key, fmt in FORMAT_OF_KEY.items():
            if key in first:
                return fmt
        return "chat"  # JSON of an unknown shape: the errors will name the missing field
    # The first record may be cut off at the end of the head.
    m = _KEY_SNIFF.search(text)
    return FORMAT_OF_KEY[m.group(1)] if m else None


def first_line_of(text: str) -> str:
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


def csv_delimiter(header_line: str, filename: str) -> str:
    if filename.lower().endswith(".tsv") or ("\t" in header_line and "," not in header_line):
        return "\t"
    if ";" in header_line and "," not in header_line:
        return ";"
    return ","


def jsonl_warning(head: bytes, max_depth: int) -> str | None:
    """Why a file read as format 'lines' looks like JSONL, if it does."""
    lines = head.decode("utf-8", "replace").splitlines()
    if len(head) >= HEAD_BYTES:
        lines = lines[:-1]  # may be cut off
    lines = [ln for ln in lines if ln.strip()][:20]
    objects = 0
    for ln in lines:
        try:
            objects += isinstance(jsonguard.loads(ln, max_depth), dict)
        except ValueError:
            pass
    if not (lines and objects * 2 > len(lines)):
        return None
    return (
        f"{objects} of the first {len(lines)} lines are JSON objects: the file looks like JSONL, but with "
        "format 'lines' every line is stored as raw JSON text; to read its fields, upload it with "
        "format auto or name the fields (query column, answer column)"
    )
