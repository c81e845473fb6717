import hashlib
import io
import json
import re
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils.html import escape

from tests.threads import run_together
from workbench.actions import ActionError
from workbench.actions import datasets as dataset_actions
from workbench.actions.datasets import DatasetRejected, import_dataset, queue_token_stats, review_version
from workbench.models import Dataset, DatasetRow, DatasetVersion, FoundationModel
from workbench.tasks import compute_token_stats

pytestmark = pytest.mark.django_db

QA = [
    ("How do I reset my password?", "Use the link on the login page."),
    ("Where can I find my invoice?", "Under Billing, then Invoices."),
    ("Can I change my plan mid-month?", "Yes; the price is prorated — about 5 € a day."),
]
SYSTEM = "You are the support bot of Acme."


def jsonl(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def chat_row(q: str, a: str | None = None, system: str | None = None) -> dict[str, object]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": q})
    if a is not None:
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def qa_messages(system: str | None = None) -> list[list[dict[str, str]]]:
    return [chat_row(q, a, system)["messages"] for q, a in QA]


def query_messages() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": q}] for q, _ in QA]


def csv_bytes() -> bytes:
    lines = ["id,Customer question,Agent reply,notes"]
    lines += [f'{i},"{q}","{a}",n{i}' for i, (q, a) in enumerate(QA)]
    return ("\r\n".join(lines) + "\r\n").encode()


# (id, filename, bytes, extra form fields, format detected, messages stored)
FORMAT_CASES = [
    ("chat", "conversations.jsonl", jsonl(*(chat_row(q, a) for q, a in QA)), {}, "chat", qa_messages()),
    (
        "chat-system",
        "with-system.jsonl",
        jsonl(*(chat_row(q, a, SYSTEM) for q, a in QA)),
        {},
        "chat",
        qa_messages(SYSTEM),
    ),
    (
        "alpaca-array",
        "alpaca.json",
        json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA], indent=2).encode(),
        {},
        "alpaca",
        qa_messages(),
    ),
    (
        "alpaca-jsonl",
        "alpaca.jsonl",
        jsonl(*({"instruction": q, "output": a} for q, a in QA)),
        {},
        "alpaca",
        qa_messages(),
    ),
    (
        "sharegpt",
        "share.jsonl",
        jsonl(
            *({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA)
        ),
        {},
        "sharegpt",
        qa_messages(),
    ),
    (
        "csv-columns",
        "export.csv",
        csv_bytes(),
        {"query_column": "Customer question", "answer_column": "Agent reply"},
        "csv",
        qa_messages(),
    ),
    # no answer column chosen, and "Agent reply" is not a name the reader knows
    (
        "csv-query-only",
        "export.csv",
        csv_bytes(),
        {"query_column": "customer question"},
        "csv",
        query_messages(),
    ),
    ("lines", "queries.txt", "".join(q + "\n" for q, _ in QA).encode(), {}, "lines", query_messages()),
]


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path: Path) -> Path:
    """Each test gets its own MEDIA_ROOT, so 'nothing left behind' is exact."""
    settings.MEDIA_ROOT = tmp_path / "files"
    # alice and bob get passwords; the default hasher costs ~0.4 s a test
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return settings.MEDIA_ROOT


def upload(client, project, data: bytes, filename: str = "data.jsonl", **fields: object):
    body = {"file": SimpleUploadedFile(filename, data), **{k: v for k, v in fields.items() if v is not None}}
    return client.post(reverse("dataset_upload", args=[project.slug]), body)


def command(project, path: Path, name: str = "ds", *args: str) -> str:
    out = io.StringIO()
    call_command(
        "import_dataset",
        str(path),
        "--project",
        project.slug,
        "--name",
        name,
        *args,
        stdout=out,
        stderr=io.StringIO(),
    )
    return out.getvalue()


def command_rejected(project, path: Path, *args: str, name: str = "ds") -> str:
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc:
        call_command(
            "import_dataset",
            str(path),
            "--project",
            project.slug,
            "--name",
            name,
            *args,
            stdout=io.StringIO(),
            stderr=err,
        )
    assert exc.value.code not in (0, None)
    return err.getvalue()


def cli_args(fields: dict[str, object]) -> list[str]:
    args: list[str] = []
    for key, value in fields.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def stored_files(media_root: Path) -> list[str]:
    folder = media_root / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_nothing_stored(media_root: Path) -> None:
    assert not Dataset.objects.exists()
    assert not DatasetVersion.objects.exists()
    assert not DatasetRow.objects.exists()
    assert stored_files(media_root) == []  # no stored copy, no .upload-* temp file


def stored_messages(version: DatasetVersion) -> list[list[dict[str, str]]]:
    return list(version.rows.order_by("index").values_list("messages", flat=True))


def big_chat(n: int, bad_line: int | None = None, bad: bytes = b'{"messages": [}\n') -> bytes:
    out = io.BytesIO()
    for i in range(1, n + 1):
        if i == bad_line:
            out.write(bad)
        else:
            out.write(
                json.dumps(chat_row(f"Question number {i} about the refund policy?", f"Answer {i}.")).encode()
                + b"\n"
            )
    return out.getvalue()


# --- every format, browser and command ---------------------------------------


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_it_stores_each_format_uploaded_in_the_browser(alice_client, alice_project, media_root, case):
    _, filename, data, fields, fmt, messages = case
    r = upload(alice_client, alice_project, data, filename, name="support", **fields)
    version = DatasetVersion.objects.get()
    assert r.status_code == 302 and r.url == version.get_absolute_url()
    assert (version.format, version.row_count, version.number) == (fmt, 3, 1)
    assert stored_messages(version) == messages
    assert version.source_filename == filename and version.dataset.name == "support"
    assert (media_root / version.file).read_bytes() == data
    page = alice_client.get(r.url)
    assert page.status_code == 200
    assert escape(messages[0][-1]["content"]).encode() in page.content


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_it_stores_each_format_with_the_command(alice_project, media_root, tmp_path, case):
    _, filename, data, fields, fmt, messages = case
    path = tmp_path / filename
    path.write_bytes(data)
    out = command(alice_project, path, "support", *cli_args(fields))
    version = DatasetVersion.objects.get()
    assert f"{alice_project.slug}/support@1: 3 rows ({fmt})" in out
    assert version.format == fmt and stored_messages(version) == messages
    assert (media_root / version.file).read_bytes() == data
    # naming the format gives the same as detecting it
    command(alice_project, path, "named", "--format", fmt, *cli_args(fields))
    assert Dataset.objects.get(name="named").latest.sha256 == version.sha256


