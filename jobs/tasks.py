from __future__ import annotations

from celery import shared_task

from jobs import runner


@shared_task(name="jobs.tasks.run_job", ignore_result=True, acks_late=True)
def run_job(job_id: int) -> None:
    """Thin and idempotent: the runner claims the job row or does nothing."""
    runner.run_job(job_id, run_job.request.hostname or "local")
