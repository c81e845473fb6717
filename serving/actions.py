"""Verbs of the serving app: aliases, gated promotion and rollback, API
keys. Each is atomic; the alias_moved signal goes out only on commit."""

from __future__ import annotations

import re
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from evals.models import EvalSuite
from jobs.models import Job
from jobs.tasks import enqueue
from serving.gate import Verdict, evaluate_gate
from serving.models import DEFAULT_ALIASES, Alias, AliasMove, ApiKey, alias_moved, hash_key
from workbench.actions import ActionError
from workbench.models import FoundationModel, Project, Variant

Actor = User | None  # None: a command run without --user
ALIAS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")


class GateRefused(ActionError):
    """The gate failed and the promotion was not forced."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        super().__init__(message)
        self.verdict = verdict


# --- variants and aliases ------------------------------------------------------------------


def ensure_base_variants(project: Project) -> list[Variant]:
    """One variant per registered base model (no adapter, no prompt), so a
    base can be evaluated, promoted and served like any other variant."""

    def missing() -> list[FoundationModel]:
        have = set(
            Variant.objects.filter(project=project, adapter_path="", prepend_prompt=False).values_list(
                "base_model_id", flat=True
            )
        )
        return [b for b in FoundationModel.objects.all() if b.pk not in have]

    if missing():
        with transaction.atomic():
            # Serialises concurrent first visits: one base variant per base, not two.
            Project.objects.select_for_update().filter(pk=project.pk).first()
            Variant.objects.bulk_create(
                [Variant(project=project, name=b.name, base_model=b) for b in missing()]
            )
    return list(
        Variant.objects.filter(project=project, adapter_path="", prepend_prompt=False).select_related(
            "base_model"
        )
    )


def ensure_default_aliases(project: Project) -> None:
    for name in DEFAULT_ALIASES:
        if not Alias.objects.filter(project=project, name=name).exists():
            try:
                with transaction.atomic():
                    Alias.objects.create(project=project, name=name)
            except IntegrityError:
                pass  # another request made it first


@transaction.atomic
def create_alias(user: Actor, project: Project, name: str) -> Alias:
    name = name.strip().lower()
    if not ALIAS_NAME.match(name):
        raise ActionError(
            f"“{name}” is not a valid alias name: use lowercase letters, digits, - and _ "
            "(at most 50), starting with a letter or digit."
        )
    if Alias.objects.filter(project=project, name=name).exists():
        raise ActionError(f"There is already an alias named “{name}” in this project.")
    return Alias.objects.create(project=project, name=name)


@transaction.atomic
def update_gate(
    user: Actor,
    alias: Alias,
    *,
    gating_suite: EvalSuite | None,
    min_all_rules: float | None,
    min_retained_lower: float | None,
    max_regression: float | None,
    log_requests: bool | None = None,
    min_fact_recall: float | None = None,
    fact_recall_vs_teacher: bool = False,
    max_skills_drop: float | None = None,
) -> Alias:
    if gating_suite is not None and gating_suite.project_id != alias.project_id:
        raise ActionError(f"The suite “{gating_suite}” belongs to another project.")
    if min_all_rules is not None and not 0 <= min_all_rules <= 1:
        raise ActionError(f"Minimum all-rules compliance must be between 0 and 1, not {min_all_rules}.")
    if max_regression is not None and max_regression < 0:
        raise ActionError(f"The largest allowed regression cannot be negative ({max_regression}).")
    if min_fact_recall is not None and not 0 <= min_fact_recall <= 1:
        raise ActionError(f"Minimum fact recall must be between 0 and 1, not {min_fact_recall}.")
    if max_skills_drop is not None and not 0 <= max_skills_drop <= 1:
        raise ActionError(
            f"The largest drop in general skills must be between 0 and 1, not {max_skills_drop}."
        )
    rules = (min_all_rules, min_retained_lower, max_regression)
    bars = (*rules, min_fact_recall, max_skills_drop)
    if gating_suite is None and (any(r is not None for r in bars) or fact_recall_vs_teacher):
        raise ActionError("Gate rules need a gating suite: choose the suite the numbers are measured on.")
    locked = Alias.objects.select_for_update(of=("self",)).get(pk=alias.pk)
    locked.gating_suite = gating_suite
    locked.min_all_rules, locked.min_retained_lower, locked.max_regression = rules
    locked.min_fact_recall, locked.fact_recall_vs_teacher = min_fact_recall, fact_recall_vs_teacher
    locked.max_skills_drop = max_skills_drop
    fields = ["gating_suite", *Alias.GATE_FIELDS]
    if log_requests is not None:  # None: the log setting stays as it is (the gate form leaves it alone)
        locked.log_requests = log_requests
        fields.append("log_requests")
    locked.save(update_fields=fields)
    return locked


@transaction.atomic
def set_request_logging(user: Actor, alias: Alias, log_requests: bool) -> Alias:
    """Turn the alias's request log on or off; the gate is left as it is."""
    Alias.objects.filter(pk=alias.pk).update(log_requests=log_requests)
    alias.log_requests = log_requests
    return alias


