from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from workbench.models import BaseModel, DatasetVersion, Project, PromptVersion, Variant


class Job(models.Model):
    """A unit of long work on a worker. The row owns its lifecycle; every
    state change is a compare-and-set update, and terminal states never change."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STATUSES = [(QUEUED, "Queued"), (RUNNING, "Running"), (SUCCEEDED, "Succeeded"), (FAILED, "Failed"),
                (CANCELLED, "Cancelled")]
    ACTIVE = (QUEUED, RUNNING)
    TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

    TEACHER = "teacher"
    FINETUNE = "finetune"
    KINDS = [(TEACHER, "Teacher generation"), (FINETUNE, "Fine-tune")]

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=20, choices=KINDS)
    status = models.CharField(max_length=20, choices=STATUSES, default=QUEUED, db_index=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="jobs")
    prompt_version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="jobs")
    dataset_version = models.ForeignKey(DatasetVersion, null=True, blank=True, on_delete=models.PROTECT,
                                        related_name="jobs", help_text="Input rows (filled in by the teacher job "
                                        "for a fine-tune that depends on one)")
    output_dataset = models.ForeignKey(DatasetVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                       related_name="produced_by")
    variant = models.ForeignKey(Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    depends_on = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="dependents")
    params = models.JSONField(default=dict, blank=True)
    progress = models.JSONField(default=dict, blank=True)
    history = models.JSONField(default=list, blank=True, help_text="Loss curve points")
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    cancel_requested = models.BooleanField(default=False)
    worker = models.CharField(max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("job_detail", args=[self.project.slug, self.pk])

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def data_dir(self) -> Any:
        return settings.DATA_DIR / "jobs" / str(self.pk)

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
        return self._cas(self.QUEUED, Q(cancel_requested=False), status=self.RUNNING, worker=worker,
                         attempts=F("attempts") + 1, started_at=now, heartbeat_at=now, error="")

    def succeed(self, **changes: Any) -> bool:
        return self._cas(self.RUNNING, status=self.SUCCEEDED, finished_at=timezone.now(), **changes)

    def fail(self, reason: str) -> bool:
        self.append_log(f"FAILED: {reason}")
        return self._cas(self.ACTIVE, status=self.FAILED, error=reason, finished_at=timezone.now())

    def mark_cancelled(self, reason: str = "cancelled") -> bool:
        self.append_log(reason)
        return self._cas(self.ACTIVE, status=self.CANCELLED, finished_at=timezone.now(), error="")

    def request_cancel(self) -> None:
        """Queued jobs stop at once; running ones stop at their next step."""
        Job.objects.filter(pk=self.pk, status__in=self.ACTIVE).update(cancel_requested=True)
        self._cas(self.QUEUED, status=self.CANCELLED, finished_at=timezone.now())
        self.refresh_from_db()

    def requeue_if_stale(self, stale_after: timedelta) -> str | None:
        """RUNNING with no heartbeat for `stale_after` (its worker died):
        back to QUEUED to resume, or FAILED after max_attempts. Returns the
        new status, or None when the job was alive or already moved."""
        cutoff = timezone.now() - stale_after
        stale = Q(heartbeat_at__lt=cutoff)
        reason = f"worker {self.worker or '?'} stopped responding (attempt {self.attempts} of {self.max_attempts})"
        if self.attempts >= self.max_attempts:
            if self._cas(self.RUNNING, stale, status=self.FAILED, finished_at=timezone.now(),
                         error=f"{reason}; giving up after {self.attempts} attempts"):
                self.append_log(f"FAILED: {self.error}")
                return self.FAILED
            return None
        if self.cancel_requested:
            return self.CANCELLED if self._cas(self.RUNNING, stale, status=self.CANCELLED,
                                               finished_at=timezone.now()) else None
        if self._cas(self.RUNNING, stale, status=self.QUEUED, worker=""):
            self.append_log(f"{reason}; requeued to resume from the last checkpoint")
            return self.QUEUED
        return None

    # --- progress ------------------------------------------------------------

    def beat(self) -> None:
        Job.objects.filter(pk=self.pk, status=self.RUNNING).update(heartbeat_at=timezone.now())

    def cancel_is_requested(self) -> bool:
        return Job.objects.filter(pk=self.pk, cancel_requested=True).exists()

    def set_progress(self, progress: dict[str, Any], point: dict[str, Any] | None = None) -> None:
        changes: dict[str, Any] = {"progress": progress, "heartbeat_at": timezone.now()}
        if point is not None:
            self.history = [*self.history, point]
            changes["history"] = self.history
        self.progress = progress
        Job.objects.filter(pk=self.pk, status=self.RUNNING).update(**changes)

    def append_log(self, line: str) -> None:
        from django.db.models import Value
        from django.db.models.functions import Concat

        stamp = timezone.now().strftime("%H:%M:%S")
        Job.objects.filter(pk=self.pk).update(log=Concat(F("log"), Value(f"[{stamp}] {line}\n")))

    @property
    def percent(self) -> int:
        p = self.progress or {}
        total = p.get("max_steps") or p.get("total")
        done = p.get("step") if "max_steps" in p else p.get("done")
        if self.status == self.SUCCEEDED:
            return 100
        return int(100 * (done or 0) / total) if total else 0
