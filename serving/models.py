"""Aliases (eval-gated pointers to variants), their audit trail, API keys and
the request log of the /v1 gateway."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import models
from django.dispatch import Signal
from django.utils import timezone

from evals.models import EvalSuite
from workbench.models import Project, Variant

DEFAULT_ALIASES = ("staging", "production")


class Alias(models.Model):
    """A project's name for "the variant that answers now" (staging,
    production, custom). Clients call PROJECT_SLUG/ALIAS; promotion moves it."""

    # The gate's bars, beside its gating suite: one list for the form, the action and specs.
    GATE_FIELDS = (
        "min_all_rules",
        "min_retained_lower",
        "max_regression",
        "min_fact_recall",
        "fact_recall_vs_teacher",
        "max_skills_drop",
    )

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="aliases")
    name = models.SlugField(max_length=50)
    variant = models.ForeignKey(
        Variant, null=True, blank=True, on_delete=models.PROTECT, related_name="aliases"
    )
    # The gate: which suite a candidate must have been evaluated on, and the bars it must clear.
    gating_suite = models.ForeignKey(
        EvalSuite, null=True, blank=True, on_delete=models.SET_NULL, related_name="gated_aliases"
    )
    min_all_rules = models.FloatField(
        null=True, blank=True, help_text="Minimum all-rules compliance of the candidate (0-1)"
    )
    min_retained_lower = models.FloatField(
        null=True, blank=True, help_text="Minimum lower CI bound of prompt effect retained (0-1)"
    )
    max_regression = models.FloatField(
        null=True, blank=True, help_text="Largest drop allowed on the suite's main metric vs the holder"
    )
    min_fact_recall = models.FloatField(
        null=True, blank=True, help_text="Minimum fact recall of the candidate (0-1)"
    )
    fact_recall_vs_teacher = models.BooleanField(
        default=False,
        help_text="The student's fact recall must be at least the prompted teacher's (four-arm comparison)",
    )
    max_skills_drop = models.FloatField(
        null=True,
        blank=True,
        help_text="Largest drop in general skills (student - floor, four-arm comparison) allowed (0-1)",
    )
    log_requests = models.BooleanField(default=False, help_text="Keep each /v1 request and response")
    serve_merged = models.BooleanField(
        default=False,
        help_text="Serve the variant's adapter merged into a copy of its base: the bare base's "
        "per-token cost, one more copy of the base in memory (hf engine)",
    )
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="unique_alias_name")]

    def __str__(self) -> str:
        return f"{self.project.slug}/{self.name}"

    @property
    def model_name(self) -> str:
        return f"{self.project.slug}/{self.name}"


class AliasMove(models.Model):
    """One audited move of an alias: promotion, override or rollback."""

    PROMOTE = "promote"
    OVERRIDE = "override"
    ROLLBACK = "rollback"
    ACTIONS = [(PROMOTE, "promote"), (OVERRIDE, "promote (gate overridden)"), (ROLLBACK, "rollback")]

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="moves")
    action = models.CharField(max_length=10, choices=ACTIONS)
    from_variant = models.ForeignKey(
        Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    to_variant = models.ForeignKey(
        Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    verdict = models.JSONField(default=dict, blank=True, help_text="Gate result: passed, checks with numbers")
    reason = models.TextField(blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.alias} {self.action} -> {self.to_variant_id}"

    @property
    def gated(self) -> bool:
        """The alias had a gate when it moved (a rollback's verdict is kept but never blocks)."""
        return bool(self.verdict.get("checks"))


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    """A per-project bearer key for /v1. Only its hash is stored; the key is
    shown once, at creation."""

    PREFIX = "wb-"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, help_text="First characters, to recognise the key")
    hashed = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.project.slug})"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class RequestLog(models.Model):
    """One /v1 completion (chat or legacy text), kept when the alias logs requests."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="request_logs")
    alias = models.ForeignKey(
        Alias, null=True, blank=True, on_delete=models.SET_NULL, related_name="requests"
    )
    variant = models.ForeignKey(Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # The x-request-id the client was answered with, so a request it quotes can be found.
    request_id = models.CharField(max_length=40, blank=True, default="", db_index=True)
    model = models.CharField(max_length=300, help_text="The model name the client asked for")
    request = models.JSONField(help_text="The request body as received")
    response = models.JSONField(default=dict, blank=True)
    status = models.PositiveSmallIntegerField(default=200)
    latency_ms = models.FloatField(default=0.0)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    captured_into = models.ForeignKey(
        "workbench.DatasetVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "alias", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.model} {self.status} {self.created_at:%Y-%m-%d %H:%M}"


# Sent on commit after an alias moved (promotion, override, rollback), with
# `alias`: the gateway loads the adapters aliases need into the engine.
alias_moved = Signal()


class SpecRun(models.Model):
    """A spec applied from the browser. Nothing waits in a worker for its
    jobs: each time a job it follows ends, the run is applied again (every
    finished step is reused by its fingerprint) and goes one step further."""

    RUNNING, DONE, REFUSED, FAILED = "running", "done", "refused", "failed"
    STATUSES = [
        (RUNNING, "Running"),
        (DONE, "Done"),
        (REFUSED, "Refused by the gate"),
        (FAILED, "Failed"),
    ]

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="spec_runs")
    text = models.TextField(help_text="The spec as applied (YAML)")
    status = models.CharField(max_length=10, choices=STATUSES, default=RUNNING)
    plan = models.JSONField(default=dict, blank=True, help_text="The plan when the run started")
    log = models.TextField(blank=True)
    message = models.TextField(blank=True)
    outcome = models.JSONField(default=dict, blank=True)
    waiting_on = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # One advance at a time: a second one that finds it taken asks the first to go again.
    advancing_since = models.DateTimeField(null=True, blank=True)
    again = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"spec run #{self.pk}"

    @property
    def is_running(self) -> bool:
        return self.status == self.RUNNING
