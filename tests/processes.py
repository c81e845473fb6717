"""Start and stop the real processes the tests talk to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_for(
    predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{_tail(log)}")


def wait_for_job(
    job, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    """Job.wait under a deadline, giving up early when the worker process died."""

    def worker_alive(polled) -> None:
        if proc is not None and proc.poll() is not None and not polled.is_terminal:
            raise AssertionError(f"the worker exited while waiting for {what}\n{_tail(log)}")

    if not job.wait(timeout, poll=0.2, on_poll=worker_alive):
        raise AssertionError(f"timed out waiting for {what} (job {job.pk} is {job.status})\n{_tail(log)}")
    return job


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log and log.exists() else ""


@contextmanager
def celery_worker(
    broker_url: str,
    database_url: str,
    tmp_path: Path,
    queues: str = "gpu,default",
    extra_env: dict[str, str] | None = None,
    pool: str = "prefork",
) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `celery worker` process; yields once it has written its heartbeat."""
    from workbench.models import WorkerHeartbeat

    name = f"test-{uuid.uuid4().hex[:8]}@localhost"
    log = tmp_path / f"{name}.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "WORKER_HEARTBEAT_SECONDS": "1",
        **(extra_env or {}),
    }
    cmd = [
        str(BIN / "celery"),
        "-A",
        "workbench",
        "worker",
        "-Q",
        queues,
        "-n",
        name,
        "-P",
        pool,
        "--concurrency",
        "1",
        "--max-tasks-per-child",
        "1",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(
            lambda: WorkerHeartbeat.objects.filter(hostname=name).exists(), 60, f"worker {name}", proc, log
        )
        yield proc, name
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
