"""Hostile uploads and forms of the dataset pages: an upload stops at the limit
(Content-Length first, then the bytes as they arrive) having written no more
than the limit; out-of-range seeds and ids are a 4xx that says what was
wrong, never a 500; a one-object JSON file names the key to load."""

import io
import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart
from django.urls import reverse

from workbench.actions import ActionError
from workbench.actions.datasets import derive_version, import_dataset
from workbench.models import Dataset, DatasetRow, DatasetVersion

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "files"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return settings.MEDIA_ROOT


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def nothing_stored(root: Path) -> bool:
    return (
        not files_under(root)
        and not DatasetVersion.all_objects.exists()
        and not DatasetRow.objects.exists()
        and not Dataset.objects.exists()
    )


def chat_lines(n: int) -> bytes:
    return b"".join(
        json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "x" * 60}]}).encode() + b"\n"
        for i in range(n)
    )


class Body:
    """A request body that records how much of it was read, and the most
    bytes the upload directory held at any read."""

    def __init__(self, data: bytes, watch: Path) -> None:
        self.src, self.watch = io.BytesIO(data), watch
        self.bytes_read, self.most_on_disk = 0, 0

    def read(self, size: int = -1) -> bytes:
        self.most_on_disk = max(self.most_on_disk, sum(p.stat().st_size for p in files_under(self.watch)))
        data = self.src.read(size)
        self.bytes_read += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        return self.src.readline(size)


def post_raw(client, project, body: Body, content_length: int):
    return client.generic(
        "POST",
        reverse("dataset_upload", args=[project.slug]),
        **{"wsgi.input": body, "CONTENT_LENGTH": str(content_length), "CONTENT_TYPE": MULTIPART_CONTENT},
    )


# --- item 5: uploads stop at the limit ------------------------------------------


def test_it_refuses_a_content_length_over_the_limit_before_reading_the_body(
    alice_client, alice_project, media_root, settings
):
    settings.UPLOAD_MAX_BYTES = 1024 * 1024
    body = Body(
        encode_multipart(BOUNDARY, {"file": SimpleUploadedFile("big.jsonl", chat_lines(10))}), media_root
    )
    r = post_raw(alice_client, alice_project, body, 400 * 1024 * 1024)
    assert r.status_code == 413
    assert (
        "The upload is 400.0\xa0MB; the limit is 1.0\xa0MB. Nothing was read or stored." in r.content.decode()
    )
    assert body.bytes_read == 0
    assert nothing_stored(media_root)


def test_it_stops_a_file_at_the_limit_as_its_bytes_arrive(alice_client, alice_project, media_root, settings):
    """The Content-Length passes (it is within the room left for the other
    fields), the file does not: no more than the limit ever reaches the disk."""
    settings.UPLOAD_MAX_BYTES = 100_000
    data = encode_multipart(
        BOUNDARY, {"name": "big", "file": SimpleUploadedFile("big.jsonl", chat_lines(1000))}
    )
    assert 100_000 < len(data) < 100_000 + 64 * 1024 and len(chat_lines(1000)) > 100_000
    body = Body(data, media_root)
    r = post_raw(alice_client, alice_project, body, len(data))
    assert r.status_code == 413
    assert (
        "big.jsonl is larger than the 97.7\xa0KB limit; the upload was stopped there and nothing was stored."
        in r.content.decode()
    )
    assert 0 < body.most_on_disk <= 100_000
    assert body.bytes_read <= 100_000 + 2 * 64 * 1024  # read in 64 KiB chunks, none after the stop
    assert nothing_stored(media_root)


def test_a_file_under_the_limit_goes_through_the_same_handlers(
    alice_client, alice_project, media_root, settings
):
    settings.UPLOAD_MAX_BYTES = 100_000
    r = alice_client.post(
        reverse("dataset_upload", args=[alice_project.slug]),
        {"name": "ok", "file": SimpleUploadedFile("ok.jsonl", chat_lines(50))},
    )
    assert r.status_code == 302
    version = DatasetVersion.objects.get()
    assert version.row_count == 50
    assert [p.name for p in files_under(media_root)] == [Path(version.file).name]  # no temporary file left


def test_a_refused_upload_needs_a_login_first(client, alice_project, media_root):
    body = Body(b"x" * 10, media_root)
    r = post_raw(client, alice_project, body, 400 * 1024 * 1024)
    assert r.status_code == 302 and "/login/" in r["Location"] and body.bytes_read == 0


def test_a_prompt_upload_is_refused_from_its_content_length_too(
    alice_client, alice, alice_project, media_root, settings
):
    from workbench.actions.prompts import create_prompt

    prompt = create_prompt(alice_project, alice, "p", "Be brief.", None, "")
    settings.PROMPT_MAX_BYTES = 4003
    body = Body(encode_multipart(BOUNDARY, {"file": SimpleUploadedFile("p.md", b"x" * 10)}), media_root)
    for url in (
        reverse("prompt_create", args=[alice_project.slug]),
        reverse("prompt_save", args=[alice_project.slug, prompt.prompt_id]),
    ):
        r = alice_client.generic(
            "POST",
            url,
            **{
                "wsgi.input": body,
                "CONTENT_LENGTH": str(50 * 1024 * 1024),
                "CONTENT_TYPE": MULTIPART_CONTENT,
            },
        )
        assert (
            r.status_code == 413
            and "the limit is 3.9\xa0KB. Nothing was read or stored." in r.content.decode()
        )
    assert body.bytes_read == 0 and prompt.prompt.versions.count() == 1


