"""The job reaper runs in every worker's main process: it requeues jobs whose
worker died (no heartbeat), whatever the broker. Dataset imports staged by
workbench become jobs here, and an import that ends unfinished is discarded."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from django.dispatch import receiver

from jobs.models import Job, job_finished
from jobs.runners.dataset_import import DatasetImportRunner
from workbench.actions.datasets import discard_staging, import_requested

log = logging.getLogger(__name__)
_stop = threading.Event()


def _loop(interval: int) -> None:
    from django.db import close_old_connections, connection

    from jobs.tasks import reap_and_requeue

    while True:
        try:
            close_old_connections()
            for job_id, status in reap_and_requeue():
                log.warning("job %s had no heartbeat: now %s", job_id, status)
        except Exception:
            log.exception("job reaper failed")
        finally:
            connection.close()
        if _stop.wait(interval):
            return


@worker_ready.connect
def start_reaper(**_kw: Any) -> None:
    from django.conf import settings

    threading.Thread(
        target=_loop, args=(settings.JOB_REAP_SECONDS,), name="wb-job-reaper", daemon=True
    ).start()


@worker_shutdown.connect
def stop_reaper(**_kw: Any) -> None:
    _stop.set()


# --- dataset imports: workbench stages the version, jobs runs the import ------


def queue_dataset_import(version: Any, user: Any = None) -> Job:
    """The import job of a staging version, sent to a worker on commit."""
    from jobs.tasks import enqueue

    job = Job.objects.create(
        project=version.dataset.project,
        kind=DatasetImportRunner.kind,
        output_dataset=version,
        params={"file": version.source_filename},
        max_attempts=2,
        created_by=user if getattr(user, "is_authenticated", False) else None,
    )
    enqueue(job)
    return job


@receiver(import_requested)
def import_as_job(sender: Any, version: Any, user: Any = None, **_kw: Any) -> Job:
    return queue_dataset_import(version, user)


@receiver(job_finished)
def discard_unfinished_import(sender: Any, job: Job, status: str, **_kw: Any) -> None:
    """A cancelled (even while queued), failed or reaped import leaves no rows."""
    if job.kind == DatasetImportRunner.kind and status != Job.SUCCEEDED and job.output_dataset_id:
        discard_staging(job.output_dataset_id)


@receiver(job_finished)
def check_teacher_answers(sender: Any, job: Job, status: str, **_kw: Any) -> None:
    """An absorb's fine-tune waits for confirmation when too many of the teacher's answers fail a rule."""
    if status == Job.SUCCEEDED and job.kind == "teacher":
        from jobs.actions import hold_for_data_check

        hold_for_data_check(job)
