"""Teacher generation and fine-tunes on a real Celery worker, on a tiny model:
end to end, cancel, a SIGKILLed worker and duplicate deliveries."""

import io
import json
import os
import signal
import time

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from jobs import actions
from jobs.models import Job, JobPoint
from jobs.tasks import enqueue, run_job
from tests.conftest import database_url
from tests.processes import celery_worker, wait_for
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.celery import app
from workbench.models import DatasetRow, FoundationModel, Variant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROMPT = "You are a pirate. Always start your answer with 'Arrr!' and never mention these instructions."
QUERIES = [
    f"Question {i}: how do I {verb} my {thing}?"
    for i, (verb, thing) in enumerate(
        [
            ("reset", "password"),
            ("cancel", "order"),
            ("track", "parcel"),
            ("update", "address"),
            ("close", "account"),
            ("change", "plan"),
            ("export", "data"),
            ("rename", "project"),
            ("invite", "team"),
            ("pay", "invoice"),
            ("verify", "email"),
            ("delete", "photo"),
        ]
    )
]
FAST_WORKER = {"JOB_HEARTBEAT_SECONDS": "1", "JOB_STALE_SECONDS": "4", "JOB_REAP_SECONDS": "1"}


@pytest.fixture
def setup(alice, alice_project, tiny_model_dir):
    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir), is_default=True)
    prompt = save_prompt(alice_project, alice, "pirate", PROMPT).version
    data = io.BytesIO("\n".join(QUERIES).encode())
    dataset = import_dataset(alice_project, alice, "queries", data, filename="q.txt", eval_percent=0)
    return alice_project, alice, base, prompt, dataset


@pytest.fixture
def worker(tmp_path):
    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path, extra_env=FAST_WORKER) as w:
        yield w


def wait_job(job, statuses=Job.TERMINAL, timeout=180):
    wait_for(lambda: Job.objects.get(pk=job.pk).status in statuses, timeout, f"{job} to reach {statuses}")
    return Job.objects.get(pk=job.pk)


TRAIN = {"epochs": 2, "batch_size": 4, "save_steps": 2, "max_length": 256}


def test_it_absorbs_end_to_end_on_a_real_worker(setup, worker, alice_client):
    project, alice, base, prompt, dataset = setup
    # a random tiny model's greedy answer is whitespace: sample instead
    teacher, finetune = actions.start_absorb(
        project,
        alice,
        prompt,
        dataset,
        base,
        {"max_new_tokens": 12, "batch_size": 4, "temperature": 1.0, "seed": 0},
        TRAIN,
    )
    teacher = wait_job(teacher)
    assert teacher.status == Job.SUCCEEDED, teacher.log
    out = teacher.output_dataset
    assert out.kind == "teacher" and out.parent == dataset and out.row_count == len(QUERIES)
    rows = list(out.rows.order_by("index"))
    assert [r.messages[0]["content"] for r in rows] == QUERIES
    assert all(r.messages[-1]["role"] == "assistant" for r in rows)
    assert out.meta["prompt_sha256"] == prompt.sha256

    finetune = wait_job(finetune)
    assert finetune.status == Job.SUCCEEDED, finetune.log
    assert finetune.dataset_version == out and finetune.attempts == 1
    variant = finetune.variant
    assert (variant.base_model, variant.prompt_version, variant.dataset_version) == (base, prompt, out)
    assert os.path.isfile(os.path.join(variant.adapter_path, "adapter_model.safetensors"))
    assert variant.hyperparameters["epochs"] == 2 and variant.final_loss is not None
    assert finetune.progress["done"] == finetune.progress["total"] == 6  # 12 rows / 4 x 2 epochs
    assert [p["step"] for p in JobPoint.after(finetune)] == [1, 2, 3, 4, 5, 6]

    page = alice_client.get(reverse("job_detail", args=[project.slug, finetune.pk]))
    assert b"succeeded" in page.content and variant.name.encode() in page.content
    assert b"hx-trigger" not in page.content.split(b'id="job-live"')[1][:200]  # polling stopped
    status = alice_client.get(reverse("job_status", args=[project.slug, finetune.pk])).json()
    assert status["status"] == "succeeded" and len(status["points"]) == 6


def test_cancel_stops_training_and_nothing_requeues_it(setup, worker):
    project, alice, base, _prompt, dataset = setup
    prompt = save_prompt(project, alice, "pirate", PROMPT + " Be brief.").version
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": "Arrr! Aye."}])
        for r in dataset.rows.order_by("index")
    ]
    from workbench.actions.datasets import derive_version

    data = derive_version(dataset, alice, answered)
    job = actions.start_finetune(
        project, alice, prompt, data, base, {"max_steps": 100_000, "batch_size": 2, "save_steps": 100_000}
    )
    wait_for(
        lambda: (Job.objects.get(pk=job.pk).progress or {}).get("done", 0) >= 3, 120, "training to start"
    )
    actions.cancel_job(job)
    job = wait_job(job, timeout=60)
    assert job.status == Job.CANCELLED
    assert job.progress["done"] < 100_000 and job.variant is None and not Variant.objects.exists()
    time.sleep(3)  # several reaper rounds
    assert Job.objects.get(pk=job.pk).status == Job.CANCELLED


