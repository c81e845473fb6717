from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines import formats
from workbench.actions import ActionError
from workbench.actions.datasets import DatasetRejected, import_dataset
from workbench.management.commands._common import project_by_slug

# The messages name a setting as the upload form does; on the command line it is a flag.
SETTING_FLAGS = {
    "records key": "--records-key KEY",
    "query column": "--query-column NAME",
    "answer column": "--answer-column NAME",
    "use only the chosen answers": "--use-chosen",
    "format": "--format NAME",
}


def flag_hint(messages: list[str]) -> str | None:
    """Which flags set the settings the messages name, or None when they name none."""
    text = " ".join(messages)
    named = [
        f"{s}: {flag}"
        for s, flag in SETTING_FLAGS.items()
        if s in text and (s != "format" or "the format" in text or "format auto" in text)
    ]
    return f"On the command line, {'; '.join(named)}." if named else None


class Command(BaseCommand):
    help = (
        "Validate a dataset file as a stream and store it as a new version of the named dataset "
        "(in short batches, into a version that is visible only once every row is stored). "
        "Bad rows are printed as 'line N: reason' on stderr and nothing is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--project", required=True, help="Project slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--format", default="auto", choices=["auto", *formats.FORMATS])
        parser.add_argument("--query-column")
        parser.add_argument("--answer-column")
        parser.add_argument(
            "--eval-percent",
            type=int,
            default=None,
            help="Percent of rows held out for evals; left out: 10%%, but at least WORKBENCH_EVAL_MIN_HELD_OUT "
            "rows (at most half)",
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--skip-bad",
            action="store_true",
            help="Store the good rows and list the bad ones on the version instead of storing nothing",
        )
        parser.add_argument(
            "--use-chosen",
            action="store_true",
            help="DPO pairs (chosen/rejected): load only the chosen answers",
        )
        parser.add_argument(
            "--records-key",
            help='For a file that is one JSON object, e.g. {"qa": [...]}: the key holding the rows',
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        project = project_by_slug(opts["project"])
        path: Path = opts["file"]
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        try:
            with path.open("rb") as f:
                version = import_dataset(
                    project,
                    None,
                    opts["name"],
                    f,
                    filename=path.name,
                    fmt=opts["format"],
                    query_column=opts["query_column"],
                    answer_column=opts["answer_column"],
                    eval_percent=opts["eval_percent"],
                    seed=opts["seed"],
                    skip_bad=opts["skip_bad"],
                    use_chosen=opts["use_chosen"],
                    records_key=opts["records_key"],
                )
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        except DatasetRejected as rej:
            for error in rej.errors:
                self.stderr.write(str(error))
            hint = flag_hint([str(e) for e in rej.errors])
            if hint:
                self.stderr.write(hint)
            if rej.error_count > len(rej.errors):
                self.stderr.write(f"... and {rej.error_count - len(rej.errors):,} more")
            if rej.file_problem is not None:
                self.stderr.write(f"{path}: nothing was stored.")
            else:
                self.stderr.write(f"{path}: {rej.error_count:,} bad row(s); nothing was stored.")
            sys.exit(1)
        for warning in version.meta.get("warnings", []):
            self.stderr.write(f"warning: {warning}")
        hint = flag_hint(version.meta.get("warnings", []))
        if hint:
            self.stderr.write(hint)
        skipped = version.meta.get("skipped")
        if skipped:
            for reason in skipped["rows"]:
                self.stderr.write(f"skipped {reason}")
            if skipped["count"] > len(skipped["rows"]):
                self.stderr.write(f"... and {skipped['count'] - len(skipped['rows']):,} more")
            self.stderr.write(f"{path}: skipped {skipped['count']:,} bad row(s) (--skip-bad).")
        for note in version.meta.get("notes", []):
            self.stdout.write(f"note: {note}")
        if version.meta.get("kept_fields"):
            self.stdout.write(f"kept fields: {', '.join(version.meta['kept_fields'])}")
        self.stdout.write(
            f"{project.slug}/{version}: {version.row_count:,} rows ({version.format}), "
            f"{version.eval_count:,} eval / {version.row_count - version.eval_count:,} train, "
            f"{version.duplicate_count:,} duplicates, sha256 {version.sha256[:12]}"
        )
