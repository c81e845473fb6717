"""The fine-tune: a LoRA adapter learns to answer WITHOUT the prompt what the
teacher answered WITH it; the result is a registered variant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Value, When

from engines.inference import GenerationSettings, SettingsError
from engines.progress import Progress
from engines.training import TrainConfig, general_examples, general_mix_queries, train
from jobs.backend import generator
from jobs.registry import JobCancelled, JobError, JobRunner, register
from workbench import data_quality
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Variant

# Training only on answers that pass every rule needs enough of them left.
MIN_PASSING_ROWS = 32
MIN_PASSING_SHARE = 0.25
# The base's answers to the general instructions, kept in the job's directory: a retried attempt
# reuses them (and trains on exactly the rows its checkpoints were made from).
GENERAL_MIX_FILE = "general-mix.jsonl"
GENERAL_MAX_NEW_TOKENS = 256
GENERAL_CHUNK = 16  # answers generated (and saved) together


def training_examples(
    version: DatasetVersion, system_prompt: str, passing_only: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """The examples to learn from and how many rows were left out. With
    passing_only, answers still flagged as failing a checkable rule (not
    repaired, edited or accepted in review) are left out, as long as enough
    others remain: the student learns what the data shows."""
    examples: list[dict[str, Any]] = []
    failing: list[dict[str, Any]] = []
    unresolved = Case(When(DatasetRow.UNRESOLVED, then=Value(True)), default=Value(False))
    rows = version.rows.filter(split=DatasetRow.TRAIN).annotate(_unresolved=unresolved).order_by("index")
    for messages, fails in rows.values_list("messages", "_unresolved").iterator(chunk_size=2000):
        if messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
            example = {
                "messages": messages[:-1],
                "answer": messages[-1]["content"],
                "system_prompt": system_prompt,
            }
            (failing if passing_only and fails else examples).append(example)
    enough = max(MIN_PASSING_ROWS, MIN_PASSING_SHARE * (len(examples) + len(failing)))
    if failing and len(examples) < enough:
        return examples + failing, 0
    return examples, len(failing)


@register
class FinetuneRunner(JobRunner):
    kind = "finetune"
    label = "Fine-tune"
    requires = ("base_model", "prompt_version", "dataset_version")
    LOG_EVERY = 30.0  # seconds between progress lines in the job log
    _logged_at: float  # set when the run starts

    def _progress(self, p: Progress) -> None:
        self.progress(p)
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY:
            self._logged_at = now
            m = p.metrics
            loss = f"{m['loss']:.4f}" if isinstance(m.get("loss"), float) else "?"
            self.log(
                f"step {p.done:.0f}/{p.total or 0:.0f} loss {loss} "
                f"{float(m.get('tokens_per_second') or 0):.0f} tok/s"
            )

    def run(self) -> None:
        self._logged_at = time.monotonic()
        job = self.job
        version, prompt_version, base = job.dataset_version, job.prompt_version, job.base_model
        assert version is not None and prompt_version is not None and base is not None
        passing_only = bool(job.params.get("passing_only", False))
        examples, left_out = training_examples(version, prompt_version.text, passing_only)
        if not examples:
            raise JobError(f"{version} has no train rows with an assistant answer to learn from.")
        if left_out:
            self.log(
                f"training on the {len(examples)} answers that pass every rule; {left_out} still failing a "
                f"rule are left out (review them to bring them in, or untick 'only answers that pass')"
            )
        elif passing_only and version.rows.filter(split=DatasetRow.TRAIN).unresolved().exists():
            self.log("too few answers pass every rule to train on them alone: training on all of them")
        config = TrainConfig.from_dict(job.params.get("train", {}))
        guard_rails = _guard_rails(version)
        warn = data_quality.warning(version, settings.DATA_FAIL_WARN_SHARE)
        if warn:
            self.log(f"warning: {warn}")
        general = self._general_mix(config, len(examples), guard_rails)
        examples += general
        self.log(
            f"fine-tune: {len(examples)} examples from {version} ({len(general)} of them general), "
            f"base {base.name}, LoRA r={config.rank} "
            f"alpha={config.alpha}, lr {config.learning_rate}, {config.epochs} epochs, batch {config.batch_size}"
        )
        # Checkpoints and the adapter live in the job's directory: a requeued
        # attempt resumes from there, and the adapter is stored once.
        teacher = FoundationModel.objects.filter(pk=job.params.get("teacher_model")).first()
        if teacher is not None and teacher.pk != base.pk:
            self.log(f"teacher model: {teacher.name}" + (" (KL against it)" if config.kl_weight > 0 else ""))
        result = train(
            base.path,
            examples,
            job.data_dir,
            config,
            progress=self._progress,
            should_stop=self.should_stop,
            resume=True,
            teacher_dir=teacher.path if teacher is not None else None,
        )
        if result.cancelled:
            raise JobCancelled()
        if result.resumed_from_step:
            self.log(f"resumed from checkpoint at step {result.resumed_from_step}")
        if result.adapter_dir is None:
            raise JobError("training finished without an adapter")
        with transaction.atomic():
            variant = Variant.objects.create(
                project=job.project,
                name=f"{prompt_version.prompt.name}-absorbed-{job.pk}",
                base_model=base,
                adapter_path=str(result.adapter_dir),
                prompt_version=prompt_version,
                prompt_sha256=prompt_version.sha256,
                dataset_version=version,
                hyperparameters=config.to_dict(),
                generation=guard_rails,
                final_loss=result.final_loss,
                duration_seconds=result.duration_seconds,
                metrics={**result.to_dict(), "rows_left_out_failing": left_out, "general_rows": len(general)},
                created_by=job.created_by,
            )
            if not self.succeed(variant=variant):
                raise transaction.TransactionManagementError("job was moved while finishing")
        loss = "?" if result.final_loss is None else f"{result.final_loss:.4f}"
        self.log(
            f"fine-tune done: {result.steps} steps, final loss {loss}, "
            f"{result.tokens_per_second:.0f} tok/s; variant {variant.name}"
        )

    def _general_mix(
        self, config: TrainConfig, task_rows: int, guard_rails: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """General instructions answered by the base itself (no prompt, greedy,
        with the teacher's guard rails, as the variant is served), to mix into
        the training rows so the student keeps what the base could do."""
        queries = general_mix_queries(task_rows, config.general_mix, config.seed)
        if not queries:
            return []
        job = self.job
        assert job.base_model is not None
        cache = job.data_dir / GENERAL_MIX_FILE
        answers = _cached_answers(cache)
        todo = [q for q in queries if q not in answers]
        if todo:
            gen = GenerationSettings.from_dict(
                {**guard_rails, "temperature": 0.0, "max_new_tokens": GENERAL_MAX_NEW_TOKENS}
            )
            self.log(f"general mix: the base answers {len(todo)} general instructions (greedy, no prompt)")
            started = time.monotonic()
            base = generator(job.base_model)
            job.data_dir.mkdir(parents=True, exist_ok=True)
            torn = cache.is_file() and cache.stat().st_size > 0 and not cache.read_bytes().endswith(b"\n")
            with cache.open("a", encoding="utf-8") as out:
                if torn:  # a line cut short by a killed attempt must not swallow the next one
                    out.write("\n")
                for start in range(0, len(todo), GENERAL_CHUNK):
                    chunk = todo[start : start + GENERAL_CHUNK]
                    completions = base.generate(
                        [[{"role": "user", "content": q}] for q in chunk],
                        None,
                        gen,
                        adapter=False,
                        should_stop=self.should_stop,
                    )
                    for query, c in zip(chunk, completions, strict=True):
                        answers[query] = (c.text, c.finish_reason)
                        line = {"query": query, "text": c.text, "finish_reason": c.finish_reason}
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    out.flush()
            self.log(f"general mix: answered in {time.monotonic() - started:.0f} s")
        mixed, left_out = general_examples([(q, *answers[q]) for q in queries])
        notes = [f"general_mix {config.general_mix}", f"{len(queries) - len(todo)} answers reused"]
        if left_out:
            notes.append(f"{left_out} empty or cut at {GENERAL_MAX_NEW_TOKENS} tokens, left out")
        example = (
            f", e.g. {mixed[0]['messages'][0]['content']!r} -> {mixed[0]['answer'][:80]!r}" if mixed else ""
        )
        self.log(
            f"general mix: {len(mixed)} general rows join {task_rows} training rows ({'; '.join(notes)}){example}"
        )
        return mixed


def _cached_answers(path: Path) -> dict[str, tuple[str, str]]:
    """instruction -> (answer, finish reason) saved by an earlier attempt; a
    line cut short by a killed process is skipped (asked again)."""
    answers: dict[str, tuple[str, str]] = {}
    if not path.is_file():
        return answers
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            answers[row["query"]] = (str(row["text"]), str(row["finish_reason"]))
        except (ValueError, KeyError, TypeError):
            continue
    return answers


def _guard_rails(version: DatasetVersion) -> dict[str, Any]:
    """The teacher's guard rails (repetition penalty, no-repeat n-grams,
    stop strings): the same base model loops the same way without them, so
    stored rails that no longer validate stop the job (before it trains)
    rather than make a variant served without them. The teacher's other
    settings do not matter here."""
    stored = version.meta.get("generation") or {}
    if not isinstance(stored, dict):
        raise JobError(
            f"the teacher's generation settings stored with {version} are not an object: {stored!r:.80}"
        )
    rails = {k: v for k, v in stored.items() if k in GenerationSettings.GUARD_RAILS}
    try:
        return GenerationSettings.from_dict(rails).guard_rails()
    except SettingsError as exc:
        raise JobError(
            f"the teacher's guard rails stored with {version} are invalid ({exc}); a variant "
            f"served without them loops. Generate the teacher answers again."
        ) from exc
