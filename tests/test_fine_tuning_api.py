"""The OpenAI fine-tuning API (/v1/files, /v1/fine_tuning/jobs), driven by
the real `openai` package against a live server. The whole flow runs on a
real Celery worker and the hf engine with the tiny model: upload, create,
follow the events until it succeeds, chat with the fine-tuned model and its
checkpoints; the same for an absorb. Refusals are checked in the shapes the
SDK raises, and another project's key finds nothing."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from jobs.models import Job
from serving.actions import create_api_key
from tests.test_gateway import sdk
from workbench.models import DatasetRow, DatasetVersion, Variant

pytestmark = [pytest.mark.django_db(transaction=True)]

QUESTIONS = [
    "Where is my parcel?",
    "How do I change my address?",
    "Can I return an item?",
    "When do you deliver?",
    "How much is shipping?",
    "Do you ship abroad?",
]


def chat_jsonl(questions: list[str], answer: str = "Parcelly here: on its way. Cheers, Ada") -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
        for q in questions
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def keys(alice, alice_project, bob, bob_project):
    _key, raw = create_api_key(alice, alice_project, "sdk")
    _bob_key, bob_raw = create_api_key(bob, bob_project, "sdk")
    return raw, bob_raw


def test_files_upload_list_retrieve_content_and_delete(live_server, keys, alice_project):
    client = sdk(live_server, keys[0])
    data = chat_jsonl(QUESTIONS)
    made = client.files.create(file=("support.jsonl", data), purpose="fine-tune")
    assert (made.object, made.purpose, made.status, made.bytes, made.filename) == (
        "file",
        "fine-tune",
        "processed",
        len(data),
        "support.jsonl",
    )
    version = DatasetVersion.objects.get(pk=int(made.id.removeprefix("file-")))
    assert version.dataset.project == alice_project and version.row_count == len(QUESTIONS)
    assert not version.rows.filter(split=DatasetRow.EVAL).exists()  # every row trains
    assert [f.id for f in client.files.list()] == [made.id]
    assert client.files.retrieve(made.id).filename == "support.jsonl"
    assert client.files.content(made.id).read() == data
    # every format the upload page reads: a CSV of questions too
    csv = client.files.create(file=("queries.csv", b"query\nWhere is it?\nHow late?\n"), purpose="fine-tune")
    assert (client.files.retrieve(csv.id).format, DatasetVersion.objects.get(pk=csv.id[5:]).row_count) == (
        "csv",
        2,
    )
    deleted = client.files.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    assert not DatasetVersion.objects.filter(pk=version.pk).exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    assert [f.id for f in client.files.list()] == [csv.id]


def test_a_bad_file_is_an_openai_shaped_400_naming_the_line_and_stores_nothing(live_server, keys):
    client = sdk(live_server, keys[0])
    bad = (
        b'{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": [{"role": "user", "content": "cut\n'
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert err.value.status_code == 400
    assert "line 2" in err.value.message and err.value.body["param"] == "file"
    assert err.value.body["code"] == "invalid_file"
    assert not DatasetVersion.all_objects.exists()
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("ok.jsonl", chat_jsonl(QUESTIONS)), purpose="assistants")
    assert err.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("empty.jsonl", b""), purpose="fine-tune")
    assert "nothing was stored" in err.value.message
    assert not DatasetVersion.all_objects.exists()


def test_another_projects_files_and_jobs_are_not_found(live_server, keys, tiny_base, alice_client):
    alice, bob = (sdk(live_server, k) for k in keys)
    made = alice.files.create(file=("support.jsonl", chat_jsonl(QUESTIONS)), purpose="fine-tune")
    for call in (
        lambda: bob.files.retrieve(made.id),
        lambda: bob.files.content(made.id),
        lambda: bob.files.delete(made.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.files.list().data == []
    job = alice.fine_tuning.jobs.create(training_file=made.id, model="tiny-lively")
    for call in (
        lambda: bob.fine_tuning.jobs.retrieve(job.id),
        lambda: bob.fine_tuning.jobs.cancel(job.id),
        lambda: bob.fine_tuning.jobs.list_events(job.id),
        lambda: bob.fine_tuning.jobs.checkpoints.list(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.fine_tuning.jobs.list().data == []
    # the UI shows the job like any other
    page = alice_client.get(Job.objects.get().get_absolute_url())
    assert page.status_code == 200 and job.id in page.content.decode()
    # nor can bob train on alice's file
    with pytest.raises(openai.BadRequestError) as err:
        bob.fine_tuning.jobs.create(training_file=made.id, model="tiny-lively")
    assert err.value.body["param"] == "training_file"
    assert Job.objects.count() == 1
    # a job, once created, cannot be deleted from under it
    with pytest.raises(openai.APIStatusError) as err:
        alice.files.delete(made.id)
    assert err.value.status_code == 409 and job.id in err.value.message


def test_job_settings_are_checked_before_anything_runs(live_server, keys, tiny_base):
    client = sdk(live_server, keys[0])
    made = client.files.create(file=("support.jsonl", chat_jsonl(QUESTIONS)), purpose="fine-tune")
    queries = client.files.create(file=("q.txt", b"Where is it?\nHow late?\n"), purpose="fine-tune")
    refusals = [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
        ({"method": {"type": "dpo", "dpo": {}}}, "method.type"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 10**6}}}}, None),
        ({"suffix": "no spaces please"}, "suffix"),
        ({"seed": "seven"}, "seed"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations"),
        ({"model": "gpt-4o-mini"}, "model"),
        ({"training_file": "file-999999"}, "training_file"),
        ({"training_file": queries.id}, None),  # questions without answers: nothing to learn from
        ({"method": {"type": "absorb", "absorb": {}}}, "method.absorb"),
    ]
    for extra, param in refusals:
        body = {"training_file": made.id, "model": "tiny-lively", **extra}
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**body)
        assert err.value.status_code == 400, extra
        if param is not None:
            assert err.value.body["param"] == param, (extra, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.post(
            "/fine_tuning/jobs",
            body={"training_file": made.id, "model": "tiny-lively", "x": 1},
            cast_to=object,
        )
    assert "x" in err.value.message
    assert not Job.objects.exists()
    # an absorb needs held-out queries to compare the arms on
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            training_file=queries.id,
            model="tiny-lively",
            method={"type": "absorb", "absorb": {"system_prompt": "You are Ada."}},  # type: ignore[typeddict-item]
        )
    assert err.value.body["param"] == "validation_file"
    # the questions to synthesise first: a number, true / false or settings, within bounds
    for synthesis, message in (("lots", "must be true, false, a number"), (5000, "from 1 to 2000")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(
                training_file=queries.id,
                validation_file=queries.id,
                model="tiny-lively",
                method={
                    "type": "absorb",
                    "absorb": {"system_prompt": "You are Ada.", "synthesis": synthesis},
                },  # type: ignore[typeddict-item]
            )
        assert message in err.value.message, err.value.body
    assert not Job.objects.exists()


def test_unknown_routes_and_methods_are_openai_shaped(live_server, keys):
    url = f"{live_server.url}/v1"
    auth = {"Authorization": f"Bearer {keys[0]}"}
    put = httpx.put(f"{url}/files", headers=auth)
    assert put.status_code == 405 and put.json()["error"]["code"] == "method_not_allowed"
    raw = httpx.post(f"{url}/files", headers=auth, json={"purpose": "fine-tune"})
    assert raw.status_code == 400 and "multipart" in raw.json()["error"]["message"]
    assert httpx.get(f"{url}/files").status_code == 401


def wait_succeeded(client: openai.OpenAI, job_id: str, timeout: float = 600) -> tuple[object, list]:
    """Follow the job as a script would: its events until it ends."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
            seen[event.id] = event
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            assert job.status == "succeeded", (job.error, [e.message for e in seen.values()][:40])
            return job, list(seen.values())
        time.sleep(1)
    raise AssertionError(f"{job_id} did not end in {timeout} s")


