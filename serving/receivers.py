"""Keep the engine's adapters in step with the aliases: when an alias moves,
load what its new holder needs and unload the adapters no alias points to.

The engine being down never breaks a promotion: the gateway loads what a
request needs anyway (lazily), so this only saves the first client the wait."""

from __future__ import annotations

import logging
from typing import Any

from evals.models import EvalRun
from jobs.models import Job
from serving import engine_client
from serving.engine_client import ADAPTER_PREFIX, EngineError
from serving.models import Alias
from workbench.models import Variant

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


def sync_engine(alias: Alias) -> tuple[str | None, list[str]]:
    """Load the alias's variant into the engine and unload the workbench's
    adapters no alias needs. Returns (loaded name, unloaded names)."""
    client = engine_client.client()
    loaded = None
    variant = Variant.objects.select_related("base_model").filter(pk=alias.variant_id).first()
    if variant is not None:
        client.ensure_loaded(variant, refresh=True)
        loaded = variant.engine_model
    needed = needed_adapters()
    unloaded = []
    for model in client.models():
        name = str(model.get("id", ""))
        # Only adapters the workbench loaded (variant-*), never what the team gave the engine itself.
        if name.startswith(ADAPTER_PREFIX) and model.get("parent") and name not in needed:
            client.unload_adapter(name)
            unloaded.append(name)
    return loaded, unloaded


def on_alias_moved(sender: Any = None, alias: Alias | None = None, **_kw: Any) -> None:
    if alias is None:
        return
    try:
        loaded, unloaded = sync_engine(alias)
    except EngineError as exc:
        log.warning("Alias %s moved, but the engine could not be updated (it will load on the first "
                    "request): %s", alias, exc)
        return
    log.info("Alias %s moved: engine serves %s%s", alias, loaded,
             f"; unloaded {', '.join(unloaded)}" if unloaded else "")
