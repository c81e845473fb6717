from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.models import Job
from serving.management.commands._common import variant_by_id
from serving.pipeline import PlanError, absorb_of, export_spec
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = (
        "Write the spec that reproduces a finished absorb (a variant, or its fine-tune job): `apply` of it "
        "reuses every step. Without --out it references the prompt and data by version; with --out DIR it "
        "writes DIR/spec.yaml with the prompt, rules, facts and data as files beside it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--variant", type=int, help="Variant id (list_variants shows them)")
        which.add_argument("--job", type=int, help="The absorb's fine-tune (or teacher) job id")
        parser.add_argument("--out", type=Path, help="A folder for spec.yaml and its files")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        variant = variant_by_id(project, opts["variant"]) if opts["variant"] is not None else None
        job = None
        if opts["job"] is not None:
            job = Job.objects.filter(project=project, pk=opts["job"]).first()
            if job is None:
                raise CommandError(f"No job {opts['job']} in project {project.slug}.")
        try:
            text = export_spec(project, absorb_of(project, variant, job), opts["out"])
        except PlanError as exc:
            raise CommandError(str(exc)) from exc
        if opts["out"] is None:
            self.stdout.write(text, ending="")
        else:
            self.stdout.write(f"wrote {opts['out'] / 'spec.yaml'}")
