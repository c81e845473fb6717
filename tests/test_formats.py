import io
import json
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from engines import formats, protocol
from engines.formats import (
    FORMATS,
    DatasetReader,
    Limits,
    Row,
    RowError,
    detect_format,
)

LIMITS = Limits()


class ShortReads(io.BytesIO):
    """A file that returns at most READS["size"] bytes a read: the reader's chunks end at any place."""

    def read(self, n: int | None = -1) -> bytes:
        size = READS["size"]
        return super().read(size if n is None or n < 0 else min(n, size))


# Bytes a read of ShortReads returns; tests set it with monkeypatch.setitem.
READS = {"size": 64 * 1024}


def stream(
    fileobj: BinaryIO, fmt: str = "auto", limits: Limits = LIMITS, **kw: str
) -> Iterator[Row | RowError]:
    """The rows and every error in file order, through the public reader."""
    reader = DatasetReader(fileobj, fmt, limits=limits, keep_errors=sys.maxsize, **kw)  # type: ignore[arg-type]
    seen = 0
    for row in reader:
        yield from reader.errors[seen:]
        seen = len(reader.errors)
        yield row
    yield from reader.errors[seen:]


def events(data: bytes, fmt: str = "auto", limits: Limits = LIMITS, **kw: str) -> list[Row | RowError]:
    return list(stream(ShortReads(data), fmt, limits, **kw))


def rows(data: bytes, fmt: str = "auto", **kw: str) -> list[list[dict[str, str]]]:
    out = events(data, fmt, **kw)
    assert [str(e) for e in out if isinstance(e, RowError)] == []
    return [e.messages for e in out if isinstance(e, Row)]


def errors(data: bytes, fmt: str = "auto", limits: Limits = LIMITS, **kw: str) -> list[str]:
    return [str(e) for e in events(data, fmt, limits, **kw) if isinstance(e, RowError)]


