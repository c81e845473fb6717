"""What a variant saves, and how to serve it: cost per million requests for
the student and for the prompted base (the teacher arm), the prompt tokens
saved, the request count that pays back teacher generation and training, and
a deployment recommendation. Every figure comes from the comparison's own
runs on this worker (batched answers, single-request latency, tokens) and the
jobs that made the variant; the price per machine-hour is the user's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from engines import evaluation as ev
from evals.models import ArmComparison, EvalRun
from jobs.backend import variant_teacher_endpoint
from jobs.models import Job
from serving.models import Alias
from workbench import backend

MILLION = 1_000_000


@dataclass
class ArmCost:
    arm: str
    seconds_per_request: float  # batched, as the eval answered: machine time a request costs
    prompt_tokens: float
    completion_tokens: float
    p50: float | None  # single request
    batch_size: int | None
    per_million: float  # price of a million requests

    @property
    def seconds_per_token(self) -> float | None:
        return self.seconds_per_request / self.completion_tokens if self.completion_tokens else None


@dataclass
class Recommendation:
    backend: str
    weights: str  # "adapter" or "merged"
    max_batch: int | None
    reasons: list[str] = field(default_factory=list)


@dataclass
class Economics:
    price_per_hour: float
    arms: dict[str, ArmCost]
    one_off_seconds: dict[str, float]  # teacher, training
    problems: list[str] = field(default_factory=list)
    recommendation: Recommendation | None = None

    @property
    def student(self) -> ArmCost | None:
        return self.arms.get(ev.STUDENT)

    @property
    def teacher(self) -> ArmCost | None:
        return self.arms.get(ev.TEACHER)

    @property
    def one_off_cost(self) -> float:
        return sum(self.one_off_seconds.values()) / 3600 * self.price_per_hour

    @property
    def tokens_saved(self) -> float | None:
        if self.student is None or self.teacher is None:
            return None
        return self.teacher.prompt_tokens - self.student.prompt_tokens

    @property
    def saving_per_million(self) -> float | None:
        if self.student is None or self.teacher is None or self.problems:
            return None
        return self.teacher.per_million - self.student.per_million

    @property
    def cost_ratio(self) -> float | None:
        if self.student is None or self.teacher is None or not self.teacher.per_million or self.problems:
            return None
        return self.student.per_million / self.teacher.per_million

    @property
    def break_even_requests(self) -> int | None:
        """Requests after which the saving has paid for the teacher and the training;
        None when the student saves nothing per request."""
        saving = self.saving_per_million
        if saving is None or saving <= 0:
            return None
        return int(self.one_off_cost / (saving / MILLION)) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "price_per_hour": self.price_per_hour,
            "per_million": {arm: round(c.per_million, 4) for arm, c in self.arms.items()},
            "tokens_saved_per_request": self.tokens_saved,
            "saving_per_million": self.saving_per_million,
            "one_off_seconds": self.one_off_seconds,
            "one_off_cost": round(self.one_off_cost, 4),
            "break_even_requests": self.break_even_requests,
            "problems": self.problems,
            "recommendation": self.recommendation.__dict__ if self.recommendation else None,
        }


def _arm_cost(run: EvalRun, price: float) -> ArmCost | None:
    s = run.summary or {}
    per = s.get("seconds_per_example")
    if not isinstance(per, int | float) or per <= 0:
        return None
    return ArmCost(
        arm=run.arm,
        seconds_per_request=float(per),
        prompt_tokens=float(s.get("prompt_tokens") or 0),
        completion_tokens=float(s.get("completion_tokens") or 0),
        p50=(s.get("latency") or {}).get("p50"),
        batch_size=s.get("batch_size"),
        per_million=float(per) * MILLION / 3600 * price,
    )


def _duration(job: Job | None) -> float:
    if job is None or job.started_at is None or job.finished_at is None:
        return 0.0
    return max(0.0, (job.finished_at - job.started_at).total_seconds())


def economics(comparison: ArmComparison, price_per_hour: float | None = None) -> Economics:
    price = float(settings.SERVING_PRICE_PER_HOUR if price_per_hour is None else price_per_hour)
    runs = {r.arm: r for r in comparison.runs.all()}
    arms = {arm: c for arm, r in runs.items() if (c := _arm_cost(r, price)) is not None}
    finetune = comparison.absorb_job
    teacher = finetune.depends_on if finetune is not None else None
    variant = comparison.variant
    training = _duration(finetune) or float(variant.duration_seconds or 0)
    out = Economics(price, arms, {"teacher": _duration(teacher), "training": training})
    if ev.STUDENT not in arms or ev.TEACHER not in arms:
        out.problems.append("the student and teacher arms have not both answered yet")
    if variant_teacher_endpoint(variant) is not None:
        out.problems.append(
            "the teacher arm was answered by the teacher endpoint, not on this machine: "
            "its cost is not comparable with the student's"
        )
    out.recommendation = recommend(comparison, out)
    return out


def recommend(comparison: ArmComparison, money: Economics) -> Recommendation:
    """Backend, adapter or merged weights, and batch size, with the figures behind each."""
    variant = comparison.variant
    reasons: list[str] = []
    if backend.remote():
        name = "vllm"
        reasons.append("this workbench is configured to serve through vLLM.")
    else:
        name = "hf engine"
        reasons.append(
            "this workbench serves through its own hf engine; vLLM (continuous batching, batched LoRA, "
            "prefix caching) is the engine for many concurrent requests."
        )
    others = (
        Alias.objects.filter(variant__base_model=variant.base_model)
        .exclude(variant=variant)
        .exclude(variant__isnull=True)
        .values_list("variant", flat=True)
        .distinct()
        .count()
    )
    floor, student = money.arms.get(ev.FLOOR), money.arms.get(ev.STUDENT)
    overhead = (
        student.seconds_per_token / floor.seconds_per_token
        if floor and student and floor.seconds_per_token and student.seconds_per_token
        else None
    )
    if others:
        weights = "adapter"
        reasons.append(
            f"{others} other adapter{'s' if others != 1 else ''} of {variant.base_model} "
            f"{'are' if others != 1 else 'is'} served by aliases: one shared base holds them all."
        )
    else:
        weights = "merged" if overhead is not None and overhead > 1.05 else "adapter"
        measured = (
            f"the adapter costs {overhead:.2f}x the bare base per generated token on this eval"
            if overhead is not None
            else "the adapter's cost per token was not measured"
        )
        reasons.append(
            f"it would be the only adapter of {variant.base_model} in use and {measured}"
            + ("; merged weights serve at the base's speed." if weights == "merged" else ".")
        )
    max_batch = None
    if student and student.p50 and student.batch_size:
        gain = student.p50 / student.seconds_per_request
        max_batch = student.batch_size if gain > 1.2 else 1
        reasons.append(
            f"batched {student.batch_size} at a time, a request cost {student.seconds_per_request:.2f} s "
            f"of machine time against {student.p50:.2f} s alone ({gain:.1f}x)"
            + ("; batch requests." if gain > 1.2 else "; batching did not pay here.")
        )
    return Recommendation(name, weights, max_batch, reasons)