def test_the_content_hash_is_of_the_normalised_rows(alice, alice_project):
    """The hash is of the normalised rows, so the same conversations in any
    format hash the same, and differ from the same queries without answers."""
    hashes = {}
    for case_id, filename, data, fields, _, _ in FORMAT_CASES:
        version = import_dataset(alice_project, alice, case_id, io.BytesIO(data), filename=filename, **fields)
        hashes[case_id] = version.sha256
    expected = hashlib.sha256(
        "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in qa_messages()).encode()
    ).hexdigest()
    assert (
        hashes["chat"]
        == hashes["alpaca-array"]
        == hashes["alpaca-jsonl"]
        == hashes["sharegpt"]
        == hashes["csv-columns"]
        == expected
    )
    assert hashes["lines"] == hashes["csv-query-only"] != hashes["chat"]
    assert hashes["chat-system"] not in (hashes["chat"], hashes["lines"])


def test_it_detects_the_format_and_lets_the_user_override_it(alice_client, alice_project):
    data = jsonl(*(chat_row(q) for q, _ in QA))
    upload(alice_client, alice_project, data, "rows.jsonl", name="auto")
    upload(alice_client, alice_project, data, "rows.jsonl", name="forced", format="lines")
    auto, forced = (Dataset.objects.get(name=n).latest for n in ("auto", "forced"))
    assert auto.format == "chat" and stored_messages(auto) == query_messages()
    # read as plain text, every JSON line is a query of its own
    assert (
        forced.format == "lines" and stored_messages(forced)[0][0]["content"] == data.decode().split("\n")[0]
    )
    # a header with a known column makes a file without an extension a CSV
    upload(alice_client, alice_project, b"question,answer\nhi,hello\n", "noext", name="table")
    table = Dataset.objects.get(name="table").latest
    assert table.format == "csv" and stored_messages(table) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ]


def test_it_rejects_a_file_read_in_the_wrong_format(alice_client, alice_project, media_root):
    data = jsonl(*(chat_row(q, a) for q, a in QA))
    r = upload(alice_client, alice_project, data, "rows.jsonl", name="x", format="alpaca")
    assert r.status_code == 400
    assert escape("line 3: missing field 'instruction' (found 'messages')").encode() in r.content
    assert b"read as alpaca" in r.content
    assert_nothing_stored(media_root)


# --- bad rows: reported by line, nothing stored -------------------------------

