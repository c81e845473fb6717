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
from collections.abc import Callable
from typing import Any

from django.db import transaction

from engines import curation, facts
from engines.facts import FactCheck, FactsError
from engines.inference import GenerationSettings
from engines.leakage import leak_flags, prompt_spans
from engines.progress import Progress
from engines.remote import RemoteGenerationError
from engines.rules import Rule, rules_to_json, validate_rules
from jobs.backend import recording_usage, teacher_backend, teacher_generator
from jobs.registry import JobError, JobRunner, register
from workbench import data_quality
from workbench.actions.datasets import derive_version
from workbench.models import DatasetRow, DatasetVersion

CHUNK = 64  # conversations generated (and saved) per chunk: a retried job only generates the rest

Messages = list[dict[str, str]]


class Guide:
    """What the teacher is shown and checked on per query, beyond the prompt:
    the prompt's passages relevant to the query (beside the question), and the
    prompt's facts checks that apply to it (a sample must state them)."""

    def __init__(self, prompt: str, rules: list[Rule], fact_list: list[FactCheck], passages: int) -> None:
        # Sentences holding a rule's own text state the rules: the teacher has them in the prompt.
        literals = curation.rule_literals(rules)
        self.retriever = curation.Retriever(prompt, exclude=literals) if passages else None
        self.k = passages
        self.prompt = prompt
        self.facts = fact_list
        self._notes: dict[str, str] = {}
        # The sentence of the prompt stating each fact: a reminder quotes it, a later round may open with it.
        sentences = [p.text for p in curation.passages(prompt)] if fact_list else []
        self._statements = {f.name: _statement(f, sentences) for f in fact_list}

    def note(self, messages: Messages) -> str:
        query = curation.last_user_text(messages)
        if self.retriever is None:
            return ""
        if query not in self._notes:
            self._notes[query] = curation.facts_note(self.retriever.relevant(query, self.k))
        return self._notes[query]

    def _asked(self, messages: Messages) -> list[FactCheck]:
        return facts.applicable(self.facts, curation.last_user_text(messages)) if self.facts else []

    def checker(self, messages: Messages) -> curation.Checker | None:
        asked = self._asked(messages)
        if not asked:
            return None
        return lambda text: {f"fact:{f.name}": facts.states(f, text) for f in asked}

    def invented(self, messages: Messages) -> Callable[[str], list[str]]:
        """The figures (money, times) an answer states that neither the prompt nor the question does."""
        known = f"{self.prompt}\n{curation.last_user_text(messages)}"
        return lambda text: curation.unsupported_figures(text, known)

    def sources(self, messages: Messages) -> dict[str, str]:
        return {f"fact:{f.name}": self._statements[f.name] for f in self._asked(messages)}


