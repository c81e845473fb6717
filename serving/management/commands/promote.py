from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving import actions
from serving.gate import Verdict
from serving.management.commands._common import alias_by_name, user_by_name, variant_by_id
from workbench.actions import ActionError
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = (
        "Promote a variant to an alias of a project through the alias's eval gate; prints the verdict. "
        "Exit code 1 when the gate refuses (override with --force --reason)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--alias", required=True, help="Alias name, e.g. production")
        parser.add_argument(
            "--variant", required=True, type=int, help="Variant id (list_variants shows them)"
        )
        parser.add_argument("--force", action="store_true", help="Override a failed gate (needs --reason)")
        parser.add_argument("--reason", default="", help="Why; kept in the audit trail")
        parser.add_argument("--user", help="Username recorded in the audit trail")
        parser.add_argument(
            "--json", action="store_true", help="Print {alias, variant, action, verdict, from}"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        actions.ensure_base_variants(project)
        actions.ensure_default_aliases(project)
        alias = alias_by_name(project, opts["alias"])
        variant = variant_by_id(project, opts["variant"])
        user = user_by_name(opts["user"])
        holder = alias.variant_id
        try:
            move = actions.promote(user, alias, variant, force=opts["force"], reason=opts["reason"])
        except actions.GateRefused as exc:
            self._print(opts, alias.name, variant.pk, "refused", exc.verdict, holder)
            raise CommandError(str(exc)) from exc
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "alias": alias.name,
                        "variant": variant.pk,
                        "action": move.action,
                        "verdict": move.verdict,
                        "from": move.from_variant_id,
                    },
                    indent=2,
                )
            )
            return
        self._explain(move.verdict)
        self.stdout.write(
            f"{alias.model_name}: {move.action} {move.from_variant or 'nothing'} -> {variant} "
            f"(#{variant.pk}){', gate overridden: ' + move.reason if move.action == 'override' else ''}"
        )

    def _explain(self, verdict: dict[str, Any]) -> None:
        for c in verdict.get("checks", []):
            self.stdout.write(f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}")

    def _print(
        self,
        opts: dict[str, Any],
        alias: str,
        variant: int,
        action: str,
        verdict: Verdict,
        holder: int | None,
    ) -> None:
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "alias": alias,
                        "variant": variant,
                        "action": action,
                        "verdict": verdict.to_dict(),
                        "from": holder,
                    },
                    indent=2,
                )
            )
        else:
            self._explain(verdict.to_dict())