OK = jsonl(chat_row("A good first row"))
BAD_CASES = [
    (
        "invalid-json",
        "a.jsonl",
        OK + b'{"messages": [\n',
        {},
        "line 2: invalid JSON: Expecting value (column 15)",
    ),
    (
        "missing-field",
        "a.jsonl",
        OK + b'{"msgs": []}\n',
        {},
        "line 2: missing field 'messages' (found 'msgs')",
    ),
    (
        "unknown-role",
        "a.jsonl",
        OK + jsonl({"messages": [{"role": "bot", "content": "b"}]}),
        {},
        "line 2: messages[0].role: unknown role 'bot'",
    ),
    ("empty-content", "a.jsonl", OK + jsonl(chat_row(" ")), {}, "line 2: messages[0].content: empty content"),
    (
        "no-user-turn",
        "a.jsonl",
        OK + jsonl({"messages": [{"role": "assistant", "content": "x"}]}),
        {},
        "line 2: no user turn",
    ),
    (
        "system-later",
        "a.jsonl",
        OK + jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
        {},
        "line 2: messages[1]: a system message may only come first",
    ),
    (
        "not-a-string",
        "a.jsonl",
        OK + b'{"messages": [{"role": "user", "content": 5}]}\n',
        {},
        "line 2: messages[0].content: expected a string, got number",
    ),
    (
        "not-utf8",
        "a.jsonl",
        OK + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
        {},
        "line 2: not valid UTF-8",
    ),
    (
        "alpaca-jsonl",
        "a.jsonl",
        b'{"instruction": "a"}\n{"output": "b"}\n',
        {},
        "line 2: missing field 'instruction' (found 'output')",
    ),
    (
        "alpaca-array",
        "a.json",
        b'[\n  {"instruction": "a"},\n  {"input": "b"}\n]\n',
        {},
        "line 3 (record 2): missing field 'instruction' (found 'input')",
    ),
    (
        "sharegpt",
        "a.jsonl",
        b'{"conversations": [{"from": "human", "value": "a"}]}\n{"conversations": [{"from": "robot", "value": "a"}]}\n',
        {},
        "line 2: conversations[0].from: unknown role 'robot'",
    ),
    (
        "csv-fields",
        "a.csv",
        b"question,answer\na,b\nc,d,e\n",
        {},
        "line 3: row has 3 fields but the header has 2",
    ),
    (
        "csv-empty-query",
        "a.csv",
        b"question,answer\na,b\n ,d\n",
        {},
        "line 3: column 'question': empty query",
    ),
    (
        "csv-no-column",
        "a.csv",
        b"question,answer\na,b\n",
        {"query_column": "prompt"},
        "line 1: no column 'prompt' in the header (columns: 'question', 'answer')",
    ),
    (
        "csv-ambiguous",
        "a.csv",
        b"q_text,r_text\na,b\n",
        {},
        "line 1: cannot tell which column holds the queries",
    ),
    ("nul-byte", "a.txt", b"fine\nab\x00c\n", {}, "line 2: line contains a NUL byte"),
    ("empty-file", "a.jsonl", b"", {}, "the file is empty"),
    ("utf16", "a.txt", "hello\n".encode("utf-16"), {}, "the file is UTF-16 encoded; save it as UTF-8"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_it_shows_each_bad_row_by_line_on_the_page(alice_client, alice_project, media_root, case):
    _, filename, data, fields, message = case
    r = upload(alice_client, alice_project, data, filename, name="bad", **fields)
    assert r.status_code == 400
    assert escape(message).encode() in r.content
    assert escape(f"{filename} was not stored").encode() in r.content
    assert r.context["form"]["name"].value() == "bad"  # the form keeps what was typed
    assert_nothing_stored(media_root)


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_it_prints_each_bad_row_by_line_from_the_command(alice_project, media_root, tmp_path, case):
    _, filename, data, fields, message = case
    path = tmp_path / filename
    path.write_bytes(data)
    err = command_rejected(alice_project, path, *cli_args(fields))
    assert message in err and "nothing was stored" in err
    assert_nothing_stored(media_root)


def test_it_says_how_many_errors_were_left_out(alice_client, alice_project, tmp_path):
    data = OK + b"not json\n" * 60
    r = upload(alice_client, alice_project, data, "many.jsonl", name="many")
    assert r.status_code == 400 and b"60 bad rows" in r.content and b"The first 50 are shown" in r.content
    assert b"line 51: invalid JSON" in r.content and b"line 52:" not in r.content
    path = tmp_path / "many.jsonl"
    path.write_bytes(data)
    err = command_rejected(alice_project, path)
    assert "line 51: invalid JSON" in err and "... and 10 more" in err and "60 bad row(s)" in err


# --- all or nothing -----------------------------------------------------------


def test_a_bad_row_in_the_middle_of_a_big_file_stores_nothing(
    alice_client, alice_project, media_root, tmp_path
):
    # several batches are inserted before the parser reaches the bad row
    data = big_chat(7000, bad_line=4501)
    r = upload(alice_client, alice_project, data, "big.jsonl", name="big")
    assert r.status_code == 400 and b"line 4501: invalid JSON" in r.content
    assert_nothing_stored(media_root)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    assert "line 4501: invalid JSON" in command_rejected(alice_project, path, name="big")
    assert_nothing_stored(media_root)


def test_a_file_over_the_byte_limit_stores_nothing(
    alice_client, alice_project, media_root, tmp_path, settings
):
    data = big_chat(3000)
    settings.UPLOAD_MAX_BYTES = 64 * 1024
    r = upload(alice_client, alice_project, data, "big.jsonl", name="big")
    # refused by the upload handler, before the body is read (tests/test_hostile_uploads.py)
    assert r.status_code == 413 and b"the limit is 64.0\xc2\xa0KB" in r.content
    assert_nothing_stored(media_root)
    # the command has no size to check up front: the stream stops at the limit
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    assert "file is larger than the 64 KB limit" in command_rejected(alice_project, path)
    assert_nothing_stored(media_root)
    # the size the client sends is not trusted: the stream is counted too
    with pytest.raises(DatasetRejected) as exc:
        import_dataset(alice_project, None, "big", io.BytesIO(data), filename="big.jsonl")
    assert str(exc.value.errors[-1]) == "file is larger than the 64 KB limit"
    assert_nothing_stored(media_root)


def test_a_file_over_the_row_limit_stores_nothing(
    alice_client, alice_project, media_root, tmp_path, settings
):
    settings.DATASET_MAX_ROWS = 2500
    data = big_chat(3000)
    r = upload(alice_client, alice_project, data, "big.jsonl", name="big")
    assert r.status_code == 400 and b"more than 2,500 rows (limit)" in r.content
    assert_nothing_stored(media_root)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    assert "more than 2,500 rows (limit)" in command_rejected(alice_project, path)
    assert_nothing_stored(media_root)


def test_a_row_over_the_character_limit_stores_nothing(
    alice_client, alice_project, media_root, tmp_path, settings
):
    settings.DATASET_MAX_ROW_CHARS = 200
    data = big_chat(3000, bad_line=2500, bad=jsonl(chat_row("x" * 300)))
    r = upload(alice_client, alice_project, data, "big.jsonl", name="big")
    assert r.status_code == 400 and b"line 2500: line is longer than the 200-character limit" in r.content
    assert_nothing_stored(media_root)
    path = tmp_path / "q.txt"
    path.write_bytes(b"short\n" + b"y" * 201 + b"\nshort too\n")
    assert "line 2: line is longer than the 200-character limit" in command_rejected(alice_project, path)
    assert_nothing_stored(media_root)


def test_a_crash_in_the_middle_of_an_import_leaves_nothing(
    alice, alice_project, media_root, tmp_path, monkeypatch
):
    real = DatasetRow.objects.bulk_create
    calls: list[int] = []

    def bulk_create(objs, *args, **kwargs):
        calls.append(len(objs))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(objs, *args, **kwargs)

    monkeypatch.setattr(DatasetRow.objects, "bulk_create", bulk_create)
    data = big_chat(5000)
    with pytest.raises(OSError, match="disk full"):
        import_dataset(alice_project, alice, "big", io.BytesIO(data), filename="big.jsonl")
    assert calls == [dataset_actions.ROW_BATCH, dataset_actions.ROW_BATCH]
    assert_nothing_stored(media_root)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        command(alice_project, path)
    assert_nothing_stored(media_root)


def test_a_crash_after_the_file_was_moved_in_place_leaves_nothing(
    alice, alice_project, media_root, monkeypatch
):
    def broken_split(version):
        raise RuntimeError("split failed")

    monkeypatch.setattr(dataset_actions, "apply_split", broken_split)
    with pytest.raises(RuntimeError, match="split failed"):
        import_dataset(alice_project, alice, "ds", io.BytesIO(jsonl(*(chat_row(q) for q, _ in QA))))
    assert_nothing_stored(media_root)


def test_it_refuses_bad_options_without_storing(alice_client, alice_project, media_root):
    data = jsonl(chat_row("hi"))
    r = upload(alice_client, alice_project, data, name="x", eval_percent=101)
    assert r.status_code == 400 and b"between 0 and 100 percent" in r.content
    r = upload(alice_client, alice_project, data, name="x", seed="abc")
    assert r.status_code == 400 and b"Invalid number" in r.content
    r = upload(alice_client, alice_project, data, name="x", format="parquet")
    assert r.status_code == 400 and b"Unknown format" in r.content
    r = alice_client.post(reverse("dataset_upload", args=[alice_project.slug]), {"name": "x"})
    assert r.status_code == 400 and b"Choose a file" in r.content
    assert_nothing_stored(media_root)


def test_the_command_refuses_a_missing_file_or_project(alice_project, tmp_path, media_root):
    with pytest.raises(CommandError, match="no such file"):
        command(alice_project, tmp_path / "nope.jsonl")
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl(chat_row("hi")))
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("import_dataset", str(path), "--project", "nope", "--name", "x")
    with pytest.raises(CommandError, match="between 0 and 100"):
        command(alice_project, path, "x", "--eval-percent", "101")
    assert_nothing_stored(media_root)


# --- the stored file -----------------------------------------------------------


@pytest.mark.parametrize("memory_limit", [2 * 1024 * 1024, 256], ids=["in-memory", "temp-file"])
def test_it_stores_the_upload_byte_for_byte_under_a_generated_name(
    alice_client, alice_project, media_root, settings, memory_limit
):
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = memory_limit  # both of Django's upload handlers
    data = b"\xef\xbb\xbf" + jsonl(*(chat_row(q, a) for q, a in QA)).replace(b"\n", b"\r\n")
    r = upload(alice_client, alice_project, data, "../../etc/passwd.jsonl", name="sneaky")
    assert r.status_code == 302
    version = DatasetVersion.objects.get()
    stored = media_root / version.file
    assert re.fullmatch(r"datasets/[0-9a-f]{32}\.jsonl", version.file)
    assert stored.read_bytes() == data
    assert stored_files(media_root) == [stored.name]


def test_the_users_filename_is_never_a_path(alice, alice_project, media_root):
    data = jsonl(chat_row("hi"))
    version = import_dataset(alice_project, alice, "x", io.BytesIO(data), filename="../../etc/passwd.jsonl")
    stored = (media_root / version.file).resolve()
    assert stored.parent == (media_root / "datasets").resolve()
    assert "passwd" not in version.file and stored.read_bytes() == data
    assert version.source_filename == "../../etc/passwd.jsonl"  # kept for display only
    csv_version = import_dataset(alice_project, alice, "y", io.BytesIO(b"question\nhi\n"), filename="a.csv")
    lines_version = import_dataset(alice_project, alice, "z", io.BytesIO(b"hi\n"), filename="a.txt")
    array = import_dataset(alice_project, alice, "w", io.BytesIO(b' \n[{"instruction": "hi"}]'), filename="a")
    assert csv_version.file.endswith(".csv") and lines_version.file.endswith(".txt")
    assert array.format == "alpaca" and array.file.endswith(".json")
    assert len(stored_files(media_root)) == 4


# --- versions, duplicates, split ----------------------------------------------


def test_a_second_upload_under_the_same_name_is_the_next_version(alice_client, alice_project, media_root):
    upload(alice_client, alice_project, jsonl(*(chat_row(q) for q, _ in QA)), name="support")
    upload(alice_client, alice_project, jsonl(*(chat_row(q) for q, _ in QA[:2])), name="support")
    upload(alice_client, alice_project, jsonl(chat_row("other")), "other.jsonl")  # named after the file
    dataset = Dataset.objects.get(name="support")
    assert [(v.number, v.row_count) for v in dataset.versions.order_by("number")] == [(1, 3), (2, 2)]
    assert dataset.latest.number == 2 and len(stored_files(media_root)) == 3
    r = alice_client.get(reverse("dataset_detail", args=[alice_project.slug, dataset.pk]))
    assert r.context["version"].number == 2
    listing = alice_client.get(reverse("dataset_list", args=[alice_project.slug]))
    assert b"support" in listing.content and b"v2" in listing.content and b"2 versions" in listing.content
    old = alice_client.get(reverse("dataset_version", args=[alice_project.slug, dataset.pk, 1]))
    assert old.context["version"].row_count == 3


def test_a_rejected_new_version_leaves_the_old_one_alone(alice_client, alice_project, media_root):
    good = jsonl(*(chat_row(q, a) for q, a in QA))
    upload(alice_client, alice_project, good, name="support")
    before = stored_files(media_root)
    r = upload(alice_client, alice_project, good + b"oops\n", name="support")
    assert r.status_code == 400 and b"line 4: invalid JSON" in r.content
    assert [v.number for v in DatasetVersion.objects.all()] == [1] and DatasetRow.objects.count() == 3
    assert stored_files(media_root) == before
    assert (media_root / DatasetVersion.objects.get().file).read_bytes() == good
    # and the next good upload is version 2, not 3
    upload(alice_client, alice_project, good, name="support")
    assert sorted(DatasetVersion.objects.values_list("number", flat=True)) == [1, 2]


def test_it_counts_duplicate_rows(alice, alice_project):
    data = b"refund?\ninvoice?\nrefund?\nrefund?\nplan?\n"
    version = import_dataset(alice_project, alice, "d", io.BytesIO(data), filename="q.txt")
    assert (version.row_count, version.duplicate_count) == (5, 2)
    # same queries from a CSV: same rows, same hash, same duplicates
    table = import_dataset(alice_project, alice, "t", io.BytesIO(b"query\n" + data), filename="q.csv")
    assert (table.sha256, table.duplicate_count) == (version.sha256, 2)


def eval_indices(version: DatasetVersion) -> list[int]:
    return list(version.rows.filter(split=DatasetRow.EVAL).order_by("index").values_list("index", flat=True))


def test_the_split_is_deterministic_and_exact(alice, alice_project):
    data = b"".join(f"query {i}\n".encode() for i in range(237))

    def imp(name: str, percent: int, seed: int) -> DatasetVersion:
        return import_dataset(
            alice_project, alice, name, io.BytesIO(data), filename="q.txt", eval_percent=percent, seed=seed
        )

    a, b, c = imp("a", 15, 7), imp("b", 15, 7), imp("c", 15, 8)
    assert len(eval_indices(a)) == round(237 * 15 / 100) == a.eval_count == 36
    assert eval_indices(a) == eval_indices(b)
    assert eval_indices(c) != eval_indices(a) and len(eval_indices(c)) == 36
    # a small set still gets one eval row and keeps one train row
    assert (
        import_dataset(alice_project, alice, "small", io.BytesIO(b"a\nb\nc\n"), eval_percent=10).eval_count
        == 1
    )
    assert import_dataset(alice_project, alice, "two", io.BytesIO(b"a\nb\n"), eval_percent=90).eval_count == 1
    zero = imp("zero", 0, 7)
    assert zero.eval_count == 0 and zero.rows.filter(split=DatasetRow.TRAIN).count() == 237
    assert imp("ten", 10, 0).eval_count == 24  # round(23.7)
    held_out = imp("held-out", 100, 0)  # an eval set: every row
    assert held_out.eval_count == 237 and held_out.rows.filter(split=DatasetRow.TRAIN).count() == 0


def test_a_derived_version_keeps_the_split_and_counts_duplicates(alice, alice_project):
    data = b"".join(f"query {i}\n".encode() for i in range(40))
    parent = import_dataset(alice_project, alice, "d", io.BytesIO(data), eval_percent=25, seed=2)
    rows = list(parent.rows.order_by("index"))
    answered = [(r.index, [*r.messages, {"role": "assistant", "content": "same answer"}]) for r in rows]
    answered.append((rows[0].index, answered[0][1]))  # one duplicate
    child = dataset_actions.derive_version(parent, alice, answered, kind=DatasetVersion.TEACHER)
    assert (child.number, child.row_count, child.duplicate_count, child.parent) == (2, 41, 1, parent)
    parent_eval = set(eval_indices(parent))
    assert eval_indices(child) == [i for i, (p, _) in enumerate(answered) if p in parent_eval]
    assert len(parent_eval) == 10
    assert child.sha256 != parent.sha256 and Dataset.objects.get().latest == child


def test_the_page_shows_the_counts_of_the_split(alice_client, alice_project):
    upload(
        alice_client,
        alice_project,
        b"".join(f"q{i}\n".encode() for i in range(50)),
        "q.txt",
        name="q",
        eval_percent=20,
        seed=3,
    )
    version = DatasetVersion.objects.get()
    r = alice_client.get(version.get_absolute_url())
    assert (r.context["eval_count"], r.context["train_count"]) == (10, 40)
    assert b"eval (20%, seed 3)" in r.content


# --- preview, export --------------------------------------------------------------


@pytest.fixture
def version45(alice, alice_project) -> DatasetVersion:
    data = b"".join(f"query number {i}\n".encode() for i in range(1, 46))
    return import_dataset(
        alice_project, alice, "preview", io.BytesIO(data), filename="q.txt", eval_percent=20, seed=1
    )


def test_the_preview_is_paginated(alice_client, version45):
    url = version45.get_absolute_url()
    r = alice_client.get(url + "?page=2")
    assert r.status_code == 200
    assert [row.index for row in r.context["page"]] == list(range(20, 40))
    assert b"query number 21<" in r.content and b"query number 20<" not in r.content
    assert b"page 2 of 3" in r.content and b"<html" in r.content


def test_an_htmx_page_request_gets_only_the_rows(alice_client, version45):
    r = alice_client.get(
        version45.get_absolute_url() + "?page=3", headers={"HX-Request": "true", "HX-Target": "rows"}
    )
    assert r.status_code == 200
    body = r.content.decode()
    assert body.lstrip().startswith('<div id="rows">')
    assert "<html" not in body and "Token lengths" not in body
    assert "query number 41<" in body and "page 3 of 3" in body
    assert 'hx-get="?split=&page=2" hx-target="#rows"' in body


def test_the_preview_filters_by_split(alice_client, version45):
    r = alice_client.get(version45.get_absolute_url() + "?split=eval")
    rows = list(r.context["page"])
    assert len(rows) == 9 == version45.eval_count  # round(45 * 0.2)
    assert {row.split for row in rows} == {"eval"}
    assert [row.index for row in rows] == eval_indices(version45)
    r = alice_client.get(
        version45.get_absolute_url() + "?split=train&page=2",
        headers={"HX-Request": "true", "HX-Target": "rows"},
    )
    body = r.content.decode()
    assert "<html" not in body and "page 2 of 2" in body and 'hx-get="?split=train&page=1"' in body
    assert body.count("· train") == 16 and "· eval" not in body


def test_it_exports_the_normalised_rows_as_jsonl(alice_client, alice_project, version45):
    r = alice_client.get(reverse("dataset_export", args=[alice_project.slug, version45.dataset_id, 1]))
    assert r.status_code == 200 and r["Content-Type"].startswith("application/jsonl")
    assert f'filename="{alice_project.slug}-{version45.dataset_id}-v1.jsonl"' in r["Content-Disposition"]
    lines = [json.loads(line) for line in b"".join(r.streaming_content).decode().splitlines()]
    assert [x["messages"] for x in lines] == [
        [{"role": "user", "content": f"query number {i}"}] for i in range(1, 46)
    ]
    evals = [i for i, x in enumerate(lines) if x["split"] == "eval"]
    assert evals == eval_indices(version45)
    assert {x["split"] for x in lines} == {"train", "eval"}


def test_an_exported_dataset_imports_to_the_same_rows(alice_client, alice, alice_project):
    data = jsonl(*(chat_row(q, a, SYSTEM) for q, a in QA))
    first = import_dataset(alice_project, alice, "a", io.BytesIO(data), filename="a.jsonl")
    r = alice_client.get(reverse("dataset_export", args=[alice_project.slug, first.dataset_id, 1]))
    again = import_dataset(
        alice_project, alice, "b", io.BytesIO(b"".join(r.streaming_content)), filename="export.jsonl"
    )
    assert again.sha256 == first.sha256


def test_the_export_keeps_the_extra_fields_of_each_row(alice_client, alice, alice_project):
    rows = [{"id": f"r{i}", "source": "faq", **chat_row(q, a)} for i, (q, a) in enumerate(QA)]
    version = import_dataset(alice_project, alice, "a", io.BytesIO(jsonl(*rows)), filename="a.jsonl")
    r = alice_client.get(reverse("dataset_export", args=[alice_project.slug, version.dataset_id, 1]))
    exported = [json.loads(line) for line in b"".join(r.streaming_content).decode().splitlines()]
    assert [(e["id"], e["source"]) for e in exported] == [(f"r{i}", "faq") for i in range(len(QA))]


# --- token statistics -----------------------------------------------------------


@pytest.fixture
def tiny(tiny_model_dir) -> FoundationModel:
    return FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))


