"""Teacher generation: a model WITH the prompt answers every train query;
the answers become a dataset version the team can review.

When the prompt has checkable rules the answers are curated (engines.curation):
N samples per query and the one passing the most rules kept, answers opened
with the text a starts_with rule requires, mechanical repairs recorded; the
version keeps each row's record, the rules it still fails, and a report of
how each step moved the pass rates."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from django.db import transaction

from engines import curation
from engines.inference import GenerationSettings
from engines.leakage import leak_flags, prompt_spans
from engines.progress import Progress
from engines.remote import RemoteGenerationError
from engines.rules import Rule, rules_to_json, validate_rules
from jobs.backend import generator
from jobs.models import Job
from jobs.registry import JobError, JobRunner, register
from workbench import data_quality
from workbench.actions.datasets import derive_version
from workbench.models import DatasetRow, DatasetVersion

CHUNK = 64  # conversations generated (and saved) per chunk: a retried job only generates the rest

Messages = list[dict[str, str]]


@register
class TeacherRunner(JobRunner):
    kind = "teacher"
    label = "Teacher generation"
    requires = ("base_model", "prompt_version", "dataset_version")
    user_errors = (RemoteGenerationError,)

    def run(self) -> None:
        job = self.job
        assert (
            job.dataset_version is not None and job.prompt_version is not None and job.base_model is not None
        )
        gen = GenerationSettings.from_dict(job.params.get("generation"))
        to_answer, kept = self._answerable(bool(job.params.get("keep_existing", True)))
        if not to_answer and not kept:
            raise JobError(f"{job.dataset_version} has no rows in its train split.")
        system_prompt = job.prompt_version.text
        rules = validate_rules(job.prompt_version.rules or [])
        curate = self._curation(rules)
        opening = curation.opening(rules) if curate and curate.prefill else None
        samples = curate.best_of if curate else 1
        sample_gen = gen
        if curate:
            sample_gen = self._capped(gen, rules, curate)
            if samples > 1:
                sample_gen = dataclasses.replace(
                    sample_gen, temperature=curate.temperature, top_p=curate.top_p
                )
        job.data_dir.mkdir(parents=True, exist_ok=True)
        done_file = job.data_dir / "teacher-answers.jsonl"
        answers = self._answers_so_far(done_file)
        todo = [(i, m) for i, m in to_answer if i not in answers]
        # Similar lengths in one chunk: less padding inside each batch.
        todo.sort(key=lambda im: -sum(len(m["content"]) for m in im[1]))
        total = len(to_answer)
        self.log(
            f"teacher: {total} queries to answer ({len(answers)} already done), {len(kept)} keep their "
            f"answer; batch {gen.batch_size}, max {sample_gen.max_new_tokens} new tokens"
        )
        if curate:
            self.log(
                f"curation: best of {samples} (temperature {sample_gen.temperature}, top-p {sample_gen.top_p})"
                f"{f', answers open with {opening!r}' if opening else ''}, repairs: "
                f"{', '.join(curate.repairs) or 'none'}; {len(rules)} rules"
            )
        started = time.monotonic()
        generated = 0
        self.progress(Progress(done=len(answers), total=total, unit="queries"))

        def progress(p: Progress) -> None:
            # The engines count generated answers: N per query with best-of-N.
            done_now = int(p.done) // samples
            self.progress(
                Progress.since(
                    started, len(answers) + done_now, total, "queries", rate_done=generated + done_now
                )
            )

        if todo:
            # In process, or on the vLLM server (its prefix cache shares the prompt): jobs.backend decides.
            teacher = generator(job.base_model)
            with done_file.open("a") as out:
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start : start + CHUNK]
                    groups = teacher.generate_samples(
                        [m for _, m in chunk],
                        system_prompt,
                        sample_gen,
                        samples,
                        opening=opening,
                        progress=progress,
                        should_stop=self.should_stop,
                    )
                    for (index, _), group in zip(chunk, groups, strict=True):
                        answers[index] = {
                            "index": index,
                            "text": group[0].text,
                            "finish_reason": group[0].finish_reason,
                            "samples": [c.text for c in group],
                            "finish_reasons": [c.finish_reason for c in group],
                        }
                        out.write(json.dumps(answers[index], ensure_ascii=False) + "\n")
                    out.flush()
                    generated += len(chunk)
        elapsed = time.monotonic() - started
        rows, flags, made = self._rows(
            to_answer, kept, answers, system_prompt, sample_gen, rules, curate, opening
        )
        meta: dict[str, Any] = {
            "prompt_version": str(job.prompt_version),
            "prompt_sha256": job.prompt_version.sha256,
            "base_model": job.base_model.name,
            "teacher_model": job.base_model.name,
            "generation": sample_gen.to_dict(),
            "job": job.pk,
            "source": str(job.dataset_version),
            "seconds": round(elapsed, 1),
            "rules": rules_to_json(rules),
        }
        if rules:
            meta["quality"] = self._quality(rows, made, rules, curate, opening)
            meta["curation"] = curate.to_dict() if curate else None
        final = Progress(
            done=total,
            total=total,
            unit="queries",
            elapsed=elapsed,
            eta_seconds=0,
            rate=generated / elapsed if elapsed else None,
        )
        with transaction.atomic():
            version = derive_version(
                job.dataset_version, job.created_by, rows, kind=DatasetVersion.TEACHER, meta=meta
            )
            if not self.succeed(output_dataset=version, progress=final.to_json()):
                raise transaction.TransactionManagementError("job was moved while finishing")  # rolls back
            # The fine-tune that waits for these answers trains on them.
            job.dependents.filter(status=Job.QUEUED, dataset_version__isnull=True).update(
                dataset_version=version
            )
        self.log(
            f"teacher: {len(rows)} rows stored as {version}; {len(flags)} flagged for review; "
            f"{generated / elapsed if elapsed else 0:.2f} queries/s"
        )

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

    def _curation(self, rules: list[Rule]) -> curation.CurationSettings | None:
        """The job's curation settings; None (plain teacher answers) when
        switched off or when the prompt has no checkable rules."""
        raw = self.job.params.get("curation")
        if raw is None or not rules:
            return None
        try:
            return curation.CurationSettings.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise JobError(f"bad curation settings: {exc}") from exc

    def _capped(
        self, gen: GenerationSettings, rules: list[Rule], curate: curation.CurationSettings
    ) -> GenerationSettings:
        """Answers past a max_words limit are cut by the repair anyway (to
        3/4 of it): generating far beyond that only costs time (about 1.6
        tokens a word)."""
        limits = [r.params["n"] for r in rules if r.kind == "max_words"]
        if not limits:
            return gen
        target = curation.MAX_WORDS_TARGET if "max_words" in curate.repairs else 1.0
        cap = math.ceil(min(limits) * target * 1.6) + 24
        if cap >= gen.max_new_tokens:
            return gen
        self.log(f"curation: at most {cap} new tokens (a {min(limits)}-word limit; was {gen.max_new_tokens})")
        return dataclasses.replace(gen, max_new_tokens=cap)

    @staticmethod
    def _rows(
        to_answer: list[tuple[int, Messages]],
        kept: dict[int, Messages],
        answers: dict[int, dict[str, Any]],
        system_prompt: str,
        gen: GenerationSettings,
        rules: list[Rule],
        curate: curation.CurationSettings | None,
        opening: str | None,
    ) -> tuple[list[tuple[int, Messages, dict[str, Any]]], dict[int, list[str]], dict[int, curation.Curated]]:
        spans = prompt_spans(system_prompt)
        rows: list[tuple[int, Messages, dict[str, Any]]] = []
        flags: dict[int, list[str]] = {}
        made_by_index: dict[int, curation.Curated] = {}
        queries = dict(to_answer)
        for index in sorted([*queries, *kept]):
            if index in kept:
                messages = kept[index]
                failing = data_quality.failing(rules, messages)
                rows.append((index, messages, {"failing": failing}))
                continue
            item = answers[index]
            samples = item.get("samples") or [item["text"]]
            reasons = item.get("finish_reasons") or [item["finish_reason"]]
            record: dict[str, Any] = {}
            text, failing = samples[0], []
            if curate is not None:
                made = curation.curate(samples, rules, curate, opening)
                text, failing, record = made.text, made.failing, made.record
                record["raw"] = made.raw
                made_by_index[index] = made
            elif rules:
                failing = data_quality.failing(rules, [{"role": "assistant", "content": text}])
            picked = record.get("picked", 0)
            notes = leak_flags(text, system_prompt, spans)
            if not text.strip():
                notes.append("empty answer")
            if reasons[picked] == "length" and not record.get("repairs"):
                notes.append(f"cut off at {gen.max_new_tokens} tokens")
            if notes or failing:
                flags[len(rows)] = [*notes, *failing]
            rows.append(
                (
                    index,
                    [*queries[index], {"role": "assistant", "content": text}],
                    {"notes": notes, "failing": failing, "curation": record},
                )
            )
        return rows, flags, made_by_index

    def _quality(
        self,
        rows: list[tuple[int, Messages, dict[str, Any]]],
        made_by_index: dict[int, curation.Curated],
        rules: list[Rule],
        curate: curation.CurationSettings | None,
        opening: str | None,
    ) -> dict[str, Any]:
        """Pass rates of the train answers after each step (rows kept from
        the dataset count as they are)."""
        assert self.job.dataset_version is not None
        train = set(
            self.job.dataset_version.rows.filter(split=DatasetRow.TRAIN).values_list("index", flat=True)
        )
        made: list[curation.Curated] = []
        for index, messages, more in rows:
            if index in train:
                final = messages[-1]["content"]
                made.append(
                    made_by_index.get(index) or curation.Curated(final, final, final, {}, more["failing"])
                )
        if curate is None:
            return {
                "rule_names": [r.name for r in rules],
                "settings": None,
                "steps": [{"step": "teacher answers", **curation.pass_rates([c.text for c in made], rules)}],
            }
        return curation.quality_report(made, rules, curate, opening)
