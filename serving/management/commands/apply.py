from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from evals.management.commands._follow import wait
from jobs.models import Job
from serving.costs import economics
from serving.management.commands._common import user_by_name
from serving.pipeline import PlanError, Search, apply_plan, make_plan, optimize
from serving.pipeline.search import note as search_note
from workbench.pipeline import SpecError, build_schema, load_spec


class Command(BaseCommand):
    help = (
        "Apply an absorption spec (YAML): import what is new, plan, run the teacher, fine-tune and four-arm "
        "eval, and promote through the alias's gate. Finished steps are reused by fingerprint. --dry-run "
        "prints the plan with time estimates and changes nothing; --schema prints the spec's JSON Schema."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("spec", nargs="?", type=Path, help="The spec file (see --schema)")
        parser.add_argument("--dry-run", action="store_true", help="Print the plan; change nothing")
        parser.add_argument("--json", action="store_true", help="Print the plan (and the outcome) as JSON")
        parser.add_argument(
            "--user", help="Who acts: owns a project the spec creates; kept in the audit trail"
        )
        parser.add_argument("--schema", action="store_true", help="Print the spec's JSON Schema and exit")

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["schema"]:
            self.stdout.write(json.dumps(build_schema(), indent=2, ensure_ascii=False))
            return
        if opts["spec"] is None:
            raise CommandError("Give a spec file (or --schema).")
        user = user_by_name(opts["user"])
        try:
            spec = load_spec(opts["spec"])
            plan = make_plan(spec)
        except SpecError as exc:
            raise CommandError(
                f"{len(exc.problems)} problem(s) in the spec:\n" + "\n".join(exc.problems)
            ) from exc
        except PlanError as exc:
            raise CommandError(str(exc)) from exc
        err = self.stderr if opts["json"] else self.stdout
        searching = "search" in spec.data
        if opts["dry_run"]:
            note = search_note(spec)
            if opts["json"]:
                self.stdout.write(json.dumps({"plan": plan.to_dict(), "search": note}, indent=2))
            else:
                self.stdout.write(plan.text() + (f"\n{note}" if note else ""))
            return
        err.write(plan.text())

        def follow(job: Job) -> None:
            wait([job], err)

        search: Search | None = None
        try:
            if searching:
                search = optimize(spec, user, err.write, follow)
                err.write(search.text())
                if search.outcome is None:
                    raise PlanError(f"no trial made a variant ({search.stopped})")
                outcome = search.outcome
            else:
                outcome = apply_plan(plan, user, err.write, follow)
        except PlanError as exc:
            raise CommandError(str(exc)) from exc
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "plan": plan.to_dict(),
                        "outcome": outcome.to_dict(),
                        "costs": economics(outcome.comparison).to_dict() if outcome.comparison else None,
                        "search": search.to_dict() if search else None,
                    },
                    indent=2,
                    default=str,
                )
            )
        else:
            self._summary(outcome)
        if outcome.promoted is False:
            raise CommandError(outcome.message)

    def _summary(self, outcome: Any) -> None:
        variant, comparison = outcome.variant, outcome.comparison
        if variant is not None:
            self.stdout.write(f"variant: {variant.name} (#{variant.pk})")
        if comparison is not None:
            metric = comparison.suite.main_metric
            arms = ", ".join(
                f"{run.arm} {value:.2f}"
                if isinstance(value := (run.metric(metric) or {}).get("value"), int | float)
                else f"{run.arm} n/a"
                for run in comparison.runs.order_by("pk")
            )
            retained = comparison.headline.get("retained") or {}
            value = retained.get("value")
            self.stdout.write(f"eval: comparison #{comparison.pk} on {comparison.suite}: {metric} {arms}")
            self.stdout.write(
                "      prompt effect retained: "
                + (
                    f"{value:.3f}"
                    if isinstance(value, int | float)
                    else f"n/a ({retained.get('note') or 'no headline'})"
                )
            )
            self._costs(comparison)
        if outcome.promoted is not None:
            self.stdout.write(f"promote: {outcome.message}")

    def _costs(self, comparison: Any) -> None:
        money = economics(comparison)
        if money.problems:
            self.stdout.write("cost: not computed: " + "; ".join(money.problems))
        elif money.student and money.teacher:
            pays = money.break_even_requests
            self.stdout.write(
                f"cost: {money.student.per_million:,.2f} per million requests for the student, "
                f"{money.teacher.per_million:,.2f} for the base with the prompt "
                f"(at {money.price_per_hour:g} an hour, SERVING_PRICE_PER_HOUR); "
                f"{money.tokens_saved:,.0f} prompt tokens saved a request; "
                + (
                    f"teacher and training paid back after {pays:,} requests"
                    if pays
                    else "no saving a request"
                )
            )
        if money.recommendation:
            r = money.recommendation
            self.stdout.write(
                f"serve: {r.backend}, {'merged weights' if r.weights == 'merged' else 'adapter over the shared base'}"
                + (f", batch up to {r.max_batch}" if r.max_batch else "")
                + " ("
                + " ".join(r.reasons)
                + ")"
            )
