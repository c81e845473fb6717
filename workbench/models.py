from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connection, models
from django.db.models import Q
from django.db.models.expressions import RawSQL
from django.db.models.functions import Lower
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from engines.curation import student_view

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User


class ProjectQuerySet(models.QuerySet["Project"]):
    def for_user(self, user: User | AnonymousUser) -> ProjectQuerySet:
        """Projects the user is a member of. Every project-scoped lookup goes
        through this, so a non-member never sees another team's data."""
        if not user.is_authenticated:
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
        constraints = [
            models.UniqueConstraint(
                Lower("name"),
                name="unique_project_name_ci",
                violation_error_message="A project with this name already exists.",
            ),
        ]

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

    def role_of(self, user: User) -> str | None:
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


class FoundationModel(models.Model):
    """A base model the workbench can load (a local safetensors directory): what
    adapters are trained over and served on. (Not "BaseModel": that reads like
    an abstract class.)"""

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

    def __str__(self) -> str:
        return f"ping {self.pk} on {self.queue}"

    @property
    def round_trip_ms(self) -> int | None:
        if self.answered_at is None:
            return None
        return int((self.answered_at - self.created_at).total_seconds() * 1000)


class Prompt(models.Model):
    """A named system prompt of a project; its text lives in immutable versions."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="unique_prompt_name")]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("prompt_detail", args=[self.project.slug, self.pk])

    @property
    def latest(self) -> PromptVersion | None:
        return self.versions.order_by("-number").first()


class PromptVersion(models.Model):
    """One saved text of a prompt, with its checkable rules and facts. Never changed."""

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    text = models.TextField()
    sha256 = models.CharField(max_length=64)
    rules = models.JSONField(default=list, blank=True)
    facts = models.JSONField(
        default=list, blank=True, help_text="Facts checks (engines.facts format): what answers must state"
    )
    note = models.CharField(max_length=300, blank=True)
    token_counts = models.JSONField(
        default=dict,
        blank=True,
        help_text="Token cost under each base model (by name), computed once: see cost_under",
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["prompt", "-number"]
        constraints = [models.UniqueConstraint(fields=["prompt", "number"], name="unique_prompt_version")]

    def __str__(self) -> str:
        return f"{self.prompt.name}@{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("prompt_version", args=[self.prompt.project.slug, self.prompt_id, self.number])

    def cost_under(self, base_model: FoundationModel) -> dict[str, Any]:
        """The text's token cost under the base model's tokenizer and chat
        template (see workbench.prompt_costs.breakdown). The text never changes,
        so the counts are kept on the row, keyed by model name and checked
        against the model's path (a re-registered model is counted again)."""
        cached = self.token_counts.get(base_model.name)
        if cached and cached.get("path") == base_model.path:
            return cached
        from workbench.prompt_costs import breakdown  # loads a tokenizer

        cost = {"path": base_model.path, **breakdown(base_model.path, self.text)}
        self.token_counts = {**self.token_counts, base_model.name: cost}
        if self.pk:
            PromptVersion.objects.filter(pk=self.pk).update(token_counts=self.token_counts)
        return cost

    def too_long_for(self, base_model: FoundationModel) -> str | None:
        """Why this text cannot be used with the base model (a request with it
        does not fit the model's context), or None when it fits. Later steps
        (teacher generation, fine-tunes, evals) refuse a version that is too long."""
        cost = self.cost_under(base_model)
        context = cost.get("context")
        if context is None or cost["request_total"] < context:
            return None
        return (
            f"{self} is {cost['request_total']:,} tokens per request with {base_model.name}'s chat "
            f"template; the model reads at most {context:,} tokens, so no room is left for a "
            f"query and an answer. Shorten the prompt."
        )


