from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import QuerySet
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify


class ProjectQuerySet(models.QuerySet["Project"]):
    def for_user(self, user: object) -> ProjectQuerySet:
        """Projects the user is a member of. Every project-scoped lookup goes
        through this, so a non-member never sees another team's data."""
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(memberships__user=user).distinct()


class Project(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = ProjectQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("project_detail", args=[self.slug])

    @staticmethod
    def unique_slug(name: str) -> str:
        base = slugify(name)[:90] or "project"
        slug, n = base, 2
        while Project.objects.filter(slug=slug).exists():
            slug, n = f"{base}-{n}", n + 1
        return slug

    def role_of(self, user: object) -> str | None:
        m = self.memberships.filter(user=user).first()
        return m.role if m else None


class Membership(models.Model):
    OWNER = "owner"
    MEMBER = "member"
    ROLES = [(OWNER, "Owner"), (MEMBER, "Member")]

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=ROLES, default=MEMBER)
    added_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="unique_membership")]
        ordering = ["project", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class BaseModel(models.Model):
    """A base model the workbench can load: a local safetensors directory."""

    name = models.CharField(max_length=200, unique=True)
    path = models.CharField(max_length=1000, help_text="Local directory with config.json and safetensors")
    source = models.CharField(max_length=300, blank=True, help_text="Where it came from")
    parameters = models.BigIntegerField(null=True, blank=True)
    is_default = models.BooleanField(default=False)
    added_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-is_default", "name"]

    def __str__(self) -> str:
        return self.name


class WorkerHeartbeat(models.Model):
    """Written by each Celery worker every few seconds (see workbench.celery),
    so liveness works with every broker, including the embedded one."""

    hostname = models.CharField(max_length=255, unique=True)
    queues = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    stopped = models.BooleanField(default=False)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @classmethod
    def alive(cls) -> QuerySet[WorkerHeartbeat]:
        cutoff = timezone.now() - timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS)
        return cls.objects.filter(stopped=False, last_seen__gte=cutoff)

    @property
    def is_alive(self) -> bool:
        cutoff = timezone.now() - timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS)
        return not self.stopped and self.last_seen >= cutoff


class WorkerPing(models.Model):
    """A round trip through the broker and a worker, started from the UI."""

    queue = models.CharField(max_length=50, default="default")
    created_at = models.DateTimeField(default=timezone.now)
    answered_at = models.DateTimeField(null=True)
    answered_by = models.CharField(max_length=255, blank=True)

    @property
    def round_trip_ms(self) -> int | None:
        if self.answered_at is None:
            return None
        return int((self.answered_at - self.created_at).total_seconds() * 1000)
