"""The job state machine: compare-and-set moves, terminal states stay."""

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Job
from jobs.runner import reap
from workbench.actions_data import import_dataset, save_prompt
from workbench.models import BaseModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(alice, alice_project):
    import io

    base = BaseModel.objects.create(name="m", path="/m")
    prompt = save_prompt(alice_project, alice, "p", "Be brief.").version
    data = import_dataset(alice_project, alice, "d", io.BytesIO(b"hi\nho\n"), filename="d.txt")
    return Job.objects.create(project=alice_project, kind=Job.FINETUNE, base_model=base, prompt_version=prompt,
                              dataset_version=data)


def test_a_job_is_claimed_once(job):
    assert job.claim("w1")
    assert job.status == Job.RUNNING and job.attempts == 1 and job.worker == "w1"
    assert not Job.objects.get(pk=job.pk).claim("w2")  # a duplicate delivery
    assert Job.objects.get(pk=job.pk).worker == "w1"


def test_terminal_states_never_change(job):
    job.claim("w1")
    assert job.succeed()
    assert not job.fail("late error") and not job.mark_cancelled() and not job.claim("w2")
    job.request_cancel()
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED and job.error == "" and not job.cancel_requested


def test_cancelling_a_queued_job_ends_it_and_a_running_one_is_flagged(job):
    job.request_cancel()
    assert job.status == Job.CANCELLED and not job.claim("w1")


def test_a_running_job_gets_a_cancel_flag(job):
    job.claim("w1")
    job.request_cancel()
    assert job.status == Job.RUNNING and job.cancel_is_requested()


def test_the_reaper_requeues_a_stale_job_and_gives_up_after_max_attempts(job):
    sent = []
    job.claim("w1")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=120))
    assert reap(60, send=sent.append) == [(job.pk, Job.QUEUED)]
    job.refresh_from_db()
    assert job.status == Job.QUEUED and [j.pk for j in sent] == [job.pk]
    assert "stopped responding (attempt 1 of 3)" in job.log
    for attempt in (2, 3):
        assert job.claim(f"w{attempt}") and job.attempts == attempt
        Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=120))
        moved = reap(60, send=sent.append)
        job.refresh_from_db()
    assert moved == [(job.pk, Job.FAILED)] and job.status == Job.FAILED
    assert "giving up after 3 attempts" in job.error and len(sent) == 2


def test_the_reaper_leaves_live_jobs_alone(job):
    job.claim("w1")
    assert reap(60, send=lambda j: None) == []
    assert Job.objects.get(pk=job.pk).status == Job.RUNNING
