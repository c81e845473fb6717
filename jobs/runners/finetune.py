"""The fine-tune: a LoRA adapter learns to answer WITHOUT the prompt what the
teacher answered WITH it; the result is a registered variant.

With `refine_samples` the adapter then goes through a rejection-sampling
round (engines.training.refine): the student samples its own answers, those
passing the checks replace the rows' answers, and a short second fine-tune
continues the adapter on that set; the variant is the refined adapter."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Value, When

from engines import curation, facts
from engines.curation import CurationSettings
from engines.inference import GenerationSettings, SettingsError
from engines.progress import Progress
from engines.rules import validate_rules
from engines.training import (
    ADAPTER_DIR,
    TrainConfig,
    TrainResult,
    fingerprint,
    general_examples,
    general_mix_queries,
    refine_examples,
    repeat_fact_rows,
    train,
)
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
# The refine round keeps what a requeued attempt needs beside the adapter: the first adapter's
# result (so it is not trained again), the student's samples as they come, its own checkpoints.
TRAINED_FILE = "trained.json"
REFINE_SAMPLES_FILE = "refine-samples.jsonl"
REFINE_DIR = "refine"
REFINE_CHUNK = 16  # queries sampled (and saved) together
REFINE_TEMPERATURE = 0.7


def training_examples(
    version: DatasetVersion, system_prompt: str | None, passing_only: bool = False
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
    # No prompt version: a plain supervised fine-tune (the /v1/fine_tuning API) on the rows as given.
    requires = ("base_model", "dataset_version")
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
        assert version is not None and base is not None
        passing_only = bool(job.params.get("passing_only", False))
        system_prompt = prompt_version.text if prompt_version is not None else None
        examples, left_out = training_examples(version, system_prompt, passing_only)
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
        task = list(examples)
        fact_rows = 0
        if config.fact_repeat > 1 and prompt_version is not None:
            examples, fact_rows = self._repeat_fact_rows(
                examples, _fact_checks(prompt_version), config.fact_repeat
            )
        if config.student_passages and prompt_version is not None:
            k = config.student_passages
            task, examples, general = (
                self._with_passages(rows, prompt_version, k) for rows in (task, examples, general)
            )
            self.log(
                f"student_passages {k}: every row carries the prompt's {k} passages most relevant to its "
                "question, as the student will when served"
            )
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
        teacher_dir = teacher.path if teacher is not None else None
        init_adapter = self._init_adapter()
        validation = self._validation_examples(system_prompt)
        started = time.monotonic()
        refined: dict[str, Any] | None = None
        if config.refine_samples and prompt_version is not None:
            result = self._first_adapter(examples, config, teacher_dir)
            adapter_dir, refined = self._refine(task, general, config, result, guard_rails, teacher_dir)
            seconds = time.monotonic() - started  # both fine-tunes and the sampling between them
        else:
            result = self._train(
                examples,
                job.data_dir,
                config,
                teacher_dir,
                init_adapter=init_adapter,
                eval_examples=validation,
                epoch_adapters=bool(job.params.get("epoch_checkpoints")),
            )
            assert result.adapter_dir is not None
            adapter_dir, seconds = result.adapter_dir, result.duration_seconds
        metrics = {
            **result.to_dict(),
            "rows_left_out_failing": left_out,
            "general_rows": len(general),
            "fact_rows_repeated": fact_rows,
        }
        if refined is not None:
            metrics.update(adapter_dir=str(adapter_dir), refine=refined)
        name = (
            f"{prompt_version.prompt.name}-absorbed-{job.pk}"
            if prompt_version is not None
            else f"{job.params.get('suffix') or 'fine-tune'}-{job.pk}"
        )
        with transaction.atomic():
            variant = Variant.objects.create(
                project=job.project,
                name=name,
                base_model=base,
                adapter_path=str(adapter_dir),
                prompt_version=prompt_version,
                prompt_sha256=prompt_version.sha256 if prompt_version is not None else "",
                dataset_version=version,
                hyperparameters=config.to_dict(),
                generation=guard_rails,
                final_loss=result.final_loss,
                duration_seconds=seconds,
                metrics=metrics,
                created_by=job.created_by,
            )
            if refined is None:  # a refined adapter is no epoch of the first run: no checkpoints but it
                self._epoch_variants(variant, result)
            # Logged before the job shows as succeeded: a client that stops polling then has the line.
            loss = "?" if result.final_loss is None else f"{result.final_loss:.4f}"
            self.log(
                f"fine-tune done: {result.steps} steps, final loss {loss}, "
                f"{result.tokens_per_second:.0f} tok/s; variant {variant.name}"
                + (" (refined)" if refined is not None and refined.get("train") else "")
            )
            if not self.succeed(variant=variant):
                raise transaction.TransactionManagementError("job was moved while finishing")

    def _init_adapter(self) -> Path | None:
        """The adapter a fine-tune of a fine-tuned model starts from (params
        "init_variant", a variant of the same project and base)."""
        pk = self.job.params.get("init_variant")
        if pk is None:
            return None
        start = Variant.objects.filter(pk=pk, project=self.job.project).first()
        if start is None or not start.adapter_path or start.base_model_id != self.job.base_model_id:
            raise JobError(f"the variant #{pk} to continue from is gone or has no adapter on this base")
        self.log(f"continuing from the adapter of {start.name}")
        return Path(start.adapter_path)

    def _validation_examples(self, system_prompt: str | None) -> list[dict[str, Any]] | None:
        """The rows of the validation dataset version (params
        "validation_version"), whose loss is measured after each epoch."""
        pk = self.job.params.get("validation_version")
        if pk is None:
            return None
        version = DatasetVersion.objects.filter(pk=pk, dataset__project=self.job.project).first()
        if version is None:
            raise JobError(f"the validation dataset version #{pk} is gone")
        rows = version.rows.order_by("index").values_list("messages", flat=True)
        examples = [
            {"messages": m[:-1], "answer": m[-1]["content"], "system_prompt": system_prompt}
            for m in rows
            if m and m[-1]["role"] == "assistant" and m[-1]["content"].strip()
        ]
        if not examples:
            raise JobError(f"the validation data {version} has no rows with an assistant answer")
        self.log(f"validation: the loss on {len(examples)} rows of {version} is measured after each epoch")
        return examples

    def _epoch_variants(self, final: Variant, result: TrainResult) -> None:
        """Each earlier epoch's saved adapter as a servable variant of its own
        (a checkpoint); the final variant's metrics list them all."""
        log: list[dict[str, Any]] = []
        for entry in result.epoch_log:
            entry = dict(entry)
            path = entry.get("adapter_dir")
            if path and Path(path) != Path(final.adapter_path):
                entry["variant"] = Variant.objects.create(
                    project=final.project,
                    name=f"{final.name} epoch {entry['epoch']}",
                    base_model=final.base_model,
                    adapter_path=str(path),
                    prompt_version=final.prompt_version,
                    prompt_sha256=final.prompt_sha256,
                    dataset_version=final.dataset_version,
                    hyperparameters=final.hyperparameters,
                    generation=final.generation,
                    final_loss=entry.get("train_loss"),
                    metrics={"checkpoint_of_job": self.job.pk, "step": entry.get("step")},
                    created_by=final.created_by,
                ).pk
            elif path:
                entry["variant"] = final.pk
            log.append(entry)
        if log:
            final.metrics = {**final.metrics, "epoch_log": log}
            final.save(update_fields=["metrics"])

    @staticmethod
    def _with_passages(rows: list[dict[str, Any]], prompt_version: Any, k: int) -> list[dict[str, Any]]:
        """The rows, general ones too (a served student gets passages on any
        question), with the prompt's k passages most relevant to the question
        after it, as the student reads them when served; "query" keeps the
        user's own words for the checks."""
        rules = prompt_version.rules or []
        return [
            {
                **r,
                "messages": curation.student_view(r["messages"], prompt_version.text, rules, k),
                "query": curation.last_user_text(r["messages"]),
            }
            for r in rows
        ]

    def _repeat_fact_rows(
        self, examples: list[dict[str, Any]], checks: list[facts.FactCheck], repeat: int
    ) -> tuple[list[dict[str, Any]], int]:
        """The examples with each row stating the facts its query asks there
        `repeat` times, and how many such rows there are."""
        if not checks:
            self.log(f"fact_repeat {repeat}: the prompt version has no facts checks, so no row is repeated")
            return examples, 0
        repeated, covered = repeat_fact_rows(examples, checks, repeat)
        rows = (len(repeated) - len(examples)) // (repeat - 1)
        self.log(
            f"fact_repeat {repeat}: {rows} of {len(examples)} rows state the facts their query asks "
            f"({len(covered)} of the prompt's {len(checks)} facts checks); each is trained {repeat} times"
        )
        return [dict(e) for e in repeated], rows

    def _train(
        self,
        examples: list[dict[str, Any]],
        output_dir: Path,
        config: TrainConfig,
        teacher_dir: str | None,
        init_adapter: Path | None = None,
        eval_examples: list[dict[str, Any]] | None = None,
        epoch_adapters: bool = False,
    ) -> TrainResult:
        result = train(
            self.job.base_model.path,
            examples,
            output_dir,
            config,
            progress=self._progress,
            should_stop=self.should_stop,
            resume=True,
            teacher_dir=teacher_dir,
            init_adapter=init_adapter,
            eval_examples=eval_examples,
            epoch_adapters=epoch_adapters,
        )
        if result.cancelled:
            raise JobCancelled()
        if result.resumed_from_step:
            self.log(f"resumed from checkpoint at step {result.resumed_from_step}")
        if result.adapter_dir is None:
            raise JobError("training finished without an adapter")
        return result

    def _first_adapter(
        self, examples: list[dict[str, Any]], config: TrainConfig, teacher_dir: str | None
    ) -> TrainResult:
        """The adapter the refine round starts from: an earlier attempt's when
        it finished training on these very examples, else trained now."""
        job = self.job
        marker = job.data_dir / TRAINED_FILE
        run_id = fingerprint(Path(job.base_model.path), config, examples)
        try:
            stored = json.loads(marker.read_text())
            if stored["fingerprint"] == run_id and (job.data_dir / ADAPTER_DIR).is_dir():
                result = TrainResult(**{**stored["result"], "adapter_dir": job.data_dir / ADAPTER_DIR})
                self.log(f"refine: the adapter an earlier attempt trained ({result.steps} steps) is reused")
                return result
        except (OSError, ValueError, KeyError, TypeError):
            pass
        result = self._train(examples, job.data_dir, config, teacher_dir)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": run_id, "result": result.to_dict()}))
        os.replace(tmp, marker)
        return result

    def _refine(
        self,
        task: list[dict[str, Any]],
        general: list[dict[str, Any]],
        config: TrainConfig,
        first: TrainResult,
        guard_rails: dict[str, Any],
        teacher_dir: str | None,
    ) -> tuple[Path, dict[str, Any]]:
        """The rejection-sampling round: the student's samples, the rows they
        replace, and the short fine-tune that continues the adapter on them.
        Returns the adapter to register and the round's figures."""
        job = self.job
        version, prompt_version = job.dataset_version, job.prompt_version
        assert version is not None and prompt_version is not None and first.adapter_dir is not None
        rules = validate_rules(prompt_version.rules or [])
        fact_list = _fact_checks(prompt_version)
        repairs = _repairs(version)
        gen = _refine_generation(version, guard_rails, config.seed)
        n = config.refine_samples
        self.log(
            f"refine: the student (no prompt) samples {n} answers to each of {len(task)} train queries "
            f"(temperature {gen.temperature}, top-p {gen.top_p}, max {gen.max_new_tokens} new tokens); "
            f"checked against {len(rules)} rules after repairs ({', '.join(repairs) or 'none'}) "
            f"and {len(fact_list)} facts checks"
        )
        began = time.monotonic()
        samples = self._student_samples(task, n, gen, first.adapter_dir)
        sampling = time.monotonic() - began
        groups = [samples[_key(ex["messages"])] for ex in task]
        refined, report = refine_examples(
            task,
            [g[0] for g in groups],
            rules,
            fact_list,
            repairs=repairs,
            finish_reasons=[g[1] for g in groups],
        )
        self.log(report.summary())
        figures: dict[str, Any] = {
            **report.to_dict(),
            "samples_per_query": n,
            "sampling_seconds": round(sampling, 1),
            "train": None,
        }
        if not report.student:
            self.log("refine: no row changed, so no second fine-tune; the variant is the first adapter")
            return first.adapter_dir, figures
        steps_per_epoch = math.ceil(len(refined + general) / (config.batch_size * config.grad_accum))
        refine_config = dataclasses.replace(
            config,
            epochs=config.refine_epochs,
            # Smoke runs cap the steps: the refine round is no longer than the first.
            max_steps=min(config.max_steps, config.refine_epochs * steps_per_epoch)
            if config.max_steps
            else None,
            learning_rate=config.learning_rate / 2,
        )
        self.log(
            f"refine: {config.refine_epochs} more epoch(s) from the trained adapter at lr "
            f"{refine_config.learning_rate} on {len(refined)} rows ({report.student} the student's) "
            f"and {len(general)} general"
        )
        result = self._train(
            refined + general,
            job.data_dir / REFINE_DIR,
            refine_config,
            teacher_dir,
            init_adapter=first.adapter_dir,
        )
        figures["train"] = {
            k: v for k, v in result.to_dict().items() if k in ("steps", "final_loss", "duration_seconds")
        }
        self.log(
            f"refine: {result.steps} steps in {result.duration_seconds:.0f} s; the round took "
            f"{time.monotonic() - began:.0f} s with sampling"
        )
        assert result.adapter_dir is not None
        return result.adapter_dir, figures

    def _student_samples(
        self, task: list[dict[str, Any]], n: int, gen: GenerationSettings, adapter_dir: Path
    ) -> dict[str, tuple[list[str], list[str]]]:
        """conversation key -> (samples, finish reasons); those an earlier
        attempt saved are reused, the rest are generated and saved by chunks."""
        job = self.job
        assert job.base_model is not None
        cache = job.data_dir / REFINE_SAMPLES_FILE
        saved = _cached_samples(cache, n)
        todo: dict[str, list[dict[str, str]]] = {}
        for ex in task:
            key = _key(ex["messages"])
            if key not in saved:
                todo.setdefault(key, ex["messages"])
        self.log(f"refine: {len(saved)} queries' samples reused, {len(todo)} to sample")
        if not todo:
            return saved
        from engines.generator import LocalGenerator
        from engines.inference import load_model

        # In this process, where the adapter was just trained: it is no served variant yet.
        # Merged into the weights: the same function, sampled faster.
        student = LocalGenerator(load_model(job.base_model.path, adapter_dir, merge=True))
        started, items, done = time.monotonic(), list(todo.items()), 0
        torn = cache.is_file() and cache.stat().st_size > 0 and not cache.read_bytes().endswith(b"\n")
        try:
            with cache.open("a", encoding="utf-8") as out:
                if torn:  # a line cut short by a killed attempt must not swallow the next one
                    out.write("\n")
                for start in range(0, len(items), REFINE_CHUNK):
                    chunk = items[start : start + REFINE_CHUNK]
                    groups = student.generate_samples(
                        [messages for _, messages in chunk], None, gen, n, should_stop=self.should_stop
                    )
                    for (key, _), group in zip(chunk, groups, strict=True):
                        saved[key] = ([c.text for c in group], [c.finish_reason for c in group])
                        line = {"key": key, "samples": saved[key][0], "finish_reasons": saved[key][1]}
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    out.flush()
                    done += len(chunk)
                    self.progress(Progress.since(started, done * n, len(items) * n, "samples"))
        finally:
            del student
            gc.collect()  # the sampling copy of the model goes before the second fine-tune loads one
        self.log(f"refine: {len(items) * n} samples in {time.monotonic() - started:.0f} s")
        return saved

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