@pytest.mark.slow
def test_the_whole_flow_with_the_openai_sdk(live_server, keys, alice_project, tiny_base, worker, engine):
    client = sdk(live_server, keys[0])
    train = client.files.create(file=("train.jsonl", chat_jsonl(QUESTIONS * 2)), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", chat_jsonl(QUESTIONS[:3])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=train.id,
        validation_file=valid.id,
        model="tiny-lively",
        suffix="ada",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        metadata={"team": "support"},
    )
    assert (job.status, job.fine_tuned_model, job.hyperparameters.n_epochs, job.seed) == (
        "queued",
        None,
        2,
        7,
    )
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "support"})]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []
    done, events = wait_succeeded(client, job.id)
    assert done.fine_tuned_model == f"ft:tiny-lively:{alice_project.slug}:ada:{job.id}"
    assert done.trained_tokens and done.finished_at and done.error is None
    kinds = {e.type for e in events}
    assert kinds == {"message", "metrics"}
    assert any("fine-tune done" in e.message for e in events)
    assert any(e.type == "metrics" and e.data["train_loss"] is not None for e in events)
    # pages: newest first, the cursor walks back without repeating
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first.has_more and len(first.data) == 3
    second = client.fine_tuning.jobs.list_events(job.id, limit=3, after=first.data[-1].id)
    assert not {e.id for e in first.data} & {e.id for e in second.data}
    assert [e.created_at for e in first.data] == sorted((e.created_at for e in first.data), reverse=True)

    answer = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Where is my parcel?"}],
        max_tokens=8,
    )
    assert answer.model == done.fine_tuned_model and answer.choices[0].message.content
    assert done.fine_tuned_model in {m.id for m in client.models.list()}

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.metrics.step for c in checkpoints] == sorted(
        (c.metrics.step for c in checkpoints), reverse=True
    )
    assert len(checkpoints) == 2 and checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model
    assert all(c.metrics.valid_loss is not None for c in checkpoints)
    earlier = checkpoints[1].fine_tuned_model_checkpoint
    assert earlier == f"{done.fine_tuned_model}:ckpt-step-{checkpoints[1].step_number}"
    first_epoch = client.chat.completions.create(
        model=earlier, messages=[{"role": "user", "content": "Where is my parcel?"}], max_tokens=8
    )
    assert first_epoch.model == earlier
    final = Job.objects.get(pk=int(job.id[6:])).variant
    assert Variant.objects.filter(metrics__checkpoint_of_job=final.jobs.get().pk).count() == 1

    # a fine-tune of the fine-tuned model continues from its adapter
    again = client.fine_tuning.jobs.create(training_file=train.id, model=done.fine_tuned_model)
    assert again.model == done.fine_tuned_model
    assert (
        Job.objects.get(pk=int(again.id[6:])).params["init_variant"]
        == Job.objects.get(pk=int(job.id[6:])).variant_id
    )
    cancelled = client.fine_tuning.jobs.cancel(again.id)
    assert cancelled.status == "cancelled"
    stopped = Job.objects.get(pk=int(again.id[6:]))
    assert stopped.wait(120) and stopped.status == Job.CANCELLED and stopped.variant_id is None
    assert client.fine_tuning.jobs.retrieve(again.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)  # it already succeeded


