"""A new kind of long work needs only its runner: a kind registered by the
test suite (tests/job_kinds.py) runs through a real worker and broker with
the same lifecycle as teacher generation and fine-tunes."""

import pytest
from django.conf import settings
from django.db import transaction

from jobs.models import Job, JobPoint
from jobs.tasks import enqueue
from tests.conftest import database_url
from tests.processes import celery_worker, wait_for_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_kind_registered_by_the_tests_runs_on_a_real_worker(alice_project, tmp_path):
    env = {"WORKBENCH_EXTRA_JOB_RUNNERS": "tests.job_kinds", "JOB_PROGRESS_SECONDS": "0"}
    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path, extra_env=env):
        with transaction.atomic():
            first = Job.objects.create(project=alice_project, kind="test-sleepy", params={"naps": 3})
            then = Job.objects.create(
                project=alice_project, kind="test-sleepy", params={"naps": 2}, depends_on=first
            )
            enqueue(first)
        wait_for_job(then, 60, "both jobs to finish")
    first, then = Job.objects.get(pk=first.pk), Job.objects.get(pk=then.pk)
    assert (first.status, then.status) == (Job.SUCCEEDED, Job.SUCCEEDED), first.log + then.log
    assert "slept 3 naps in alpha" in first.log and "slept 2 naps" in then.log
    assert [p["step"] for p in JobPoint.after(first)] == [1, 2, 3]
    assert first.progress["done"] == 3 and first.progress["unit"] == "naps"


def test_a_kind_the_worker_does_not_know_fails_clearly(alice_project, tmp_path):
    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path):
        with transaction.atomic():
            job = Job.objects.create(project=alice_project, kind="test-sleepy")
            enqueue(job)
        wait_for_job(job, 60, "the job to fail")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.FAILED and "no runner is registered for job kind 'test-sleepy'" in job.error
