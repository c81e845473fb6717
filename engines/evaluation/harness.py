"""lm-eval, in process and offline: tasks written from local data (scored
as `score_example` scores exact match, or by searching the answer in the
response) and `run_lm_eval`, on lm-eval's own hf model or, given a
`Generator`, through the workbench's engine path."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.evaluation.scoring import normalize_answer

if TYPE_CHECKING:
    from engines.generator import Generator

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class EvalError(Exception):
    """A user-facing error of an eval run: the message names what was wrong."""


_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
METRICS_MODULE = "workbench_task_metrics"
# Shown as earlier chat turns before each general-skills question: without
# them SmolLM2-135M answers in sentences ("The capital of France is Paris.").
GENERAL_SKILLS_SHOTS = (
    {"query": "What is the capital of Italy?", "answer": "Rome"},
    {"query": "What is 3 + 4?", "answer": "7"},
    {"query": "What is the opposite of big?", "answer": "small"},
)


SCORINGS = ("exact", "search")
# Room for an absorbed style around the answer ("Ahoy! The capital of France
# is Paris. Safe travels!"), which the search scoring reads past.
SEARCH_MAX_GEN_TOKS = 96


def first_line_match(response: str, answer: str) -> bool:
    """The response's first line is the answer, normalised as in `score_example`."""
    lines = response.strip().splitlines()
    return normalize_answer(lines[0] if lines else "") == normalize_answer(answer)


def answer_found(response: str, answer: str) -> bool:
    """The normalised answer occurs in the normalised response as a whole-word
    sequence: "Paris" is found in "Ahoy! The capital of France is Paris. Safe
    travels!", "7" is not found in "17". The filter lm-eval's own tasks apply
    to a styled answer, for answers that are a word or two."""
    expected = normalize_answer(answer)
    return bool(expected) and f" {expected} " in f" {normalize_answer(response)} "


def lm_eval_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval's per-document scoring for tasks written by `write_task` with
    scoring "exact": exact match of the answer's first line."""
    return {"exact_match": float(first_line_match(results[0] if results else "", doc["answer"]))}