class Dataset(models.Model):
    """A named dataset of a project; its rows live in immutable versions."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="unique_dataset_name")]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("dataset_detail", args=[self.project.slug, self.pk])

    @property
    def latest(self) -> DatasetVersion | None:
        return self.versions.order_by("-number").first()

    @property
    def captured(self) -> bool:
        """Some version holds captured /v1 requests (reads prefetched versions when there are)."""
        return any(v.captured for v in self.versions.all())


class VisibleVersionManager(models.Manager["DatasetVersion"]):
    """The default manager: only versions whose rows are all stored. An import
    in progress inserts its rows in many short transactions into a staging
    version; no list, picker, export, job or eval sees it until its last step
    makes it ready (and related managers, `dataset.versions`, filter the same)."""

    def get_queryset(self) -> models.QuerySet[DatasetVersion]:
        return super().get_queryset().filter(state=DatasetVersion.READY)


class DatasetVersion(models.Model):
    """An immutable set of normalised rows (see engines.formats), with a
    deterministic train/eval split. Edits make a new version."""

    UPLOAD = "upload"
    TEACHER = "teacher"
    EDIT = "edit"
    KINDS = [(UPLOAD, "Upload"), (TEACHER, "Teacher answers"), (EDIT, "Edited")]
    READY = "ready"
    IMPORTING = "importing"
    STATES = [(READY, "Ready"), (IMPORTING, "Importing")]

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=20, choices=KINDS, default=UPLOAD)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    format = models.CharField(max_length=20, blank=True)
    source_filename = models.CharField(max_length=255, blank=True, help_text="As uploaded; display only")
    file = models.CharField(max_length=255, blank=True, help_text="Stored upload, relative to MEDIA_ROOT")
    sha256 = models.CharField(max_length=64, help_text="Hash of the normalised rows")
    row_count = models.PositiveIntegerField(default=0)
    duplicate_count = models.PositiveIntegerField(default=0)
    eval_percent = models.PositiveSmallIntegerField(default=10)
    eval_min = models.PositiveIntegerField(
        default=0,
        help_text="The split holds out at least this many rows (at most half); 0: the percent alone",
    )
    split_seed = models.IntegerField(default=0)
    token_stats = models.JSONField(default=dict, blank=True)
    meta = models.JSONField(default=dict, blank=True, help_text="Lineage and options")
    state = models.CharField(
        max_length=10,
        choices=STATES,
        default=READY,
        help_text="importing: a staging version, invisible until all its rows are stored",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = VisibleVersionManager()
    # Staging versions too (imports and their cleanup). noqa: ruff takes a Manager() for a field.
    all_objects = models.Manager()  # noqa: DJ012

    class Meta:
        ordering = ["dataset", "-number"]
        constraints = [models.UniqueConstraint(fields=["dataset", "number"], name="unique_dataset_version")]

    def __str__(self) -> str:
        return f"{self.dataset.name}@{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("dataset_version", args=[self.dataset.project.slug, self.dataset_id, self.number])

    @property
    def eval_count(self) -> int:
        return self.rows.filter(split=DatasetRow.EVAL).count()

    @property
    def captured(self) -> bool:
        """Its rows include /v1 requests captured from the request log: their
        answers are what was served, not the teacher's."""
        return bool(self.meta.get("captured_requests"))


class DatasetRowQuerySet(models.QuerySet["DatasetRow"]):
    def failing_rule(self, rule: str) -> DatasetRowQuerySet:
        """The rows whose answer fails `rule`, filtered in SQL (never a list
        of ids: 250k of them pass SQLite's limit on query variables)."""
        if connection.features.supports_json_field_contains:
            return self.filter(failing__contains=[rule])
        # SQLite has no JSON containment: look inside the array with json_each.
        table = connection.ops.quote_name(DatasetRow._meta.db_table)
        column = connection.ops.quote_name(DatasetRow._meta.get_field("failing").column)
        fails = RawSQL(
            f"EXISTS (SELECT 1 FROM json_each({table}.{column}) WHERE json_each.value = %s)",
            (rule,),
            output_field=models.BooleanField(),
        )
        return self.alias(_fails_rule=fails).filter(_fails_rule=True)

    def unresolved(self) -> DatasetRowQuerySet:
        """Rows still failing a rule: not accepted in review (see DatasetRow.is_unresolved)."""
        return self.filter(DatasetRow.UNRESOLVED)

    def flagged(self) -> DatasetRowQuerySet:
        """Rows that show a flag on the review page (see DatasetRow.flags)."""
        return self.filter(DatasetRow.FLAGGED)


