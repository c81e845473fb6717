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


@shared_task(name="workbench.tasks.compute_token_stats", ignore_result=True)
def compute_token_stats(version_id: int, base_model_id: int) -> None:
    """Token-length statistics of a dataset version under one tokenizer."""
    from django.db import transaction

    from engines.tokens import length_stats, load_tokenizer
    from workbench.models import BaseModel, DatasetVersion

    version = DatasetVersion.objects.get(pk=version_id)
    model = BaseModel.objects.get(pk=base_model_id)
    try:
        rows = version.rows.values_list("messages", flat=True).iterator(chunk_size=2000)
        result = {"status": "done", **length_stats(load_tokenizer(model.path), rows)}
    except Exception as exc:
        result = {"status": "failed", "error": str(exc)[:300]}
    with transaction.atomic():
        locked = DatasetVersion.objects.select_for_update().get(pk=version_id)
        locked.token_stats = {**locked.token_stats, model.name: result}
        locked.save(update_fields=["token_stats"])