def test_it_computes_token_stats_with_the_real_tokenizer(alice_client, alice, alice_project, tiny):
    from engines.tokens import load_tokenizer

    rows = [chat_row(" ".join(["word"] * n), "ok") for n in (1, 5, 10, 20, 40, 80, 160)]
    version = import_dataset(alice_project, alice, "lengths", io.BytesIO(jsonl(*rows)), filename="a.jsonl")
    compute_token_stats(version.pk, tiny.pk)
    version.refresh_from_db()
    stats = version.token_stats["tiny"]
    assert stats["status"] == "done" and stats["count"] == 7
    assert stats["min"] < stats["median"] < stats["p95"] <= stats["max"]
    # the longest row has 159 more words than the shortest; each " word" is one token
    tok = load_tokenizer(tiny.path)
    assert len(tok(" word" * 159, add_special_tokens=False)["input_ids"]) == 159
    assert stats["max"] - stats["min"] == 159
    assert stats["total"] > 7 * stats["min"]
    r = alice_client.get(version.get_absolute_url())
    expected = (
        f"min {stats['min']} · median {stats['median']} · p95 {stats['p95']} · max {stats['max']} tokens"
    )
    assert expected in r.content.decode()
    fragment = alice_client.get(
        reverse("dataset_stats_fragment", args=[alice_project.slug, version.dataset_id, 1])
    )
    assert expected in fragment.content.decode() and "hx-trigger" not in fragment.content.decode()


