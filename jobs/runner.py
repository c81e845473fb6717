"""Runs one job: claims the row, wraps the engine in start/terminate, keeps a
heartbeat, and turns engine errors into clear failure reasons. Knows nothing
of Celery: the task is a one-line wrapper around `run_job`."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Q

from jobs.models import Job
from workbench.actions import ActionError
from workbench.actions_data import derive_version
from workbench.models import DatasetRow, DatasetVersion, Variant

log = logging.getLogger(__name__)

TEACHER_CHUNK = 64  # conversations generated (and saved) per chunk


class JobCancelled(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Marks the job alive even while one step takes long; the reaper
    requeues a job whose heartbeat stops (its worker died)."""

    def __init__(self, job: Job) -> None:
        super().__init__(name=f"job-{job.pk}-heartbeat", daemon=True)
        self.job, self.stop_event = job, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(settings.JOB_HEARTBEAT_SECONDS):
            try:
                self.job.beat()
            except Exception:
                log.exception("job heartbeat failed")
        connection.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def enqueue(job: Job) -> None:
    """Send the job's task once the current transaction commits."""
    from jobs.tasks import run_job as task

    job_id = job.pk
    transaction.on_commit(lambda: task.apply_async(args=[job_id], queue="gpu"))


def run_job(job_id: int, worker: str) -> None:
    close_old_connections()
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.claim(worker):
        return  # a duplicate delivery, or the job was cancelled while queued
    job.append_log(f"attempt {job.attempts} of {job.max_attempts} started on {worker}")
    heartbeat = _Heartbeat(job)
    heartbeat.start()
    try:
        if job.kind == Job.TEACHER:
            _run_teacher(job)
        else:
            _run_finetune(job)
    except JobCancelled:
        job.mark_cancelled("cancelled by request; stopped at the next step")
    except Exception as exc:
        from engines.inference import GenerationCancelled, ModelLoadError
        from engines.training import TrainingError

        if isinstance(exc, GenerationCancelled):
            job.mark_cancelled(f"cancelled by request ({exc})")
        elif isinstance(exc, (TrainingError, ModelLoadError, ActionError, ValueError)):
            job.fail(str(exc))
        else:
            job.append_log(traceback.format_exc())
            job.fail(f"{type(exc).__name__}: {exc}")
    finally:
        heartbeat.stop()
    job.refresh_from_db()
    if job.status in (Job.FAILED, Job.CANCELLED):
        for dep in job.dependents.filter(status=Job.QUEUED):
            dep.mark_cancelled(f"cancelled: {job} {job.status}")


# --- teacher -----------------------------------------------------------------

def _answerable(job: Job) -> tuple[list[tuple[int, list[dict[str, str]]]], dict[int, list[dict[str, str]]]]:
    """Train-split rows to answer, and rows that keep their own answer."""
    keep = bool(job.params.get("keep_existing", True))
    to_answer: list[tuple[int, list[dict[str, str]]]] = []
    kept: dict[int, list[dict[str, str]]] = {}
    assert job.dataset_version is not None
    rows = job.dataset_version.rows.filter(split=DatasetRow.TRAIN).order_by("index").values_list("index", "messages")
    for index, messages in rows.iterator(chunk_size=2000):
        if messages[-1]["role"] == "assistant":
            if keep:
                kept[index] = messages
                continue
            messages = messages[:-1]
        to_answer.append((index, messages))
    return to_answer, kept