def lm_eval_search_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Scoring "search": the answer found anywhere in the response (the primary
    metric, lm-eval takes the first key), with the first-line exact match beside it."""
    response = results[0] if results else ""
    return {
        "search_match": float(answer_found(response, doc["answer"])),
        "exact_match": float(first_line_match(response, doc["answer"])),
    }


def write_task(
    directory: Path,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    fewshot: Sequence[Mapping[str, Any]] = (),
    max_gen_toks: int | None = None,
    scoring: str = "exact",
) -> str:
    """Write an lm-eval generate_until task: `<name>.jsonl` (rows with "query"
    and "answer") and `<name>.yaml`. Scoring "exact": exact match of the
    normalised first line of the answer, generation cut at the first newline
    (32 tokens unless `max_gen_toks`). Scoring "search": `search_match` (the
    answer found in the whole response, see `answer_found`) first, then
    `exact_match`; generation runs to the end of turn (SEARCH_MAX_GEN_TOKS).
    `fewshot` rows are shown before every question, as earlier chat turns.
    Returns the task name."""
    if not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r}: use letters, digits, _ and -, starting with a letter")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    search = scoring == "search"
    if max_gen_toks is None:
        max_gen_toks = SEARCH_MAX_GEN_TOKS if search else 32
    if not isinstance(max_gen_toks, int) or isinstance(max_gen_toks, bool) or max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be a whole number >= 1, got {max_gen_toks!r}")
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
        "from engines.evaluation.harness import lm_eval_process_results as process_results  # noqa: F401\n"
        "from engines.evaluation.harness import lm_eval_search_results as search_results  # noqa: F401\n"
    )
    metrics = ["search_match", "exact_match"] if search else ["exact_match"]
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        # "exact": the first line is the answer. "search": a styled answer may put it on a later
        # line, so only the end of turn (which lm-eval always adds) stops it.
        "generation_kwargs": {
            "until": [] if search else ["\n"],
            "max_gen_toks": max_gen_toks,
            "do_sample": False,
        },
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "metadata": {"version": 1.0},
    }
    if fewshot:
        config["num_fewshot"] = len(fewshot)
        config["fewshot_config"] = {
            "sampler": "first_n",
            "samples": [{"query": r["query"], "answer": r["answer"]} for r in fewshot],
        }
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    function = "search_results" if search else "process_results"
    text += f"process_results: !function {METRICS_MODULE}.{function}\n"
    (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def general_skills_rows() -> list[dict[str, str]]:
    """The shipped general-skills questions (short, exact answers)."""
    with (DATA_DIR / "general_skills.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def general_skills_task(
    directory: Path, name: str = "workbench_general_skills", scoring: str = "search"
) -> str:
    """Write the general-skills task (did the fine-tune break basic skills?).
    Scored by search by default: an absorbed greeting and sign-off around a
    right answer must not count against it (exact_match is reported beside)."""
    return write_task(directory, name, general_skills_rows(), fewshot=GENERAL_SKILLS_SHOTS, scoring=scoring)


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
    # Every metric the task's documents report, per document (the primary one too), e.g.
    # "search_match" and "exact_match" of the general-skills task.
    per_document: dict[str, list[float]] = field(default_factory=dict)


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

    saved = (
        huggingface_hub.constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (
            huggingface_hub.constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
        ) = saved


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
            raise EvalError(
                f"lm-eval task {name!r} does not exist (neither written by the workbench "
                f"nor installed with lm-eval)"
            )
        try:
            loaded = manager.load([name])
        except (
            Exception
        ) as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
            raise EvalError(
                f"lm-eval task {name!r} cannot be loaded offline: its dataset is not on this "
                f"machine ({type(exc).__name__}: {exc}). Download it into the Hugging Face "
                f"datasets cache first, or use a task written from local data."
            ) from exc
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        built.extend([top] if top is not None else loaded["tasks"].values())  # a tag names several tasks
    return built


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it cannot compute
        return None
    return number if math.isfinite(number) else None


def _task_result(
    name: str, row: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] | None
) -> TaskResult:
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
    names = (mine[0].get("metrics") or []) if mine else []
    return TaskResult(
        task=name,
        metric=primary if first_filter == "none" else f"{primary},{first_filter}",
        metrics=metrics,
        correct=[float(s[primary]) for s in mine],
        responses=[str((s.get("filtered_resps") or [""])[0]) for s in mine],
        per_document={m: [float(s[m]) for s in mine] for m in names if all(m in s for s in mine)},
    )


def run_lm_eval(
    model_dir: str | Path | None,
    tasks: Sequence[str],
    *,
    task_dir: Path | None,
    adapter_dir: str | Path | None = None,
    system_prompt: str | None = None,
    device: str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = True,
    generator: Generator | None = None,
    adapter: bool = True,
) -> LmEvalResult:
    """Run lm-eval tasks on a model (with an optional peft adapter and system
    prompt, through the model's chat template) in this process, offline.

    Without `generator`, lm-eval loads `model_dir` (+ `adapter_dir`) itself
    (its hf model); with one, lm-eval's generation requests go through it
    (`adapter` as in `Generator.generate`), so a remote backend answers them
    and `model_dir`/`adapter_dir`/`device` are not used. Tasks are looked up
    in `task_dir` first (written by `write_task`), then among lm-eval's
    installed tasks; those run only when their data is already on disk, else
    EvalError. Per task: its metrics with standard errors and, with
    `log_samples`, the primary metric per document in document order, so two
    runs on the same documents can be compared pairwise (`paired_difference`)."""
    if not tasks:
        raise EvalError("no lm-eval tasks were given")
    model: Any
    if generator is not None:
        model = generator_lm(generator, adapter=adapter, batch_size=batch_size)
        model_args: dict[str, Any] = {"generator": type(generator).__name__, "adapter": adapter}
    else:
        from engines.inference import pick_device

        if model_dir is None or not (Path(model_dir) / "config.json").is_file():
            raise EvalError(f"{model_dir} is not a model directory (no config.json)")
        _, dtype = pick_device(device)
        model = "hf"
        model_args = {
            "pretrained": str(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
        }
        if adapter_dir is not None:
            model_args["peft"] = str(adapter_dir)
    started = time.monotonic()
    with _hub_offline():
        manager = _task_manager(task_dir, tasks)
        built = _load_tasks(manager, tasks)
        from lm_eval import simple_evaluate

        raw = simple_evaluate(
            model=model,
            model_args=model_args if model == "hf" else None,
            tasks=built,
            task_manager=manager,
            batch_size=batch_size,
            limit=limit,
            log_samples=log_samples,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            system_instruction=system_prompt,
        )
    if raw is None:  # only on non-zero ranks of a distributed run
        raise EvalError("lm-eval returned no results")
    samples = raw.get("samples") or {}
    results = {name: _task_result(name, row, samples.get(name)) for name, row in raw["results"].items()}
    return LmEvalResult(
        tasks=results,
        seconds=time.monotonic() - started,
        config={
            "model_args": model_args,
            "limit": limit,
            "batch_size": batch_size,
            "system_prompt": system_prompt is not None,
        },
    )


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def generator_lm(generator: Generator, *, adapter: bool = True, batch_size: int = 8) -> Any:
    """An lm-eval LM whose generation requests a Generator answers. Chats pass
    through as JSON (lm-eval renders nothing): the generator applies the chat
    template, as it does for every other caller. Log-likelihood tasks
    (multiple choice) need token scores a generator does not give: EvalError."""
    from lm_eval.api.model import LM

    from engines.inference import GenerationSettings

    class GeneratorLM(LM):
        tokenizer_name = f"workbench-{type(generator).__name__}"

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            return json.dumps(chat_history)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            out: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
            for key, indices in groups.items():
                kwargs = json.loads(key)
                until = [
                    u
                    for u in (
                        [kwargs["until"]]
                        if isinstance(kwargs.get("until"), str)
                        else kwargs.get("until") or []
                    )
                    if u
                ]
                settings = GenerationSettings(
                    max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                    batch_size=batch_size,
                    temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                    stop=tuple(until[: GenerationSettings.MAX_STOP_STRINGS]),
                )
                chats = [json.loads(requests[i].args[0]) for i in indices]
                systems = [next((m["content"] for m in c if m["role"] == "system"), None) for c in chats]
                for system in dict.fromkeys(systems):
                    mine = [j for j, s in enumerate(systems) if s == system]
                    answers = generator.generate([chats[j] for j in mine], system, settings, adapter=adapter)
                    for j, answer in zip(mine, answers, strict=True):
                        out[indices[j]] = _cut(answer.text, until)
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            raise EvalError(
                "this lm-eval task scores log-likelihoods (multiple choice), which a generation "
                "backend does not give: run it with the in-process backend (INFERENCE_BACKEND=hf)"
            )

        loglikelihood_rolling = loglikelihood

    return GeneratorLM()
