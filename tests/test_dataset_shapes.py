"""Dataset shapes people download and upload as they are: preference data,
multimodal and tool-calling rows, self-instruct seed tasks, extra fields,
other field names. Each either loads with what it means or fails naming the
field, its format and what to do instead; never silent data loss. Through the
action, the command and the upload page."""

import io
import json
import shutil
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from workbench.actions import ActionError
from workbench.actions.datasets import MAX_SKIPPED_KEPT, DatasetRejected, import_dataset
from workbench.models import Dataset, DatasetRow, DatasetVersion

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
TOOLS = "tool calls need a tool-capable chat template; this workbench's base models have none"


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "files"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return settings.MEDIA_ROOT


def load(project, user, fixture: str, **options: object) -> DatasetVersion:
    with (FIXTURES / fixture).open("rb") as f:
        return import_dataset(project, user, "ds", f, filename=fixture, **options)


def rejected(project, user, fixture: str, **options: object) -> list[str]:
    with pytest.raises(DatasetRejected) as exc:
        load(project, user, fixture, **options)
    return [str(e) for e in exc.value.errors]


def command(project, tmp_path: Path, fixture: str, *args: str) -> tuple[int, str, str]:
    path = tmp_path / fixture
    shutil.copy(FIXTURES / fixture, path)
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(
            "import_dataset",
            str(path),
            "--project",
            project.slug,
            "--name",
            "ds",
            *args,
            stdout=out,
            stderr=err,
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def upload(client, project, fixture: str, **fields: object):
    body = {"file": SimpleUploadedFile(fixture, (FIXTURES / fixture).read_bytes()), "name": "ds", **fields}
    return client.post(reverse("dataset_upload", args=[project.slug]), body)


def assert_nothing_stored(media_root: Path) -> None:
    assert not Dataset.objects.exists()
    assert not DatasetVersion.objects.exists()
    assert not DatasetRow.objects.exists()
    folder = media_root / "datasets"
    assert not folder.exists() or list(folder.iterdir()) == []


def stored_messages(version: DatasetVersion) -> list[list[dict[str, str]]]:
    return list(version.rows.order_by("index").values_list("messages", flat=True))


def qa(q: str, a: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])


# --- shapes that would lose meaning fail, naming the field and what to do ------

REFUSED = [
    (
        "kto.jsonl",
        "line 1: label: KTO preference data: label false marks an undesirable answer; the workbench "
        "trains on answers it should imitate — remove the rows labelled false or drop the label field",
    ),
    (
        "multimodal_chat.json",
        "line 2 (record 1): images: multimodal rows: the base models here read text only",
    ),
    ("multimodal_sharegpt.jsonl", "line 1: image: multimodal rows: the base models here read text only"),
    (
        "dpo.jsonl",
        "line 1: chosen/rejected: DPO preference pairs; the workbench trains on one answer per query — "
        'turn on "use only the chosen answers"',
    ),
    ("dpo_conversational.jsonl", 'turn on "use only the chosen answers"'),
    ("openai_tools.jsonl", f"line 1: tools: {TOOLS}"),
    ("openai_tool_calls_only.jsonl", f"line 1: messages[1].tool_calls: {TOOLS}"),
    ("glaive.jsonl", f"line 1: chat: glaive-style function calling: {TOOLS}"),
    # Worded by engines.protocol, which the gateway shares.
    ("multipart_image.jsonl", "line 1: messages[0].content[1] must be a text part"),
    (
        "gsm8k.jsonl",
        "line 1: missing field 'messages' (found 'question', 'answer'); supported formats: chat "
        "(messages), alpaca (instruction/input/output), sharegpt (conversations), completion "
        '(prompt/completion) — choose the format, or name the fields: query column "question", '
        'answer column "answer"',
    ),
    (
        "single_object.json",
        'the file is one JSON object; its records are under the key "data" (2 items): load it '
        'with records key "data"',
    ),
]


