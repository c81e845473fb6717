"""The job reaper runs in every worker's main process: it requeues jobs whose
worker died (no heartbeat), whatever the broker."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

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

    threading.Thread(target=_loop, args=(settings.JOB_REAP_SECONDS,), name="wb-job-reaper", daemon=True).start()


@worker_shutdown.connect
def stop_reaper(**_kw: Any) -> None:
    _stop.set()
