"""Evals of a prompt-absorbed variant: score answers, compare arms, judge, run lm-eval.

Four arms answer the same held-out queries (`ARMS`): the base model without
the prompt (floor), the base with it (teacher), the adapter without it
(student) and the adapter with it. One loaded model serves all four: peft
switches the adapter off for the base arms.

Per example, `score_example` gives rule checks, reference metrics (exact
match, chrF, ROUGE-L) and agreement with the teacher's answer; the statistics
(`mean_ci`, `paired_difference`, `prompt_effect_retained`) put bootstrap
confidence intervals on the means, paired over the examples because every arm
answers the same queries. `judge_messages` / `parse_judge` are the
LLM-as-judge protocol; `run_lm_eval` runs lm-eval tasks in process, offline.

Plain Python: no Django, no Celery; torch, lm_eval, sacrebleu, rouge_score,
scipy and scikit-learn are imported only by the functions that use them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.chat import Message
from engines.progress import Progress, ProgressFn, StopFn
from engines.rules import Rule, outcomes

if TYPE_CHECKING:
    from engines.inference import Completion, GenerationSettings, LoadedModel

DATA_DIR = Path(__file__).resolve().parent / "data"


class EvalError(Exception):
    """A user-facing error of an eval run: the message names what was wrong."""


# --- scoring one example -------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation (any Unicode
    punctuation, not only ASCII), no articles a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    # rouge_score's tokenizer keeps only ASCII letters and digits: text in
    # other scripts scores 0, so read ROUGE-L with chrF beside it.
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), 0-1."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    """chrF (character n-gram F-score, sacrebleu's defaults), scaled to 0-1."""
    from sacrebleu import sentence_chrf

    return float(sentence_chrf(answer, [reference]).score) / 100.0


@dataclass
class ExampleScore:
    rules: dict[str, bool]
    all_rules: bool | None  # None when there are no rules
    exact_match: float | None  # reference metrics are None without a reference
    chrf: float | None
    rouge_l: float | None
    agreement: float | None  # ROUGE-L F1 with the teacher's answer; None without one
    # Why a failed rule check could not be decided (a pattern that ran out of time), by rule name.
    rule_errors: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat metric names -> values, only the metrics present."""
        out: dict[str, float] = {}
        if self.all_rules is not None:
            out["all_rules"] = float(self.all_rules)
        for name, passed in self.rules.items():
            out[f"rule:{name}"] = float(passed)
        for name in ("exact_match", "chrf", "rouge_l", "agreement"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def score_example(
    answer: str,
    *,
    rules: Sequence[Rule] = (),
    reference: str | None = None,
    teacher: str | None = None,
) -> ExampleScore:
    """Score one answer: its rule checks, against a reference answer (exact
    match after `normalize_answer`, chrF, ROUGE-L F1) and against the
    teacher's answer to the same query. Agreement is ROUGE-L F1 with the
    teacher: word overlap in order, cheap and symmetric; it says how close the
    student stays to what it was trained to imitate, not whether either is right."""
    results = outcomes(rules, answer) if rules else {}
    checks = {name: o.passed for name, o in results.items()}
    score = ExampleScore(rules=checks, all_rules=all(checks.values()) if checks else None,
                         exact_match=None, chrf=None, rouge_l=None, agreement=None,
                         rule_errors={name: o.reason for name, o in results.items() if o.reason})
    if reference is not None:
        score.exact_match = float(normalize_answer(answer) == normalize_answer(reference))
        score.chrf = chrf(answer, reference)
        score.rouge_l = rouge_l(answer, reference)
    if teacher is not None:
        score.agreement = rouge_l(answer, teacher)
    return score


# --- statistics -----------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    value: float | None
    low: float | None
    high: float | None
    n: int
    note: str = ""


def _array(values: Sequence[float]) -> Any:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError("values must be a flat list of finite numbers")
    return arr


def _bootstrap(data: tuple[Any, ...], statistic: Callable[..., Any], confidence: float, resamples: int,
               seed: int) -> Any:
    """scipy's percentile bootstrap, paired: every resample draws the same
    example indices from each array."""
    import numpy as np
    from scipy import stats

    with warnings.catch_warnings():
        # Degenerate resamples (all equal) are expected with 0/1 metrics on few examples.
        warnings.simplefilter("ignore")
        # batch bounds memory: resamples x examples floats per array at once otherwise.
        return stats.bootstrap(data, statistic, n_resamples=resamples, confidence_level=confidence,
                               method="percentile", paired=True, vectorized=True, batch=250,
                               rng=np.random.default_rng(seed))


def mean_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean with a bootstrap percentile confidence interval."""
    import numpy as np

    arr = _array(values)
    n = len(arr)
    if n == 0:
        return Estimate(None, None, None, 0, "no examples")
    mean = float(arr.mean())
    if n == 1 or np.all(arr == arr[0]):
        return Estimate(mean, mean, mean, n, "one example: no interval" if n == 1 else "")
    res = _bootstrap((arr,), lambda x, axis: np.mean(x, axis=axis), confidence, resamples, seed)
    return Estimate(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), n)


