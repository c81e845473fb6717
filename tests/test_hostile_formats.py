"""Hostile and careless dataset files against the parser (engines/formats/):
nesting that would make ijson's memory grow with the square of the depth (issue
18 item 1, measured in a child process), one JSON object holding the records
under a key (item 15), unpaired surrogates (item 9), and a fuzz of brackets and
strings from which no RecursionError or MemoryError may escape."""

import io
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines import formats
from engines.formats import DatasetReader, Limits, Row, RowError, detect_format
from workbench.actions.datasets import DatasetRejected, import_dataset
from workbench.models import DatasetRow, DatasetVersion

REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits()


class ShortReads(io.BytesIO):
    """A file that returns at most READS["size"] bytes a read: the reader's chunks end at any place."""

    def read(self, n: int | None = -1) -> bytes:
        size = READS["size"]
        return super().read(size if n is None or n < 0 else min(n, size))


# Bytes a read of ShortReads returns; tests set it with monkeypatch.setitem.
READS = {"size": 64 * 1024}
DEEP = "JSON nested more than 32 levels deep (the limit is 32)"


def chat_record(i: int) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    }


def events(data: bytes, fmt: str = "auto", limits: Limits = LIMITS, **kw: object) -> list[Row | RowError]:
    """The rows and every error in file order, through the public reader."""
    reader = DatasetReader(ShortReads(data), fmt, limits=limits, keep_errors=sys.maxsize, **kw)  # type: ignore[arg-type]
    out: list[Row | RowError] = []
    seen = 0
    for row in reader:
        out += reader.errors[seen:]
        seen = len(reader.errors)
        out.append(row)
    return out + reader.errors[seen:]


def errors(data: bytes, fmt: str = "auto", **kw: object) -> list[str]:
    return [str(e) for e in events(data, fmt, **kw) if isinstance(e, RowError)]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- item 1: nesting, measured in a child process ---------------------------------

# The child imports the parser, then times and measures only the parse. Its
# address space is capped so that, without a depth limit, the parse fails fast
# (MemoryError) instead of taking the host's memory.
CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))
from engines import formats
path, fmt = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    t0 = time.perf_counter()
    reader = formats.DatasetReader(f, fmt, limits=formats.Limits(), filename=path)
    rows = sum(1 for _ in reader)
    seconds = time.perf_counter() - t0