def _run_teacher(job: Job) -> None:
    from engines.inference import GenerationSettings, generate, load_model
    from engines.leakage import leak_flags, prompt_spans

    if job.dataset_version is None:
        raise ActionError("The teacher job has no input dataset.")
    to_answer, kept = _answerable(job)
    if not to_answer and not kept:
        raise ActionError(f"{job.dataset_version} has no rows in its train split.")
    system_prompt = job.prompt_version.text
    gen = GenerationSettings(
        max_new_tokens=int(job.params.get("max_new_tokens", 256)),
        temperature=float(job.params.get("temperature", 0.0)), seed=job.params.get("seed"),
    )
    batch_size = int(job.params.get("batch_size", 8))
    # Finished chunks survive a crash: a retried job only generates the rest.
    job.data_dir.mkdir(parents=True, exist_ok=True)
    done_file = job.data_dir / "teacher-answers.jsonl"
    answers: dict[int, dict[str, Any]] = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
            answers[item["index"]] = item
    todo = [(i, m) for i, m in to_answer if i not in answers]
    # Similar lengths in one chunk: less padding inside each batch.
    todo.sort(key=lambda im: -sum(len(m["content"]) for m in im[1]))
    total = len(to_answer)
    job.append_log(f"teacher: {total} queries to answer ({len(answers)} already done), "
                   f"{len(kept)} keep their answer; batch {batch_size}, max {gen.max_new_tokens} new tokens")
    loaded = load_model(job.base_model.path) if todo else None
    started = time.monotonic()
    generated = 0

    def progress(done_in_chunk: int, _total: int) -> None:
        done = len(answers) + done_in_chunk
        elapsed = time.monotonic() - started
        rate = (generated + done_in_chunk) / elapsed if elapsed > 0 else 0.0
        job.set_progress({"done": done, "total": total, "queries_per_second": round(rate, 3),
                          "eta_seconds": round((total - done) / rate) if rate else None,
                          "elapsed": round(elapsed)})

    with done_file.open("a") as out:
        for start in range(0, len(todo), TEACHER_CHUNK):
            chunk = todo[start:start + TEACHER_CHUNK]
            completions = generate(loaded, [m for _, m in chunk], system_prompt, gen, batch_size=batch_size,
                                   reuse_prefix=True, progress=progress, should_stop=job.cancel_is_requested)
            for (index, _), c in zip(chunk, completions, strict=True):
                item = {"index": index, "text": c.text, "finish_reason": c.finish_reason}
                answers[index] = item
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
            out.flush()
            generated += len(chunk)
    elapsed = time.monotonic() - started
    spans = prompt_spans(system_prompt)
    rows: list[tuple[int, list[dict[str, str]]]] = []
    flags: dict[int, list[str]] = {}
    generated_by_index = dict(to_answer)
    for index in sorted([*generated_by_index, *kept]):
        if index in kept:
            rows.append((index, kept[index]))
            continue
        item = answers[index]
        row_flags = leak_flags(item["text"], system_prompt, spans)
        if not item["text"].strip():
            row_flags.append("empty answer")
        if item["finish_reason"] == "length":
            row_flags.append(f"cut off at {gen.max_new_tokens} tokens")
        if row_flags:
            flags[len(rows)] = row_flags
        rows.append((index, [*generated_by_index[index], {"role": "assistant", "content": item["text"]}]))
    meta = {"prompt_version": str(job.prompt_version), "prompt_sha256": job.prompt_version.sha256,
            "base_model": job.base_model.name, "generation": job.params, "job": job.pk,
            "source": str(job.dataset_version), "seconds": round(elapsed, 1)}
    with transaction.atomic():
        version = derive_version(job.dataset_version, job.created_by, rows, kind=DatasetVersion.TEACHER,
                                 meta=meta, flags=flags)
        if not job.succeed(output_dataset=version,
                           progress={**job.progress, "done": total, "total": total, "eta_seconds": 0}):
            raise transaction.TransactionManagementError("job was moved while finishing")  # rolls back
        for dep in job.dependents.filter(status=Job.QUEUED):
            Job.objects.filter(pk=dep.pk, dataset_version__isnull=True).update(dataset_version=version)
            enqueue(dep)
    job.append_log(f"teacher: {len(rows)} rows stored as {version}; {len(flags)} flagged for review; "
                   f"{total / elapsed if elapsed else 0:.2f} queries/s")


# --- fine-tune -----------------------------------------------------------------

def training_examples(version: DatasetVersion, system_prompt: str) -> list[dict[str, Any]]:
    examples = []
    rows = version.rows.filter(split=DatasetRow.TRAIN).order_by("index").values_list("messages", flat=True)
    for messages in rows.iterator(chunk_size=2000):
        if messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
            examples.append({"messages": messages[:-1], "answer": messages[-1]["content"],
                             "system_prompt": system_prompt})
    return examples


