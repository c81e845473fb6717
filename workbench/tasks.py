from __future__ import annotations

import logging

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from engines.tokens import length_stats, load_tokenizer
from workbench.models import DatasetVersion, FoundationModel, WorkerPing

logger = logging.getLogger(__name__)


@shared_task(name="workbench.tasks.answer_ping", ignore_result=True)
def answer_ping(ping_id: int, queue: str = "default") -> None:
    """Record that a worker received the ping: proves the broker round trip.
    `queue` is read by the router (CELERY_TASK_ROUTES): the ping tests that queue."""
    WorkerPing.objects.filter(pk=ping_id, answered_at__isnull=True).update(
        answered_at=timezone.now(), answered_by=answer_ping.request.hostname or ""
    )


@shared_task(name="workbench.tasks.compute_token_stats", ignore_result=True)
def compute_token_stats(version_id: int, base_model_id: int) -> None:
    """Token-length statistics of a dataset version under one tokenizer."""
    version = DatasetVersion.objects.get(pk=version_id)
    model = FoundationModel.objects.get(pk=base_model_id)
    try:
        rows = version.rows.values_list("messages", flat=True).iterator(chunk_size=2000)
        result = {"status": "done", **length_stats(load_tokenizer(model.path), rows)}
    except Exception as exc:  # shown on the page; the traceback goes to the worker log
        logger.exception("token statistics of %s under %s failed", version, model)
        result = {"status": "failed", "error": str(exc)[:300]}
    # Other models' entries may have changed meanwhile: merge on the locked row.
    with transaction.atomic():
        locked = DatasetVersion.objects.select_for_update().get(pk=version_id)
        locked.token_stats = {**locked.token_stats, model.name: result}
        locked.save(update_fields=["token_stats"])