def _fact_checks(prompt_version: Any) -> list[facts.FactCheck]:
    try:
        return facts.validate_facts(prompt_version.facts or [])
    except facts.FactsError as exc:
        raise JobError(f"the prompt version's facts checks are invalid: {exc}") from exc


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


def _key(messages: list[dict[str, str]]) -> str:
    """A conversation's key in the samples file (the same across attempts)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def _cached_samples(path: Path, n: int) -> dict[str, tuple[list[str], list[str]]]:
    """The student's samples an earlier attempt saved; a torn line, or one
    with another number of samples, is sampled again."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            texts, reasons = [str(t) for t in row["samples"]], [str(r) for r in row["finish_reasons"]]
        except (ValueError, KeyError, TypeError):
            continue
        if len(texts) == n == len(reasons):
            out[str(row["key"])] = (texts, reasons)
    return out


def _repairs(version: DatasetVersion) -> tuple[str, ...]:
    """The repairs the teacher's answers were curated with; the curation
    defaults when the data was not curated (the round checks as curation would)."""
    stored = version.meta.get("curation")
    try:
        return CurationSettings.from_dict(stored if isinstance(stored, dict) else None).repairs
    except (TypeError, ValueError):
        return CurationSettings().repairs


def _refine_generation(version: DatasetVersion, guard_rails: dict[str, Any], seed: int) -> GenerationSettings:
    """The teacher's generation settings (token cap, batch, guard rails), sampled at
    REFINE_TEMPERATURE with the training seed unless the teacher's had one."""
    stored = version.meta.get("generation")
    try:
        gen = GenerationSettings.from_dict(stored if isinstance(stored, dict) else None)
    except SettingsError:
        gen = GenerationSettings()
    gen = dataclasses.replace(
        gen, **{k: v for k, v in guard_rails.items() if k in GenerationSettings.GUARD_RAILS}
    )
    return dataclasses.replace(
        gen, temperature=REFINE_TEMPERATURE, seed=gen.seed if gen.seed is not None else seed
    )


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
