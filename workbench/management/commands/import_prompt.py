from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workbench.actions import ActionError
from workbench.actions.prompts import parse_rules_json, read_prompt_file, rules_json_max_chars, save_prompt
from workbench.management.commands._common import project_by_slug
from workbench.models import FoundationModel
from workbench.prompt_costs import TokenCountError


class Command(BaseCommand):
    help = (
        "Save a system prompt from a text/markdown file as a new version of the named prompt "
        "(created if new). --rules takes a JSON list of {name, kind, ...parameters}, --facts a JSON list "
        "of {name, question, expect | expect_regex, source}; see README. Without them the latest "
        "version's rules and facts are kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--rules", type=Path, help="JSON file with the prompt's checkable rules")
        parser.add_argument("--facts", type=Path, help="JSON file with the prompt's facts checks")
        parser.add_argument("--note", default="")

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        path: Path = opts["file"]
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        try:
            rules_data = _read_json(opts["rules"])
            facts_data = _read_json(opts["facts"])
            with path.open("rb") as f:
                text = read_prompt_file(f, str(path))
            saved = save_prompt(
                project, None, opts["name"], text, rules_data, opts["note"], facts_data=facts_data
            )
        except OSError as exc:
            raise CommandError(f"{path}: {exc}") from exc
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        v = saved.version
        state = "stored as" if saved.created else "unchanged, still"
        self.stdout.write(
            f"{project.slug}/{v.prompt.name}: {state} version {v.number} "
            f"({len(v.text):,} characters, {len(v.rules)} rules, {len(v.facts)} facts, sha256 {v.sha256[:12]})"
        )
        for model in FoundationModel.objects.all():
            try:
                reason = v.too_long_for(model)
            except TokenCountError as exc:  # a broken model directory does not undo the import
                reason = f"could not count its tokens under {model.name}: {exc}"
            if reason:
                self.stderr.write(f"warning: {reason}")


def _read_json(path: Path | None) -> Any:
    """A rules or facts file's JSON (None without a file), size and nesting bounded."""
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            # Past the limit by one byte is enough to refuse it; the rest is never read.
            raw = f.read(4 * rules_json_max_chars() + 1)
        return parse_rules_json(raw.decode("utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: {exc}") from exc
