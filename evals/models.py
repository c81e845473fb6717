from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from engines.evaluation import ARM_SPECS
from jobs.models import Job, TeacherEndpoint
from workbench.models import DatasetVersion, FoundationModel, Project, PromptVersion, Variant

# What a run can be ranked by; rule metrics are "rule:<name>", facts "fact:<name>".
METRICS = {
    "all_rules": "All rules",
    "fact_recall": "Fact recall",
    "exact_match": "Exact match",
    "chrf": "chrF",
    "rouge_l": "ROUGE-L",
    "agreement": "Teacher agreement",
    "judge": "Judge score",
}


def metric_label(name: str) -> str:
    if name.startswith("rule:"):
        return f"rule {name[5:]}"
    if name.startswith("fact:"):
        return f"fact {name[5:]}"
    if name.startswith("lm_eval:"):
        return f"lm-eval {name[8:]}"
    return METRICS.get(name, name)


class EvalSuite(models.Model):
    """Held-out queries of a project (a dataset version's eval split, with
    reference answers where the rows have them) and the checks to run."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="eval_suites")
    name = models.CharField(max_length=200)
    dataset_version = models.ForeignKey(DatasetVersion, on_delete=models.PROTECT, related_name="eval_suites")
    prompt_version = models.ForeignKey(
        PromptVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="eval_suites",
        help_text="The prompt whose rules are checked and that the 'with prompt' arms get",
    )
    rules = models.JSONField(
        default=list, blank=True, help_text="Checkable rules (copied from the prompt version)"
    )
    facts = models.JSONField(
        default=list, blank=True, help_text="Facts checks (copied from the prompt version)"
    )
    main_metric = models.CharField(max_length=100, default="all_rules")
    judge = models.ForeignKey(
        Variant,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The variant that judges answers (none: no judge)",
    )
    judge_base = models.ForeignKey(
        FoundationModel,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="A base model that judges answers",
    )
    # A judge larger than the student is what makes its scores mean something: a 135M judge scores
    # an empty greeting 10 (bench/README). RESTRICT: deleting the endpoint must not drop the judge
    # unsaid.
    judge_endpoint = models.ForeignKey(
        TeacherEndpoint,
        null=True,
        blank=True,
        on_delete=models.RESTRICT,
        related_name="judged_suites",
        help_text="An OpenAI-compatible endpoint that judges answers",
    )
    judge_rubric = models.TextField(blank=True)
    lm_eval_tasks = models.JSONField(
        default=list,
        blank=True,
        help_text='"suite", "general_skills" or the name of an installed lm-eval task whose data is on disk',
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="unique_suite_name")]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("suite_detail", args=[self.project.slug, self.pk])

    @property
    def has_judge(self) -> bool:
        return bool(
            (self.judge_id or self.judge_base_id or self.judge_endpoint_id) and self.judge_rubric.strip()
        )

    @property
    def judge_label(self) -> str:
        """Who judges, in words ("" when nobody does)."""
        if self.judge_endpoint_id and self.judge_endpoint:
            return f"endpoint {self.judge_endpoint.name} ({self.judge_endpoint.model})"
        if self.judge_id and self.judge:
            return f"variant {self.judge.name}"
        if self.judge_base_id and self.judge_base:
            return f"base model {self.judge_base.name}"
        return ""


class EvalExample(models.Model):
    """One held-out query of a suite, copied from its dataset row: a suite
    never changes when the dataset gets new versions."""

    suite = models.ForeignKey(EvalSuite, on_delete=models.CASCADE, related_name="examples")
    index = models.PositiveIntegerField()
    messages = models.JSONField(help_text="The conversation up to the answer")
    reference = models.TextField(blank=True, help_text="The row's own answer, if it had one")
    source_index = models.PositiveIntegerField(help_text="Row index in the dataset version")

    class Meta:
        ordering = ["suite", "index"]
        constraints = [models.UniqueConstraint(fields=["suite", "index"], name="unique_example_index")]

    def __str__(self) -> str:
        return f"{self.suite} example {self.index}"

    @property
    def query(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


class ArmComparison(models.Model):
    """The four arms of one absorbed variant on one suite, run by one job
    with one loaded base model."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="arm_comparisons")
    suite = models.ForeignKey(EvalSuite, on_delete=models.CASCADE, related_name="comparisons")
    variant = models.ForeignKey(Variant, on_delete=models.CASCADE, related_name="comparisons")
    absorb_job = models.ForeignKey(
        Job,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The fine-tune that made the variant",
    )
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="comparisons")
    headline = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.variant} on {self.suite}"

    def get_absolute_url(self) -> str:
        return reverse("comparison_detail", args=[self.project.slug, self.pk])