def jsonl(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def chat(*messages: dict[str, str]) -> dict[str, object]:
    return {"messages": list(messages)}


class _CountingReader(io.BytesIO):
    """A file that notes the largest read asked of it and how far it was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.largest_read = 0
        self.position = 0

    def read(self, size: int | None = -1, /) -> bytes:
        assert size is not None and size > 0, "the whole file was asked for"
        self.largest_read = max(self.largest_read, size)
        data = super().read(size)
        self.position += len(data)
        return data


# --- formats and detection ---


def test_it_parses_chat_jsonl_with_and_without_a_system_message():
    data = jsonl(chat(user("hi")), chat(system("be brief"), user("q"), assistant("a")))
    assert rows(data) == [[user("hi")], [system("be brief"), user("q"), assistant("a")]]


def test_it_keeps_line_numbers_across_blank_lines_and_crlf():
    data = b'\r\n{"messages": [{"role": "user", "content": "a"}]}\r\n\n{"messages": [{"role": "user", "content": "b"}]}'
    out = events(data)
    assert [(r.line, r.messages) for r in out if isinstance(r, Row)] == [(2, [user("a")]), (4, [user("b")])]


def test_it_normalises_alpaca_from_a_json_array_and_from_jsonl():
    records = [
        {"instruction": "Translate", "input": "hallo", "output": "hello"},
        {"instruction": "Say hi", "input": "", "output": ""},
        {"instruction": "Say hi", "input": None},
    ]
    expected = [
        [user("Translate\n\nhallo"), assistant("hello")],
        [user("Say hi")],
        [user("Say hi")],
    ]
    assert rows(json.dumps(records).encode()) == expected
    assert rows(jsonl(*records)) == expected


def test_it_normalises_sharegpt_roles():
    record = {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
        ],
    }
    expected = [[system("You are terse."), user("q1"), assistant("a1"), user("q2")]]
    assert rows(jsonl(record)) == expected
    assert rows(json.dumps([record], indent=2).encode()) == expected


def test_it_parses_csv_with_guessed_columns():
    data = b"id,question,response\n1,What is 2+2?,4\n2,And 3+3?,\n"
    assert rows(data, filename="qa.csv") == [[user("What is 2+2?"), assistant("4")], [user("And 3+3?")]]


def test_it_parses_csv_with_chosen_columns_in_any_case():
    data = b"Title,Body,Reply\nt,the body,the reply\n"
    assert rows(data, "csv", query_column="body", answer_column="Reply") == [
        [user("the body"), assistant("the reply")]
    ]


def test_it_parses_tab_separated_files():
    assert rows(b"prompt\tcompletion\nq\ta\n", filename="x.tsv") == [[user("q"), assistant("a")]]


def test_it_reads_plain_lines_skipping_blank_lines_and_stripping_cr():
    out = events(b"first query\r\n\n   \nsecond query\n  indented stays\n")
    assert [(r.line, r.messages) for r in out if isinstance(r, Row)] == [
        (1, [user("first query")]),
        (4, [user("second query")]),
        (5, [user("  indented stays")]),
    ]


@pytest.mark.parametrize(
    ("head", "filename", "expected"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "", "chat"),
        (b'\xef\xbb\xbf  [{"messages": []}]', "data.json", "chat"),
        (b'[{"instruction": "a", "output": "b"}]', "", "alpaca"),
        (b'{"instruction": "a"}\n', "x.jsonl", "alpaca"),
        (b'{"conversations": [{"from": "human", "value": "x"}]}\n', "", "sharegpt"),
        # The first record is cut off at the end of the head.
        (b'[\n  {"conversations": [{"from": "human", "value": "' + b"x" * 100, "", "sharegpt"),
        (b"query,answer\nq,a\n", "", "csv"),
        (b"anything at all\n", "upload.csv", "csv"),
        (b"what is the capital of France?\nwho wrote Hamlet?\n", "", "lines"),
        (b"[URGENT] my order is late\n", "", "lines"),
        (b"a, b, c\n", "", "lines"),
        (b"{not json}\n", "notes.txt", "lines"),
        (b"", "", "lines"),
    ],
)
def test_it_detects_the_format(head, filename, expected):
    assert detect_format(head, filename) == expected


def test_it_lets_the_caller_override_the_detected_format():
    data = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    assert rows(data, "lines") == [[user('{"messages": [{"role": "user", "content": "hi"}]}')]]
    assert rows(b"text,extra\nhello,x\n", "csv") == [[user("hello")]]


def test_it_exposes_the_resolved_format():
    reader = DatasetReader(io.BytesIO(b'[{"instruction": "x"}]'), limits=LIMITS)
    assert reader.format == "alpaca"
    assert set(FORMATS) == {"chat", "alpaca", "sharegpt", "completion", "fields", "csv", "lines"}


def test_it_refuses_an_unknown_format_name():
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        DatasetReader(io.BytesIO(b""), "xml", limits=LIMITS)


# --- bad rows ---


def test_it_reports_invalid_json_with_the_column():
    data = jsonl(chat(user("ok"))) + b'{"messages": [{"role": "user" "content": "x"}]}\n'
    assert errors(data) == ["line 2: invalid JSON: Expecting ',' delimiter (column 31)"]


def test_it_reports_a_missing_field_naming_the_keys_found():
    [error] = errors(jsonl({"prompt": "x", "completion": "y"}), "chat")
    assert error.startswith(
        "line 1: missing field 'messages' (found 'prompt', 'completion'); supported formats:"
    )
    assert 'query column "prompt", answer column "completion"' in error
    assert errors(jsonl(chat({"role": "user"}))) == ["line 1: messages[0]: missing field 'content'"]
    [error] = errors(jsonl({"input": "x"}), "alpaca")
    assert error.startswith("line 1: missing field 'instruction' (found 'input');")
    assert errors(jsonl({"conversations": [{"value": "x"}]})) == [
        "line 1: conversations[0]: missing field 'from'"
    ]


def test_it_reports_an_unknown_role():
    data = jsonl(chat(user("a"), assistant("b"), {"role": "bot", "content": "c"}))
    assert errors(data) == [
        "line 1: messages[2].role: unknown role 'bot' (expected one of system, user, assistant, developer)"
    ]
    data = jsonl({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "r"}]})
    assert errors(data) == [
        "line 1: conversations[1].from: unknown role 'bot' (expected system, human or gpt)"
    ]


def test_it_reads_the_developer_role_as_system_as_the_gateway_does():
    data = jsonl(chat({"role": "developer", "content": "Be brief."}, user("q"), assistant("a")))
    assert rows(data) == [[system("Be brief."), user("q"), assistant("a")]]
    data = jsonl(chat(user("q"), {"role": "developer", "content": "Late."}))
    assert errors(data) == ["line 1: messages[1]: a system message may only come first"]


def test_it_joins_content_parts_as_the_gateway_does():
    parts = [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]
    data = jsonl(chat({"role": "user", "content": parts}, assistant("a")))
    joined = protocol.content_text(parts, "messages[0].content")
    assert rows(data) == [[user(joined), assistant("a")]]
    assert joined == "Part one." + protocol.TEXT_PART_SEPARATOR + "Part two."


def test_it_reports_empty_content():
    assert errors(jsonl(chat(user("  \n")))) == ["line 1: messages[0].content: empty content"]
    assert errors(jsonl({"instruction": ""})) == ["line 1: instruction: empty content"]
    assert errors(jsonl({"conversations": [{"from": "human", "value": ""}]})) == [
        "line 1: conversations[0].value: empty content"
    ]


def test_it_reports_wrong_types():
    assert errors(jsonl(chat({"role": "user", "content": {"a": 1}}))) == [
        "line 1: messages[0].content: expected a string, got object"
    ]
    assert errors(jsonl(chat({"role": 1, "content": "a"}))) == [
        "line 1: messages[0].role: expected a string, got number"
    ]
    assert errors(jsonl({"messages": "hi"})) == ["line 1: messages: expected a list, got string"]
    assert errors(jsonl({"messages": ["hi"]})) == ["line 1: messages[0]: expected a JSON object, got string"]
    assert errors(b'"a"\n', "chat") == ["line 1: expected a JSON object, got string"]
    assert errors(b'["a"]\n', "chat") == ["record 1: expected a JSON object, got string"]
    assert errors(jsonl({"instruction": "x", "output": 5})) == [
        "line 1: output: expected a string, got number"
    ]


def test_it_reports_a_row_without_a_user_turn():
    reason = "no user turn (a row must contain at least one user message)"
    assert errors(jsonl(chat(system("s")))) == [f"line 1: {reason}"]
    assert errors(jsonl({"messages": []})) == [f"line 1: {reason}"]
    assert errors(jsonl({"conversations": []})) == [f"line 1: {reason}"]


def test_it_reports_turns_out_of_order():
    assert errors(jsonl(chat(user("q"), system("s")))) == [
        "line 1: messages[1]: a system message may only come first"
    ]
    assert errors(jsonl(chat(system("s"), assistant("a"), user("q")))) == [
        "line 1: messages[1]: the conversation must start with a user message, not assistant"
    ]


def test_it_reports_bytes_that_are_not_utf8_with_their_line():
    latin1 = "café".encode("latin-1")
    assert errors(b"ok\n" + latin1 + b"\n") == [
        "line 2: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"
    ]
    assert errors(jsonl(chat(user("ok"))) + b'{"messages": "' + latin1 + b'"}\n') == [
        "line 2: not valid UTF-8 (byte 0xe9 at column 18); save the file as UTF-8"
    ]
    assert errors(b"query\nok\n" + latin1 + b"\n", "csv") == [
        "line 3: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"
    ]
    assert errors(b'query\nok\n"two\n' + latin1 + b'"\nok\n', "csv") == [
        "line 3: not valid UTF-8 on line 4 (byte 0xe9 at column 4); save the file as UTF-8"
    ]


def test_it_reports_a_binary_file():
    blob = bytes(range(256)) * 4
    out = errors(b"\x89PNG\r\n\x1a\n" + blob, "lines")
    assert len(out) == 1 and "looks like a binary file" in out[0]  # one message, not one per line
    assert errors(b"hello\x00world\n") == ["line 1: line contains a NUL byte (is this a binary file?)"]
    assert errors("query\nhello\n".encode("utf-16")) == ["the file is UTF-16 encoded; save it as UTF-8"]


def test_it_reports_lines_that_are_too_long_and_goes_on():
    limits = Limits(max_row_chars=60)
    long_row = json.dumps(chat(user("x" * 100))).encode() + b"\n"
    out = events(jsonl(chat(user("a"))) + long_row + jsonl(chat(user("b"))), limits=limits)
    assert [str(e) for e in out] == [
        str(Row(1, [user("a")])),
        "line 2: line is longer than the 60-character limit",
        str(Row(3, [user("b")])),
    ]
    assert errors(b"short\n" + "é".encode() * 61 + b"\nshort\n", limits=limits) == [
        "line 2: line is longer than the 60-character limit"
    ]
    # Exactly at the limit is fine, whatever the bytes per character.
    assert errors("✓".encode() * 60 + b"\r\n", limits=limits) == []


# --- limits ---


def test_it_stops_at_the_byte_limit():
    data = b"q\n" * 600
    assert errors(data, limits=Limits(max_bytes=1200)) == []
    out = events(data, limits=Limits(max_bytes=1199))
    assert str(out[-1]) == "file is larger than the 1,199 bytes limit"
    assert isinstance(out[-1], RowError) and out[-1].fatal
    out = events(data, limits=Limits(max_bytes=1024))
    assert str(out[-1]) == "file is larger than the 1 KB limit"
    out = events(b"q\n" * (512 * 1024 + 1), limits=Limits(max_bytes=1024**2))
    assert str(out[-1]) == "file is larger than the 1 MB limit"


def test_it_stops_at_the_byte_limit_inside_the_head():
    out = events(b"q\n" * 10, limits=Limits(max_bytes=5))
    assert [str(e) for e in out if isinstance(e, RowError)] == ["file is larger than the 5 bytes limit"]


def test_it_stops_at_the_row_limit():
    assert errors(b"a\n\nb\nc\n", limits=Limits(max_rows=3)) == []
    out = events(b"a\nb\nc\nd\ne\n", limits=Limits(max_rows=3))
    assert [str(e) for e in out] == [str(Row(i, [user(c)])) for i, c in ((1, "a"), (2, "b"), (3, "c"))] + [
        "more than 3 rows (limit)"
    ]
    assert errors(json.dumps([{"instruction": "x"}] * 5).encode(), limits=Limits(max_rows=1_000)) == []
    assert errors(json.dumps([{"instruction": "x"}] * 5).encode(), limits=Limits(max_rows=4)) == [
        "more than 4 rows (limit)"
    ]
    assert str(RowError(0, f"more than {1_000_000:,} rows (limit)")) == "more than 1,000,000 rows (limit)"


def test_it_reports_an_empty_file():
    assert errors(b"") == ["the file is empty"]
    assert errors(b"\n \n") == ["the file contains no rows"]
    assert errors(b"query,answer\n", "csv") == ["the file contains no rows"]
    assert errors(b"[]") == ["the file contains no rows"]


# --- JSON arrays ---


def test_it_streams_a_json_array_with_record_numbers_and_lines():
    records = [{"instruction": f"task {i}", "output": "done"} for i in range(3)]
    data = json.dumps(records, indent=2).encode()
    out = events(data)
    assert [(r.record, r.line) for r in out if isinstance(r, Row)] == [(1, 2), (2, 6), (3, 10)]


def test_it_reports_bad_records_of_a_json_array_and_goes_on():
    data = (
        b"[\n"
        b'  {"instruction": "a"},\n'
        b'  {"instruction": 3},\n'
        b"  {\n"
        b'    "input": "b"\n'
        b"  },\n"
        b'  "just a string",\n'
        b'  ["a", {"instruction": "in a list"}],\n'
        b'  {"instruction": "f"}\n'
        b"]\n"
    )
    out = events(data)
    assert [str(e) for e in out if isinstance(e, RowError)] == [
        "line 3 (record 2): instruction: expected a string, got number",
        "line 4 (record 3): missing field 'instruction' (found 'input'); supported formats: chat (messages), alpaca "
        "(instruction/input/output), sharegpt (conversations), completion (prompt/completion) — choose the format, "
        'or name the fields: query column "input"',
        "record 4: expected a JSON object, got string",
        "record 5: expected a JSON object, got list",
    ]
    assert [(r.record, r.line) for r in out if isinstance(r, Row)] == [(1, 2), (6, 9)]
    assert not any(e.fatal for e in out if isinstance(e, RowError))


def test_it_stops_at_a_syntax_error_in_a_json_array_naming_its_line_and_column():
    head = b'[\n  {"instruction": "a"},\n'
    tail = b'  {"instruction": "f"}\n]\n'
    cases = [
        (
            b'  {"instruction": "b" "c"},\n',
            "line 3 (record 2): invalid JSON: Expecting ',' delimiter (line 3, column 23)",
        ),
        (
            b'  {\n    "instruction":\n      "d" "e"\n  },\n',
            "line 3 (record 2): invalid JSON: Expecting ',' delimiter (line 5, column 11)",
        ),
        (
            b'  {"instruction": "' + "é".encode("latin-1") + b'"},\n',
            "line 3 (record 2): not valid UTF-8 (byte 0xe9 at column 20); save the file as UTF-8",
        ),
        (
            b'  {\n    "instruction": "\xe9"},\n',
            "line 3 (record 2): not valid UTF-8 on line 4 (byte 0xe9 at column 21); save the file as UTF-8",
        ),
        (
            b'  {"instruction": "tab\there"},\n',
            "line 3 (record 2): invalid JSON: Invalid control character (line 3, column 23)",
        ),
        # json would take NaN; yajl does not, and says so in its words.
        (
            b'  {"instruction": NaN},\n',
            "line 3 (record 2): invalid JSON: invalid char in json text (line 3, column 19)",
        ),
        # Outside an object record: yajl's words, with the line and column it points at.
        (b"  [1,\n   2 3],\n", "line 4: invalid JSON: after array element, I expect ',' or ']' (column 6)"),
        (b'  "caf\xe9",\n', "line 3: not valid UTF-8 (byte 0xe9 at column 7); save the file as UTF-8"),
    ]
    for bad, message in cases:
        out = events(head + bad + tail)
        assert [str(e) for e in out] == [str(Row(2, [user("a")], 1)), message], bad
        assert isinstance(out[-1], RowError) and out[-1].fatal
    assert errors(head + b'  "x" "y",\n' + tail) == [
        "record 2: expected a JSON object, got string",
        "line 3: invalid JSON: after array element, I expect ',' or ']' (column 7)",
    ]


def test_it_reports_the_line_of_a_syntax_error_past_the_first_chunk(monkeypatch):
    records = [{"instruction": f"task {i}", "output": "done"} for i in range(3_000)]
    good = json.dumps(records, indent=2).encode()
    assert len(good) > 2 * 64 * 1024
    bad = good.replace(b'"task 1500",', b'"task 1500" "oops",')
    line = good[: good.index(b'"task 1500"')].count(b"\n") + 1
    expected = (
        f"line {line - 1} (record 1501): invalid JSON: Expecting ',' delimiter (line {line}, column 32)"
    )
    for chunk in (7, 4096, 64 * 1024):
        monkeypatch.setitem(READS, "size", chunk)
        assert errors(bad) == [expected]
        out = events(b"[" + b" " * chunk + b'{"instruction": "x"}\n\n]]', "alpaca")
        assert str(out[-1]) == "line 3: unexpected data after the end of the JSON array"


def test_it_reports_the_structure_of_a_broken_json_array():
    ok = b'{"instruction": "x"}'
    assert errors(b"[" + ok + b" " + ok + b"]") == ["line 1: expected ',' or ']' after record 1, found '{'"]
    assert errors(b"[" + ok + b",\n]") == ["line 2: trailing comma after record 1"]
    # A truncated file.
    assert errors(b"[" + ok + b",\n" + ok) == [
        "line 2: the JSON array is not closed (file ends after record 2)"
    ]
    assert errors(b"[" + ok + b",\n" + ok + b",\n") == [
        "line 3: the JSON array is not closed (file ends after record 2)"
    ]
    assert errors(b'[\n{"instruction": "x}]') == [
        "line 2 (record 1): the file ends inside this record (an unclosed string, object or list)"
    ]
    assert errors(b"[\n" + ok + b',\n{"instruction": "x", "input": [\n') == [
        "line 3 (record 2): the file ends inside this record (an unclosed string, object or list)"
    ]
    # A string left open at the end of a line: JSON strings hold no raw newline.
    assert errors(b'[\n{"instruction": "x}]\n') == [
        "line 2 (record 1): invalid JSON: Invalid control character (line 2, column 21)"
    ]
    assert errors(b'[{"instruction": [1}, ' + ok + b"]") == [
        "line 1 (record 1): invalid JSON: Expecting ',' delimiter (line 1, column 20)"
    ]
    # Garbage after the array.
    assert errors(b"[\n" + ok + b"] []") == ["line 2: unexpected data after the end of the JSON array"]
    assert errors(b"[\n" + ok + b"]\n\n{}\n") == ["line 4: unexpected data after the end of the JSON array"]
    assert errors(b"[\n" + ok + b"]\n 3") == ["line 3: unexpected data after the end of the JSON array"]
    # Items that are not objects: their line is not tracked, their number is.
    assert errors(b'[1, "two", null, [' + ok + b"], " + ok + b"]", "alpaca") == [
        "record 1: expected a JSON object, got number",
        "record 2: expected a JSON object, got string",
        "record 3: expected a JSON object, got null",
        "record 4: expected a JSON object, got list",
    ]


def test_it_stops_at_a_syntax_error_whatever_the_chunk_size(monkeypatch):
    ok = b'{"instruction": "x"}'
    cases = {
        b"[" + ok + b" " + ok + b"]": "line 1: expected ',' or ']' after record 1, found '{'",
        b"[" + ok + b",\n]": "line 2: trailing comma after record 1",
        b"[\n"
        + ok
        + b",\n  "
        + ok
        + b"\n\n"
        + ok
        + b"]": "line 5: expected ',' or ']' after record 2, found '{'",
        b'[\n  {"instruction":\n  "b" "c"}]': "line 2 (record 1): invalid JSON: Expecting ',' delimiter (line 3, column 7)",
        b"[\n" + ok + b"]\n\n[]": "line 4: unexpected data after the end of the JSON array",
    }
    for chunk in (1, 2, 3, 7, 64 * 1024):
        monkeypatch.setitem(READS, "size", chunk)
        for data, message in cases.items():
            assert errors(data) == [message], (chunk, data)


def test_it_reports_json_array_records_that_are_too_long():
    data = json.dumps([{"instruction": "x" * 500}, {"instruction": "ok"}]).encode()
    out = events(data, limits=Limits(max_row_chars=100))
    assert [str(e) for e in out] == [
        "line 1 (record 1): record is longer than the 100-character limit",
        str(Row(1, [user("ok")], 2)),
    ]
    # Characters, not bytes, and only the record's own (not the comma or
    # blanks after it): exactly at the limit is fine.
    record = '{"instruction": "' + "✓" * 80 + '"}'
    assert len(record) == 99
    for text in (f"[{record}]", f"[\n  {record},\n  {record}\n]\n"):
        assert errors(text.encode(), limits=Limits(max_row_chars=99)) == []
        assert len(errors(text.encode(), limits=Limits(max_row_chars=98))) == text.count(record)


def test_it_stops_at_a_json_array_record_too_long_to_hold():
    # ijson builds a record whole, so one still open 4 bytes a character past
    # the limit stops the parse instead of filling the memory.
    big = {"instruction": "x" * 300_000, "input": [{"k": "v"}] * 1000}
    data = json.dumps([{"instruction": "ok"}, big, {"instruction": "never read"}], indent=1).encode()
    reader = _CountingReader(data)
    out = list(stream(reader, limits=Limits(max_row_chars=10_000)))
    assert [str(e) for e in out] == [
        str(Row(2, [user("ok")], 1)),
        "line 5 (record 2): record is longer than the 10,000-character limit (a JSON array cannot be read past it)",
    ]
    assert isinstance(out[-1], RowError) and out[-1].fatal
    assert reader.position < len(data) / 2
    # So does an item that is not an object (its start is not tracked).
    out = events(
        b'[{"instruction": "ok"}, "' + b"x" * 300_000 + b'"]', "alpaca", Limits(max_row_chars=10_000)
    )
    assert str(out[-1]) == (
        "record 2: record is longer than the 10,000-character limit (a JSON array cannot be read past it)"
    )


def test_it_splits_json_arrays_across_any_chunk_boundary(monkeypatch):
    tricky = [
        'a "quoted" word',
        "back\\slash\\",
        "brackets ]}[{ inside",
        "é ü \u2028 ✓",
        "tab\tnew\nline",
        '\\"',
    ]
    records = [
        {"instruction": t, "input": tricky[-i], "meta": [[{"k": t}], {}]} for i, t in enumerate(tricky, 1)
    ]
    for indent in (None, 1):
        data = json.dumps(records, indent=indent, ensure_ascii=indent is None).encode()
        expected = rows(data)
        where = [(r.line, r.record) for r in events(data) if isinstance(r, Row)]
        assert len(expected) == len(records)
        starts = [1] * len(records) if indent is None else [2 + 12 * i for i in range(len(records))]
        assert where == list(zip(starts, range(1, len(records) + 1), strict=True))
        for chunk in (1, 2, 3, 7):
            monkeypatch.setitem(READS, "size", chunk)
            assert rows(data) == expected
            assert [(r.line, r.record) for r in events(data) if isinstance(r, Row)] == where
            assert rows(jsonl(*records)) == expected
        monkeypatch.undo()


# --- CSV ---


def test_it_handles_a_bom_and_quoted_newlines_in_csv():
    data = '\ufeffquery,answer\n"first\nspans, lines",yes\nsecond,no\n'.encode()
    out = events(data, filename="x.csv")
    assert [(r.line, r.messages) for r in out if isinstance(r, Row)] == [
        (2, [user("first\nspans, lines"), assistant("yes")]),
        (4, [user("second"), assistant("no")]),
    ]


def test_it_reports_a_missing_csv_column_naming_the_columns():
    data = b"id,text,label\n1,hi,x\n"
    assert errors(data, "csv", query_column="question") == [
        "line 1: no column 'question' in the header (columns: 'id', 'text', 'label'); name one of them as "
        "the query column or the answer column"
    ]
    assert errors(data, "csv", answer_column="reply") == [
        "line 1: no column 'reply' in the header (columns: 'id', 'text', 'label'); name one of them as "
        "the query column or the answer column"
    ]
    assert errors(b"a,b\n1,2\n", "csv") == [
        "line 1: cannot tell which column holds the queries; name one of the columns ('a', 'b') "
        "as the query column"
    ]


def test_it_reports_bad_csv_rows_by_the_line_they_start_on():
    data = b'query,answer\nok,1\n"two\nlines",2,extra\n,3\n\nfine,4\n'
    assert errors(data, "csv") == [
        "line 3: row has 3 fields but the header has 2",
        "line 5: column 'query': empty query",
    ]


def test_it_stops_a_runaway_csv_quote_at_the_row_limit():
    data = b'query\n"never closed\n' + b"more text\n" * 50 + b"last\n"
    out = errors(data, "csv", limits=Limits(max_row_chars=100))
    assert out[0] == "line 2: row is longer than the 100-character limit"
    out = events(b"query\n" + b"x" * 500 + b"\nok\n", "csv", limits=Limits(max_row_chars=100))
    assert [str(e) for e in out] == [
        "line 2: row is longer than the 100-character limit",
        str(Row(3, [user("ok")])),
    ]


# --- the reader, hashing, memory ---


def test_it_counts_every_error_and_keeps_the_first_fifty():
    data = b"".join(b'{"messages": %d}\n' % i for i in range(120)) + jsonl(chat(user("ok")))
    reader = DatasetReader(io.BytesIO(data), limits=LIMITS)
    assert len(list(reader)) == 1
    kept = reader.errors
    assert (reader.row_count, reader.error_count, len(kept)) == (1, 120, 50)
    assert str(kept[0]) == "line 1: messages: expected a list, got number"
    assert kept[-1].line == 50


def test_it_yields_only_good_rows_from_a_reader():
    data = jsonl(chat(user("a")), {"messages": 1}, chat(user("b")))
    reader = DatasetReader(io.BytesIO(data), limits=LIMITS, keep_errors=1)
    written = [row.to_json() for row in reader]
    assert [json.loads(w) for w in written] == [chat(user("a")), chat(user("b"))]
    assert (reader.row_count, reader.error_count, reader.ok, reader.stopped) == (2, 1, False, False)
    with pytest.raises(RuntimeError):
        list(reader)


def test_it_notes_when_a_reader_stopped_early():
    reader = DatasetReader(io.BytesIO(b"a\nb\n"), limits=Limits(max_rows=1))
    assert len(list(reader)) == 1
    assert reader.stopped and [str(e) for e in reader.errors] == ["more than 1 rows (limit)"]


def test_it_hashes_normalised_rows_stably():
    a = rows(jsonl(chat(user("q"), assistant("a"))))[0]
    b = rows(b"question,answer\nq,a\n", "csv")[0]
    assert Row(1, a).sha == Row(3, b, 2).sha
    assert Row(1, a).sha != Row(1, [user("q")]).sha
    assert len(Row(1, a).sha) == 64


def test_it_reads_a_big_json_array_chunk_by_chunk():
    records = [{"instruction": f"question {i} " + "word " * 50, "output": "answer"} for i in range(20_000)]
    data = json.dumps(records, indent=4).encode()
    reader = _CountingReader(data)
    rows_read = stream(reader)
    first = next(rows_read)
    assert isinstance(first, Row) and (first.line, first.record) == (2, 1)
    assert (
        reader.position <= 2 * formats.HEAD_BYTES < len(data) / 20
    )  # the first row came before the rest was read
    rest = list(rows_read)
    assert len(rest) == 19_999 and all(isinstance(r, Row) for r in rest)
    assert (rest[-1].line, rest[-1].record) == (2 + 4 * 19_999, 20_000)
    assert reader.position == len(data)
    assert reader.largest_read <= 64 * 1024


def _peak_while_parsing(path: Path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            count = sum(1 for _ in DatasetReader(f, limits=LIMITS))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_it_parses_in_constant_memory(tmp_path):
    line = json.dumps(chat(user("question number %d"))) + "\n"
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(line % i for i in range(20_000)))
    big.write_text("".join(line % i for i in range(200_000)))
    (n_small, peak_small), (n_big, peak_big) = _peak_while_parsing(small), _peak_while_parsing(big)
    assert (n_small, n_big) == (20_000, 200_000)
    assert peak_big / peak_small < 1.2
    assert peak_big < big.stat().st_size / 20


def test_it_parses_a_json_array_in_constant_memory(tmp_path):
    def write(path: Path, n: int) -> None:
        with path.open("w") as f:
            f.write("[")
            for i in range(n):
                f.write(("," if i else "") + json.dumps({"instruction": f"{i} " + "word " * 100}))
            f.write("]")

    small, big = tmp_path / "small.json", tmp_path / "big.json"
    write(small, 2_000)
    write(big, 20_000)
    (n_small, peak_small), (n_big, peak_big) = _peak_while_parsing(small), _peak_while_parsing(big)
    assert (n_small, n_big) == (2_000, 20_000)
    assert peak_big / peak_small < 1.2
    assert peak_big < big.stat().st_size / 20


def test_it_reads_dpo_pairs_as_their_chosen_answer_only_when_asked():
    ultrafeedback = {
        "prompt": "Hi?",
        "chosen": [user("Hi?"), assistant("Hello")],
        "rejected": [user("Hi?"), assistant("Go")],
        "prompt_id": "p1",
    }
    orca = {"system": "Be brief.", "question": "2+2?", "chosen": "4", "rejected": "5"}
    trl = {"prompt": [user("Yo")], "chosen": [assistant("Hey")], "rejected": [assistant("No")]}
    data = jsonl(ultrafeedback, orca, trl)
    assert all('turn on "use only the chosen answers"' in e for e in errors(data))
    reader = DatasetReader(io.BytesIO(data), limits=LIMITS, use_chosen=True)
    out = list(reader)
    assert [r.messages for r in out] == [
        [user("Hi?"), assistant("Hello")],  # the prompt field repeats the chosen conversation's user turn
        [system("Be brief."), user("2+2?"), assistant("4")],
        [user("Yo"), assistant("Hey")],
    ]
    assert out[0].extra == {"prompt_id": "p1"} and reader.kept_fields == ["prompt_id"]
    assert reader.notes and "rejected answers were dropped" in reader.notes[0]


def test_it_names_a_pretty_printed_single_object_longer_than_the_head():
    big = json.dumps(
        {"data": [{"question": f"q{i} " * 20, "answer": "a"} for i in range(2000)], "version": "1"}, indent=2
    ).encode()
    assert len(big) > formats.HEAD_BYTES
    assert errors(big, filename="x.json") == [
        'the file is one JSON object; its records are under the key "data" (2,000 items): load it with records '
        'key "data"'
    ]
    # no list of records in it: the keys are named
    plain = json.dumps({"data": {"question": "q " * 40_000}, "version": "1"}, indent=2).encode()
    assert errors(plain, filename="x.json") == [
        "the file is a single JSON object with keys data, version; the rows must be a JSON array or one object "
        "per line (JSONL)"
    ]
    # several pretty-printed objects are not one: their lines are reported
    assert len(errors(json.dumps(chat(user("a")), indent=2).encode() * 2)) > 1


def test_it_refuses_tool_calls_before_their_null_content():
    row = chat(
        user("Weather?"),
        {
            "role": "assistant",
            "content": None,  # type: ignore[dict-item]
            "tool_calls": [{"id": "c1", "type": "function"}],
        },
    )
    assert errors(jsonl(row)) == [
        "line 1: messages[1].tool_calls: tool calls need a tool-capable chat template; "
        "this workbench's base models have none"
    ]
    glaive_sharegpt = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}],
        "tools": "",
    }
    assert "a 'function_call' turn: tool calls need" in errors(jsonl(glaive_sharegpt))[0]
