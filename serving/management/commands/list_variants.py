from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from serving import actions
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = "Every variant of a project, the base models included, with lineage, staleness and aliases."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--json", action="store_true", help="Print a JSON list")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        actions.ensure_base_variants(project)
        variants = (
            project.variants.select_related("base_model", "prompt_version__prompt")
            .prefetch_related("aliases")
            .order_by("pk")
        )
        rows = [actions.variant_json(v) for v in variants]
        if opts["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            flags = " ".join(f for f in ("base" if r["is_base"] else "", "STALE" if r["stale"] else "") if f)
            self.stdout.write(
                f"{r['id']:>5}  {r['name']:<30} base={r['base_model']} adapter={r['adapter'] or '-'} "
                f"prompt={r['prompt'] or '-'} aliases={','.join(r['aliases']) or '-'} {flags}".rstrip()
            )
