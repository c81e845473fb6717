from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines.curation import REPAIRS, CurationSettings
from engines.inference import SettingsError
from engines.training import ConfigError
from jobs import actions
from jobs.models import Job, TeacherEndpoint
from workbench import data_quality
from workbench.actions import ActionError
from workbench.actions.prompts import find_prompt_version
from workbench.management.commands._common import base_model_by_name, dataset_version_by_ref, project_by_slug
from workbench.models import FoundationModel


class Command(BaseCommand):
    help = (
        "Absorb a prompt: queue teacher generation on the dataset's train split, then a LoRA fine-tune on "
        "the teacher's answers. --wait shows progress; --json prints the variant's id and metrics."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--prompt", required=True, help="NAME or NAME@VERSION")
        parser.add_argument("--dataset", required=True, help="NAME or NAME@VERSION")
        parser.add_argument("--base-model", help="Registered base model (default: the default one)")
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--max-steps", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument(
            "--refine",
            type=int,
            metavar="N",
            help="After training, the student samples N answers per train query; passing ones replace the "
            "rows' answers for one more short fine-tune (refine_samples; 0-8, default off)",
        )
        gen = actions.absorb_generation()
        parser.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens)
        parser.add_argument(
            "--teacher-batch", type=int, default=gen.batch_size, help="Teacher generation batch size"
        )
        parser.add_argument(
            "--temperature", type=float, default=gen.temperature, help="Teacher sampling (0 = greedy)"
        )
        parser.add_argument("--seed", type=int, help="Teacher sampling seed")
        parser.add_argument(
            "--repetition-penalty",
            type=float,
            default=gen.repetition_penalty,
            help="Penalise repeated tokens (>1; small models loop without it)",
        )
        parser.add_argument(
            "--no-repeat-ngram-size",
            type=int,
            default=gen.no_repeat_ngram_size,
            help="Never repeat an n-gram of this size (0 = off)",
        )
        parser.add_argument("--stop", action="append", default=[], help="Stop string (repeatable)")
        parser.add_argument(
            "--synthesize",
            type=int,
            default=actions.ABSORB_SYNTHESIS_COUNT,
            metavar="N",
            help="The teacher first writes up to N questions about the prompt's sections and facts (a synthesis "
            "job) and answers them with the dataset's (default %(default)s; 0: the dataset's queries only)",
        )
        parser.add_argument(
            "--teacher-model",
            help="Registered model that answers WITH the prompt (default: the student's base model)",
        )
        cur = CurationSettings()
        curation = parser.add_argument_group("curation (on by default when the prompt has checkable rules)")
        curation.add_argument("--no-curation", action="store_true", help="Keep the teacher's raw answers")
        curation.add_argument(
            "--best-of",
            type=int,
            default=cur.best_of,
            help="Samples per query in each round; the one passing most checks once repaired is kept",
        )
        curation.add_argument(
            "--rounds",
            type=int,
            default=cur.rounds,
            help="Rounds of samples: later rounds ask only the queries with no passing sample yet",
        )
        curation.add_argument(
            "--no-reminders",
            action="store_true",
            help="Later rounds repeat the request instead of reminding the teacher what still fails",
        )
        curation.add_argument(
            "--no-phrases",
            action="store_true",
            help="Later rounds don't open an answer lacking a required phrase (a contains rule) with it",
        )
        curation.add_argument(
            "--no-fact-sentences",
            action="store_true",
            help="Later rounds don't open an answer missing a fact its query asks for with the prompt's sentence",
        )
        curation.add_argument(
            "--probe",
            type=int,
            default=cur.probe,
            help="Round one asks this many queries first; what they rarely meet (a required phrase, the facts) "
            "opens the other answers from round one on (0: later rounds only)",
        )
        curation.add_argument(
            "--passages",
            type=int,
            default=cur.passages,
            help="Prompt passages relevant to each query shown to the teacher beside it (0: none)",
        )
        curation.add_argument("--sample-temperature", type=float, default=cur.temperature)
        curation.add_argument("--sample-top-p", type=float, default=cur.top_p)
        curation.add_argument(
            "--no-prefill",
            action="store_true",
            help="Don't start answers with the text a starts_with rule requires",
        )
        curation.add_argument(
            "--repairs",
            default=",".join(cur.repairs),
            help=f"Comma-separated repairs to apply, or 'none' (all: {','.join(REPAIRS)})",
        )
        parser.add_argument("--train-config", type=Path, help="JSON file of training settings")
        parser.add_argument(
            "--skip-teacher",
            action="store_true",
            help="The dataset already holds the answers: fine-tune only",
        )
        parser.add_argument(
            "--train-on-failing",
            action="store_true",
            help="Also train on answers that still fail a checkable rule (default: leave them out "
            "while at least a quarter of the rows pass)",
        )
        parser.add_argument(
            "--teacher-endpoint", help="A teacher endpoint of the project, by name, answers WITH the prompt"
        )
        parser.add_argument(
            "--keep-existing",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Rows that already end with an answer keep it (default: yes, but not on traffic captured "
            "from /v1, whose answers are what was served); --no-keep-existing asks the teacher for every row",
        )
        parser.add_argument(
            "--review-first",
            action="store_true",
            help="Queue only the teacher; start the fine-tune from the reviewed answers later",
        )
        parser.add_argument(
            "--check-data",
            action="store_true",
            help="Hold the fine-tune for confirmation when more than the set share of its training answers "
            "fail a checkable rule (the absorb form does this unless told to train anyway)",
        )
        parser.add_argument("--no-eval", action="store_true", help="No four-arm eval when the fine-tune ends")
        parser.add_argument("--eval-max-new-tokens", type=int, help="Answer length of the eval's four arms")
        parser.add_argument(
            "--eval-max-examples", type=int, help="Held-out queries the eval answers, at most"
        )
        parser.add_argument("--wait", action="store_true", help="Follow the jobs; exit non-zero if one fails")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON (implies --wait)")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        try:
            prompt_version = find_prompt_version(project, opts["prompt"])
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        version = dataset_version_by_ref(project, opts["dataset"])
        base = base_model_by_name(opts["base_model"])
        training: dict[str, Any] = {}
        if opts["train_config"]:
            training = json.loads(opts["train_config"].read_text())
        for key in ("epochs", "max_steps", "batch_size"):
            if opts[key] is not None:
                training[key] = opts[key]
        if opts["refine"] is not None:
            training["refine_samples"] = opts["refine"]
        evaluation: dict[str, Any] = {
            k: v
            for k, v in {
                "auto": False if opts["no_eval"] else None,
                "max_new_tokens": opts["eval_max_new_tokens"],
                "max_examples": opts["eval_max_examples"],
            }.items()
            if v is not None
        }
        try:
            if opts["skip_teacher"]:
                warn = data_quality.warning(version, settings.DATA_FAIL_WARN_SHARE)
                if opts["check_data"] and warn:
                    raise CommandError(f"{warn} (leave out --check-data to train anyway)")
                jobs = [
                    actions.start_finetune(
                        project,
                        None,
                        prompt_version,
                        version,
                        base,
                        training,
                        passing_only=not opts["train_on_failing"],
                        evaluation=evaluation,
                    )
                ]
            else:
                teacher_model: FoundationModel | None = base
                endpoint = None
                if opts["teacher_endpoint"]:
                    endpoint = TeacherEndpoint.objects.filter(
                        project=project, name=opts["teacher_endpoint"]
                    ).first()
                    if endpoint is None:
                        raise CommandError(
                            f"No teacher endpoint {opts['teacher_endpoint']!r} in {project.slug}."
                        )
                    teacher_model = None
                if opts["teacher_model"]:
                    teacher_model = FoundationModel.objects.filter(name=opts["teacher_model"]).first()
                    if teacher_model is None:
                        raise CommandError(f"No registered model {opts['teacher_model']!r} to teach.")
                repairs = [r for r in opts["repairs"].split(",") if r.strip() and r.strip() != "none"]
                curation: dict[str, Any] | bool = (
                    False
                    if opts["no_curation"]
                    else {
                        "best_of": opts["best_of"],
                        "rounds": opts["rounds"],
                        "reminders": not opts["no_reminders"],
                        "phrases": not opts["no_phrases"],
                        "fact_sentences": not opts["no_fact_sentences"],
                        "probe": opts["probe"],
                        "passages": opts["passages"],
                        "temperature": opts["sample_temperature"],
                        "top_p": opts["sample_top_p"],
                        "prefill": not opts["no_prefill"],
                        "repairs": [r.strip() for r in repairs],
                    }
                )
                teacher, finetune = actions.start_absorb(
                    project,
                    None,
                    prompt_version,
                    version,
                    base,
                    {
                        "max_new_tokens": opts["max_new_tokens"],
                        "temperature": opts["temperature"],
                        "batch_size": opts["teacher_batch"],
                        "seed": opts["seed"],
                        "repetition_penalty": opts["repetition_penalty"],
                        "no_repeat_ngram_size": opts["no_repeat_ngram_size"],
                        "stop": opts["stop"],
                    },
                    training,
                    teacher_model=teacher_model,
                    curation=curation,
                    passing_only=not opts["train_on_failing"],
                    keep_existing=opts["keep_existing"],
                    review_first=opts["review_first"],
                    teacher_endpoint=endpoint,
                    evaluation=evaluation,
                    data_check=settings.DATA_FAIL_WARN_SHARE if opts["check_data"] else None,
                    synthesis=opts["synthesize"],
                )
                first = [teacher.depends_on] if teacher.depends_on is not None else []
                jobs = [*first, teacher, *([finetune] if finetune else [])]
        except (ActionError, ConfigError, SettingsError) as exc:
            raise CommandError(str(exc)) from exc
        err = self.stderr if opts["json"] else self.stdout
        err.write(f"queued: {', '.join(f'{j} (id {j.pk})' for j in jobs)}")
        if not (opts["wait"] or opts["json"]):
            return
        for job in jobs:
            self._follow(job, err)
        final = Job.objects.get(pk=jobs[-1].pk)
        if opts["json"]:
            variant = final.variant
            self.stdout.write(
                json.dumps(
                    {
                        "jobs": [
                            {"id": j.pk, "kind": j.kind, "status": Job.objects.get(pk=j.pk).status}
                            for j in jobs
                        ],
                        "variant": None
                        if variant is None
                        else {
                            "id": variant.pk,
                            "name": variant.name,
                            "adapter_path": variant.adapter_path,
                            "final_loss": variant.final_loss,
                            "duration_seconds": variant.duration_seconds,
                            "metrics": variant.metrics,
                        },
                    },
                    indent=2,
                )
            )

    def _follow(self, job: Job, out: Any) -> None:
        width = 30

        def draw(polled: Job) -> None:
            p = polled.current_progress
            detail, eta = "", None
            if p is not None:
                loss = p.metrics.get("loss")
                detail = f"{p.done:.0f}/{'?' if p.total is None else f'{p.total:.0f}'} {p.unit}" + (
                    f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
                )
                eta = p.eta_seconds
            bar = "#" * (polled.percent * width // 100)
            line = (
                f"\r{polled.label:<18} [{bar:<{width}}] {polled.percent:3d}% {detail}"
                f"{f' eta {eta:.0f}s' if eta and not polled.is_terminal else ''} {polled.status}"
            )
            out.write(line.ljust(100), ending="")
            out.flush()
            if polled.is_terminal:
                out.write("")

        job.wait(poll=1, on_poll=draw)
        if job.status != Job.SUCCEEDED:
            out.write(f"{job} {job.status}: {job.error or 'see the job log'}")
            sys.exit(1)
