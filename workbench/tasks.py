from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from workbench.models import WorkerPing


@shared_task(name="workbench.tasks.answer_ping", ignore_result=True)
def answer_ping(ping_id: int) -> None:
    """Record that a worker received the ping: proves the broker round trip."""
    WorkerPing.objects.filter(pk=ping_id, answered_at__isnull=True).update(
        answered_at=timezone.now(), answered_by=answer_ping.request.hostname or ""
    )