def _run_finetune(job: Job) -> None:
    from engines.training import TrainConfig, train

    version = job.dataset_version
    if version is None:
        raise ActionError("The fine-tune has no input dataset (its teacher job did not finish).")
    examples = training_examples(version, job.prompt_version.text)
    if not examples:
        raise ActionError(f"{version} has no train rows with an assistant answer to learn from.")
    config = TrainConfig.from_dict(job.params.get("train", {}))
    out_dir = job.data_dir
    job.append_log(f"fine-tune: {len(examples)} examples from {version}, base {job.base_model.name}, "
                   f"LoRA r={config.rank} alpha={config.alpha}, lr {config.learning_rate}, "
                   f"{config.epochs} epochs, batch {config.batch_size}")
    last_logged = [0.0]

    def progress(p: dict[str, Any]) -> None:
        point = None
        if p.get("loss") is not None:
            point = {"step": p.get("step"), "loss": round(float(p["loss"]), 5),
                     "lr": p.get("learning_rate")}
        job.set_progress({k: v for k, v in p.items() if isinstance(v, (int, float, str, type(None)))}, point)
        now = time.monotonic()
        if now - last_logged[0] > 30:
            last_logged[0] = now
            job.append_log(f"step {p.get('step')}/{p.get('max_steps')} loss {p.get('loss')} "
                           f"{p.get('tokens_per_second', 0):.0f} tok/s")

    result = train(job.base_model.path, examples, out_dir, config, progress=progress,
                   should_stop=job.cancel_is_requested, resume=True)
    if result.cancelled:
        raise JobCancelled()
    if result.resumed_from_step:
        job.append_log(f"resumed from checkpoint at step {result.resumed_from_step}")
    adapter_dir = _keep_adapter(job, result.adapter_dir)
    with transaction.atomic():
        variant = Variant.objects.create(
            project=job.project, name=f"{job.prompt_version.prompt.name}-absorbed-{job.pk}",
            base_model=job.base_model, adapter_path=str(adapter_dir), prompt_version=job.prompt_version,
            prompt_sha256=job.prompt_version.sha256, dataset_version=version,
            hyperparameters=config.to_dict(), final_loss=result.final_loss,
            duration_seconds=result.duration_seconds, metrics=result.to_dict(), created_by=job.created_by,
        )
        if not job.succeed(variant=variant):
            raise transaction.TransactionManagementError("job was moved while finishing")
    job.append_log(f"fine-tune done: {result.steps} steps, final loss {result.final_loss}, "
                   f"{result.tokens_per_second:.0f} tok/s; variant {variant.name}")
    # Checkpoints are only for resuming; the adapter is kept.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _keep_adapter(job: Job, adapter_dir: Path | None) -> Path:
    if adapter_dir is None:
        raise ActionError("training finished without an adapter")
    dest = settings.DATA_DIR / "adapters" / f"job-{job.pk}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(adapter_dir, dest)
    return dest


# --- reaper -------------------------------------------------------------------

def reap(stale_seconds: int | None = None, send: Callable[[Job], None] = enqueue) -> list[tuple[int, str]]:
    """Requeue (or fail, after max attempts) running jobs whose heartbeat
    stopped. Safe to run from many workers at once."""
    from datetime import timedelta

    from django.utils import timezone

    stale = timedelta(seconds=stale_seconds or settings.JOB_STALE_SECONDS)
    moved = []
    for job in Job.objects.filter(Q(status=Job.RUNNING) & Q(heartbeat_at__lt=timezone.now() - stale)):
        with transaction.atomic():
            new_status = job.requeue_if_stale(stale)
            if new_status == Job.QUEUED:
                send(job)
        if new_status:
            moved.append((job.pk, new_status))
            if new_status in (Job.FAILED, Job.CANCELLED):
                for dep in job.dependents.filter(status=Job.QUEUED):
                    dep.mark_cancelled(f"cancelled: {job} {new_status}")
    return moved