class DatasetRow(models.Model):
    """One normalised conversation. What review decided is data: `failing`
    (the rules the answer fails), `notes` (other warnings about the answer:
    a prompt leak, empty, cut off) and `review` (edited, accepted); the flags
    shown on the page are derived from them, never read back."""

    TRAIN = "train"
    EVAL = "eval"
    NOT_REVIEWED = ""
    EDITED = "edited"
    ACCEPTED = "accepted"
    # A dropped row is not in the reviewed version at all.
    REVIEW_STATES = [(NOT_REVIEWED, "Not reviewed"), (EDITED, "Edited"), (ACCEPTED, "Accepted as it is")]

    version = models.ForeignKey(DatasetVersion, on_delete=models.CASCADE, related_name="rows")
    index = models.PositiveIntegerField()
    line = models.PositiveIntegerField(default=0, help_text="Line in the uploaded file")
    messages = models.JSONField()
    sha256 = models.CharField(max_length=64)
    split = models.CharField(max_length=5, default=TRAIN)
    notes = models.JSONField(
        default=list,
        blank=True,
        help_text="Warnings about the answer other than rules: prompt leaks, empty, cut off",
    )
    extra = models.JSONField(default=dict, blank=True, help_text="Fields of the uploaded row no format reads")
    failing = models.JSONField(
        default=list, blank=True, help_text="Names of the version's rules the answer fails"
    )
    review = models.CharField(
        max_length=10,
        choices=REVIEW_STATES,
        default=NOT_REVIEWED,
        blank=True,
        help_text="What a reviewer did: edited the answer, or accepted it as it is",
    )
    curation = models.JSONField(
        default=dict, blank=True, help_text="How the answer was made: samples, pick, opening, repairs"
    )

    objects = DatasetRowQuerySet.as_manager()

    # An accepted answer no longer warns; an edited one is checked again, so its `failing` is current.
    UNRESOLVED = ~Q(failing=[]) & ~Q(review=ACCEPTED)
    FLAGGED = ~Q(review=ACCEPTED) & (~Q(failing=[]) | ~Q(notes=[]))

    class Meta:
        ordering = ["version", "index"]
        constraints = [models.UniqueConstraint(fields=["version", "index"], name="unique_row_index")]
        indexes = [models.Index(fields=["version", "split", "index"])]

    def __str__(self) -> str:
        return f"{self.version} row {self.index}"

    @property
    def is_unresolved(self) -> bool:
        return bool(self.failing) and self.review != self.ACCEPTED

    @property
    def flags(self) -> list[str]:
        """What the review page shows beside the row (display only)."""
        if self.review == self.ACCEPTED:
            return []
        return [*self.notes, *(f"fails rule: {name}" for name in self.failing)]


class Variant(models.Model):
    """A servable model: a base model plus (optionally) a LoRA adapter, with
    the lineage that produced it."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="variants")
    name = models.CharField(max_length=200)
    base_model = models.ForeignKey(FoundationModel, on_delete=models.PROTECT, related_name="variants")
    adapter_path = models.CharField(
        max_length=1000, blank=True, help_text="LoRA adapter directory (safetensors)"
    )
    prompt_version = models.ForeignKey(
        PromptVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="variants"
    )
    prompt_sha256 = models.CharField(max_length=64, blank=True)
    # An absorbed variant records the prompt it absorbed (lineage) and is served
    # without it; a "prompted" variant (a base + a prompt) gets it prepended.
    prepend_prompt = models.BooleanField(
        default=False, help_text="Serve with prompt_version as the system prompt"
    )
    dataset_version = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="variants"
    )
    hyperparameters = models.JSONField(default=dict, blank=True)
    generation = models.JSONField(
        default=dict,
        blank=True,
        help_text="Generation guard rails it answers with in evals and /v1 unless a request sets them "
        "(repetition_penalty, no_repeat_ngram_size, stop); an absorbed variant takes its teacher's",
    )
    final_loss = models.FloatField(null=True, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_base(self) -> bool:
        """A registered base model as served: no adapter, no prompt."""
        return not self.adapter_path and not self.prepend_prompt

    @property
    def engine_model(self) -> str:
        """The name the inference engine knows this variant by: the base's
        served name, or the adapter's name (one LoRA slot per adapter variant)."""
        return f"variant-{self.pk}" if self.adapter_path else self.base_model.name

    @property
    def system_prompt(self) -> str | None:
        return self.prompt_version.text if self.prepend_prompt and self.prompt_version else None

    @property
    def student_passages(self) -> int:
        """How many of its prompt's passages the adapter was trained to read
        beside the question (TrainConfig.student_passages); 0 for most."""
        k = (self.hyperparameters or {}).get("student_passages") or 0
        return k if isinstance(k, int) and self.adapter_path and self.prompt_version_id else 0

    def student_view(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages as this adapter reads them: with its prompt's most
        relevant passages after the last user message when it was trained so."""
        k = self.student_passages
        if not k or self.prompt_version is None:
            return messages
        return student_view(messages, self.prompt_version.text, self.prompt_version.rules or [], k)

    def newer_prompt_version(self) -> PromptVersion | None:
        """The latest version of the absorbed prompt when it is newer than the
        one this adapter learned: the variant is stale."""
        if not self.adapter_path or self.prompt_version is None:
            return None
        latest = self.prompt_version.prompt.versions.order_by("-number").first()
        return latest if latest and latest.number > self.prompt_version.number else None