def test_the_stats_button_queues_the_task(
    alice_client, alice, alice_project, tiny, django_capture_on_commit_callbacks, monkeypatch
):
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(*(chat_row(q) for q, _ in QA))))
    url = reverse("dataset_stats", args=[alice_project.slug, version.dataset_id, 1])
    with django_capture_on_commit_callbacks() as callbacks:
        r = alice_client.post(url, {"base_model": tiny.pk})
    assert r.status_code == 302 and r.url == version.get_absolute_url()
    version.refresh_from_db()
    assert version.token_stats == {"tiny": {"status": "queued"}}
    assert len(callbacks) == 1  # sent to the broker once the request commits
    page = alice_client.get(version.get_absolute_url()).content.decode()
    assert "computing…" in page and 'hx-trigger="every 2s"' in page
    # run what was queued, in this process
    monkeypatch.setitem(compute_token_stats.app.conf, "task_always_eager", True)
    callbacks[0]()
    version.refresh_from_db()
    assert version.token_stats["tiny"]["status"] == "done" and version.token_stats["tiny"]["count"] == 3
    fragment = alice_client.get(
        reverse("dataset_stats_fragment", args=[alice_project.slug, version.dataset_id, 1])
    )
    assert "hx-trigger" not in fragment.content.decode() and "median" in fragment.content.decode()


