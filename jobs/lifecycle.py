"""The one lifecycle of long work: claim the row, find the runner of its kind,
keep a heartbeat, store progress, end in exactly one terminal state, and
requeue the jobs of dead workers. Knows nothing of Celery: jobs.tasks wraps
`execute` and sends what it returns."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from engines.inference import GenerationCancelled, ModelLoadError, SettingsError
from engines.progress import Progress
from engines.training import TrainingError
from jobs.models import Job
from jobs.registry import JobCancelled, JobError, kinds, runner_for
from workbench.actions import ActionError

log = logging.getLogger(__name__)

# Errors whose message says all the user needs; anything else is a bug: its
# traceback goes to the worker's log under an incident id, and members see the id.
USER_ERRORS: tuple[type[BaseException], ...] = (
    JobError,
    ActionError,
    TrainingError,
    ModelLoadError,
    SettingsError,
)


class _Heartbeat(threading.Thread):
    """Marks the job alive even while one step takes long; the reaper
    requeues a job whose heartbeat stops (its worker died)."""

    def __init__(self, job: Job) -> None:
        super().__init__(name=f"job-{job.pk}-heartbeat", daemon=True)
        self.job, self.stop_event = job, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(settings.JOB_HEARTBEAT_SECONDS):
            try:
                self.job.beat()
            except Exception:
                log.exception("job heartbeat failed")
        connection.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class ProgressWriter:
    """Receives every Progress an engine reports; writes the latest one at
    most every `every` seconds and appends curve points in batches, so a
    1,000-step run costs tens of writes, not thousands of history rewrites."""

    def __init__(self, job: Job, every: float | None = None) -> None:
        self.job = job
        self.every = settings.JOB_PROGRESS_SECONDS if every is None else every
        self.latest: Progress | None = None
        self.points: list[dict[str, Any]] = []
        self.written_at = float("-inf")

    def __call__(self, progress: Progress) -> None:
        self.latest = progress
        if progress.point is not None:
            self.points.append(dict(progress.point))
        if time.monotonic() - self.written_at >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.latest is None and not self.points:
            return
        if self.latest is not None:
            self.job.save_progress(self.latest, self.points)
        self.points = []
        self.written_at = time.monotonic()


def execute(job_id: int, worker: str) -> list[int]:
    """Run one job to a terminal state. Returns the ids of the jobs that
    waited for it and may start now. A duplicate delivery, or a job
    cancelled while queued, does nothing."""
    job = Job.objects.select_related("project").filter(pk=job_id).first()
    if job is None or not job.claim(worker):
        return []
    runner_class = runner_for(job.kind)
    if runner_class is None:
        job.fail(
            f"no runner is registered for job kind {job.kind!r} (known kinds: {', '.join(kinds()) or 'none'})"
        )
        return []
    problem = runner_class.check_inputs(job)
    if problem:
        job.fail(problem)
        return []
    job.append_log(f"attempt {job.attempts} of {job.max_attempts} started on {worker}")
    writer = ProgressWriter(job)
    heartbeat = _Heartbeat(job)
    heartbeat.start()
    try:
        runner_class(job, writer).run()
        writer.flush()
    except (JobCancelled, GenerationCancelled) as exc:
        writer.flush()
        job.mark_cancelled(f"cancelled by request; stopped at the next step{f' ({exc})' if str(exc) else ''}")
    except (*USER_ERRORS, *runner_class.user_errors) as exc:
        job.fail(str(exc))
    except Exception as exc:
        # Tracebacks and messages of unexpected errors name server paths and internals: they stay here.
        incident = secrets.token_hex(4)
        log.exception("job %s (%s) failed, incident %s", job.pk, job.kind, incident)
        job.append_log(f"internal error (incident {incident}); the traceback is in the worker's log")
        job.fail(
            f"internal error ({type(exc).__name__}), incident {incident}: an administrator finds the "
            "details in the worker's log"
        )
    finally:
        heartbeat.stop()
    job.refresh_from_db()
    if job.status == Job.RUNNING:
        job.succeed()
    return [dep.pk for dep in job.ready_dependents()]


def reap(stale_seconds: int | None = None) -> list[tuple[int, str]]:
    """Requeue (or fail, after max attempts) running jobs whose heartbeat
    stopped. Returns (job id, new status); the caller sends the requeued
    ones. Safe to run from many workers at once."""
    stale = timedelta(seconds=stale_seconds or settings.JOB_STALE_SECONDS)
    moved = []
    for job in Job.objects.filter(status=Job.RUNNING, heartbeat_at__lt=timezone.now() - stale):
        with transaction.atomic():
            new_status = job.requeue_if_stale(stale)
        if new_status:
            moved.append((job.pk, new_status))
    return moved
