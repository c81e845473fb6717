from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from evals import actions
from evals.management.commands._follow import dump, run_json, table, wait
from evals.models import EvalRun
from workbench.actions import ActionError
from workbench.management.commands._common import project_by_slug
from workbench.models import FoundationModel


class Command(BaseCommand):
    help = (
        "Evaluate variants on a suite of a project and print the leaderboard (--json: every metric with "
        "its 95% CI)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--suite", required=True, help="Suite name")
        parser.add_argument(
            "--variant", action="append", type=int, default=[], help="Variant id (repeatable)"
        )
        parser.add_argument("--base-model", action="append", default=[], help="Base model name (repeatable)")
        parser.add_argument("--with-prompt", action="store_true", help="Send the suite's prompt to each")
        parser.add_argument("--max-new-tokens", type=int)
        parser.add_argument("--wait", action="store_true", help="Follow the jobs; exit non-zero if one fails")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON (implies --wait)")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        suite = project.eval_suites.filter(name=opts["suite"]).first()
        if suite is None:
            known = ", ".join(project.eval_suites.values_list("name", flat=True)) or "none"
            raise CommandError(f"No suite '{opts['suite']}' in project {project.slug} (suites: {known}).")
        prompt = suite.prompt_version if opts["with_prompt"] else None
        specs = []
        for variant_id in opts["variant"]:
            variant = project.variants.filter(pk=variant_id).select_related("base_model").first()
            if variant is None:
                raise CommandError(f"No variant {variant_id} in project {project.slug}.")
            specs.append(actions.RunSpec(variant.base_model, variant, prompt))
        for name in opts["base_model"]:
            base = FoundationModel.objects.filter(name=name).first()
            if base is None:
                raise CommandError(f"No base model '{name}'.")
            specs.append(actions.RunSpec(base, None, prompt))
        generation = {"max_new_tokens": opts["max_new_tokens"]} if opts["max_new_tokens"] else None
        try:
            runs = actions.start_runs(project, None, suite, specs, generation)
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        err = self.stderr if opts["json"] else self.stdout
        err.write(f"queued {len(runs)} run(s) on {suite}")
        if not (opts["wait"] or opts["json"]):
            return
        wait(list({r.job_id: r.job for r in runs if r.job}.values()), err)
        done = list(
            EvalRun.objects.filter(pk__in=[r.pk for r in runs]).select_related(
                "variant", "prompt_version__prompt", "base_model", "job"
            )
        )
        if opts["json"]:
            self.stdout.write(
                dump({"suite": suite.name, "metric": suite.main_metric, "runs": [run_json(r) for r in done]})
            )
        else:
            self.stdout.write(table(done, suite.main_metric))