@transaction.atomic
def set_deployment(user: Actor, alias: Alias, serve_merged: bool) -> Alias:
    """Serve the alias's variant merged (or as an adapter again); the engine
    follows on commit, as after a move."""
    if serve_merged and settings.INFERENCE_BACKEND != "hf":
        raise ActionError(
            "Merged deployments need the hf engine: vLLM loads its models when it starts. "
            "Export the merged model and start a vLLM server with it instead."
        )
    Alias.objects.filter(pk=alias.pk).update(serve_merged=serve_merged)
    alias.serve_merged = serve_merged
    _moved(alias)
    return alias


# --- promotion -----------------------------------------------------------------------------


def _moved(alias: Alias) -> None:
    transaction.on_commit(lambda: alias_moved.send(sender=Alias, alias=alias))


def _sync(alias: Alias, locked: Alias) -> None:
    """The caller's alias object shows the move too."""
    alias.variant, alias.variant_id, alias.updated_at = locked.variant, locked.variant_id, locked.updated_at


def promote(user: Actor, alias: Alias, variant: Variant, force: bool = False, reason: str = "") -> AliasMove:
    """Move the alias to the variant if the gate passes (or the user forces
    it with a reason). The gate is evaluated again under the alias's row lock,
    so two promotions at once run one after the other, each judged against
    the holder it actually replaces."""
    if variant.project_id != alias.project_id:
        raise ActionError(
            f"{variant} belongs to another project: an alias can only point at its project's variants."
        )
    reason = reason.strip()
    if force and not reason:
        raise ActionError("Overriding the gate needs a reason: say why this variant goes out anyway.")
    with transaction.atomic():
        locked = (
            Alias.objects.select_for_update(of=("self",))
            .select_related("project", "gating_suite")
            .get(pk=alias.pk)
        )
        holder = locked.variant
        if holder is not None and holder.pk == variant.pk:
            raise ActionError(f"{locked.model_name} already points at {variant}.")
        verdict = evaluate_gate(locked, variant)
        if not verdict.passed and not force:
            failed = "\n".join(f"{c.name}: {c.detail}" for c in verdict.failed)
            raise GateRefused(verdict, f"The gate of {locked.model_name} refused {variant}:\n{failed}")
        move = AliasMove.objects.create(
            alias=locked,
            action=AliasMove.PROMOTE if verdict.passed else AliasMove.OVERRIDE,
            from_variant=holder,
            to_variant=variant,
            verdict=verdict.to_dict(),
            reason=reason,
            user=user,
        )
        locked.variant = variant
        locked.updated_at = timezone.now()
        locked.save(update_fields=["variant", "updated_at"])
        _moved(locked)
    _sync(alias, locked)
    return move


def rollback_target(alias: Alias) -> tuple[AliasMove | None, Variant | None]:
    """The latest move and the holder before it (where a rollback goes)."""
    last = alias.moves.select_related("from_variant").first()
    return last, (last.from_variant if last else None)


