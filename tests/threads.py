"""Run calls at the same moment, each in its own thread with its own
database connection (tests that use it need django_db(transaction=True))."""

from __future__ import annotations

import threading
from collections.abc import Callable

from django.db import connection


def run_together(*calls: Callable[[], object]) -> None:
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=10)
            call()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
