from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Concat
from django.dispatch import Signal
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property

from engines.progress import Progress
from jobs.registry import JobError, label_of
from workbench.models import DatasetVersion, FoundationModel, Project, PromptVersion, Variant

# Sent after a job reached a terminal state (kwargs: job, status), so apps
# above jobs can follow up (evals starts the four-arm comparison of a new variant).
job_finished = Signal()


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def normalize_base_url(value: str) -> str:
    """An endpoint's server root: http(s), a host, no credentials, query or
    fragment; a trailing /v1 (how OpenAI clients spell base URLs) is dropped,
    since requests go to ROOT/v1/chat/completions."""
    value = (value or "").strip()
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise ValidationError(f"Not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError("The URL must start with http:// or https://.")
    if not parts.hostname or any(c.isspace() for c in value):
        raise ValidationError(
            "The URL needs a host name, e.g. http://vllm:8000 or https://api.example.com/v1."
        )
    if parts.username or parts.password:
        raise ValidationError(
            "Put no credentials in the URL: name the environment variable that holds the key."
        )
    if parts.query or parts.fragment:
        raise ValidationError("The URL takes no query string or fragment.")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{path}"


def validate_base_url(value: str) -> None:
    normalize_base_url(value)


def validate_env_name(value: str) -> None:
    if value and not ENV_NAME.fullmatch(value):
        raise ValidationError(
            "An environment variable name: letters, digits and underscores, not starting with a digit."
        )


class TeacherEndpoint(models.Model):
    """An OpenAI-compatible server that can teach (vLLM with a large model, a
    hosted API, this workbench's own /v1). The API key is never stored: the
    row names the environment variable the worker reads it from."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="teacher_endpoints")
    name = models.CharField(max_length=100)
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="The server's root or its /v1 URL (http or https), e.g. http://vllm:8000/v1.",
    )
    model = models.CharField(max_length=200, help_text="The model name the endpoint serves.")
    api_key_env = models.CharField(
        max_length=128,
        blank=True,
        validators=[validate_env_name],
        help_text="The NAME of the environment variable that holds the API key on the workers "
        "(the key itself is never stored). Empty: no key is sent.",
    )
    max_concurrency = models.PositiveSmallIntegerField(
        default=8,
        validators=[MinValueValidator(1), MaxValueValidator(64)],
        help_text="Requests in flight at once (1-64).",
    )
    price_input_per_million = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text="Price per million input (prompt) tokens, for the cost shown on jobs.",
    )
    price_output_per_million = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text="Price per million output (completion) tokens.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "name"],
                name="unique_teacher_endpoint_name",
                violation_error_message="This project already has a teacher endpoint of that name.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.model})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.base_url = normalize_base_url(self.base_url)
        super().save(*args, **kwargs)

    @property
    def identity(self) -> str:
        """What answers: part of every response-cache key."""
        return f"endpoint:{self.base_url}|{self.model}"

    def api_key(self) -> str | None:
        """The key from the worker's environment; a named variable that is
        unset is an error naming it (None when no variable is named)."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise JobError(
                f"teacher endpoint {self.name!r}: the environment variable {self.api_key_env} that should hold "
                "its API key is not set on this worker"
            )
        return value

    @property
    def has_prices(self) -> bool:
        return self.price_input_per_million is not None or self.price_output_per_million is not None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The price of these tokens, or None without prices."""
        if not self.has_prices:
            return None
        per_in = float(self.price_input_per_million or 0)
        per_out = float(self.price_output_per_million or 0)
        return (prompt_tokens * per_in + completion_tokens * per_out) / 1_000_000

    def snapshot(self) -> dict[str, Any]:
        """What a job records of the endpoint it used (the row may change or go)."""
        return {"id": self.pk, "name": self.name, "base_url": self.base_url, "model": self.model}


class Job(models.Model):
    """A unit of long work on a worker, of any kind (a runner registered under
    `kind` does the work, see jobs.registry). The row owns its lifecycle:
    every state change is a compare-and-set update, terminal states never
    change, and a job that ends without succeeding cancels the queued jobs
    that depend on it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STATUSES = [
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
        (CANCELLED, "Cancelled"),
    ]
    ACTIVE = (QUEUED, RUNNING)
    TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=40, help_text="The registered runner that does the work")
    status = models.CharField(max_length=20, choices=STATUSES, default=QUEUED, db_index=True)
    params = models.JSONField(default=dict, blank=True, help_text="The kind's own settings")
    # Inputs and outputs of the absorb kinds; other kinds leave them empty
    # and keep their inputs in params or in a row of their own app.
    base_model = models.ForeignKey(
        FoundationModel, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs"
    )
    prompt_version = models.ForeignKey(
        PromptVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs"
    )
    dataset_version = models.ForeignKey(
        DatasetVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="jobs",
        help_text="Input rows (filled in by the teacher job for a fine-tune that depends on one)",
    )
    output_dataset = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="produced_by"
    )
    variant = models.ForeignKey(
        Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    depends_on = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="dependents"
    )
    # A teacher job's OpenAI-compatible teacher (None: base_model answers); params keep a snapshot.
    teacher_endpoint = models.ForeignKey(
        TeacherEndpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    progress = models.JSONField(default=dict, blank=True, help_text="The latest engines.progress.Progress")
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    cancel_requested = models.BooleanField(default=False)
    worker = models.CharField(max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The token of the form that started the job: a resubmitted form (Back, reload) finds this job
    # instead of starting a second one.
    form_token = models.UUIDField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "form_token"], name="unique_job_form_token")
        ]

    def __str__(self) -> str:
        return f"{self.label} #{self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("job_detail", args=[self.project.slug, self.pk])

    @property
    def label(self) -> str:
        return label_of(self.kind)

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @cached_property
    def params_variant(self) -> Variant | None:
        """The variant a kind names in its params rather than produces (a merge: the one it merges)."""
        pk = self.params.get("variant") if isinstance(self.params, dict) else None
        if not isinstance(pk, int):
            return None
        return Variant.objects.filter(pk=pk, project_id=self.project_id).first()

    @property
    def data_dir(self) -> Path:
        return Path(settings.DATA_DIR) / "jobs" / str(self.pk)

    @property
    def current_progress(self) -> Progress | None:
        return Progress.from_json(self.progress)

    @property
    def percent(self) -> int:
        if self.status == self.SUCCEEDED:
            return 100
        p = self.current_progress
        return int(100 * p.fraction) if p else 0

    # --- compare-and-set transitions; each returns whether it happened -------

    def _cas(self, from_status: str | tuple[str, ...], extra: Q | None = None, **changes: Any) -> bool:
        statuses = (from_status,) if isinstance(from_status, str) else from_status
        q = Q(pk=self.pk, status__in=statuses) & (extra or Q())
        done = Job.objects.filter(q).update(**changes) == 1
        if done:
            self.refresh_from_db()
        return done

    def claim(self, worker: str) -> bool:
        """QUEUED -> RUNNING for this worker. A second delivery finds the row
        claimed and does nothing."""
        now = timezone.now()
        return self._cas(
            self.QUEUED,
            Q(cancel_requested=False),
            status=self.RUNNING,
            worker=worker,
            attempts=F("attempts") + 1,
            started_at=now,
            heartbeat_at=now,
            error="",
        )

    def _end(
        self,
        status: str,
        log_line: str,
        from_status: str | tuple[str, ...] = ACTIVE,
        extra: Q | None = None,
        **changes: Any,
    ) -> bool:
        """The one way into a terminal state. Logs only a move that happened;
        a job that ends without succeeding cancels the queued jobs that wait for it,
        in the same transaction: nobody sees it ended with its dependents still queued."""
        with transaction.atomic():
            if not self._cas(from_status, extra, status=status, finished_at=timezone.now(), **changes):
                return False
            if log_line:
                self.append_log(log_line)
            if status != self.SUCCEEDED:
                for dep in self.dependents.filter(status=self.QUEUED):
                    dep.mark_cancelled(f"cancelled: {self} {status}")
        job_finished.send(sender=Job, job=self, status=status)
        return True

    def succeed(self, **changes: Any) -> bool:
        return self._end(self.SUCCEEDED, "", self.RUNNING, **changes)

    def fail(self, reason: str) -> bool:
        return self._end(self.FAILED, f"FAILED: {reason}", error=reason)

    def mark_cancelled(self, reason: str = "cancelled") -> bool:
        return self._end(self.CANCELLED, reason, error="")

    def request_cancel(self) -> bool:
        """Queued jobs stop at once; running ones stop at their next step.
        Returns False (and changes nothing, log included) for a job that already ended."""
        if not Job.objects.filter(pk=self.pk, status__in=self.ACTIVE).update(cancel_requested=True):
            self.refresh_from_db()
            return False
        if not self._end(self.CANCELLED, "cancelled before it started", self.QUEUED, error=""):
            self.append_log("cancel requested; stopping at the next step", only_if=self.RUNNING)
        self.refresh_from_db()
        return True

    def requeue_if_stale(self, stale_after: timedelta) -> str | None:
        """RUNNING with no heartbeat for `stale_after` (its worker died):
        back to QUEUED to resume, or FAILED after max_attempts. Returns the
        new status, or None when the job was alive or already moved."""
        stale = Q(heartbeat_at__lt=timezone.now() - stale_after)
        reason = (
            f"worker {self.worker or '?'} stopped responding (attempt {self.attempts} of {self.max_attempts})"
        )
        if self.attempts >= self.max_attempts:
            msg = f"{reason}; giving up after {self.attempts} attempts"
            return (
                self.FAILED
                if self._end(self.FAILED, f"FAILED: {msg}", self.RUNNING, stale, error=msg)
                else None
            )
        if self.cancel_requested:
            return (
                self.CANCELLED
                if self._end(self.CANCELLED, f"{reason}; cancelled as requested", self.RUNNING, stale)
                else None
            )
        if self._cas(self.RUNNING, stale, status=self.QUEUED, worker=""):
            self.append_log(f"{reason}; requeued to resume from the last checkpoint")
            return self.QUEUED
        return None

    def hand_on(self, version: DatasetVersion) -> None:
        """The queued jobs waiting for this one with no data of their own yet
        take `version` (what this one stored) as their data."""
        self.dependents.filter(status=self.QUEUED, dataset_version__isnull=True).update(
            dataset_version=version
        )

    def ready_dependents(self) -> list[Job]:
        """Queued jobs waiting for this one, once it succeeded."""
        if self.status != self.SUCCEEDED:
            return []
        return list(self.dependents.filter(status=self.QUEUED))

    def wait(
        self, timeout: float | None = None, poll: float = 1.0, on_poll: Callable[[Job], None] | None = None
    ) -> bool:
        """Follow the job to its end from outside a worker (a command, a
        script, a test): refresh every `poll` seconds and call `on_poll`
        after each refresh, the last one included. True once the job ended;
        False when `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.refresh_from_db()
            if on_poll is not None:
                on_poll(self)
            if self.is_terminal:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    # --- while running --------------------------------------------------------

    def beat(self) -> None:
        Job.objects.filter(pk=self.pk, status=self.RUNNING).update(heartbeat_at=timezone.now())

    def cancel_is_requested(self) -> bool:
        return Job.objects.filter(pk=self.pk, cancel_requested=True).exists()

    def save_progress(self, progress: Progress, points: list[dict[str, Any]] | None = None) -> None:
        """Store the latest progress (and beat); append curve points."""
        self.progress = progress.to_json()
        Job.objects.filter(pk=self.pk, status=self.RUNNING).update(
            progress=self.progress, heartbeat_at=timezone.now()
        )
        if points:
            JobPoint.append(self, points)

    def append_log(self, line: str, only_if: str | None = None) -> None:
        stamp = timezone.now().strftime("%Y-%m-%d %H:%M:%S")  # a job may run past midnight
        rows = Job.objects.filter(pk=self.pk, **({"status": only_if} if only_if else {}))
        rows.update(log=Concat(F("log"), Value(f"[{stamp}] {line}\n")))


class JobPoint(models.Model):
    """One sample of a job's curve (the loss at a step), appended as it
    comes: a poll asks only for the points after the last one it has."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="points")
    seq = models.PositiveIntegerField()
    data = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["job", "seq"]
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="unique_job_point")]

    def __str__(self) -> str:
        return f"{self.job} point {self.seq}"

    @classmethod
    def append(cls, job: Job, points: list[dict[str, Any]]) -> None:
        # Only the job's one running attempt appends, so max + 1 cannot race.
        last = cls.objects.filter(job=job).aggregate(m=models.Max("seq"))["m"] or 0
        rows = [JobPoint(job=job, seq=last + i, data=p) for i, p in enumerate(points, start=1)]
        JobPoint.objects.bulk_create(rows)  # by name: the stubs type cls(...) as JobPoint, not Self

    @classmethod
    def after(cls, job: Job, seq: int = 0) -> list[dict[str, Any]]:
        """Points after `seq`, each with its own `seq`, oldest first."""
        rows = cls.objects.filter(job=job, seq__gt=seq).order_by("seq").values_list("seq", "data")
        return [{"seq": s, **d} for s, d in rows]


class AbsorbPreset(models.Model):
    """Settings of the absorb form saved under a name, for the project's
    team to start the next absorb from; the form validates them on save and
    reads them back as its initial values (the prompt and the data are not
    part of a preset)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="absorb_presets")
    name = models.CharField(max_length=80)
    values = models.JSONField(default=dict, help_text="The form's settings, by field name")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="unique_absorb_preset_name")]

    def __str__(self) -> str:
        return self.name