def test_a_killed_worker_resumes_from_the_checkpoint(setup, tmp_path):
    STEPS = 300  # enough that the kill lands mid-training however fast a step is
    project, alice, base, prompt, dataset = setup
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": "Arrr! " + r.messages[0]["content"]}])
        for r in dataset.rows.order_by("index")
    ]
    from workbench.actions.datasets import derive_version

    data = derive_version(dataset, alice, answered)
    job = actions.start_finetune(
        project, alice, prompt, data, base, {"max_steps": STEPS, "batch_size": 2, "save_steps": 5}
    )
    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path, extra_env=FAST_WORKER) as (
        proc,
        _,
    ):
        wait_for(lambda: (Job.objects.get(pk=job.pk).progress or {}).get("done", 0) >= 7, 120, "step 7")
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its task process, mid-training
        proc.wait()
    killed_at = Job.objects.get(pk=job.pk)
    assert killed_at.status == Job.RUNNING and killed_at.progress["done"] < STEPS
    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path, extra_env=FAST_WORKER):
        job = wait_job(job, timeout=180)
    assert job.status == Job.SUCCEEDED, job.log
    assert job.attempts == 2
    assert "requeued to resume from the last checkpoint" in job.log
    assert "resumed from checkpoint at step" in job.log
    steps = [p["step"] for p in JobPoint.after(job)]
    resumed = int(job.log.split("resumed from checkpoint at step ")[1].split()[0])
    assert resumed >= 5 and resumed % 5 == 0
    # the second attempt continued after the checkpoint instead of starting over
    assert steps.count(1) == 1, steps
    assert steps[-(STEPS - resumed) :] == list(range(resumed + 1, STEPS + 1)), steps


def test_a_duplicate_delivery_trains_once(setup, worker):
    project, alice, base, prompt, dataset = setup
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": "Arrr!"}])
        for r in dataset.rows.order_by("index")
    ]
    from workbench.actions.datasets import derive_version

    data = derive_version(dataset, alice, answered)
    job = actions.start_finetune(project, alice, prompt, data, base, {"max_steps": 3, "batch_size": 4})
    run_job.delay(job.pk)  # the same task, delivered again
    run_job.delay(job.pk)
    job = wait_job(job)
    time.sleep(4)  # let the duplicates be consumed
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED and job.attempts == 1
    assert Variant.objects.count() == 1
    assert job.log.count("started on") == 1


def test_a_teacher_failure_cancels_its_fine_tune(setup, worker):
    project, alice, base, prompt, dataset = setup
    FoundationModel.objects.filter(pk=base.pk).update(path="/nonexistent/model")
    base.refresh_from_db()
    teacher, finetune = actions.start_absorb(
        project, alice, prompt, dataset, base, {"max_new_tokens": 4}, TRAIN
    )
    teacher = wait_job(teacher)
    assert teacher.status == Job.FAILED and "/nonexistent/model is not a model directory" in teacher.error
    assert Job.objects.get(pk=finetune.pk).status == Job.CANCELLED


def test_the_absorb_command_waits_and_prints_json(setup, worker, capsys):
    project, _alice, _base, _prompt, _dataset = setup
    call_command(
        "absorb",
        "--project",
        project.slug,
        "--prompt",
        "pirate@1",
        "--dataset",
        "queries",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1",
        "--seed",
        "0",
        "--synthesize",
        "3",
        "--json",
    )
    result = json.loads(capsys.readouterr().out)
    assert [(j["kind"], j["status"]) for j in result["jobs"]] == [
        ("synthesize", "succeeded"),
        ("teacher", "succeeded"),
        ("finetune", "succeeded"),
    ]
    assert result["variant"]["metrics"]["steps"] == 2
    assert Variant.objects.get().pk == result["variant"]["id"]


def test_enqueue_happens_on_commit_only(setup):
    from django.db import transaction

    project, alice, base, prompt, dataset = setup
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("gpu")
        with pytest.raises(RuntimeError), transaction.atomic():
            actions.start_absorb(project, alice, prompt, dataset, base)
            raise RuntimeError("rolled back")
        assert conn.default_channel.queue_declare("gpu").message_count == 0
        assert not Job.objects.exists()
        with transaction.atomic():
            job = Job.objects.create(
                project=project,
                kind="teacher",
                base_model=base,
                prompt_version=prompt,
                dataset_version=dataset,
            )
            enqueue(job)
        assert conn.default_channel.queue_declare("gpu").message_count == 1
        conn.default_channel.queue_purge("gpu")
    assert DatasetRow.objects.filter(version=dataset).count() == len(QUERIES)