def _paired(*arrays: Sequence[float]) -> list[Any]:
    out = [_array(a) for a in arrays]
    if len({len(a) for a in out}) > 1:
        raise ValueError(f"paired lists must have the same length, got {', '.join(str(len(a)) for a in out)}")
    return out


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> Estimate:
    """mean(a - b) over paired examples, with a paired bootstrap interval
    (resampling the differences is resampling the same indices of a and b)."""
    x, y = _paired(a, b)
    return mean_ci(list(x - y), confidence, resamples, seed)


def prompt_effect_retained(student: Sequence[float], floor: Sequence[float], teacher: Sequence[float],
                           confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """(mean(student) - mean(floor)) / (mean(teacher) - mean(floor)): the share
    of what the prompt adds to the base model that the student keeps without
    it (1.0 = all of it; above 1, the student beats the prompted base).

    The interval is a paired bootstrap over examples; resamples where the
    teacher is not above the floor have no ratio and are dropped (the note
    says how many). When the teacher is not above the floor on the full
    sample the ratio is undefined and value/low/high are None."""
    import numpy as np

    s, f, t = _paired(student, floor, teacher)
    n = len(s)
    if n == 0:
        return Estimate(None, None, None, 0, "no examples")
    gain, base = float(s.mean() - f.mean()), float(t.mean() - f.mean())
    if base <= 0:
        return Estimate(None, None, None, n,
                        f"the prompted base is not better than the floor on this metric "
                        f"(teacher {t.mean():.2f} vs floor {f.mean():.2f}): compare absolute scores instead")
    value = gain / base
    if n == 1:
        return Estimate(value, value, value, n, "one example: no interval")

    def gains(s_: Any, f_: Any, t_: Any, axis: int) -> Any:
        return np.stack([s_.mean(axis=axis) - f_.mean(axis=axis), t_.mean(axis=axis) - f_.mean(axis=axis)])

    res = _bootstrap((s, f, t), gains, confidence, resamples, seed)
    num, den = res.bootstrap_distribution
    kept = den > 0
    dropped = int((~kept).sum())
    note = (f"{dropped} of {resamples} resamples dropped: the teacher was not above the floor in them"
            if dropped else "")
    if not kept.any():
        return Estimate(value, None, None, n, note)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(num[kept] / den[kept], [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), n, note)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and 95th percentile of request latencies (None when empty)."""
    import numpy as np

    arr = _array(seconds)
    if len(arr) == 0:
        return {"mean": None, "p50": None, "p95": None}
    p50, p95 = np.percentile(arr, [50, 95])
    return {"mean": float(arr.mean()), "p50": float(p50), "p95": float(p95)}


def judge_human_agreement(judge: Sequence[float], human: Sequence[float]) -> dict[str, Any]:
    """How far the LLM judge agrees with human ratings of the same answers:
    Spearman's rank correlation and Cohen's kappa (quadratic weights, on
    scores rounded to whole numbers). None where undefined (fewer than 3
    pairs, or scores that never vary), with a note."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    j, h = _paired(judge, human)
    n = len(j)
    if n < 3:
        return {"n": n, "spearman": None, "cohen_kappa": None, "note": f"{n} rated pairs: at least 3 are needed"}
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: both say so by returning NaN
        rho = float(spearmanr(j, h).statistic)
        kappa = float(cohen_kappa_score(j.round().astype(int), h.round().astype(int), weights="quadratic"))
    if math.isnan(rho):
        notes.append("Spearman is undefined when the judge's or the humans' scores never vary")
    if math.isnan(kappa):
        notes.append("Cohen's kappa is undefined when both give one and the same score throughout")
    return {"n": n, "spearman": None if math.isnan(rho) else rho,
            "cohen_kappa": None if math.isnan(kappa) else kappa, "note": "; ".join(notes)}


# --- LLM-as-judge ---------------------------------------------------------------


def judge_messages(rubric: str, query: str, answer: str, reference: str | None = None,
                   scale: tuple[int, int] = (1, 10)) -> list[Message]:
    """The chat a judge model answers to grade one answer against a rubric."""
    low, high = scale
    system = (
        "You are an impartial judge. Grade the assistant's answer to the user's query against this rubric.\n\n"
        f"## Rubric\n{rubric.strip()}\n\n"
        f"Use a scale from {low} (worst) to {high} (best)"
        + (", and compare the answer with the reference answer" if reference is not None else "")
        + ".\nOutput format: first your reasoning in a few sentences, then a final line "
        f"`Score: N`, where N is a whole number from {low} to {high}. Nothing after that line."
    )
    parts = [f"## Query\n{query}"]
    if reference is not None:
        parts.append(f"## Reference answer\n{reference}")
    parts.append(f"## Answer to grade\n{answer}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


@dataclass
class JudgeVerdict:
    score: float | None
    reasoning: str
    error: str = ""


_NUMBER = r"(-?\d+(?:\.\d+)?)"
# "Score: 8", "score = 7", "**Score:** 8", "Score: 8/10"
_SCORE_LABEL = re.compile(r"\bscore\b\W{0,3}?\s*[:=]\s*\**\s*" + _NUMBER, re.IGNORECASE)
# "7/10" and "7 / 10" (the denominator must be the scale's top)
_SCORE_FRACTION = re.compile(_NUMBER + r"\s*/\s*(\d+)\b")


def parse_judge(text: str, scale: tuple[int, int] = (1, 10)) -> JudgeVerdict:
    """A judge's score and reasoning from its free text. The LAST score wins
    (judges often restate the rubric's scale first); the reasoning is the
    text before the line holding it."""
    low, high = scale
    text = text or ""
    if not text.strip():
        return JudgeVerdict(None, "", "the judge's output is empty: expected reasoning, then `Score: N`")
    matches = [(m.start(1), m.group(1)) for m in _SCORE_LABEL.finditer(text)]
    matches += [(m.start(1), m.group(1)) for m in _SCORE_FRACTION.finditer(text) if int(m.group(2)) == high]
    if not matches:
        return JudgeVerdict(None, text.strip(),
                            f"no score found: expected a final line `Score: N` with N from {low} to {high}")
    start, number = max(matches)
    line_start = text.rfind("\n", 0, start) + 1
    reasoning = text[:line_start].strip()
    score = float(number)
    if not low <= score <= high:
        return JudgeVerdict(None, reasoning, f"score {number} is outside the scale {low}-{high}")
    return JudgeVerdict(score, reasoning)


# --- four arms, one loaded model ------------------------------------------------------

ARMS = ("floor", "teacher", "student", "student+prompt")
_WITH_PROMPT = {"floor": False, "teacher": True, "student": False, "student+prompt": True}
_WITH_ADAPTER = {"floor": False, "teacher": False, "student": True, "student+prompt": True}


def _check_arms(loaded: LoadedModel, arms: Sequence[str]) -> None:
    unknown = [a for a in arms if a not in _WITH_PROMPT]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}: use {', '.join(ARMS)}")
    if any(_WITH_ADAPTER[a] for a in arms) and not loaded.has_adapter:
        raise ValueError("the student arms need the model loaded with its adapter, unmerged "
                         "(load_model(..., adapter_dir=..., merge=False))")


@contextlib.contextmanager
def arm(loaded: LoadedModel, name: str, system_prompt: str | None) -> Iterator[str | None]:
    """Run as one arm inside the block: the adapter switched off for the base
    arms; yields the system prompt that arm gets (None for floor and student)."""
    _check_arms(loaded, [name])
    prompt = system_prompt if _WITH_PROMPT[name] else None
    if _WITH_ADAPTER[name]:
        yield prompt
    else:
        with loaded.adapter_disabled():
            yield prompt


def generate_arms(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    arms: Sequence[str] = ARMS,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, list[Completion]]:
    """Every arm's answers to the same conversations, from one loaded model
    (base + unmerged adapter). Each arm is its own `generate` call, so the
    shared-prefix KV cache is encoded per arm and never crosses arms (it
    depends on both the prompt and the adapter). `progress` gets one Progress
    over all arms (unit "generations"); cancelling raises GenerationCancelled
    counting all arms."""
    from engines.inference import GenerationCancelled, generate

    _check_arms(loaded, arms)
    total = len(conversations) * len(arms)
    started = time.monotonic()
    out: dict[str, list[Completion]] = {}
    for index, name in enumerate(arms):
        offset = index * len(conversations)

        def report(p: Progress, offset: int = offset) -> None:
            if progress is not None:
                progress(Progress.since(started, offset + p.done, total, "generations"))

        with arm(loaded, name, system_prompt) as prompt:
            try:
                out[name] = generate(loaded, conversations, prompt, settings, progress=report,
                                     should_stop=should_stop)
            except GenerationCancelled as cancelled:
                raise GenerationCancelled(offset + cancelled.done, total) from None
    return out


def single_request_latency(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    sample: int = 8,
    *,
    arm_name: str | None = None,
) -> list[float]:
    """Wall seconds of single requests (batch 1, one after another) on the
    first `sample` conversations: what one user waits, where batched
    throughput hides it. After one untimed warm-up request. With `arm_name`
    the requests run as that arm (system_prompt is then the project's prompt)."""
    from engines.inference import GenerationSettings, generate

    one = replace(settings or GenerationSettings(), batch_size=1)
    chosen = list(conversations[:sample])
    if not chosen:
        return []
    context = arm(loaded, arm_name, system_prompt) if arm_name else contextlib.nullcontext(system_prompt)
    with context as prompt:
        # The first request pays for allocator and thread-pool start-up.
        generate(loaded, chosen[:1], prompt, replace(one, max_new_tokens=2))
        seconds = []
        for conv in chosen:
            began = time.perf_counter()
            generate(loaded, [conv], prompt, one)
            seconds.append(time.perf_counter() - began)
    return seconds


# --- lm-eval, in process and offline ------------------------------------------------

_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
METRICS_MODULE = "workbench_task_metrics"
# Shown as earlier chat turns before each general-skills question: without
# them SmolLM2-135M answers in sentences ("The capital of France is Paris.").
GENERAL_SKILLS_SHOTS = (
    {"query": "What is the capital of Italy?", "answer": "Rome"},
    {"query": "What is 3 + 4?", "answer": "7"},
    {"query": "What is the opposite of big?", "answer": "small"},
)


def lm_eval_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval's per-document scoring for tasks written by `write_task`: exact
    match of the answer's first line, normalised as in `score_example`."""
    lines = (results[0] if results else "").strip().splitlines()
    return {"exact_match": float(normalize_answer(lines[0] if lines else "") == normalize_answer(doc["answer"]))}


def write_task(directory: Path, name: str, rows: Sequence[Mapping[str, Any]],
               fewshot: Sequence[Mapping[str, Any]] = (), max_gen_toks: int = 32) -> str:
    """Write an lm-eval generate_until task: `<name>.jsonl` (rows with "query"
    and "answer") and `<name>.yaml`, scored by exact match of the normalised
    first line of the answer. `fewshot` rows are shown before every question,
    as earlier chat turns. Returns the task name."""
    if not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r}: use letters, digits, _ and -, starting with a letter")
    errors = []
    for number, row in enumerate([*rows, *fewshot], 1):
        where = f"row {number}" if number <= len(rows) else f"few-shot row {number - len(rows)}"
        for key in ("query", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                errors.append(f"{where}: {key!r} must be a non-empty string")
    if not rows:
        errors.append("a task needs at least one row")
    if errors:
        raise ValueError("; ".join(errors))
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    with data.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"query": row["query"], "answer": row["answer"]}, ensure_ascii=False) + "\n")
    # The scoring function lives in engines; lm-eval loads `!function` code from the task's folder.
    (directory / f"{METRICS_MODULE}.py").write_text(
        "# Written by engines.evaluation.write_task: lm-eval scores these tasks as the workbench does.\n"
        "from engines.evaluation import lm_eval_process_results as process_results  # noqa: F401\n"
    )
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        # The first line is the answer; the end of turn also stops it.
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if fewshot:
        config["num_fewshot"] = len(fewshot)
        config["fewshot_config"] = {
            "sampler": "first_n",
            "samples": [{"query": r["query"], "answer": r["answer"]} for r in fewshot],
        }
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    text += f"process_results: !function {METRICS_MODULE}.process_results\n"
    (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def general_skills_rows() -> list[dict[str, str]]:
    """The shipped general-skills questions (short, exact answers)."""
    with (DATA_DIR / "general_skills.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def general_skills_task(directory: Path, name: str = "workbench_general_skills") -> str:
    """Write the general-skills task (did the fine-tune break basic skills?)."""
    return write_task(directory, name, general_skills_rows(), fewshot=GENERAL_SKILLS_SHOTS)


@dataclass(frozen=True)
class MetricValue:
    value: float
    stderr: float | None


@dataclass
class TaskResult:
    task: str
    metric: str  # the primary metric: the first of the task's metric list
    metrics: dict[str, MetricValue]  # "exact_match", or "exact_match,<filter>" for filters other than none
    correct: list[float]  # the primary metric per document, in document order (1.0/0.0 for accuracy)
    responses: list[str]  # the model's (filtered) answer per document


@dataclass
class LmEvalResult:
    tasks: dict[str, TaskResult]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)  # model_args and settings of the run


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # The libraries read HF_HUB_OFFLINE once, at import: switch their flags
    # directly so a dataset that is not on disk fails at once instead of
    # waiting on the network, whatever the environment says.
    import datasets.config
    import huggingface_hub.constants

    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
             datasets.config.HF_DATASETS_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_OFFLINE) = saved


