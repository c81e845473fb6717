"""How long a step will take, from what this workbench's workers measured:
the finished jobs' own records (a teacher job's final progress: queries
and seconds; a variant's metrics: training tokens and seconds; an eval job's
progress: answers and seconds). Without a measurement, a default rate from
bench/README.md (2 vCPU, SmolLM2-135M), and the plan says so."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines import facts as facts_module
from engines.curation.context import student_view
from engines.tokens import length_stats, load_tokenizer
from jobs.models import Job, TeacherEndpoint
from workbench.models import FoundationModel

RECENT = 10  # finished jobs a rate is measured over
# bench/README.md, 2 vCPU, SmolLM2-135M-Instruct: teacher 0.54 queries/s (best of 1, batch 16),
# fine-tune 157 tokens/s, a decode step of 16 rows ~0.3 s (128 new tokens: ~0.4 answers/s).
# Judge verdicts and lm-eval rows ("eval steps"): 0.17/s on the lumen run of bench/README
# (2026-12-07, AMD, loaded); a quiet box does better.
# Synthesis: 375 questions drafted in 330 s on lumen (bench/README, ninth session).
DEFAULT_RATES = {"samples": 0.5, "tokens": 150.0, "answers": 0.4, "eval steps": 0.2, "questions": 1.0}
SAMPLE_ROWS = 200  # rows whose tokens are counted to estimate the rest


@dataclass
class Estimate:
    count: float  # how much work, in `unit`
    unit: str  # "samples" (teacher), "questions" (synthesis), "tokens" (training), "answers" (eval)
    rate: float  # units per second
    source: str  # where the rate comes from, in words
    measured: bool
    counts: str = ""  # the counts behind `count`, in words
    notes: list[str] = field(default_factory=list)  # what the estimate leaves out
    default_seconds: float | None = None  # at the default rates, where parts have rates of their own

    @property
    def seconds(self) -> float:
        return self.count / self.rate if self.rate > 0 else 0.0

    @property
    def seconds_at_defaults(self) -> float:
        """What a workbench that has measured nothing yet would plan."""
        if self.default_seconds is not None:
            return self.default_seconds
        return self.count / DEFAULT_RATES[self.unit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "count": round(self.count),
            "unit": self.unit,
            "rate": round(self.rate, 3),
            "measured": self.measured,
            "source": self.source,
            "counts": self.counts,
            "notes": self.notes,
            "text": self.describe(),
        }

    def describe(self) -> str:
        text = f"~{duration(self.seconds)} for {self.counts} at {self.rate:.2f} {self.unit}/s ({self.source})"
        return text + "".join(f"; {n}" for n in self.notes)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(unit: str, measured: list[tuple[int, float, float]], what: str) -> tuple[float, str, bool]:
    """Units per second over (job id, units, seconds) measurements, or the default."""
    done = [(pk, units, seconds) for pk, units, seconds in measured if units > 0 and seconds > 0]
    if not done:
        default = DEFAULT_RATES[unit]
        return default, f"no measurement yet: using the default rate {default:g} {unit}/s", False
    rate = sum(u for _, u, _ in done) / sum(s for _, _, s in done)
    jobs = ", ".join(f"#{pk}" for pk, _, _ in done[:5]) + (" …" if len(done) > 5 else "")
    return rate, f"measured on this workbench over {what} {jobs}", True


def _samples_per_query(params: dict[str, Any]) -> int:
    curation = params.get("curation")
    best_of = curation.get("best_of") if isinstance(curation, dict) else 1
    return best_of if isinstance(best_of, int) and best_of > 0 else 1


def _measured(
    kind: str,
    teacher_model: FoundationModel,
    endpoint: TeacherEndpoint | None,
    per_done: Callable[[dict[str, Any]], int],
) -> list[tuple[int, float, float]]:
    """(job id, units, seconds) of the same teacher's recent finished jobs of a kind, from
    their final progress (done x per_done(params) units)."""
    jobs = Job.objects.filter(kind=kind, status=Job.SUCCEEDED)
    jobs = (
        jobs.filter(teacher_endpoint=endpoint)
        if endpoint is not None
        else jobs.filter(base_model=teacher_model, teacher_endpoint__isnull=True)
    )
    measured = []
    for job in jobs.order_by("-finished_at")[:RECENT]:
        p = job.progress or {}
        done, elapsed = p.get("done"), p.get("elapsed")
        if isinstance(done, int | float) and isinstance(elapsed, int | float):
            measured.append((job.pk, float(done) * per_done(job.params), float(elapsed)))
    return measured


def teacher(
    queries: int,
    teacher_model: FoundationModel,
    endpoint: TeacherEndpoint | None,
    curation: dict[str, Any] | None,
) -> Estimate:
    """Samples (queries x best of N of the first round) at the samples/s the same teacher measured."""
    measured = _measured("teacher", teacher_model, endpoint, _samples_per_query)
    rate, source, ok = _rate("samples", measured, "teacher jobs")
    best_of = _samples_per_query({"curation": curation})
    notes = []
    if curation and int(curation.get("rounds") or 1) > 1:
        notes.append("later curation rounds (only queries still failing) come on top")
    counts = f"{queries:,} queries" + (f" x best of {best_of}" if best_of > 1 else "")
    return Estimate(queries * best_of, "samples", rate, source, ok, counts, notes)


def synthesis(
    count: int, teacher_model: FoundationModel, endpoint: TeacherEndpoint | None, oversample: float
) -> Estimate:
    """Questions drafted (about `oversample` x the count kept) at the rate the same teacher's
    synthesis jobs measured."""
    measured = _measured("synthesize", teacher_model, endpoint, lambda params: 1)
    rate, source, ok = _rate("questions", measured, "synthesis jobs")
    drafts = round(count * oversample)
    return Estimate(drafts, "questions", rate, source, ok, f"~{drafts:,} questions drafted for {count:,}")


def example_tokens(base: FoundationModel, conversations: Sequence[list[dict[str, str]]]) -> float | None:
    """Mean tokens of conversations as the student is trained on them (no system prompt)."""
    if not conversations:
        return None
    try:
        stats = length_stats(load_tokenizer(base.path), conversations)
    except (OSError, ValueError):
        return None
    return stats["total"] / stats["count"] if stats.get("count") else None


def training(
    base: FoundationModel,
    train: dict[str, Any],
    rows: int,
    head: Sequence[list[dict[str, str]]],
    answered: bool,
    max_new_tokens: int,
    fact_checks: Iterable[Any] = (),
    prompt: str = "",
    rules: Sequence[Any] = (),
) -> Estimate:
    """Tokens: examples (train rows, the general mix, repeated fact rows) x their mean
    length x epochs, at the tokens/s of the finished fine-tunes on this base.
    A student that reads passages (`student_passages`) is counted with them:
    the rows are measured as the fine-tune will see them, from the prompt's text."""
    variants = (
        Job.objects.filter(kind="finetune", status=Job.SUCCEEDED, base_model=base, variant__isnull=False)
        .select_related("variant")
        .order_by("-finished_at")[:RECENT]
    )
    measured = []
    for job in variants:
        assert job.variant is not None
        m = job.variant.metrics or {}
        tokens, seconds = m.get("train_tokens"), m.get("duration_seconds")
        if isinstance(tokens, int | float) and isinstance(seconds, int | float):
            measured.append((job.pk, float(tokens), float(seconds)))
    rate, source, ok = _rate("tokens", measured, "fine-tunes")
    notes: list[str] = []
    queries = [last_user(m) for m in head]  # the user's own words: the facts checks match them
    passages = int(train.get("student_passages") or 0)
    if passages and prompt.strip():
        head = [student_view(conv, prompt, rules, passages) for conv in head]
        notes.append(f"each row carries the prompt's {passages} passages nearest its question")
    per = example_tokens(base, head)
    if per is None:  # about 4 characters a token, and the chat template's own
        chars = sum(len(m.get("content", "")) for conv in head for m in conv)
        per = chars / max(1, len(head)) / 4 + 10
        notes.append("token counts guessed from characters (the tokenizer could not be read)")
    if not answered:
        per += max_new_tokens
        notes.append(f"answers counted at their limit of {max_new_tokens} tokens (an upper bound)")
    checks = list(fact_checks)
    fact_share = (
        sum(bool(facts_module.applicable(checks, q)) for q in queries) / len(queries)
        if checks and queries
        else 0.0
    )
    fact_repeat = int(train.get("fact_repeat") or 1)
    general = float(train.get("general_mix") or 0.0)
    examples = rows * (1 + general) + rows * fact_share * (fact_repeat - 1)
    if train.get("max_steps"):
        processed = (
            int(train["max_steps"]) * int(train.get("batch_size") or 1) * int(train.get("grad_accum") or 1)
        )
        counts = f"{train['max_steps']} steps x {processed // int(train['max_steps'])} examples x ~{per:.0f} tokens"
    else:
        epochs = int(train.get("epochs") or 1)
        processed = round(examples * epochs)
        counts = f"~{examples:,.0f} examples x {epochs} epoch{'s' if epochs > 1 else ''} x ~{per:.0f} tokens"
        if fact_share and fact_repeat > 1:
            notes.append(f"~{fact_share:.0%} of the rows ask a fact and are trained {fact_repeat} times")
    if int(train.get("refine_samples") or 0):
        notes.append("the refine round is not estimated")
    return Estimate(processed * per, "tokens", rate, source, ok, counts, notes)


