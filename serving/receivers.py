"""Keep the engine's adapters in step with the aliases: when an alias moves,
load what its new holder needs and unload the adapters no alias points to.

The engine being down never breaks a promotion: the gateway loads what a
request needs anyway (lazily), so this only saves the first client the wait."""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q
from django.utils import timezone

from engines.protocol import OpenAIError
from evals.models import EvalRun
from jobs.models import Job
from serving import engine_client
from serving.engine_client import ADAPTER_PREFIX, MERGED_PREFIX
from serving.models import Alias, ApiKey, SpecRun
from workbench.models import Project, Variant

log = logging.getLogger(__name__)


def needed_adapters() -> set[str]:
    """Engine names of the adapters some alias (of any project) points to,
    and of those an eval run still in progress asks the engine for (the vllm
    backend answers eval runs too: unloading under one would fail it)."""
    ids = set(Alias.objects.filter(variant__isnull=False).values_list("variant_id", flat=True))
    active = EvalRun.objects.filter(job__status__in=Job.ACTIVE)
    ids |= set(active.filter(variant__isnull=False).values_list("variant_id", flat=True))
    ids |= set(active.filter(suite__judge__isnull=False).values_list("suite__judge_id", flat=True))
    with_adapter = Variant.objects.filter(pk__in=ids).exclude(adapter_path="").values_list("pk", flat=True)
    return {f"{ADAPTER_PREFIX}{pk}" for pk in with_adapter}


def needed_merged() -> set[str]:
    """Engine names of the merged models an alias serves."""
    ids = Alias.objects.filter(serve_merged=True, variant__isnull=False).exclude(variant__adapter_path="")
    return {f"{MERGED_PREFIX}{pk}" for pk in ids.values_list("variant_id", flat=True)}


def sync_engine(alias: Alias) -> tuple[str | None, list[str]]:
    """Load the alias's variant into the engine (merged if the alias says so
    and the engine is the hf one) and unload the workbench's adapters and
    merged models no alias needs. Returns (loaded name, unloaded names)."""
    client = engine_client.client()
    loaded = None
    variant = None
    merged = engine_client.serves_merged(alias)
    if alias.variant_id is not None:
        variant = Variant.objects.select_related("base_model").filter(pk=alias.variant_id).first()
    if variant is not None:
        client.ensure_loaded(variant, refresh=True, merged=merged)
        loaded = engine_client.served_name(variant, merged)
    needed = needed_adapters() | needed_merged()
    unloaded = []
    for model in client.models():
        name = str(model.get("id", ""))
        if name in needed:
            continue
        # Only what the workbench loaded (variant-*, merged-variant-*), never what the team gave the engine.
        if name.startswith(ADAPTER_PREFIX) and model.get("parent"):
            client.unload_adapter(name)
            unloaded.append(name)
        elif name.startswith(MERGED_PREFIX) and not model.get("parent") and client.backend == "hf":
            client.unload_base(name)
            unloaded.append(name)
    return loaded, unloaded


def on_alias_moved(sender: Any = None, alias: Alias | None = None, **_kw: Any) -> None:
    if alias is None:
        return
    try:
        loaded, unloaded = sync_engine(alias)
    except OpenAIError as exc:
        log.warning(
            "Alias %s moved, but the engine could not be updated (it will load on the first request): %s",
            alias,
            exc,
        )
        return
    log.info(
        "Alias %s moved: engine serves %s%s",
        alias,
        loaded,
        f"; unloaded {', '.join(unloaded)}" if unloaded else "",
    )


def on_member_removed(
    sender: Any = None, project: Project | None = None, user: Any = None, **_kw: Any
) -> str | None:
    """A removed member's keys of the project stop working with the removal
    (same transaction): they no longer reach its /v1 models."""
    if project is None or user is None:
        return None
    keys = ApiKey.objects.select_for_update().filter(
        project=project, created_by=user, revoked_at__isnull=True
    )
    revoked = list(keys.order_by("created_at").values_list("pk", "prefix", "name"))
    if not revoked:
        return None
    ApiKey.objects.filter(pk__in=[pk for pk, _, _ in revoked]).update(revoked_at=timezone.now())
    listed = ", ".join(f"{prefix}…" + (f" ({name})" if name else "") for _, prefix, name in revoked)
    log.info("Member %s removed from %s: revoked %d API key(s)", user, project.slug, len(revoked))
    return (
        f"{len(revoked)} API key{'s' if len(revoked) != 1 else ''} {user} created in this project "
        f"{'were' if len(revoked) != 1 else 'was'} revoked: {listed}."
    )


def on_job_finished(sender: Any, job: Job, status: str, **_kw: Any) -> None:
    """A job a browser-applied spec waits on ended: take the spec one step
    further. A run being advanced right now is asked to go again (it may
    have read the job as running just before it ended)."""
    from serving.tasks import advance_spec_run  # serving.tasks imports the pipeline, which imports this app

    runs = SpecRun.objects.filter(project_id=job.project_id, status=SpecRun.RUNNING).filter(
        Q(waiting_on=job) | Q(advancing_since__isnull=False)
    )
    for run_id in runs.values_list("pk", flat=True):
        advance_spec_run.delay_on_commit(run_id)