def test_a_tokenizer_that_fails_is_reported(alice_client, alice, alice_project, tmp_path):
    broken = FoundationModel.objects.create(name="broken", path=str(tmp_path / "no-such-model"))
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(chat_row("hi"))))
    compute_token_stats(version.pk, broken.pk)
    version.refresh_from_db()
    assert version.token_stats["broken"]["status"] == "failed" and version.token_stats["broken"]["error"]
    assert b"failed" in alice_client.get(version.get_absolute_url()).content


def test_the_stats_button_refuses_an_unknown_model(alice_client, alice, alice_project):
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(chat_row("hi"))))
    url = reverse("dataset_stats", args=[alice_project.slug, version.dataset_id, 1])
    for value in ("999", "abc", ""):
        assert alice_client.post(url, {"base_model": value}).status_code == 404, value
    version.refresh_from_db()
    assert version.token_stats == {}


def test_queueing_stats_keeps_what_other_models_have(
    alice, alice_project, tiny, django_capture_on_commit_callbacks
):
    other = FoundationModel.objects.create(name="other", path=tiny.path)
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(*(chat_row(q) for q, _ in QA))))
    stale = DatasetVersion.objects.get(pk=version.pk)  # read before anything was queued
    with django_capture_on_commit_callbacks():
        queue_token_stats(version, tiny)
    compute_token_stats(version.pk, tiny.pk)  # ran and finished while `stale` was still held
    with django_capture_on_commit_callbacks() as callbacks:
        queued = queue_token_stats(stale, other)
    assert len(callbacks) == 1
    version.refresh_from_db()
    assert version.token_stats["tiny"]["status"] == "done" and version.token_stats["tiny"]["count"] == 3
    assert version.token_stats["other"] == {"status": "queued"} and queued.token_stats == version.token_stats


@pytest.mark.django_db(transaction=True)
def test_two_models_queued_at_once_are_both_kept(alice, alice_project, tiny, monkeypatch):
    # the tasks run in the queueing thread once it commits, as a worker would after it
    monkeypatch.setitem(compute_token_stats.app.conf, "task_always_eager", True)
    models = [tiny] + [FoundationModel.objects.create(name=f"tiny-{i}", path=tiny.path) for i in range(3)]
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(*(chat_row(q) for q, _ in QA))))
    run_together(*(lambda m=m: queue_token_stats(version, m) for m in models))
    version.refresh_from_db()
    assert sorted(version.token_stats) == ["tiny", "tiny-0", "tiny-1", "tiny-2"]
    assert {s["status"] for s in version.token_stats.values()} == {"done"}


def test_a_bad_upload_form_keeps_what_was_typed(alice_client, alice_project, media_root):
    r = upload(
        alice_client,
        alice_project,
        jsonl(chat_row("hi")),
        "q.csv",
        name="typed",
        format="csv",
        query_column="Customer question",
        eval_percent="101",
        seed="abc",
    )
    body = r.content.decode()
    assert r.status_code == 400
    assert "The eval split must be between 0 and 100 percent." in body
    assert "Invalid number: the split seed is a whole number." in body
    assert r.context["form"].errors.keys() == {"eval_percent", "seed"}
    assert 'value="typed"' in body and 'value="Customer question"' in body
    assert 'value="101" aria-invalid="true"' in body and 'value="abc" aria-invalid="true"' in body
    assert '<option value="csv" selected>' in body and "<details open>" in body
    assert_nothing_stored(media_root)


def test_the_upload_form_names_the_dataset_after_the_file(alice_client, alice_project):
    r = upload(alice_client, alice_project, b"a\nb\nc\nd\n", "support queries.txt", eval_percent="", seed="")
    version = DatasetVersion.objects.get()
    assert r.status_code == 302 and version.dataset.name == "support queries"
    assert (version.eval_percent, version.split_seed, version.format) == (10, 0, "lines")


def test_the_default_split_holds_out_enough_queries_to_decide_on(alice, alice_project, settings):
    """10% of 40 rows is 4 held-out queries, whose CIs span [0, 1]: the default
    split holds out at least EVAL_MIN_HELD_OUT (at most half); a chosen percent is kept."""
    settings.EVAL_MIN_HELD_OUT = 20
    data = b"".join(f"query {i}\n".encode() for i in range(40))
    a = import_dataset(alice_project, alice, "a", io.BytesIO(data), filename="q.txt", seed=3)
    b = import_dataset(alice_project, alice, "b", io.BytesIO(data), filename="q.txt", seed=3)
    assert (a.eval_count, a.eval_percent, a.eval_min) == (20, 10, 20)
    assert eval_indices(a) == eval_indices(b)  # same seed, same rows
    chosen = import_dataset(alice_project, alice, "c", io.BytesIO(data), filename="q.txt", eval_percent=10)
    assert (chosen.eval_count, chosen.eval_min) == (4, 0)  # an explicit choice is honoured
    small = import_dataset(alice_project, alice, "d", io.BytesIO(b"a\nb\nc\nd\ne\nf\n"))
    assert small.eval_count == 3  # half: the rest must still teach
    large = b"".join(f"query {i}\n".encode() for i in range(237))
    assert import_dataset(alice_project, alice, "e", io.BytesIO(large)).eval_count == 24  # 10% > 20
    # A version derived with a new split keeps the minimum.
    rows = [(r.index, r.messages) for r in a.rows.order_by("index")]
    child = dataset_actions.derive_version(a, alice, rows, keep_split=False)
    assert (child.eval_min, child.eval_count) == (20, 20)