def _statement(fact: FactCheck, sentences: list[str]) -> str:
    """The whole prompt sentence that holds the fact's source and states it
    (a source may be a fragment: "on Saturday from 09:00 to 13:00"); else
    the first sentence stating it; else the source itself."""
    source = fact.source.strip().casefold()
    stating = [s for s in sentences if facts.states(fact, s)]
    for sentence in stating:
        if source and source in sentence.casefold():
            return sentence
    if stating:
        return stating[0]
    return fact.source or f"The answer is {fact.expect or 'in the prompt'}."


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
        costs_file = job.data_dir / "teacher-rounds.json"
        guide = Guide(system_prompt, rules, self._facts(), curate.passages if curate else 0)
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
                f"curation: best of {samples} per round, up to {curate.rounds} rounds"
                f"{' with reminders' if curate.reminders else ''} (temperature {sample_gen.temperature}, "
                f"top-p {sample_gen.top_p}){f', answers open with {opening!r}' if opening else ''}, "
                f"{curate.passages} relevant passages beside each question, repairs: "
                f"{', '.join(curate.repairs) or 'none'}; {len(rules)} rules, {len(guide.facts)} facts checks"
            )
        started = time.monotonic()
        generated = 0
        self.progress(Progress(done=len(answers), total=total, unit="queries"))

        in_chunk = [0]  # queries of the chunk being answered

        def progress(p: Progress) -> None:
            # The engines count generated answers: N per query in the first round, fewer in later
            # rounds; a chunk counts as done only when all its rounds are (the bar never goes back).
            done_now = min(in_chunk[0] - 1, int(p.done) // samples) if in_chunk[0] else 0
            self.progress(
                Progress.since(
                    started, len(answers) + done_now, total, "queries", rate_done=generated + done_now
                )
            )

        if todo:
            # In process, or on the vLLM server (its prefix cache shares the prompt): jobs.backend decides.
            # Behind the project's response cache; an endpoint when the job names one.
            teacher = teacher_generator(job)
            self.log(f"teacher: generating {teacher_backend(teacher)}")
            early = self._early(costs_file)  # what an earlier chunk's probe learned, kept for the rest
            with done_file.open("a") as out, recording_usage(job, teacher):
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start : start + CHUNK]
                    in_chunk[0] = len(chunk)
                    sampled = curation.sample_until_pass(
                        teacher,
                        [m for _, m in chunk],
                        system_prompt,
                        sample_gen,
                        rules if curate else [],
                        best_of=samples,
                        rounds=curate.rounds if curate else 1,
                        repairs=curate.repairs if curate else (),
                        opening=opening,
                        notes=[guide.note(m) for _, m in chunk],
                        checkers=[guide.checker(m) for _, m in chunk],
                        sources=[guide.sources(m) for _, m in chunk],
                        reminders=bool(curate and curate.reminders),
                        phrases=bool(curate and curate.phrases),
                        fact_sentences=bool(curate and curate.fact_sentences),
                        probe=curate.probe if curate else 0,
                        early=early,
                        progress=progress,
                        should_stop=self.should_stop,
                    )
                    if sampled.early is not None:
                        early = sampled.early
                        self.log(f"curation: {early.describe()}")
                    for (index, messages), group in zip(chunk, sampled.samples, strict=True):
                        answers[index] = {
                            "index": index,
                            "text": group[0].text,
                            "finish_reason": group[0].finish_reason,
                            "samples": [c.text for c in group],
                            "finish_reasons": [c.finish_reason for c in group],
                            "rounds": [c.round for c in group],
                            "phrases": [c.phrase for c in group],
                        }
                        note = guide.note(messages)
                        if note:
                            answers[index]["note"] = note
                        out.write(json.dumps(answers[index], ensure_ascii=False) + "\n")
                    out.flush()
                    self._add_costs(costs_file, sampled.rounds, early)
                    generated += len(chunk)
        elapsed = time.monotonic() - started
        rows, flags, made = self._rows(
            to_answer, kept, answers, system_prompt, sample_gen, rules, curate, opening, guide
        )
        meta: dict[str, Any] = {
            "prompt_version": str(job.prompt_version),
            "prompt_sha256": job.prompt_version.sha256,
            "base_model": job.base_model.name,
            "teacher_model": job.teacher_endpoint.model if job.teacher_endpoint else job.base_model.name,
            "teacher_usage": job.params.get("teacher_usage"),
            "generation": sample_gen.to_dict(),
            "job": job.pk,
            "source": str(job.dataset_version),
            "seconds": round(elapsed, 1),
            "rules": rules_to_json(rules),
        }
        if rules:
            meta["quality"] = self._quality(
                rows, made, rules, curate, opening, self._costs(costs_file), self._stored_early(costs_file)
            )
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
            job.hand_on(version)  # the fine-tune that waits for these answers trains on them
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

    def _facts(self) -> list[FactCheck]:
        assert self.job.prompt_version is not None
        try:
            return facts.validate_facts(self.job.prompt_version.facts or [])
        except FactsError as exc:
            raise JobError(f"the prompt version's facts checks are invalid: {exc}") from exc

    @staticmethod
    def _add_costs(path: Any, rounds: list[curation.RoundCost], early: curation.Early | None = None) -> None:
        """Each round's queries, samples and seconds, summed over the chunks,
        and what round one's probe learned (kept beside the answers, so a
        resumed job reports the whole cost and skips the probe)."""
        stored = TeacherRunner._read_costs(path)
        totals = {c["round"]: c for c in stored["rounds"]}
        for r in rounds:
            t = totals.setdefault(r.round, {"round": r.round, "queries": 0, "samples": 0, "seconds": 0.0})
            t["queries"] += r.queries
            t["samples"] += r.samples
            t["seconds"] = round(t["seconds"] + r.seconds, 2)
        kept = early.to_json() if early is not None else stored["early"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"rounds": sorted(totals.values(), key=lambda c: c["round"]), "early": kept})
        )
        tmp.replace(path)

    @staticmethod
    def _read_costs(path: Any) -> dict[str, Any]:
        if not path.exists():
            return {"rounds": [], "early": None}
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {"rounds": data, "early": None}  # before the probe

    @staticmethod
    def _costs(path: Any) -> list[dict[str, Any]]:
        return list(TeacherRunner._read_costs(path)["rounds"])

    @staticmethod
    def _stored_early(path: Any) -> dict[str, Any] | None:
        early = TeacherRunner._read_costs(path)["early"]
        return early if isinstance(early, dict) else None

    @staticmethod
    def _early(path: Any) -> curation.Early | None:
        stored = TeacherRunner._stored_early(path)
        return curation.Early.from_json(stored) if stored is not None else None

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
        guide: Guide,
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
                made = curation.curate(
                    samples,
                    rules,
                    curate,
                    opening,
                    rounds=item.get("rounds"),
                    extra=guide.checker(queries[index]),
                    invented=guide.invented(queries[index]),
                )
                text, failing, record = made.text, made.failing, made.record
                record["raw"] = made.raw
                if item.get("note"):
                    record["note"] = item["note"]  # what the teacher was shown beside the question
                if (item.get("phrases") or [False] * len(samples))[made.record["picked"]]:
                    record["phrase_prefilled"] = True  # a required phrase or a fact's sentence
                made_by_index[index] = made
            elif rules:
                failing = data_quality.failing(rules, [{"role": "assistant", "content": text}])
            picked = record.get("picked", 0)
            # Quoting a fact passage the teacher was handed (beside the question, or as the sentence a later
            # round's answer opened with) states a fact; it is not a leak of instructions.
            facts_shown = " ".join([item.get("note") or "", *guide.sources(queries[index]).values()])
            shown = spans - prompt_spans(facts_shown) if facts_shown.strip() else spans
            notes = leak_flags(text, system_prompt, shown)
            if not text.strip():
                notes.append("empty answer")
            if curate is not None:
                notes.extend(f"does not state {name}" for name, ok in made.extra.items() if not ok)
                if record.get("invented_figures"):
                    notes.append("figures not in the prompt: " + ", ".join(record["invented_figures"]))
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
        costs: list[dict[str, Any]],
        early: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Pass rates of the train answers after each step (rows kept from
        the dataset count as they are); `early`: what round one's probe prefilled."""
        assert self.job.dataset_version is not None
        train = set(
            self.job.dataset_version.rows.filter(split=DatasetRow.TRAIN).values_list("index", flat=True)
        )
        made: list[curation.Curated] = []
        for index, messages, more in rows:
            if index in train:
                final = messages[-1]["content"]
                made.append(
                    made_by_index.get(index)
                    or curation.Curated(final, final, final, final, {}, more["failing"])
                )
        if curate is None:
            return {
                "rule_names": [r.name for r in rules],
                "settings": None,
                "steps": [{"step": "teacher answers", **curation.pass_rates([c.text for c in made], rules)}],
            }
        return curation.quality_report(made, rules, curate, opening, costs, early)
