from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from engines.evaluation import ARM_SPECS, FLOOR, STUDENT, TEACHER
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


# The span of a metric's scale, where it is not 0-1 (the judge scores 1-10).
METRIC_SPAN = {"judge": 9.0}


def undecided(estimates: list[dict[str, Any] | None], metric: str) -> dict[str, Any] | None:
    """Why these estimates of one metric cannot carry a decision, or None when
    they can: the widest 95% CI is wider than EVAL_DECISIVE_CI_WIDTH of the
    metric's scale, or fewer than EVAL_MIN_HELD_OUT queries back them. The
    dict holds n, width (on a 0-1 scale), the limits, and a sentence."""
    done = [e for e in estimates if e and e.get("value") is not None]
    if not done:
        return None
    span = METRIC_SPAN.get(metric, 1.0)
    widths = [
        (e["high"] - e["low"]) / span for e in done if e.get("low") is not None and e.get("high") is not None
    ]
    width = max(widths, default=None)
    ns = [int(e["n"]) for e in done if e.get("n") is not None]
    n = min(ns, default=None)
    limit, need = settings.EVAL_DECISIVE_CI_WIDTH, settings.EVAL_MIN_HELD_OUT
    wide = width is not None and width > limit
    few = n is not None and n < need
    if not (wide or few):
        return None
    facts = []
    if n is not None:
        facts.append(
            f"n = {n} held-out quer{'y' if n == 1 else 'ies'}" + (f" (fewer than {need})" if few else "")
        )
    if width is not None:
        facts.append(f"95% CI width {width:.2f}" + (f" (wider than {limit:.2f})" if wide else ""))
    elif n == 1:
        facts.append("no CI at all")
    label = metric_label(metric)
    return {
        "n": n,
        "width": width,
        "limit": limit,
        "min_n": need,
        "text": f"Too uncertain to decide on {label}: {', '.join(facts)}. Differences inside these intervals "
        f"may be noise. Hold out more queries (at least {need}, more for small differences): upload more data "
        "or a larger eval split, make a suite from it and run the arms again.",
    }


def retained_reason(headline: dict[str, Any], arms_done: set[str], finished: bool) -> str:
    """Why "prompt effect retained" has no value, in words ("" when it has
    one, or while the comparison still runs)."""
    r = headline.get("retained")
    metric = metric_label(headline.get("metric") or "")
    head = "Prompt effect retained cannot be computed"
    if r is None:
        if not finished:
            return ""
        missing = [a for a in (FLOOR, TEACHER, STUDENT) if a not in arms_done]
        if missing:
            arms = " and ".join(missing)
            return (
                f"{head}: it needs the floor, teacher and student arms, and the {arms} "
                f"arm{'s have' if len(missing) > 1 else ' has'} no results. Run the four arms again."
            )
        return f"{head}: this comparison has no headline. Run the four arms again."
    if r.get("value") is not None:
        return ""
    if not r.get("n"):
        return (
            f"{head}: no held-out query has a {metric} score in all of the floor, teacher and student arms."
        )
    absolute = headline.get("absolute") or {}
    teacher, floor = absolute.get(TEACHER), absolute.get(FLOOR)
    compare = "Compare the arms' absolute scores below, or rank by a metric the prompt moves."
    if teacher is not None and floor is not None and teacher <= floor:
        if round(teacher, 6) == round(floor, 6):
            why = (
                f"the teacher (base with the prompt) scores {teacher:.2f}, the same as the floor (base "
                "without it), so on this metric the prompt adds nothing for the student to retain "
                "(the ratio would divide by zero)"
            )
        else:
            why = (
                f"the teacher (base with the prompt) scores {teacher:.2f}, below the floor's {floor:.2f} "
                "(base without it): the prompt does not help on this metric, so there is no gain to retain"
            )
        return f"{head} on {metric}: {why}. {compare}"
    return f"{head} on {metric}: {r.get('note') or 'the teacher is not above the floor'}. {compare}"


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


NOTE_MAX = 2000


class Rating(models.Model):
    """A person's verdict on one example of two runs side by side."""

    A, B, TIE = "a", "b", "tie"
    CHOICES = [(A, "A better"), (B, "B better"), (TIE, "Tie")]

    run_a = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="+")
    run_b = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="+")
    example = models.ForeignKey(EvalExample, on_delete=models.CASCADE, related_name="ratings")
    choice = models.CharField(max_length=3, choices=CHOICES)
    # Per-output verdicts and a note, each about the run it names (never the side it was shown on).
    pass_a = models.BooleanField(null=True, blank=True, help_text="Run A's answer passes (none: not said)")
    pass_b = models.BooleanField(null=True, blank=True, help_text="Run B's answer passes (none: not said)")
    note = models.TextField(blank=True, max_length=NOTE_MAX)
    blind = models.BooleanField(default=False, help_text="Rated with the run names hidden")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run_a", "run_b", "example", "user"], name="unique_rating")
        ]

    def __str__(self) -> str:
        return f"{self.user}: {self.get_choice_display()} on {self.example}"
