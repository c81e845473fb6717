"""Query synthesis: the teacher writes the questions users would ask about
the prompt's sections and facts (engines.curation.synthesize), so a team
with 40 real queries still trains on hundreds.

The job stores a NEW dataset version: every row of the input version as it
was, then the synthetic queries (a user message each, no answer: the teacher
job answers them), each marked in its row's extra fields ({"source":
"synthetic", "unit": ...}, kept through teacher answers and exports) and with
a note, so review shows them flagged and the team can drop what it does not
want before the teacher runs. Nothing is written until the questions are
all in, then in one transaction: a cancelled or failed job leaves no
version behind."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Any

from django.db import transaction

from engines import curation
from engines.facts import FactCheck, FactsError, validate_facts
from engines.progress import Progress
from engines.remote import RemoteGenerationError
from engines.rules import RulesError, validate_rules
from jobs.backend import recording_usage, teacher_generator
from jobs.registry import JobCancelled, JobError, JobRunner, register
from workbench.actions.datasets import derive_version
from workbench.models import DatasetVersion

KIND = "synthesize"
MAX_COUNT = curation.JOB_MAX_COUNT  # synthetic queries one job may add
DEFAULT_COUNT = curation.JOB_DEFAULT_COUNT
ABSORB_COUNT = curation.ABSORB_COUNT
SYNTHETIC = "synthetic"  # the value of a synthetic row's extra["source"]


def synthetic_note(unit: str) -> str:
    return f"synthetic: {unit}"


Row = tuple[Any, list[dict[str, str]], dict[str, Any]]


@register
class SynthesisRunner(JobRunner):
    kind = KIND
    label = "Query synthesis"
    requires = ("base_model", "prompt_version", "dataset_version")
    user_errors = (RemoteGenerationError,)

    def run(self) -> None:
        job = self.job
        assert job.prompt_version is not None and job.dataset_version is not None
        count, settings = self._settings()
        prompt = job.prompt_version.text
        facts, literals = self._checks()
        parent: DatasetVersion = job.dataset_version
        rows: list[Row] = [
            (index, messages, {"notes": notes, "failing": failing, "review": review, "curation": made})
            for index, messages, notes, failing, review, made in parent.rows.order_by("index")
            .values_list("index", "messages", "notes", "failing", "review", "curation")
            .iterator(chunk_size=2000)
        ]
        # Every split counts: a question close to a held-out query would leak it into training.
        real = [curation.last_user_text(messages) for _, messages, _ in rows]
        self.log(
            f"synthesis: up to {count} questions about {job.prompt_version} ({len(facts)} facts checks), "
            f"none close to the {len(real)} queries of {parent} (token-set ratio >= {settings.threshold}); "
            f"temperature {settings.temperature}, seed {settings.seed}"
        )
        started = time.monotonic()

        def progress(p: Progress) -> None:
            self.progress(Progress.since(started, p.done, p.total, "questions"))

        teacher = teacher_generator(job)
        with recording_usage(job, teacher):
            made = curation.synthesize(
                teacher,
                prompt,
                facts,
                real,
                count=count,
                exclude=literals,
                settings=settings,
                progress=progress,
                should_stop=self.should_stop,
            )
        report = made.report
        dropped = ", ".join(f"{n} {why}" for why, n in report["dropped"].items() if n)
        self.log(
            f"synthesis: {report['units']} pieces of the prompt ({report['sections']} section chunks, "
            f"{report['facts']} facts), {report['samples_per_unit']} questions asked about each: "
            f"{report['asked']} asked, {report['parsed']} parsed, {report['kept']} kept "
            f"({report['asking_a_fact']} asking a fact a facts check knows); dropped: {dropped or 'none'}"
        )
        if report["facts_without_passage"]:
            self.log(
                "synthesis: no passage of the prompt states the source of "
                + ", ".join(report["facts_without_passage"])
                + "; no questions were written about them"
            )
        if not made.queries and self.job.params.get("then_teacher"):
            # An absorb's first step: its teacher answers the data's own queries, as without it, in a
            # version this job stores (what the teacher's fingerprint names).
            self.log(
                f"synthesis: none of the {report['asked']} questions passed the filters "
                f"({dropped or 'the prompt has no sections to ask about'}); the teacher answers the rows of "
                f"{parent} alone"
            )
        elif not made.queries:
            raise JobError(
                f"none of the {report['asked']} questions the teacher wrote passed the filters "
                f"({dropped or 'the prompt has no sections to ask about'}): no version was stored"
            )
        if self.should_stop():
            raise JobCancelled()
        version = self._store(parent, rows, made, started)
        self.log(f"synthesis: {len(rows)} rows and {len(made.queries)} synthetic queries stored as {version}")

    def _settings(self) -> tuple[int, curation.SynthesisSettings]:
        count = self.job.params.get("count", DEFAULT_COUNT)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise JobError(f"count must be a whole number from 1 to {MAX_COUNT}, got {count!r}")
        try:
            settings = curation.SynthesisSettings.from_dict(self.job.params.get("synthesis"))
        except (TypeError, ValueError) as exc:
            raise JobError(f"bad synthesis settings: {exc}") from exc
        if settings.seed is None:
            # The teacher's answers are cached by their settings: a job of its own seed gets new
            # questions (another run on the same data would only find its own), a retry the same.
            settings = dataclasses.replace(settings, seed=int(self.job.pk))
        return count, settings

    def _checks(self) -> tuple[list[FactCheck], list[str]]:
        """The prompt version's facts checks, and the texts its starts_with /
        ends_with rules require (their section says how to write: nothing to ask)."""
        pv = self.job.prompt_version
        try:
            facts = validate_facts(pv.facts or [])
            rules = validate_rules(pv.rules or [])
        except (FactsError, RulesError) as exc:
            raise JobError(f"the rules or facts checks of {pv} are invalid: {exc}") from exc
        return facts, [r.params["text"] for r in rules if r.kind in ("starts_with", "ends_with")]

    def _store(
        self, parent: DatasetVersion, rows: list[Row], made: curation.Synthesized, started: float
    ) -> DatasetVersion:
        job = self.job
        report = made.report
        added: list[Row] = [
            (None, [{"role": "user", "content": q.text}], {"notes": [synthetic_note(q.unit)]})
            for q in made.queries
        ]
        sections = len({q.unit for q in made.queries if q.kind == "section"})
        facts = len({q.unit for q in made.queries if q.kind == "fact"})
        meta: dict[str, Any] = {
            "source": str(parent),
            "job": job.pk,
            "prompt_version": str(job.prompt_version),
            "teacher_model": job.teacher_endpoint.model if job.teacher_endpoint else job.base_model.name,
            "teacher_usage": job.params.get("teacher_usage"),
            "synthesis": report,
            "notes": [
                f"{len(added)} synthetic queries added by {job} about {sections} section chunks and {facts} facts "
                f"checks of {job.prompt_version}, after the {len(rows)} rows of {parent}. They are flagged "
                f"“synthetic” in review: drop those you do not want before the teacher answers them."
                if added
                else f"The {len(rows)} rows of {parent}: none of the questions {job} wrote passed its filters."
            ],
        }
        elapsed = time.monotonic() - started
        done = report["asked"]
        final = Progress(done=done, total=done, unit="questions", elapsed=elapsed, eta_seconds=0)
        with transaction.atomic():
            version = derive_version(
                parent, job.created_by, [*rows, *added], kind=DatasetVersion.EDIT, meta=meta
            )
            # New rows have no parent row to take extra fields from: mark them here, by unit.
            by_unit: dict[tuple[str, str], list[int]] = defaultdict(list)
            for offset, q in enumerate(made.queries):
                by_unit[(q.unit, q.kind)].append(len(rows) + offset)
            for (unit, kind), indexes in by_unit.items():
                mark = {"source": SYNTHETIC, "unit": unit, "unit_kind": kind, "job": job.pk}
                for i in range(0, len(indexes), 500):
                    version.rows.filter(index__in=indexes[i : i + 500]).update(extra=mark)
            if self.should_stop():
                raise JobCancelled()  # rolls the version back
            if not self.succeed(output_dataset=version, progress=final.to_json()):
                raise transaction.TransactionManagementError("job was moved while finishing")  # rolls back
            job.hand_on(version)  # an absorb's teacher waiting for this job answers it
        return version