def evaluation(
    base: FoundationModel, heldout: int, lm_eval_tasks: Sequence[str], judge: bool = False
) -> Estimate:
    """Answers (four arms x the held-out rows) at the answers/s of finished
    eval jobs on this base; then, counted as the eval job counts them, a
    verdict per judged answer and an arm's worth of rows per lm-eval pass
    (the floor and the student), at the rate those steps took in finished jobs."""
    jobs = Job.objects.filter(kind="eval", status=Job.SUCCEEDED, base_model=base).order_by("-finished_at")
    measured, extra_measured = [], []
    for job in jobs[:RECENT]:
        p = job.progress or {}
        m = p.get("metrics") or {}
        # The answers and their own seconds (judge and lm-eval apart); older jobs counted only answers.
        done, elapsed = (
            (m.get("answers"), m.get("answer_seconds"))
            if "answers" in m
            else (p.get("done"), p.get("elapsed"))
            if p.get("unit") == "generations"
            else (None, None)
        )
        if isinstance(done, int | float) and isinstance(elapsed, int | float):
            measured.append((job.pk, float(done), float(elapsed)))
            total, seconds = p.get("done"), p.get("elapsed")
            if "answers" in m and isinstance(total, int | float) and isinstance(seconds, int | float):
                extra_measured.append((job.pk, float(total) - float(done), float(seconds) - float(elapsed)))
    rate, source, ok = _rate("answers", measured, "eval jobs")
    answers = 4 * heldout
    counts = f"4 arms x {heldout:,} held-out queries"
    extra = heldout * ((4 if judge else 0) + 2 * len(lm_eval_tasks))
    if not extra:
        return Estimate(answers, "answers", rate, source, ok, counts)
    extra_rate, extra_source, extra_ok = _rate(
        "eval steps", extra_measured, "eval jobs' judge and lm-eval steps"
    )
    seconds = answers / rate + extra / extra_rate
    if judge:
        counts += f" + {4 * heldout:,} judge verdicts"
    if lm_eval_tasks:
        counts += (
            f" + lm-eval {', '.join(lm_eval_tasks)} on 2 arms ({2 * heldout * len(lm_eval_tasks):,} steps)"
        )
    return Estimate(
        answers + extra,
        "eval steps",
        (answers + extra) / seconds,
        f"answers: {source}; judge and lm-eval: {extra_source}",
        ok and extra_ok,
        counts,
        default_seconds=answers / DEFAULT_RATES["answers"] + extra / DEFAULT_RATES["eval steps"],
    )


def last_user(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""
