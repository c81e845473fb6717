from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines.evaluation import ARMS
from evals import actions
from evals.management.commands._follow import dump, run_json, table, wait
from evals.models import ArmComparison
from workbench.actions import ActionError
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = (
        "The four arms of an absorb on its held-out queries: base without and with the prompt, adapter "
        "without and with it. Prints every metric with its CI and the prompt effect retained."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument(
            "--absorb-job",
            required=True,
            type=int,
            help="The fine-tune job (or its teacher job) of the absorb",
        )
        parser.add_argument("--suite", help="Suite name (default: the held-out split of the training data)")
        parser.add_argument("--max-new-tokens", type=int, help="Longest answer per arm (default 128)")
        parser.add_argument("--wait", action="store_true", help="Follow the job; exit non-zero if it fails")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON (implies --wait)")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        job = project.jobs.filter(pk=opts["absorb_job"]).first()
        if job is not None and job.kind == "teacher":
            job = job.dependents.filter(kind="finetune").first() or job
        if job is None or job.kind != "finetune":
            raise CommandError(f"No fine-tune job {opts['absorb_job']} in project {project.slug}.")
        if job.variant is None:
            raise CommandError(f"{job} has not produced a variant ({job.status}).")
        try:
            if opts["suite"]:
                suite = project.eval_suites.filter(name=opts["suite"]).first()
                if suite is None:
                    raise CommandError(f"No suite '{opts['suite']}' in project {project.slug}.")
            else:
                suite = actions.suite_for_variant(job.variant)
                if suite is None:
                    raise CommandError(
                        f"{job.variant} learned from data without an eval split; pass --suite."
                    )
            generation = {"max_new_tokens": opts["max_new_tokens"]} if opts["max_new_tokens"] else None
            comparison = actions.start_comparison(
                project, None, suite, job.variant, absorb_job=job, generation=generation
            )
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        err = self.stderr if opts["json"] else self.stdout
        err.write(f"queued the four arms of {job.variant} on {suite} ({comparison.job})")
        if not (opts["wait"] or opts["json"]):
            return
        assert comparison.job is not None
        wait([comparison.job], err)
        comparison = ArmComparison.objects.get(pk=comparison.pk)
        runs = sorted(
            comparison.runs.select_related("variant", "prompt_version__prompt", "base_model", "job"),
            key=lambda r: ARMS.index(r.arm),
        )
        if opts["json"]:
            self.stdout.write(
                dump(
                    {
                        "comparison": comparison.pk,
                        "suite": suite.name,
                        "metric": suite.main_metric,
                        "headline": comparison.headline,
                        "arms": {r.arm: run_json(r) for r in runs},
                    }
                )
            )
            return
        self.stdout.write(table(runs, suite.main_metric))
        r = comparison.headline.get("retained") or {}
        if r.get("value") is not None:
            self.stdout.write(
                f"prompt effect retained on {suite.main_metric}: {r['value']:.2f} "
                f"(95% CI {r['low']:.2f} to {r['high']:.2f})"
            )
        elif r.get("note"):
            self.stdout.write(f"prompt effect retained: not computable: {r['note']}")
        self.stdout.write(
            f"prompt tokens saved per 1,000 requests: {comparison.headline.get('tokens_saved_per_1000')}"
        )
        for line in substance_lines(comparison.headline):
            self.stdout.write(line)


def _estimate(e: dict[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "—" + (f" ({e['note']})" if e and e.get("note") else "")
    return f"{e['value']:.2f} (95% CI {e['low']:.2f} to {e['high']:.2f}, n={e['n']})"


def substance_lines(headline: dict[str, Any]) -> list[str]:
    """Fact recall and the judge's score per arm, beside the rules: an answer
    can obey every rule and still be wrong."""
    lines = []
    if "fact_recall" in headline:
        lines.append(
            "fact recall per arm: "
            + "; ".join(f"{arm} {_estimate(e)}" for arm, e in headline["fact_recall"].items())
        )
        if "fact_recall_vs_teacher" in headline:
            lines.append(f"fact recall, student - teacher: {_estimate(headline['fact_recall_vs_teacher'])}")
    if "judge" in headline:
        lines.append(
            "judge score per arm: "
            + "; ".join(f"{arm} {_estimate(e)}" for arm, e in headline["judge"].items())
        )
    return lines