@pytest.mark.parametrize("large", [False, True])
def test_posting_the_upload_form_twice_stores_one_version(
    alice_client, alice_project, media_root, settings, large
):
    """Back + resubmit (or a double click) of one rendered form: one version, one import job."""
    from jobs.models import Job

    settings.DATASET_SYNC_IMPORT_BYTES = 1_000 if large else 10_000_000
    page = alice_client.get(reverse("dataset_list", args=[alice_project.slug])).content.decode()
    token = page.split('name="form_token" value="')[1].split('"')[0]
    url = reverse("dataset_upload", args=[alice_project.slug])
    first = alice_client.post(
        url, {"name": "qs", "form_token": token, "file": SimpleUploadedFile("qs.jsonl", chat_lines(50))}
    )
    again = alice_client.post(
        url,
        {"name": "qs", "form_token": token, "file": SimpleUploadedFile("qs.jsonl", chat_lines(50))},
        follow=True,
    )
    assert first.status_code == 302 and again.redirect_chain[0][0] == first["Location"]
    assert "This upload was already submitted: it made qs@1." in again.content.decode()
    assert DatasetVersion.all_objects.count() == 1
    assert Job.objects.filter(kind="dataset-import").count() == (1 if large else 0)
    assert len(files_under(media_root)) == 1  # the second file was not kept
    # a new rendering of the form has a new token: a real second upload is a new version
    other = alice_client.get(reverse("dataset_list", args=[alice_project.slug])).content.decode()
    assert other.split('name="form_token" value="')[1].split('"')[0] != token


# --- item 9: out-of-range numbers are form errors ------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**31), "99999999999999999999"])
def test_a_split_seed_out_of_range_is_a_form_error(alice_client, alice_project, media_root, seed):
    r = alice_client.post(
        reverse("dataset_upload", args=[alice_project.slug]),
        {"name": "x", "seed": seed, "file": SimpleUploadedFile("x.txt", b"a\nb\n")},
    )
    assert r.status_code == 400
    assert "The split seed must be from 0 to 2,147,483,647." in r.content.decode()
    assert nothing_stored(media_root)


def test_the_action_refuses_a_seed_out_of_range(alice, alice_project, media_root):
    with pytest.raises(ActionError, match="split seed must be a whole number from 0 to 2,147,483,647"):
        import_dataset(alice_project, alice, "x", io.BytesIO(b"a\n"), seed=2**40)
    assert nothing_stored(media_root)


@pytest.fixture
def answered(alice, alice_project):
    upload = import_dataset(alice_project, alice, "q", io.BytesIO(b"q1\nq2\n"), eval_percent=0)
    rows = [
        (r.index, [*r.messages, {"role": "assistant", "content": "an answer"}]) for r in upload.rows.all()
    ]
    return derive_version(upload, alice, rows, kind=DatasetVersion.TEACHER)


@pytest.mark.parametrize(
    "field",
    [
        {"answer_99999999999999999999": "edited"},
        {"drop": "99999999999999999999"},
        {"drop": "abc"},
        {"answer_abc": "edited"},
        {"answer_\u00b2": "edited"},  # isdigit() says yes, int() says no
        {"drop": "-1"},
    ],
)
def test_review_edits_with_bad_row_ids_are_refused(alice_client, alice_project, answered, field):
    url = reverse("dataset_review", args=[alice_project.slug, answered.dataset_id, answered.number])
    r = alice_client.post(url, {"answer_0": "an edit", **field})
    assert r.status_code == 400
    assert "is not a row of this version." in r.content.decode() and "Nothing was saved" in r.content.decode()
    assert DatasetVersion.objects.count() == 2  # no new version


# --- item 15: a one-object file names its key; the form takes it -----------------


def test_a_one_object_file_is_loaded_with_its_records_key(alice_client, alice_project, media_root):
    data = json.dumps(
        {
            "version": 2,
            "qa": [{"question": "Hi?", "answer": "Hello."}, {"question": "Bye?", "answer": "Goodbye."}],
        }
    ).encode()
    url = reverse("dataset_upload", args=[alice_project.slug])
    r = alice_client.post(url, {"name": "qa", "file": SimpleUploadedFile("qa.json", data)})
    body = r.content.decode()
    assert r.status_code == 400 and "qa.json was not stored" in body and '"qa"' in body
    assert 'name="records_key"' in body and 'aria-invalid="true" autofocus' in body
    assert nothing_stored(media_root)
    r = alice_client.post(
        url,
        {
            "name": "qa",
            "records_key": "qa",
            "query_column": "question",
            "answer_column": "answer",
            "file": SimpleUploadedFile("qa.json", data),
        },
    )
    assert r.status_code == 302
    version = DatasetVersion.objects.get()
    assert version.row_count == 2 and version.meta["records_key"] == "qa"
    assert list(version.rows.order_by("index").values_list("messages", flat=True))[0] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_the_command_takes_a_records_key(alice_project, media_root, tmp_path):
    from django.core.management import call_command

    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"qa": [{"messages": [{"role": "user", "content": "Hi?"}]}]}))
    out = io.StringIO()
    call_command(
        "import_dataset",
        str(path),
        "--project",
        alice_project.slug,
        "--name",
        "qa",
        "--records-key",
        "qa",
        stdout=out,
        stderr=io.StringIO(),
    )
    assert "1 rows" in out.getvalue()
    assert DatasetVersion.objects.get().row_count == 1