fatal = [str(e) for e in reader.errors if e.fatal]
print(json.dumps({"seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": rows, "fatal": fatal}))
"""


def run_child(path: Path, fmt: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), fmt], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def hostile_files(tmp: Path) -> dict[str, tuple[Path, int]]:
    """name -> (file, the line the refusal must name)."""
    records = ",\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"q {i}"}]}, separators=(",", ":"))
        for i in range(2_000)
    )
    cases = {
        # the reproduction: 2,000 normal records, then 60,000 [ and 60,000 ] (about 240 KB)
        "records_then_brackets.json": ("[" + records + ",\n" + nested(60_000) + "]", 2_001),
        "bare_200000_deep.json": (nested(200_000), 1),
        "deep_extra_field.json": (
            "[\n"
            + json.dumps(chat_record(0))
            + ",\n"
            + json.dumps(chat_record(1))[:-1]
            + ', "meta": '
            + nested(100_000)
            + "}\n]",
            3,
        ),
        "deep_content_parts.json": (
            '[\n{"messages": [{"role": "user", "content": [{"type": "text", "text": '
            + nested(100_000)
            + "}]}]}\n]",
            2,
        ),
        "deep_line.jsonl": (
            "\n".join(json.dumps(chat_record(i)) for i in range(3))
            + '\n{"messages": '
            + nested(100_000)
            + "}\n",
            4,
        ),
        "deep_single_object.json": ('{"data": ' + nested(100_000) + "}", 1),
    }
    out = {}
    for name, (text, line) in cases.items():
        path = tmp / name
        path.write_text(text)
        out[name] = (path, line)
    return out


def test_deep_nesting_is_refused_fast_and_in_little_memory_in_every_path(tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps(chat_record(0)) + "\n")
    baseline = run_child(tiny, "auto")
    assert baseline["rows"] == 1
    files = hostile_files(tmp_path)
    assert files["records_then_brackets.json"][0].stat().st_size < 300_000
    for name, (path, line) in files.items():
        for fmt in ("chat", "alpaca", "auto"):
            result = run_child(path, fmt)
            grown_mb = (int(result["maxrss_kb"]) - int(baseline["maxrss_kb"])) / 1024  # type: ignore[call-overload]
            assert result["fatal"] == [f"line {line}: {DEEP}"], (name, fmt, result)
            assert grown_mb < 100, (name, fmt, grown_mb)
            assert float(result["seconds"]) < 1.0, (name, fmt, result["seconds"])  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "sharegpt", "completion", "fields", "auto"])
def test_every_format_refuses_deep_nesting_naming_the_line(fmt):
    kw = {"query_column": "q"} if fmt == "fields" else {}
    deep = nested(40)
    cases = {
        "array": (f'[\n{{"q": "a"}},\n{{"q": {deep}}}\n]'.encode(), 3),
        "jsonl": (f'{{"q": "a"}}\n\n{{"q": "b", "x": {deep}}}\n'.encode(), 3),
        "pretty object": (f'{{\n  "data": [\n    {deep}\n  ]\n}}'.encode(), 3),
        "one-line object": (f'{{"data": {deep}}}'.encode(), 1),
        "bare": (deep.encode(), 1),
    }
    for name, (data, line) in cases.items():
        out = errors(data, fmt, **kw)
        assert out[-1] == f"line {line}: {DEEP}", (name, out)
        assert all("nested" not in e for e in out[:-1]), (name, out)


def test_the_limit_is_32_levels_counted_from_the_top_and_can_be_set():
    def line_with_extra(levels: int) -> bytes:  # the record is level 1, "meta" holds `levels` more
        return json.dumps({**chat_record(0), "meta": json.loads(nested(levels))}).encode() + b"\n"

    assert errors(line_with_extra(31)) == []
    assert errors(line_with_extra(32)) == [f"line 1: {DEEP}"]
    assert errors(b"[" + line_with_extra(30) + b"]") == []  # the array is one more level
    assert errors(b"[" + line_with_extra(31) + b"]") == [f"line 1: {DEEP}"]
    assert errors(line_with_extra(5), limits=Limits(max_depth=4)) == [
        "line 1: JSON nested more than 4 levels deep (the limit is 4)"
    ]
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


def test_content_parts_and_brackets_inside_strings_still_load():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": nested(500)}]}]}
    assert [e.messages for e in events(json.dumps(parts).encode() + b"\n")] == [  # type: ignore[union-attr]
        [{"role": "user", "content": nested(500)}]
    ]
    array = json.dumps([parts] * 3, indent=2).encode()
    assert len([e for e in events(array) if isinstance(e, Row)]) == 3


def test_rows_before_a_deep_line_are_read_first(monkeypatch):
    monkeypatch.setitem(READS, "size", 256)
    data = (
        "[\n" + ",\n".join(json.dumps(chat_record(i)) for i in range(20)) + ",\n" + nested(5_000) + "\n]"
    ).encode()
    out = events(data)
    assert [e.record for e in out if isinstance(e, Row)] == list(range(1, 21))
    assert [str(e) for e in out if isinstance(e, RowError)] == [f"line 22: {DEEP}"]


def test_detection_of_a_deep_head_raises_nothing():
    assert detect_format(nested(100_000).encode()) == "chat"
    assert detect_format(('{"instruction": ' + nested(60_000) + "}").encode()) == "alpaca"
    assert detect_format(('[{"conversations": []}, ' + nested(60_000) + "]").encode()) == "sharegpt"


def test_the_refusal_keeps_the_fatal_error_past_the_kept_ones():
    data = ("[" + ",\n".join(json.dumps({"x": i}) for i in range(80)) + ",\n" + nested(100) + "]").encode()
    reader = DatasetReader(io.BytesIO(data), "chat", limits=LIMITS)
    assert list(reader) == []
    assert reader.stopped and reader.error_count == 81 and len(reader.errors) == formats.MAX_KEPT_ERRORS + 1
    assert str(reader.errors[-1]) == f"line 81: {DEEP}"


# --- item 15: one JSON object holding the records -----------------------------------


def alpaca(i: int) -> dict[str, str]:
    return {"instruction": f"question {i} " + "word " * 20, "output": f"answer {i}"}


QA_MESSAGE = (
    'the file is one JSON object; its records are under the key "qa" ({n} items): load it with records key '
    '"qa"'
)


def test_a_one_line_object_is_named_with_the_key_of_its_records():
    small = json.dumps({"version": 2, "qa": [alpaca(i) for i in range(3)]}).encode()
    assert errors(small) == [QA_MESSAGE.format(n=3)]
    big = json.dumps({"qa": [alpaca(i) for i in range(1_234)]}).encode() + b"\n"
    assert len(big) > formats.HEAD_BYTES
    # longer than the row limit (as on the upload form), within it, and its bytes
    for limit in (20_000, 200_000, 1_000_000):
        assert errors(big, limits=Limits(max_row_chars=limit)) == [QA_MESSAGE.format(n="1,234")], limit
    assert errors(big, "alpaca", limits=Limits(max_row_chars=20_000)) == [QA_MESSAGE.format(n="1,234")]


def test_a_row_on_one_line_is_still_a_row_and_long_jsonl_lines_still_just_too_long():
    assert [e.messages for e in events(json.dumps(chat_record(1)).encode())] == [  # type: ignore[union-attr]
        chat_record(1)["messages"]
    ]
    line = json.dumps({"qa": [alpaca(i) for i in range(1_000)]}).encode()
    assert errors(line + b"\n" + line, limits=Limits(max_row_chars=20_000)) == [
        "line 1: line is longer than the 20,000-character limit",
        "line 2: line is longer than the 20,000-character limit",
    ]


def test_records_key_reads_the_list_as_a_stream_with_the_arrays_errors():
    data = json.dumps(
        {"meta": {"source": "x"}, "qa": [alpaca(1), {"instruction": ""}, "oops", alpaca(4)], "count": 4},
        indent=2,
    ).encode()
    out = events(data, "alpaca", records_key="qa")
    assert [(e.line, e.record) for e in out if isinstance(e, Row)] == [(6, 1), (14, 4)]
    assert [str(e) for e in out if isinstance(e, RowError)] == [
        "line 10 (record 2): instruction: empty content",
        "record 3: expected a JSON object, got string",
    ]
    # the same records as a top-level array give the same errors
    array = json.dumps([alpaca(1), {"instruction": ""}, "oops", alpaca(4)]).encode()
    assert [e.reason for e in events(array, "alpaca") if isinstance(e, RowError)] == [
        e.reason for e in out if isinstance(e, RowError)
    ]


def test_records_key_detects_the_format_of_the_records_and_passes_through_the_reader(monkeypatch):
    data = json.dumps({"meta": {"prompt": "not this"}, "qa": [alpaca(i) for i in range(3_000)]}).encode()
    reader = DatasetReader(io.BytesIO(data), "auto", limits=LIMITS, records_key="qa")
    assert reader.format == "alpaca"
    assert len(list(reader)) == 3_000 and reader.ok
    monkeypatch.setitem(READS, "size", 97)  # keys and records cut at any place
    reader = DatasetReader(ShortReads(data), "auto", limits=LIMITS, records_key="qa")
    assert len(list(reader)) == 3_000 and reader.ok


def test_records_key_refuses_what_it_cannot_read():
    data = json.dumps({"data": [alpaca(1)], "name": "x"}).encode()
    assert errors(data, records_key="qa") == [
        'no key "qa" in the top-level object (its keys: "data", "name"); the records look to be under "data"'
    ]
    assert errors(json.dumps({"qa": {"item": alpaca(1)}}).encode(), records_key="qa") == [
        'the value under the records key "qa" is an object, not a list of records'
    ]
    assert errors(json.dumps([alpaca(1)]).encode(), records_key="qa") == [
        'the file is a JSON array, not one JSON object: its records are read without a records key ("qa" was given)'
    ]
    assert errors(b"query\nq\n", "csv", records_key="qa") == [
        'a records key ("qa") applies to a JSON file that is one object; format csv has no keys'
    ]
    assert errors(b'{"qa": [' + json.dumps(alpaca(1)).encode(), records_key="qa") == [
        "line 1: the JSON object is not closed (file ends after record 1)"
    ]
    assert errors(
        ('{"qa": [' + json.dumps(alpaca(1)) + ', {"x": ' + nested(50) + "}]}").encode(), records_key="qa"
    ) == [f"line 1: {DEEP}"]


# --- item 9: unpaired surrogates --------------------------------------------------------


def test_unpaired_surrogates_are_refused_naming_the_field_in_every_json_path():
    lone = {"role": "user", "content": "x\ud800y"}
    cases = [
        ({"messages": [lone]}, "chat", "messages[0].content holds an unpaired surrogate \\ud800"),
        (
            {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "\udc00"}]},
            "chat",
            "messages[1].content holds an unpaired surrogate \\udc00",
        ),
        (
            {"messages": [{"role": "us\udfffer", "content": "q"}]},
            "chat",
            "messages[0].role holds an unpaired surrogate \\udfff",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
            "chat",
            "messages[0].content[0].text holds an unpaired surrogate \\ud800",
        ),
        (
            {"conversations": [{"from": "human\ud800", "value": "q"}]},
            "sharegpt",
            "conversations[0].from holds an unpaired surrogate \\ud800",
        ),
        ({"instruction": "q", "input": "\ud800"}, "alpaca", "input holds an unpaired surrogate \\ud800"),
        (
            {"prompt": "q", "completion": "\udbff"},
            "completion",
            "completion holds an unpaired surrogate \\udbff",
        ),
        ({"q": "\ud800"}, "fields", "q holds an unpaired surrogate \\ud800"),
        (
            {**chat_record(0), "meta": {"tags": ["ok", "\ud800"]}},
            "chat",
            "meta.tags[1] holds an unpaired surrogate \\ud800",
        ),
        (
            {**chat_record(0), "meta": {"b\udc00": 1}},
            "chat",
            "the field name meta.b\\udc00 holds an unpaired surrogate \\udc00",
        ),
        (
            {**chat_record(0), "x\ud800": 1},
            "chat",
            "the field name x\\ud800 holds an unpaired surrogate \\ud800",
        ),
        (
            {"prompt": "q", "chosen": "\ud800", "rejected": "r"},
            "chat",
            "chosen holds an unpaired surrogate \\ud800",
        ),
    ]
    for record, fmt, reason in cases:
        kw: dict[str, object] = {"query_column": "q"} if fmt == "fields" else {}
        if "chosen" in record:
            kw["use_chosen"] = True
        good = json.dumps(
            chat_record(0)
            if fmt == "chat"
            else {"q": "fine"}
            if fmt == "fields"
            else {"instruction": "fine"}
            if fmt == "alpaca"
            else {"prompt": "fine"}
            if fmt == "completion"
            else {"conversations": [{"from": "human", "value": "fine"}]}
        )
        bad = json.dumps(record)  # ensure_ascii: the surrogate is a \\udxxx escape, as the issue found it
        assert "\\ud" in bad
        jsonl = f"{good}\n{good}\n{bad}\n".encode()
        array = f"[\n{good},\n{good},\n{bad}\n]".encode()
        assert errors(jsonl, fmt, **kw) == [f"line 3: {reason} (not valid Unicode)"], (fmt, record)
        assert errors(array, fmt, **kw) == [f"line 4 (record 3): {reason} (not valid Unicode)"], (fmt, record)
        keyed = f'{{"qa": [\n{good},\n{bad}\n]}}'.encode()
        assert errors(keyed, fmt, records_key="qa", **kw) == [
            f"line 3 (record 2): {reason} (not valid Unicode)"
        ]


def test_surrogate_pairs_and_escaped_backslashes_load_as_they_read(monkeypatch):
    record = {
        "messages": [{"role": "user", "content": "smile \U0001f600, and the text \\ud800 \\\\udc00"}],
        "id": "\U0001f600",
    }
    text = json.dumps(record)  # pairs as \\ud83d\\ude00 escapes
    assert "\\ud83d\\ude00" in text
    lone = json.dumps({"messages": [{"role": "user", "content": "a\udc00"}]})
    for chunk in (3, 7, 64 * 1024):  # escapes cut at any place
        monkeypatch.setitem(READS, "size", chunk)
        out = events(f"[{text}, {text}]".encode())
        assert [(e.messages, e.extra) for e in out] == [(record["messages"], {"id": "\U0001f600"})] * 2  # type: ignore[union-attr]
        out = events(f"[{text},\n{lone}]".encode())
        assert [str(e) for e in out if isinstance(e, RowError)] == [
            "line 2 (record 2): messages[0].content holds an unpaired surrogate \\udc00 (not valid Unicode)"
        ]


def test_csv_and_lines_refuse_encoded_surrogates_as_not_utf8():
    surrogate = "\ud800".encode("utf-8", "surrogatepass")
    assert errors(b"query,answer\nq," + surrogate + b"\n", "csv") == [
        "line 2: not valid UTF-8 (byte 0xed at column 3); save the file as UTF-8"
    ]
    assert errors(b"fine\nq" + surrogate + b"\n", "lines") == [
        "line 2: not valid UTF-8 (byte 0xed at column 2); save the file as UTF-8"
    ]


@pytest.mark.django_db
def test_a_surrogate_row_stores_nothing(alice, alice_project, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "files"
    data = (
        json.dumps(chat_record(0)) + "\n" + json.dumps({**chat_record(1), "meta": "\udc00"}) + "\n"
    ).encode()
    before = DatasetVersion.objects.count(), DatasetRow.objects.count()
    with pytest.raises(DatasetRejected) as exc:
        import_dataset(alice_project, alice, "s", io.BytesIO(data), filename="s.jsonl")
    assert [str(e) for e in exc.value.errors] == [
        "line 2: meta holds an unpaired surrogate \\udc00 (not valid Unicode)"
    ]
    assert (DatasetVersion.objects.count(), DatasetRow.objects.count()) == before
    # skipping bad rows stores the good one, and only valid text
    version = import_dataset(alice_project, alice, "s", io.BytesIO(data), filename="s.jsonl", skip_bad=True)
    assert version.row_count == 1


# --- no crash, whatever the bytes ----------------------------------------------------------


def fuzz_text(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.35:
            parts.append(rng.choice("[]{}") * rng.choice([1, 2, 31, 32, 33, 100, 3_000]))
        elif kind < 0.55:
            parts.append(
                json.dumps(rng.choice([chat_record(1), alpaca(2), {"qa": [alpaca(3)]}, "s", 1, None]))
            )
        elif kind < 0.75:
            parts.append(
                rng.choice(
                    [
                        '"',
                        '\\"',
                        "\\",
                        "\\ud800",
                        "\\udc00",
                        "\\ud83d\\ude00",
                        '"messages":',
                        '"qa":',
                        ",",
                        ":",
                        "\n",
                        "\r\n",
                        " ",
                    ]
                )
            )
        else:
            parts.append("".join(rng.choice('[]{}",:\\ud8 \nabc0') for _ in range(rng.randint(1, 40))))
    return "".join(parts)


def test_fuzzed_nestings_brackets_and_strings_never_crash_the_reader(monkeypatch):
    rng = random.Random(18)
    started = time.monotonic()
    for i in range(300):
        data = fuzz_text(rng).encode("utf-8", "surrogatepass")
        if i % 3 == 0:
            monkeypatch.setitem(READS, "size", rng.choice([5, 64, 1000]))
        else:
            monkeypatch.setitem(READS, "size", 64 * 1024)
        fmt = rng.choice(["auto", "chat", "alpaca", "sharegpt", "completion", "fields", "csv", "lines"])
        kw: dict[str, object] = {"query_column": "q"} if fmt == "fields" else {}
        if rng.random() < 0.2 and fmt not in ("csv", "lines"):
            kw["records_key"] = "qa"
        reader = DatasetReader(
            ShortReads(data), fmt, limits=Limits(max_row_chars=5_000), filename="f.json", **kw
        )  # type: ignore[arg-type]
        rows = list(reader)
        assert all(isinstance(r, Row) for r in rows)
        assert rows or reader.errors, (fmt, data[:200])
        for row in rows:  # whatever was accepted is storable text
            for m in row.messages:
                m["content"].encode("utf-8")
            json.dumps(row.extra, default=str).encode("utf-8")
    assert time.monotonic() - started < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 1024 * 1024  # KB: nothing blew up
