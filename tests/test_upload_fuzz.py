"""Any bytes a user uploads get a clear message, never a 500: random and
truncated files of every format, with and without a format override, and
old-Mac line endings."""

import io
import json
import random

import pytest
from django.urls import reverse

from engines import formats
from workbench.actions import ActionError
from workbench.actions.datasets import DatasetRejected, import_dataset
from workbench.models import DatasetRow, DatasetVersion

pytestmark = pytest.mark.django_db

SAMPLES = {
    "chat": b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i} \xe9"},
                    {"role": "assistant", "content": f"a{i}"},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(6)
    ),
    "alpaca": json.dumps(
        [{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(6)]
    ).encode(),
    "sharegpt": b"".join(
        json.dumps(
            {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        ).encode()
        + b"\n"
        for i in range(6)
    ),
    "csv": b"query,answer\n" + b"".join(f'"q{i}, with comma","a{i}"\n'.encode() for i in range(6)),
    "lines": b"".join(f"question number {i}?\n".encode() for i in range(6)),
}


def attempt(project, user, data: bytes, name: str, fmt: str = "auto") -> str:
    """'stored' or the user-facing message; anything else raised is a bug."""
    before = DatasetVersion.objects.count(), DatasetRow.objects.count()
    try:
        import_dataset(project, user, "fuzz", io.BytesIO(data), filename=name, fmt=fmt)
    except DatasetRejected as rej:
        assert (DatasetVersion.objects.count(), DatasetRow.objects.count()) == before  # nothing half-written
        assert rej.errors and all(str(e) for e in rej.errors)
        return "; ".join(str(e) for e in rej.errors[:3])
    except ActionError as exc:
        assert (DatasetVersion.objects.count(), DatasetRow.objects.count()) == before
        assert str(exc)
        return str(exc)
    return "stored"


def test_random_and_truncated_bytes_in_every_format_get_a_message(alice, alice_project):
    rng = random.Random(8)
    cases = [
        (bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 300, 3000]))), f"blob{i}.bin")
        for i in range(25)
    ]
    cases.append((bytes(rng.randrange(256) for _ in range(3072)), "setup.exe"))
    for fmt, sample in SAMPLES.items():
        ext = {"chat": "jsonl", "alpaca": "json", "sharegpt": "jsonl", "csv": "csv", "lines": "txt"}[fmt]
        for cut in sorted(
            {1, 2, len(sample) // 3, len(sample) // 2, len(sample) - 3, *rng.sample(range(1, len(sample)), 6)}
        ):
            cases.append((sample[:cut], f"cut{cut}.{ext}"))
        flipped = bytearray(sample)
        for _ in range(5):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        cases.append((bytes(flipped), f"flipped.{ext}"))
    for data, name in cases:
        for fmt in ("auto", *formats.FORMATS):
            message = attempt(alice_project, alice, data, name, fmt)
            assert message, (name, fmt)


def test_a_binary_file_is_refused_with_a_clear_message_on_the_page(alice_client, alice_project):
    rng = random.Random(3)
    blob = io.BytesIO(bytes(rng.randrange(256) for _ in range(3072)))
    blob.name = "setup.exe"
    response = alice_client.post(reverse("dataset_upload", args=[alice_project.slug]), {"file": blob})
    assert response.status_code == 400
    assert b"Server Error" not in response.content
    assert b"binary" in response.content or b"UTF-8" in response.content


@pytest.mark.parametrize("newline", [b"\r", b"\r\n", b"\n"])
def test_every_line_ending_gives_the_same_rows(alice, alice_project, newline):
    lines = import_dataset(
        alice_project,
        alice,
        f"q{len(newline)}{newline!r}",
        io.BytesIO(newline.join([b"How do I reset it?", b"Where is my parcel?"]) + newline),
        filename="q.txt",
    )
    assert [r.messages[0]["content"] for r in lines.rows.order_by("index")] == [
        "How do I reset it?",
        "Where is my parcel?",
    ]
    table = import_dataset(
        alice_project,
        alice,
        f"c{len(newline)}{newline!r}",
        io.BytesIO(newline.join([b"query,answer", b"q1,a1", b'"q2, long",a2']) + newline),
        filename="q.csv",
    )
    assert [(r.messages[0]["content"], r.messages[1]["content"]) for r in table.rows.order_by("index")] == [
        ("q1", "a1"),
        ("q2, long", "a2"),
    ]


def test_an_empty_file_says_only_that_it_is_empty(alice, alice_project, alice_client):
    message = attempt(alice_project, alice, b"", "empty.jsonl")
    assert "empty" in message and "bad row" not in message
    blob = io.BytesIO(b"")
    blob.name = "empty.txt"
    page = alice_client.post(
        reverse("dataset_upload", args=[alice_project.slug]), {"file": blob}
    ).content.decode()
    assert "empty" in page and "1 bad row" not in page and "Fix them" not in page