def rollback(user: Actor, alias: Alias, reason: str = "") -> AliasMove:
    """Move the alias back to the holder before its latest move (a rollback
    of a rollback goes forward again). Never refused by the gate: it is the
    way out. On a gated alias the gate is still judged on the target and
    kept in the audit row (verdict["rollback"]), so the history shows that
    the alias was gated and whether what it went back to passes today."""
    with transaction.atomic():
        locked = (
            Alias.objects.select_for_update(of=("self",))
            .select_related("project", "gating_suite")
            .get(pk=alias.pk)
        )
        last, target = rollback_target(locked)
        if last is None:
            raise ActionError(f"{locked.model_name} has never moved: nothing to roll back.")
        if target is None:
            raise ActionError(
                f"{locked.model_name} had no holder before {last.to_variant or 'its last move'}: "
                "nothing to roll back to."
            )
        verdict: dict[str, Any] = {}
        if locked.gating_suite_id is not None:
            verdict = {**evaluate_gate(locked, target).to_dict(), "rollback": True}
        move = AliasMove.objects.create(
            alias=locked,
            action=AliasMove.ROLLBACK,
            from_variant=locked.variant,
            to_variant=target,
            verdict=verdict,
            reason=reason.strip(),
            user=user,
        )
        locked.variant = target
        locked.updated_at = timezone.now()
        locked.save(update_fields=["variant", "updated_at"])
        _moved(locked)
    _sync(alias, locked)
    return move


# --- API keys ------------------------------------------------------------------------------


@transaction.atomic
def create_api_key(user: Actor, project: Project, name: str = "") -> tuple[ApiKey, str]:
    """A new key; the raw key is returned once and only its hash is kept."""
    raw = ApiKey.PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        project=project, name=name.strip()[:100], prefix=raw[:10], hashed=hash_key(raw), created_by=user
    )
    return key, raw


@transaction.atomic
def revoke_api_key(user: Actor, key: ApiKey) -> ApiKey:
    updated = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    if not updated:
        raise ActionError(f"The key {key.prefix}… is already revoked.")
    key.refresh_from_db(fields=["revoked_at"])
    return key


# --- merged model exports ------------------------------------------------------------------

MERGE = "merge"  # the job kind of serving.runners.MergeRunner


def latest_merge(variant: Variant) -> Job | None:
    return (
        Job.objects.filter(project_id=variant.project_id, kind=MERGE, params__variant=variant.pk)
        .order_by("-created_at", "-pk")
        .first()
    )


def start_merge(user: Actor, variant: Variant) -> Job:
    """The merge job that makes the variant's merged zip: the one already
    queued or running, else a new one. The variant's row lock makes two
    downloads at once start one job."""
    with transaction.atomic():
        Variant.objects.select_for_update().filter(pk=variant.pk).first()
        job = (
            Job.objects.filter(
                project_id=variant.project_id, kind=MERGE, params__variant=variant.pk, status__in=Job.ACTIVE
            )
            .order_by("pk")
            .first()
        )
        if job is None:
            job = Job.objects.create(
                project_id=variant.project_id,
                kind=MERGE,
                base_model_id=variant.base_model_id,
                params={"variant": variant.pk},
                created_by=user,
                max_attempts=2,
            )
            enqueue(job)
    return job


def variant_json(variant: Variant, aliases: list[str] | None = None) -> dict[str, Any]:
    """A variant as list_variants --json prints it."""
    newer = variant.newer_prompt_version()
    return {
        "id": variant.pk,
        "name": variant.name,
        "adapter": variant.adapter_path or None,
        "base_model": variant.base_model.name,
        "prompt_version": variant.prompt_version_id,
        "prompt": str(variant.prompt_version) if variant.prompt_version_id else None,
        "prepend_prompt": variant.prepend_prompt,
        "dataset_version": variant.dataset_version_id,
        "is_base": variant.is_base,
        "generation": variant.generation,
        "stale": newer is not None,
        "newer_prompt_version": newer.pk if newer else None,
        "aliases": aliases if aliases is not None else [a.name for a in variant.aliases.all()],
    }