def test_the_upload_page_says_how_many_rows_the_default_split_holds_out(
    alice_client, alice_project, settings
):
    settings.EVAL_MIN_HELD_OUT = 20
    page = alice_client.get(reverse("dataset_list", args=[alice_project.slug])).content.decode()
    assert "at least 20 held out" in page and "40 rows hold out 20, 200 rows hold out 20" in page
    assert "1,000 rows hold out 100" in page and 'placeholder="10, at least 20 rows"' in page
    data = b"".join(f"query {i}\n".encode() for i in range(40))
    upload(alice_client, alice_project, data, "default.txt", eval_percent="")
    upload(alice_client, alice_project, data, "chosen.txt", eval_percent="10")
    default, chosen = (DatasetVersion.objects.get(dataset__name=n) for n in ("default", "chosen"))
    assert (default.eval_count, chosen.eval_count) == (20, 4)
    page = alice_client.get(default.get_absolute_url()).content.decode()
    assert "eval (10%, at least 20 rows, seed 0)" in page


@pytest.fixture
def answered(alice, alice_project) -> DatasetVersion:
    rows = [chat_row(f"question {i}", f"answer {i}") for i in range(4)]
    return import_dataset(alice_project, alice, "answers", io.BytesIO(jsonl(*rows)), eval_percent=0)


def test_a_review_saves_edits_and_drops_as_a_new_version(alice_client, alice, answered):
    url = reverse("dataset_review", args=[answered.dataset.project.slug, answered.dataset_id, 1])
    r = alice_client.post(
        url, {"answer_0": "answer 0", "answer_1": "a better answer", "drop": ["2"]}, follow=True
    )
    new = answered.dataset.latest
    assert new.number == 2 and new.row_count == 3 and new.parent == answered
    assert [m[-1]["content"] for m in stored_messages(new)] == ["answer 0", "a better answer", "answer 3"]
    assert b"Saved answers@2: 1 answer edited, 1 row dropped, 3 rows." in r.content
    assert new.meta == {"reviewed": "answers@1", "edited": [1], "dropped": [2]}
    r = alice_client.post(url, {"answer_0": "answer 0"}, follow=True)
    assert b"No changes." in r.content
    r = alice_client.post(url, {"answer_0": "  "}, follow=True)
    assert b"An answer cannot be empty" in r.content and answered.dataset.versions.count() == 2
    assert review_version(answered, alice, {}, {99}) is None  # no such row: nothing to do


# --- permissions ----------------------------------------------------------------


def test_a_non_member_gets_404_on_every_dataset_url(
    client, bob, alice, alice_project, bob_project, media_root
):
    version = import_dataset(alice_project, alice, "secret", io.BytesIO(jsonl(chat_row("secret query"))))
    ds = version.dataset_id
    tiny = FoundationModel.objects.create(name="m", path="/nowhere")
    client.force_login(bob)
    slug = alice_project.slug
    gets = [
        reverse("dataset_list", args=[slug]),
        reverse("dataset_detail", args=[slug, ds]),
        reverse("dataset_version", args=[slug, ds, 1]),
        reverse("dataset_export", args=[slug, ds, 1]),
        reverse("dataset_stats_fragment", args=[slug, ds, 1]),
    ]
    for url in gets:
        assert client.get(url).status_code == 404, url
    assert (
        client.post(reverse("dataset_stats", args=[slug, ds, 1]), {"base_model": tiny.pk}).status_code == 404
    )
    r = upload(client, alice_project, jsonl(chat_row("hi")), name="intruder")
    assert r.status_code == 404
    # nor through their own project, by id
    own = bob_project.slug
    for url in [
        reverse("dataset_detail", args=[own, ds]),
        reverse("dataset_version", args=[own, ds, 1]),
        reverse("dataset_export", args=[own, ds, 1]),
        reverse("dataset_stats_fragment", args=[own, ds, 1]),
    ]:
        assert client.get(url).status_code == 404, url
    assert (
        client.post(reverse("dataset_stats", args=[own, ds, 1]), {"base_model": tiny.pk}).status_code == 404
    )
    assert b"secret" not in client.get(reverse("dataset_list", args=[own])).content
    version.refresh_from_db()
    assert version.token_stats == {} and Dataset.objects.count() == 1 and len(stored_files(media_root)) == 1


def test_an_anonymous_visitor_is_sent_to_log_in(client, alice, alice_project):
    version = import_dataset(alice_project, alice, "d", io.BytesIO(jsonl(chat_row("hi"))))
    for url in [
        reverse("dataset_list", args=[alice_project.slug]),
        version.get_absolute_url(),
        reverse("dataset_export", args=[alice_project.slug, version.dataset_id, 1]),
    ]:
        r = client.get(url)
        assert r.status_code == 302 and r.url.startswith(reverse("login")), url


def test_an_action_error_is_not_a_rejection(alice, alice_project):
    with pytest.raises(ActionError, match="needs a name"):
        import_dataset(alice_project, alice, "  ", io.BytesIO(b"hi\n"))


# --- a new user's first hour ------------------------------------------------------


def test_a_derived_version_shows_the_source_lines_of_the_rows_it_came_from(
    alice_client, alice, alice_project
):
    upload = import_dataset(
        alice_project, alice, "q", io.BytesIO(b"first\n\nsecond\nthird\n"), filename="q.txt", eval_percent=0
    )
    lines = dict(upload.rows.values_list("index", "line"))
    assert lines == {0: 1, 1: 3, 2: 4}  # the blank line 2 is skipped
    # the teacher answers rows 2 and 0 (parent index, messages), in that order
    answered = [
        (i, [*upload.rows.get(index=i).messages, {"role": "assistant", "content": f"answer {i}"}])
        for i in (2, 0)
    ]
    teacher = dataset_actions.derive_version(upload, alice, answered, kind=DatasetVersion.TEACHER)
    assert list(teacher.rows.order_by("index").values_list("line", flat=True)) == [4, 1]
    body = alice_client.get(teacher.get_absolute_url()).content.decode()
    assert re.findall(r"#\d+ · \w+ · line \d+", body) == ["#1 · train · line 4", "#2 · train · line 1"]
    # a review of the teacher's answers keeps the upload's lines too
    reviewed = review_version(teacher, alice, {0: "a better answer"}, set())
    assert list(reviewed.rows.order_by("index").values_list("line", flat=True)) == [4, 1]


def test_a_refused_review_keeps_what_was_typed_and_ticked(alice_client, alice, answered):
    url = reverse("dataset_review", args=[answered.dataset.project.slug, answered.dataset_id, 1])
    r = alice_client.post(url, {"answer_0": "  ", "answer_1": "a much better answer", "drop": ["3"]})
    body = r.content.decode()
    assert r.status_code == 400 and "An answer cannot be empty" in body and "Nothing was saved" in body
    assert '<textarea name="answer_1" rows="4">\na much better answer</textarea>' in body
    assert 'name="answer_0" rows="4" aria-invalid="true">\n  </textarea>' in body
    assert 'value="3" checked' in body and 'value="2" checked' not in body
    assert answered.dataset.versions.count() == 1