class EvalRun(models.Model):
    """One variant (a base model, an optional adapter, an optional prompt)
    on one suite: every example's output and checks, and the summary."""

    ARMS = [(a.name, a.label) for a in ARM_SPECS]

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="eval_runs")
    suite = models.ForeignKey(EvalSuite, on_delete=models.CASCADE, related_name="runs")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="eval_runs")
    comparison = models.ForeignKey(
        ArmComparison, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    base_model = models.ForeignKey(FoundationModel, on_delete=models.PROTECT, related_name="eval_runs")
    variant = models.ForeignKey(
        Variant,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="eval_runs",
        help_text="The variant whose adapter answers (none: the base model alone)",
    )
    prompt_version = models.ForeignKey(
        PromptVersion,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="eval_runs",
        help_text="The system prompt sent (none: no prompt)",
    )
    arm = models.CharField(max_length=20, blank=True, choices=ARMS)
    generation = models.JSONField(default=dict, blank=True, help_text="GenerationSettings used")
    summary = models.JSONField(
        default=dict, blank=True, help_text="metric -> {value, low, high, n}; tokens, latency, timings"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.label

    def get_absolute_url(self) -> str:
        return reverse("run_detail", args=[self.project.slug, self.pk])

    @property
    def label(self) -> str:
        who = self.variant.name if self.variant_id and self.variant else self.base_model.name
        prompt = f" + {self.prompt_version}" if self.prompt_version_id else ", no prompt"
        return f"{who}{prompt}"

    @property
    def status(self) -> str:
        return self.job.status if self.job_id and self.job else Job.QUEUED

    def metric(self, name: str) -> dict[str, Any] | None:
        value = (self.summary.get("metrics") or {}).get(name)
        return value if isinstance(value, dict) else None


class EvalResult(models.Model):
    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="results")
    example = models.ForeignKey(EvalExample, on_delete=models.CASCADE, related_name="results")
    output = models.TextField()
    finish_reason = models.CharField(max_length=10, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    seconds = models.FloatField(default=0.0, help_text="Wall time of the batch that produced it")
    checks = models.JSONField(default=dict, blank=True, help_text="metric -> score of this example")
    judge_score = models.FloatField(null=True, blank=True)
    judge_reasoning = models.TextField(blank=True)

    class Meta:
        ordering = ["run", "example__index"]
        constraints = [models.UniqueConstraint(fields=["run", "example"], name="unique_run_example")]

    def __str__(self) -> str:
        return f"{self.run} on {self.example}"


class Rating(models.Model):
    """A person's verdict on one example of two runs side by side."""

    A, B, TIE = "a", "b", "tie"
    CHOICES = [(A, "A better"), (B, "B better"), (TIE, "Tie")]

    run_a = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="+")
    run_b = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="+")
    example = models.ForeignKey(EvalExample, on_delete=models.CASCADE, related_name="ratings")
    choice = models.CharField(max_length=3, choices=CHOICES)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run_a", "run_b", "example", "user"], name="unique_rating")
        ]

    def __str__(self) -> str:
        return f"{self.user}: {self.get_choice_display()} on {self.example}"
