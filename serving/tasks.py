"""Celery tasks of the serving app (queue `default`: no model work)."""

from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from serving.pipeline.background import advance


@shared_task(name="serving.tasks.advance_spec_run", ignore_result=True)
def advance_spec_run(run_id: int) -> None:
    """Take a browser-applied spec one step further (serving.pipeline.background)."""
    close_old_connections()
    advance(run_id)
