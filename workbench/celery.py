"""The Celery app. Queues: `gpu` (model work, one task per child process so
GPU memory is returned after each job) and `default` (everything else)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")

app = Celery("workbench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = (Queue("default", routing_key="default"), Queue("gpu", routing_key="gpu"))
app.autodiscover_tasks()


def route_to_queue_argument(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_kw: Any
) -> dict[str, str] | None:
    """A task called with `queue=...` goes to that queue (see CELERY_TASK_ROUTES)."""
    queue = (kwargs or {}).get("queue")
    return {"queue": queue} if queue in ("gpu", "default") else None


_stop = threading.Event()
log = logging.getLogger(__name__)


def _touch(hostname: str) -> bool:
    """One beat. A database error (a restart, a dropped connection) is
    logged and the next beat tries again on a fresh connection; any other
    error is a bug and ends the heartbeat loudly (the worker then shows as
    dead, which is the truth about its beats)."""
    from django.db import DatabaseError, close_old_connections, connection
    from django.utils import timezone

    from workbench.models import WorkerHeartbeat

    try:
        close_old_connections()
        WorkerHeartbeat.objects.filter(hostname=hostname).update(last_seen=timezone.now(), stopped=False)
    except DatabaseError:
        log.warning(
            "worker heartbeat of %s not written; retrying on a new connection", hostname, exc_info=True
        )
        connection.close()
        return False
    return True


def _beat(hostname: str, queues: str, interval: float, stop: threading.Event = _stop) -> None:
    from django.db import connection
    from django.utils import timezone

    from workbench.models import WorkerHeartbeat

    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        hostname=hostname,
        defaults={
            "queues": queues,
            "pid": os.getpid(),
            "started_at": now,
            "last_seen": now,
            "stopped": False,
        },
    )
    while not stop.wait(interval):
        _touch(hostname)
    WorkerHeartbeat.objects.filter(hostname=hostname).update(stopped=True, last_seen=timezone.now())
    connection.close()


_thread: threading.Thread | None = None


@worker_ready.connect
def start_heartbeat(sender: Any = None, **_kw: Any) -> None:
    # All database work happens in this thread: the worker's main thread must
    # hold no connection when it forks task processes.
    global _thread
    from django.conf import settings

    queues = ",".join(sorted(sender.app.amqp.queues.consume_from)) if sender else ""
    _thread = threading.Thread(
        target=_beat,
        args=(sender.hostname, queues, settings.WORKER_HEARTBEAT_SECONDS),
        name="wb-heartbeat",
        daemon=True,
    )
    _thread.start()


@worker_shutdown.connect
def stop_heartbeat(**_kw: Any) -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
