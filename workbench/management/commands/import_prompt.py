from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workbench.actions import ActionError
from workbench.actions.prompts import decode_prompt_file, save_prompt
from workbench.management.commands._common import project_by_slug
from workbench.models import BaseModel


class Command(BaseCommand):
    help = ("Save a system prompt from a text/markdown file as a new version of the named prompt "
            "(created if new). --rules takes a JSON list of {name, kind, ...parameters}; see README.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--rules", type=Path, help="JSON file with the prompt's checkable rules")
        parser.add_argument("--note", default="")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        path: Path = opts["file"]
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        rules_data = None
        if opts["rules"]:
            try:
                rules_data = json.loads(opts["rules"].read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"{opts['rules']}: {exc}") from exc
            except json.JSONDecodeError as exc:
                raise CommandError(f"{opts['rules']}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
        try:
            saved = save_prompt(project, None, opts["name"], decode_prompt_file(path.read_bytes(), str(path)),
                                rules_data, opts["note"])
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        v = saved.version
        state = "stored as" if saved.created else "unchanged, still"
        self.stdout.write(f"{project.slug}/{v.prompt.name}: {state} version {v.number} "
                          f"({len(v.text):,} characters, {len(v.rules)} rules, sha256 {v.sha256[:12]})")
        for model in BaseModel.objects.all():
            try:
                reason = v.too_long_for(model)
            except Exception as exc:  # a broken model directory does not undo the import
                reason = f"could not count its tokens under {model.name}: {exc}"
            if reason:
                self.stderr.write(f"warning: {reason}")