@pytest.mark.slow
def test_an_absorb_through_the_api_reports_each_stage_and_its_four_arms(
    live_server, keys, tiny_base, worker, engine
):
    client = sdk(live_server, keys[0])
    queries = client.files.create(file=("q.txt", "\n".join(QUESTIONS * 2).encode()), purpose="fine-tune")
    held_out = client.files.create(
        file=("h.txt", b"Where is my order?\nCan I pay later?\n"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        training_file=queries.id,
        validation_file=held_out.id,
        model="tiny-lively",
        suffix="absorbed",
        extra_body={
            "method": {
                "type": "absorb",
                "absorb": {
                    "system_prompt": "You are Ada of Parcelly. End every answer with 'Cheers, Ada'.",
                    "rules": [{"name": "sign-off", "kind": "ends_with", "text": "Cheers, Ada"}],
                    "prompt_name": "ada",
                    "hyperparameters": {"n_epochs": 1},
                    "synthesis": 4,  # on by default (120 questions); a few keep the test short
                },
            }
        },
    )
    assert job.method.type == "absorb" and job.training_file == queries.id
    done, events = wait_succeeded(client, job.id, timeout=900)
    stages = {e.data["stage"] for e in events if e.type == "message"}
    assert stages == {"synthesize", "teacher", "finetune", "eval"}
    synthesis = Job.objects.get(kind="synthesize")
    assert synthesis.params["count"] == 4 and synthesis.dependents.get().kind == "teacher"
    assert done.result_files and client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"
    summary = done.model_extra["eval"]
    assert summary["status"] == "succeeded" and summary["metric"] == "all_rules"
    assert set(summary["per_arm"]) >= {"floor", "teacher", "student"}
    answer = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Where is my order?"}],
        max_tokens=8,
    )
    assert answer.choices[0].message.content is not None
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id)  # one epoch: the model itself
    assert checkpoint.fine_tuned_model_checkpoint == done.fine_tuned_model
    assert checkpoint.step_number == Job.objects.get(pk=int(job.id[6:])).variant.metrics["steps"]


