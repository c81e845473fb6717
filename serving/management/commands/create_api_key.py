from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from serving import actions
from serving.management.commands._common import user_by_name
from workbench.management.commands._common import project_by_slug


class Command(BaseCommand):
    help = "Create an API key for a project's /v1 aliases and print it (shown once; only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--name", default="", help="Who or what uses the key")
        parser.add_argument("--user", help="Username recorded as its creator")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        key, raw = actions.create_api_key(user_by_name(opts["user"]), project, opts["name"])
        self.stderr.write(
            f"API key {key.prefix}… for project {project.slug}; copy it now, it is not shown again:"
        )
        self.stdout.write(raw)
