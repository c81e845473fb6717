"""Celery tasks of the jobs app: thin, idempotent, take ids. The queue
comes from settings.CELERY_TASK_ROUTES; this module is the one place that
sends a job to a worker (`enqueue`)."""

from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from jobs import lifecycle
from jobs.models import Job


@shared_task(name="jobs.tasks.run_job", ignore_result=True, acks_late=True)
def run_job(job_id: int) -> None:
    """The lifecycle claims the row or does nothing; jobs that waited for
    this one are sent once it succeeded."""
    close_old_connections()  # a forked child must not reuse its parent's connection
    for ready in lifecycle.execute(job_id, run_job.request.hostname or "local"):
        run_job.delay_on_commit(ready)


def enqueue(job: Job) -> None:
    """Send the job to a worker once the current transaction commits."""
    run_job.delay_on_commit(job.pk)


def reap_and_requeue(stale_seconds: int | None = None) -> list[tuple[int, str]]:
    """Requeue the jobs of dead workers and send them again."""
    moved = lifecycle.reap(stale_seconds)
    for job_id, status in moved:
        if status == Job.QUEUED:
            run_job.delay_on_commit(job_id)
    return moved
