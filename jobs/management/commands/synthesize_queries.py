from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.actions import start_synthesis
from jobs.models import Job, TeacherEndpoint
from jobs.runners.synthesis import DEFAULT_COUNT, MAX_COUNT
from workbench.actions import ActionError
from workbench.actions.prompts import find_prompt_version
from workbench.management.commands._common import base_model_by_name, dataset_version_by_ref, project_by_slug


class Command(BaseCommand):
    help = (
        "Synthesise queries from a prompt version: the teacher writes the questions users would ask about "
        "each section and facts check; near-duplicates of each other and of the dataset's queries are dropped; "
        "the rest are added to a NEW version of the dataset, marked synthetic, for review before the teacher "
        "answers them. --wait follows the job; --json prints the new version."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--prompt-version", required=True, help="NAME or NAME@VERSION")
        parser.add_argument("--dataset-version", required=True, help="NAME or NAME@VERSION")
        parser.add_argument(
            "--count",
            type=int,
            default=DEFAULT_COUNT,
            help=f"Synthetic queries to add at most (1-{MAX_COUNT})",
        )
        parser.add_argument(
            "--base-model", help="Registered model that writes the questions (default: the default one)"
        )
        parser.add_argument(
            "--teacher-endpoint", help="A teacher endpoint of the project writes them instead"
        )
        parser.add_argument("--seed", type=int, help="Sampling seed")
        parser.add_argument("--wait", action="store_true", help="Follow the job; exit non-zero if it fails")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON (implies --wait)")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        try:
            prompt_version = find_prompt_version(project, opts["prompt_version"])
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        version = dataset_version_by_ref(project, opts["dataset_version"])
        base = base_model_by_name(opts["base_model"])
        endpoint = None
        if opts["teacher_endpoint"]:
            endpoint = TeacherEndpoint.objects.filter(project=project, name=opts["teacher_endpoint"]).first()
            if endpoint is None:
                raise CommandError(
                    f"No teacher endpoint {opts['teacher_endpoint']!r} in project {project.slug}."
                )
        settings = {"seed": opts["seed"]} if opts["seed"] is not None else None
        try:
            job = start_synthesis(
                project,
                None,
                prompt_version,
                version,
                base,
                opts["count"],
                settings,
                teacher_endpoint=endpoint,
            )
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        out = self.stderr if opts["json"] else self.stdout
        out.write(f"queued: {job} (id {job.pk})")
        if not (opts["wait"] or opts["json"]):
            return

        def draw(polled: Job) -> None:
            p = polled.current_progress
            done = f"{p.done:.0f}/{'?' if p.total is None else f'{p.total:.0f}'} {p.unit}" if p else ""
            out.write(f"\r{polled.label} {polled.percent:3d}% {done} {polled.status}".ljust(80), ending="")
            out.flush()
            if polled.is_terminal:
                out.write("")

        job.wait(poll=1, on_poll=draw)
        if job.status != Job.SUCCEEDED:
            out.write(f"{job} {job.status}: {job.error or 'see the job log'}")
            sys.exit(1)
        made = job.output_dataset
        assert made is not None
        report = made.meta.get("synthesis", {})
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "job": job.pk,
                        "dataset_version": {"id": made.pk, "name": str(made), "rows": made.row_count},
                        "synthesis": report,
                    },
                    indent=2,
                )
            )
        else:
            out.write(
                f"{made}: {made.row_count} rows, {report.get('kept')} of them synthetic "
                f"({report.get('asked')} questions asked)"
            )