# --- large imports: a job, short transactions, a staging version ------------------


def staged(project, user, data: bytes, name: str = "big") -> DatasetVersion:
    path = dataset_actions.store_upload(io.BytesIO(data))
    return dataset_actions.stage_import(project, user, name, path, filename=f"{name}.jsonl")


def import_job(version: DatasetVersion):
    from jobs.signals import queue_dataset_import

    return queue_dataset_import(version, None)


def test_a_large_upload_answers_at_once_and_imports_as_a_job(
    alice_client, alice, alice_project, media_root, settings
):
    from jobs.forms import AbsorbForm
    from jobs.lifecycle import execute
    from jobs.models import Job

    settings.DATASET_SYNC_IMPORT_BYTES = 10_000
    r = upload(alice_client, alice_project, big_chat(3000), "big.jsonl", name="big")
    job = Job.objects.get(kind="dataset-import")
    assert r.status_code == 302 and r["Location"] == job.get_absolute_url()
    assert job.status == Job.QUEUED and not DatasetRow.objects.exists()  # the request only stored the file
    staging = DatasetVersion.all_objects.get()
    assert staging.state == DatasetVersion.IMPORTING and job.output_dataset_id == staging.pk
    # invisible: no list, picker, page or export shows it
    assert not DatasetVersion.objects.exists() and Dataset.objects.get().latest is None
    page = alice_client.get(reverse("dataset_list", args=[alice_project.slug])).content.decode()
    assert "importing" in page and f'href="/p/alpha/datasets/{staging.dataset_id}/"' not in page
    assert (
        alice_client.get(
            reverse("dataset_export", args=[alice_project.slug, staging.dataset_id, 1])
        ).status_code
        == 404
    )
    assert not AbsorbForm(alice_project).fields["dataset_version"].queryset.exists()
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert "Imported as" not in page and "Teacher answers" not in page

    assert execute(job.pk, "test-worker") == []
    job.refresh_from_db()
    version = DatasetVersion.objects.get()
    assert job.status == Job.SUCCEEDED and job.output_dataset_id == version.pk == staging.pk
    assert version.row_count == 3000 and version.eval_count == 300 and job.percent == 100
    assert job.progress["metrics"]["rows"] == 3000 and job.progress["unit"] == "bytes"
    assert stored_files(media_root) == [Path(version.file).name]
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert f'Imported as <a href="{version.get_absolute_url()}">' in page


def test_a_rejected_import_job_says_why_and_leaves_nothing(alice, alice_project, media_root):
    from jobs.lifecycle import execute
    from jobs.models import Job

    job = import_job(staged(alice_project, alice, big_chat(5000, bad_line=4500)))
    execute(job.pk, "test-worker")
    job.refresh_from_db()
    assert (
        job.status == Job.FAILED
        and "line 4500: invalid JSON" in job.error
        and "nothing was stored" in job.error
    )
    assert_nothing_stored(media_root)
    assert not DatasetVersion.all_objects.exists() and not Dataset.objects.exists()


def test_cancelling_an_import_leaves_nothing(alice, alice_project, media_root):
    from jobs.lifecycle import ProgressWriter
    from jobs.models import Job
    from jobs.registry import JobCancelled
    from jobs.runners.dataset_import import DatasetImportRunner

    # queued: the job ends at once and its staging version goes with it
    job = import_job(staged(alice_project, alice, big_chat(100)))
    assert job.request_cancel() and job.status == Job.CANCELLED
    assert_nothing_stored(media_root)
    assert not DatasetVersion.all_objects.exists() and not Dataset.objects.exists()
    # running: it stops after the batch it is storing, and deletes the rows stored so far
    job = import_job(staged(alice_project, alice, big_chat(5000)))
    assert job.claim("test-worker") and job.request_cancel() and job.status == Job.RUNNING
    with pytest.raises(JobCancelled, match=f"stopped after {dataset_actions.ROW_BATCH:,} rows"):
        DatasetImportRunner(job, ProgressWriter(job)).run()
    assert job.mark_cancelled()
    assert_nothing_stored(media_root)
    assert not DatasetVersion.all_objects.exists() and not Dataset.objects.exists()


def test_a_new_version_of_a_dataset_stays_invisible_while_it_imports(alice, alice_project, media_root):
    first = import_dataset(alice_project, alice, "big", io.BytesIO(big_chat(10)))
    staging = staged(alice_project, alice, big_chat(20))
    assert staging.dataset_id == first.dataset_id and staging.number == 2
    assert first.dataset.latest == first and list(first.dataset.versions.all()) == [first]
    # a review edit made meanwhile takes the next number, not the staging one
    derived = dataset_actions.derive_version(first, alice, [(r.index, r.messages) for r in first.rows.all()])
    assert derived.number == 3
    version = dataset_actions.run_import(staging)
    assert version.number == 2 and version.row_count == 20
    assert [v.number for v in first.dataset.versions.all()] == [3, 2, 1]


@pytest.mark.django_db(transaction=True)
def test_another_projects_writes_go_on_while_a_large_import_runs(
    alice, bob, alice_project, bob_project, media_root
):
    """On SQLite the write lock is the whole file: an import that held one
    transaction made every other save wait for it (or fail after 30 s)."""
    import threading
    import time

    from django.db import connection

    from jobs.lifecycle import execute
    from jobs.models import Job
    from workbench.actions.prompts import save_prompt

    job = import_job(staged(alice_project, alice, big_chat(40_000)))
    running = threading.Event()
    done = threading.Event()
    import_span: list[float] = []
    writes: list[tuple[float, float]] = []

    def run_import() -> None:
        try:
            started = time.monotonic()
            running.set()
            execute(job.pk, "test-worker")
            import_span.extend([started, time.monotonic()])
        finally:
            done.set()
            connection.close()

    def write() -> None:
        try:
            running.wait(10)
            n = 0
            while not done.is_set():
                began = time.monotonic()
                save_prompt(bob_project, bob, f"p{n}", f"Version {n}.")
                writes.append((began, time.monotonic()))
                n += 1
                time.sleep(0.05)
        finally:
            connection.close()

    threads = [threading.Thread(target=run_import), threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED and DatasetVersion.objects.get().row_count == 40_000
    start, end = import_span
    during = [(b, e) for b, e in writes if e < end]
    longest = max(e - b for b, e in writes)
    # every save answered quickly while the import ran, not once it was over
    assert len(during) >= 3, (len(writes), end - start)
    assert longest < max(2.0, (end - start) / 3), (longest, end - start)