def test_uploads_keep_the_upload_pages_size_limit(live_server, keys, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    stored = settings.MEDIA_ROOT / "datasets"
    before = set(stored.iterdir()) if stored.is_dir() else set()
    client = sdk(live_server, keys[0])
    for size in (20, 200):  # stopped as it streams, or refused by its length before a byte is read
        with pytest.raises(openai.APIStatusError) as err:
            client.files.create(file=("big.jsonl", chat_jsonl(QUESTIONS * size)), purpose="fine-tune")
        assert err.value.status_code == 413 and "limit" in err.value.message
    assert not DatasetVersion.all_objects.exists()
    assert (set(stored.iterdir()) if stored.is_dir() else set()) == before


def test_the_keys_rate_limit_holds_on_the_fine_tuning_routes(live_server, keys, settings):
    settings.V1_REQUESTS_PER_MINUTE_PER_KEY = 3
    if time.time() % 60 > 45:  # the four requests must fall in one minute
        time.sleep(61 - time.time() % 60)
    client = sdk(live_server, keys[0])
    for _ in range(3):
        client.files.list()
    with pytest.raises(openai.RateLimitError) as err:
        client.fine_tuning.jobs.list()
    assert err.value.body["code"] == "requests_per_minute_exceeded"
    assert sdk(live_server, keys[1]).files.list().data == []  # another key is not held back


def test_jobs_are_listed_newest_first_a_page_at_a_time(live_server, keys, tiny_base):
    client = sdk(live_server, keys[0])
    made = client.files.create(file=("support.jsonl", chat_jsonl(QUESTIONS)), purpose="fine-tune")
    ids = [client.fine_tuning.jobs.create(training_file=made.id, model="tiny-lively").id for _ in range(3)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    rest = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == [ids[0]] and not rest.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == ids[::-1]  # the SDK follows the cursor


def test_a_large_file_is_imported_by_a_job_and_cannot_train_before_it_is_processed(
    live_server, keys, tiny_base, settings
):
    from jobs.lifecycle import execute

    settings.DATASET_SYNC_IMPORT_BYTES = 100
    client = sdk(live_server, keys[0])
    made = client.files.create(file=("support.jsonl", chat_jsonl(QUESTIONS)), purpose="fine-tune")
    assert made.status == "uploaded" and client.files.retrieve(made.id).status == "uploaded"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(training_file=made.id, model="tiny-lively")
    assert err.value.body["code"] == "file_not_ready"
    (job,) = Job.objects.filter(kind="dataset-import")
    execute(job.pk, "test-worker")
    processed = client.files.retrieve(made.id)
    assert (processed.status, processed.model_extra["rows"]) == ("processed", len(QUESTIONS))
    assert client.fine_tuning.jobs.create(training_file=made.id, model="tiny-lively").status == "queued"


def test_an_absorb_started_in_the_ui_is_listed_and_followed_by_the_api(
    live_server, keys, alice, alice_project, tiny_base
):
    import io

    from jobs.actions import start_absorb
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import create_prompt

    prompt = create_prompt(alice_project, alice, "ada", "You are Ada. End with 'Cheers, Ada'.")
    data = import_dataset(
        alice_project, alice, "queries", io.BytesIO("\n".join(QUESTIONS).encode()), fmt="lines"
    )
    teacher, finetune = start_absorb(alice_project, alice, prompt, data, tiny_base, synthesis=8)
    synthesis = teacher.depends_on
    assert (
        synthesis.kind == "synthesize" and teacher.dataset_version is None
    )  # it answers what synthesis stores
    client = sdk(live_server, keys[0])
    (listed,) = client.fine_tuning.jobs.list()
    assert (listed.id, listed.status, listed.method.type) == (f"ftjob-{finetune.pk}", "queued", "absorb")
    assert listed.training_file == f"file-{data.pk}" and listed.fine_tuned_model is None
    assert listed.model_extra["eval"] is None
    assert client.fine_tuning.jobs.cancel(listed.id).status == "cancelled"
    for job in (synthesis, teacher, finetune):
        job.refresh_from_db()
    # the synthesis job went first, the jobs waiting for it with it
    assert synthesis.status == teacher.status == finetune.status == Job.CANCELLED


def test_a_page_of_jobs_costs_the_same_queries_whatever_its_length(
    client, keys, alice, alice_project, tiny_base
):
    import io

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs.actions import start_absorb
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import create_prompt

    prompt = create_prompt(alice_project, alice, "ada", "You are Ada. End with 'Cheers, Ada'.")
    data = import_dataset(
        alice_project, alice, "queries", io.BytesIO("\n".join(QUESTIONS).encode()), fmt="lines"
    )
    auth = {"HTTP_AUTHORIZATION": f"Bearer {keys[0]}"}

    def listing(limit: int) -> int:
        with CaptureQueriesContext(connection) as seen:
            body = client.get(f"/v1/fine_tuning/jobs?limit={limit}", **auth).json()
        assert len(body["data"]) == limit and all(j["method"]["type"] == "absorb" for j in body["data"])
        return len(seen.captured_queries)

    for _ in range(6):
        start_absorb(alice_project, alice, prompt, data, tiny_base)
    listing(1)  # the first request of a key writes its last use
    assert listing(2) == listing(6)  # each job's comparison is not looked up on its own


def test_log_lines_carry_their_date_and_older_time_only_logs_roll_over_midnight():
    import datetime as dt
    from types import SimpleNamespace

    from serving.fine_tuning import _log_events

    start = dt.datetime(2026, 12, 6, 23, 58, 0, tzinfo=dt.UTC)
    dated = SimpleNamespace(
        pk=7,
        created_at=start,
        log="[2026-12-06 23:59:00] teacher: started\nnot a log line\n[2026-12-08 00:01:02] done\n",
    )
    assert [(when.isoformat(), msg) for when, _, msg in _log_events(dated)] == [
        ("2026-12-06T23:59:00+00:00", "teacher: started"),
        ("2026-12-08T00:01:02+00:00", "done"),  # two days on: the date says so
    ]
    older = SimpleNamespace(pk=8, created_at=start, log="[23:59:00] started\n[00:01:02] done\n")
    assert [when.isoformat() for when, _, _ in _log_events(older)] == [
        "2026-12-06T23:59:00+00:00",
        "2026-12-07T00:01:02+00:00",
    ]