def _task_manager(task_dir: Path | None, tasks: Sequence[str]) -> Any:
    """A TaskManager over task_dir only (instant) unless some task lives
    elsewhere; indexing lm-eval's ~15,000 installed tasks takes 10-30 s."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(task_dir) if task_dir is not None else None)


def _load_tasks(manager: Any, tasks: Sequence[str]) -> list[Any]:
    """Build each task before any model loads: an unknown name or a dataset
    that is not on disk becomes an EvalError naming the task. Returns the
    built tasks and groups, for simple_evaluate to run as they are."""
    built: list[Any] = []
    for name in tasks:
        if name not in manager.all_tasks:
            raise EvalError(f"lm-eval task {name!r} does not exist (neither written by the workbench "
                            f"nor installed with lm-eval)")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
            raise EvalError(f"lm-eval task {name!r} cannot be loaded offline: its dataset is not on this "
                            f"machine ({type(exc).__name__}: {exc}). Download it into the Hugging Face "
                            f"datasets cache first, or use a task written from local data.") from exc
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        built.extend([top] if top is not None else loaded["tasks"].values())  # a tag names several tasks
    return built


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it cannot compute
        return None
    return number if math.isfinite(number) else None


def _task_result(name: str, row: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] | None) -> TaskResult:
    metrics: dict[str, MetricValue] = {}
    for key, raw in row.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        value = _number(raw)
        if value is None:
            continue
        label = metric if filter_name == "none" else key
        metrics[label] = MetricValue(value, _number(row.get(f"{metric}_stderr,{filter_name}")))
    docs = sorted(samples or [], key=lambda s: s["doc_id"])
    primary = docs[0]["metrics"][0] if docs and docs[0].get("metrics") else next(iter(metrics), "")
    first_filter = docs[0]["filter"] if docs else "none"
    mine = [s for s in docs if s.get("filter") == first_filter]
    return TaskResult(
        task=name,
        metric=primary if first_filter == "none" else f"{primary},{first_filter}",
        metrics=metrics,
        correct=[float(s[primary]) for s in mine],
        responses=[str((s.get("filtered_resps") or [""])[0]) for s in mine],
    )


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    task_dir: Path | None,
    adapter_dir: str | Path | None = None,
    system_prompt: str | None = None,
    device: str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = True,
) -> LmEvalResult:
    """Run lm-eval tasks on a model (with an optional peft adapter and system
    prompt, through the model's chat template) in this process, offline.

    Tasks are looked up in `task_dir` first (written by `write_task`), then
    among lm-eval's installed tasks; those run only when their data is already
    on disk, else EvalError. Per task: its metrics with standard errors and,
    with `log_samples`, the primary metric per document in document order, so
    two runs on the same documents can be compared pairwise (`paired_difference`)."""
    from engines.inference import pick_device

    if not tasks:
        raise EvalError("no lm-eval tasks were given")
    if not (Path(model_dir) / "config.json").is_file():
        raise EvalError(f"{model_dir} is not a model directory (no config.json)")
    _, dtype = pick_device(device)
    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": str(dtype).removeprefix("torch."),
                                  "device": device}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    started = time.monotonic()
    with _hub_offline():
        manager = _task_manager(task_dir, tasks)
        built = _load_tasks(manager, tasks)
        from lm_eval import simple_evaluate

        raw = simple_evaluate(
            model="hf", model_args=model_args, tasks=built, task_manager=manager,
            batch_size=batch_size, limit=limit, log_samples=log_samples,
            apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=system_prompt,
        )
    if raw is None:  # only on non-zero ranks of a distributed run
        raise EvalError("lm-eval returned no results")
    samples = raw.get("samples") or {}
    results = {name: _task_result(name, row, samples.get(name)) for name, row in raw["results"].items()}
    return LmEvalResult(tasks=results, seconds=time.monotonic() - started,
                        config={"model_args": model_args, "limit": limit, "batch_size": batch_size,
                                "system_prompt": system_prompt is not None})
