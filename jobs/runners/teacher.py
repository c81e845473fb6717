"""Teacher generation: the base model WITH the prompt answers every train
query; the answers become a dataset version the team can review."""

from __future__ import annotations

import json
import time
from typing import Any

from django.db import transaction

from engines.inference import GenerationSettings, generate, load_model
from engines.leakage import leak_flags, prompt_spans
from engines.progress import Progress
from jobs.models import Job
from jobs.registry import JobError, JobRunner, register
from jobs.runners.engine import remote_model
from workbench.actions.datasets import derive_version
from workbench.models import DatasetRow, DatasetVersion

CHUNK = 64  # conversations generated (and saved) per chunk: a retried job only generates the rest

Messages = list[dict[str, str]]


@register
class TeacherRunner(JobRunner):
    kind = "teacher"
    label = "Teacher generation"
    requires = ("base_model", "prompt_version", "dataset_version")

    def run(self) -> None:
        job = self.job
        assert job.dataset_version is not None and job.prompt_version is not None and job.base_model is not None
        gen = GenerationSettings.from_dict(job.params.get("generation"))
        to_answer, kept = self._answerable(bool(job.params.get("keep_existing", True)))
        if not to_answer and not kept:
            raise JobError(f"{job.dataset_version} has no rows in its train split.")
        system_prompt = job.prompt_version.text
        job.data_dir.mkdir(parents=True, exist_ok=True)
        done_file = job.data_dir / "teacher-answers.jsonl"
        answers = self._answers_so_far(done_file)
        todo = [(i, m) for i, m in to_answer if i not in answers]
        # Similar lengths in one chunk: less padding inside each batch.
        todo.sort(key=lambda im: -sum(len(m["content"]) for m in im[1]))
        total = len(to_answer)
        self.log(f"teacher: {total} queries to answer ({len(answers)} already done), {len(kept)} keep their "
                 f"answer; batch {gen.batch_size}, max {gen.max_new_tokens} new tokens")
        started = time.monotonic()
        generated = 0
        self.progress(Progress(done=len(answers), total=total, unit="queries"))

        def progress(p: Progress) -> None:
            done = len(answers) + int(p.done)
            self.progress(Progress.since(started, done, total, "queries", rate_done=generated + p.done))

        if todo:
            # INFERENCE_BACKEND=vllm: the vLLM server answers (its prefix cache shares the prompt).
            remote = remote_model(job.base_model)
            loaded = load_model(job.base_model.path) if remote is None else None
            with done_file.open("a") as out:
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start:start + CHUNK]
                    if remote is not None:
                        completions = remote.generate([m for _, m in chunk], system_prompt, gen,
                                                      progress=progress, should_stop=self.should_stop)
                    else:
                        completions = generate(loaded, [m for _, m in chunk], system_prompt, gen,
                                               reuse_prefix=True, progress=progress, should_stop=self.should_stop)
                    for (index, _), c in zip(chunk, completions, strict=True):
                        answers[index] = {"index": index, "text": c.text, "finish_reason": c.finish_reason}
                        out.write(json.dumps(answers[index], ensure_ascii=False) + "\n")
                    out.flush()
                    generated += len(chunk)
        elapsed = time.monotonic() - started
        rows, flags = self._rows(to_answer, kept, answers, system_prompt, gen)
        meta = {"prompt_version": str(job.prompt_version), "prompt_sha256": job.prompt_version.sha256,
                "base_model": job.base_model.name, "generation": gen.to_dict(), "job": job.pk,
                "source": str(job.dataset_version), "seconds": round(elapsed, 1)}
        final = Progress(done=total, total=total, unit="queries", elapsed=elapsed, eta_seconds=0,
                         rate=generated / elapsed if elapsed else None)
        with transaction.atomic():
            version = derive_version(job.dataset_version, job.created_by, rows, kind=DatasetVersion.TEACHER,
                                     meta=meta, flags=flags)
            if not self.succeed(output_dataset=version, progress=final.to_json()):
                raise transaction.TransactionManagementError("job was moved while finishing")  # rolls back
            # The fine-tune that waits for these answers trains on them.
            job.dependents.filter(status=Job.QUEUED, dataset_version__isnull=True).update(dataset_version=version)
        self.log(f"teacher: {len(rows)} rows stored as {version}; {len(flags)} flagged for review; "
                 f"{generated / elapsed if elapsed else 0:.2f} queries/s")

    def _answerable(self, keep_existing: bool) -> tuple[list[tuple[int, Messages]], dict[int, Messages]]:
        """Train-split rows to answer, and rows that keep their own answer."""
        assert self.job.dataset_version is not None
        to_answer: list[tuple[int, Messages]] = []
        kept: dict[int, Messages] = {}
        rows = self.job.dataset_version.rows.filter(split=DatasetRow.TRAIN).order_by("index")
        for index, messages in rows.values_list("index", "messages").iterator(chunk_size=2000):
            if messages[-1]["role"] == "assistant":
                if keep_existing:
                    kept[index] = messages
                    continue
                messages = messages[:-1]
            to_answer.append((index, messages))
        return to_answer, kept

    @staticmethod
    def _answers_so_far(done_file: Any) -> dict[int, dict[str, Any]]:
        """Answers a previous attempt saved before its worker died."""
        answers: dict[int, dict[str, Any]] = {}
        if done_file.exists():
            for line in done_file.read_text().splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
                answers[item["index"]] = item
        return answers

    @staticmethod
    def _rows(to_answer: list[tuple[int, Messages]], kept: dict[int, Messages], answers: dict[int, dict[str, Any]],
              system_prompt: str, gen: GenerationSettings) -> tuple[list[tuple[int, Messages]], dict[int, list[str]]]:
        spans = prompt_spans(system_prompt)
        rows: list[tuple[int, Messages]] = []
        flags: dict[int, list[str]] = {}
        queries = dict(to_answer)
        for index in sorted([*queries, *kept]):
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
            rows.append((index, [*queries[index], {"role": "assistant", "content": item["text"]}]))
        return rows, flags
