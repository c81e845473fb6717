from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving import actions
from serving.management.commands._common import alias_by_name, user_by_name
from workbench.actions import ActionError
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = "Move an alias back to the variant it served before its latest move (audited, not gated)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--alias", required=True, help="Alias name, e.g. production")
        parser.add_argument("--reason", default="", help="Why; kept in the audit trail")
        parser.add_argument("--user", help="Username recorded in the audit trail")
        parser.add_argument("--json", action="store_true", help="Print {alias, variant, action, from}")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        alias = alias_by_name(project, opts["alias"])
        try:
            move = actions.rollback(user_by_name(opts["user"]), alias, opts["reason"])
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "alias": alias.name,
                        "variant": move.to_variant_id,
                        "action": move.action,
                        "from": move.from_variant_id,
                    },
                    indent=2,
                )
            )
        else:
            self.stdout.write(
                f"{alias.model_name}: rolled back {move.from_variant or 'nothing'} -> "
                f"{move.to_variant} (#{move.to_variant_id})"
            )