@pytest.mark.parametrize("fixture, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_it_refuses_rows_it_would_misread_with_the_action(alice, alice_project, media_root, fixture, message):
    errors = rejected(alice_project, alice, fixture)
    assert any(message in e for e in errors), errors
    assert not any("expected a string, got null" in e for e in errors)
    assert_nothing_stored(media_root)


@pytest.mark.parametrize("fixture, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_it_refuses_rows_it_would_misread_with_the_command(
    alice_project, media_root, tmp_path, fixture, message
):
    code, _, err = command(alice_project, tmp_path, fixture)
    assert code == 1 and message in err and "nothing was stored" in err
    assert_nothing_stored(media_root)


def test_it_shows_the_refusal_on_the_upload_page(alice_client, alice_project, media_root):
    r = upload(alice_client, alice_project, "kto.jsonl")
    assert r.status_code == 400 and b"KTO preference data" in r.content
    r = upload(alice_client, alice_project, "single_object.json")
    assert r.status_code == 400 and b"the file is one JSON object; its records are under the key" in r.content
    assert b'name="use_chosen"' in r.content and b'name="skip_bad"' in r.content
    assert_nothing_stored(media_root)


# --- shapes that load -----------------------------------------------------------


def test_it_expands_self_instruct_seed_tasks_into_one_row_per_instance(alice, alice_project, tmp_path):
    version = load(alice_project, alice, "self_instruct_seed.jsonl")
    assert stored_messages(version) == [
        qa(
            "Is there anything I can eat for a breakfast that doesn't include eggs?",
            "Yes, oatmeal with fruit.",
        ),
        qa("Give the antonym of the word.\n\nhot", "cold"),
        qa("Give the antonym of the word.\n\nup", "down"),
    ]
    assert "each instance became a row" in version.meta["notes"][0]
    assert version.meta["kept_fields"] == ["id", "name", "is_classification"]
    assert version.rows.get(index=2).extra == {
        "id": "seed_task_1",
        "name": "antonym",
        "is_classification": False,
    }
    code, out, _ = command(alice_project, tmp_path, "self_instruct_seed.jsonl")
    assert code == 0 and "3 rows (alpaca)" in out and "each instance became a row" in out


def test_it_loads_the_chosen_answers_of_dpo_pairs_when_asked(alice, alice_client, alice_project, tmp_path):
    version = load(alice_project, alice, "dpo.jsonl", use_chosen=True)
    assert stored_messages(version) == [qa("What is the capital of France?", "Paris."), qa("2 + 2?", "4")]
    assert "rejected answers were dropped" in version.meta["notes"][0]
    conversational = load(alice_project, alice, "dpo_conversational.jsonl", use_chosen=True)
    assert stored_messages(conversational) == [qa("Say hi.", "Hi!")]
    code, out, _ = command(alice_project, tmp_path, "dpo.jsonl", "--use-chosen")
    assert code == 0 and "2 rows" in out and "rejected answers were dropped" in out
    r = upload(alice_client, alice_project, "dpo.jsonl", use_chosen="on")
    assert r.status_code == 302
    page = alice_client.get(r.url)
    assert b"the rejected answers were dropped" in page.content


def test_it_keeps_fields_that_change_nothing_and_lists_them(alice, alice_client, alice_project, tmp_path):
    version = load(alice_project, alice, "extra_fields.jsonl")
    assert stored_messages(version) == [
        qa("Reset password?", "Use the link."),
        qa("Invoice?", "Under Billing."),
    ]
    assert [r.extra for r in version.rows.order_by("index")] == [
        {"id": "r1", "source": "helpdesk"},
        {"id": "r2", "source": "helpdesk"},
    ]
    assert version.meta["kept_fields"] == ["id", "source"]
    code, out, _ = command(alice_project, tmp_path, "extra_fields.jsonl")
    assert code == 0 and "kept fields: id, source" in out
    r = upload(alice_client, alice_project, "extra_fields.jsonl")
    assert b"kept fields: id, source" in alice_client.get(r.url).content


def test_it_detects_openai_prompt_completion_jsonl(alice, alice_project, tmp_path):
    version = load(alice_project, alice, "openai_completion.jsonl")
    assert version.format == "completion"
    assert stored_messages(version) == [
        qa("Reset password? ->", " Use the link on the login page.\n"),
        qa("Invoice? ->", " Under Billing.\n"),
    ]
    code, out, _ = command(alice_project, tmp_path, "openai_completion.jsonl")
    assert code == 0 and "2 rows (completion)" in out


def test_it_reads_named_query_and_answer_fields_of_json(alice, alice_client, alice_project, tmp_path):
    version = load(alice_project, alice, "gsm8k.jsonl", query_column="question", answer_column="answer")
    assert version.format == "fields" and version.row_count == 2
    assert stored_messages(version)[0] == qa(
        "Natalia sold 48 clips in April and half as many in May. How many in all?", "48 + 24 = 72\n#### 72"
    )
    code, out, _ = command(
        alice_project, tmp_path, "gsm8k.jsonl", "--query-column", "question", "--answer-column", "answer"
    )
    assert code == 0 and "2 rows (fields)" in out
    r = upload(alice_client, alice_project, "gsm8k.jsonl", query_column="question", answer_column="answer")
    assert r.status_code == 302
    with pytest.raises(ActionError, match="needs the name of the query field"):
        load(alice_project, alice, "gsm8k.jsonl", fmt="fields")


def test_it_joins_text_parts_and_drops_an_empty_last_answer(alice, alice_project, tmp_path):
    version = load(alice_project, alice, "multipart.jsonl")
    assert stored_messages(version) == [qa("Part one.\nPart two.", "Answer.")]
    version = load(alice_project, alice, "empty_final_answer.jsonl")
    assert stored_messages(version) == [qa("Reset password?"), qa("Invoice?")]
    code, out, _ = command(alice_project, tmp_path, "empty_final_answer.jsonl")
    assert code == 0 and "2 rows (chat)" in out


# --- skip-bad -----------------------------------------------------------------------


def test_skip_bad_stores_the_good_rows_and_lists_the_rest(alice, alice_client, alice_project, tmp_path):
    with pytest.raises(DatasetRejected):
        load(alice_project, alice, "mixed_bad.jsonl")  # all or nothing stays the default
    version = load(alice_project, alice, "mixed_bad.jsonl", skip_bad=True)
    assert stored_messages(version) == [qa("Good one?", "Yes."), qa("Good two?")]
    assert [r.line for r in version.rows.order_by("index")] == [1, 4]
    assert version.meta["skipped"] == {
        "count": 2,
        "rows": [
            "line 2: invalid JSON: Expecting value (column 1)",
            "line 3: no user turn (a row must contain at least one user message)",
        ],
    }
    code, out, err = command(alice_project, tmp_path, "mixed_bad.jsonl", "--skip-bad")
    assert code == 0 and "2 rows" in out
    assert "skipped line 2: invalid JSON" in err and "skipped 2 bad row(s)" in err
    r = upload(alice_client, alice_project, "mixed_bad.jsonl", skip_bad="on")
    assert r.status_code == 302
    page = alice_client.get(r.url).content
    assert b"skipped 2 bad rows" in page and b"line 3: no user turn" in page


def test_skip_bad_keeps_the_first_thousand_reasons_and_the_count(alice, alice_project):
    good = json.dumps({"messages": qa("q", "a")}).encode() + b"\n"
    data = good + b"not json\n" * (MAX_SKIPPED_KEPT + 5)
    version = import_dataset(alice_project, alice, "ds", io.BytesIO(data), filename="x.jsonl", skip_bad=True)
    assert version.row_count == 1
    assert version.meta["skipped"]["count"] == MAX_SKIPPED_KEPT + 5
    assert len(version.meta["skipped"]["rows"]) == MAX_SKIPPED_KEPT


def test_skip_bad_still_fails_a_file_with_no_good_row(alice, alice_project, media_root, tmp_path):
    errors = rejected(alice_project, alice, "all_bad.jsonl", skip_bad=True)
    assert errors[0] == "line 1: invalid JSON: Expecting value (column 1)"
    code, _, err = command(alice_project, tmp_path, "all_bad.jsonl", "--skip-bad")
    assert code == 1 and "nothing was stored" in err
    # and a problem that stops parsing (a CSV header) is not a bad row to skip
    (tmp_path / "t.csv").write_bytes(b"a,b\n1,2\n")
    with pytest.raises(DatasetRejected) as exc, (tmp_path / "t.csv").open("rb") as f:
        import_dataset(alice_project, alice, "ds", f, filename="t.csv", skip_bad=True)
    assert "as the query column" in str(exc.value.errors[-1])
    assert_nothing_stored(media_root)


# --- warnings -------------------------------------------------------------------------


def test_lines_format_on_jsonl_warns_that_lines_are_stored_as_raw_json(
    alice, alice_client, alice_project, tmp_path
):
    version = load(alice_project, alice, "extra_fields.jsonl", fmt="lines")
    assert version.row_count == 2 and "stored as raw JSON text" in version.meta["warnings"][0]
    code, _, err = command(alice_project, tmp_path, "extra_fields.jsonl", "--format", "lines")
    assert code == 0 and "warning: 2 of the first 2 lines are JSON objects" in err
    r = upload(alice_client, alice_project, "extra_fields.jsonl", format="lines")
    assert r.status_code == 302
    assert b"stored as raw JSON text" in alice_client.get(r.url).content
