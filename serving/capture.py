"""Capture: logged /v1 requests become a dataset version (the client's
messages and the answer served), closing the loop to the next absorb.

Rows go through the same reader as an upload (engines.formats), so a captured
row is exactly what an uploaded one would be; the version is made by the
dataset actions (import_dataset for a new dataset, derive_version for a new
version of an existing one)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction

from engines import formats
from engines.protocol import OpenAIError, parse_messages
from serving.models import RequestLog
from workbench.actions import ActionError
from workbench.actions.datasets import derive_version, import_dataset
from workbench.models import Dataset, DatasetVersion, Project

CAPTURE_FILENAME = "captured-requests.jsonl"
MAX_ID = 2**63 - 1  # ids are BigAutoField


def parse_ids(values: Sequence[str], what: str) -> list[int]:
    """Ids posted by a form, checked: ActionError naming the first that is
    not a whole number in the id range (a huge one would overflow the database)."""
    ids = []
    for raw in values:
        text = raw.strip()
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_ID:
            shown = text if len(text) <= 40 else text[:40] + "…"
            raise ActionError(f"{what}: {shown!r} is not an id (a whole number from 1 to {MAX_ID}).")
        ids.append(int(text))
    return ids


def conversation(entry: RequestLog) -> list[dict[str, str]]:
    """The client's messages read as the gateway read them (engines.protocol:
    developer is system, text parts joined; a prompted variant's prompt is not
    in them) and the first answer served. OpenAIError if they cannot be read."""
    messages = parse_messages(entry.request.get("messages"))
    choices = entry.response.get("choices") or [{}]
    answer = ((choices[0] or {}).get("message") or {}).get("content") or ""
    return [*messages, {"role": "assistant", "content": answer}]


def _rows(entries: Sequence[RequestLog]) -> list[formats.Row]:
    """The conversations read as an uploaded chat JSONL would be: the same
    normalisation and the same checks. A conversation no upload could hold
    is refused with its log id."""
    lines = []
    for entry in entries:
        try:
            lines.append(json.dumps({"messages": conversation(entry)}, ensure_ascii=False) + "\n")
        except OpenAIError as exc:
            raise ActionError(
                f"Logged request {entry.pk} cannot become a dataset row: {exc.message}"
            ) from None
    limits = formats.Limits(
        max_bytes=settings.UPLOAD_MAX_BYTES,
        max_rows=settings.DATASET_MAX_ROWS,
        max_row_chars=settings.DATASET_MAX_ROW_CHARS,
    )
    reader = formats.DatasetReader(
        io.BytesIO("".join(lines).encode()), "chat", limits=limits, filename=CAPTURE_FILENAME
    )
    rows = list(reader)
    if reader.error_count:
        first = reader.errors[0]
        raise ActionError(
            f"Logged request {entries[first.line - 1].pk} cannot become a dataset row: {first.reason}."
        )
    return rows


@transaction.atomic
def capture(
    project: Project,
    user: User | None,
    log_ids: Sequence[int],
    *,
    dataset: Dataset | None = None,
    name: str = "",
    append: bool = True,
) -> DatasetVersion:
    """A new dataset version from the selected successful requests: a new
    dataset called `name`, or the next version of `dataset` (its latest rows
    followed by the captured ones with `append`, only the captured ones
    without). The requests are marked as captured into it."""
    if any(not 1 <= i <= MAX_ID for i in log_ids):
        raise ActionError(f"A logged request id is out of range (1 to {MAX_ID}).")
    entries = list(
        RequestLog.objects.select_for_update()
        .filter(project=project, pk__in=list(log_ids), status=200)
        .order_by("created_at", "pk")
    )
    if not entries:
        raise ActionError("Select at least one logged request that succeeded.")
    if len(entries) > settings.DATASET_MAX_ROWS:
        raise ActionError(
            f"Select at most {settings.DATASET_MAX_ROWS:,} requests at once (a dataset's row limit)."
        )
    rows = _rows(entries)
    meta = {"captured_requests": [e.pk for e in entries]}
    if dataset is None:
        if not name.strip():
            raise ActionError("Name the new dataset, or choose an existing one.")
        if Dataset.objects.filter(project=project, name=name.strip()).exists():
            raise ActionError(
                f"A dataset called {name.strip()!r} already exists: choose it to add a version."
            )
        text = "".join(r.to_json() + "\n" for r in rows)
        version = import_dataset(
            project, user, name, io.BytesIO(text.encode()), filename=CAPTURE_FILENAME, fmt="chat"
        )
        version.meta = {**version.meta, **meta}
        version.save(update_fields=["meta"])
    else:
        if dataset.project_id != project.pk:
            raise ActionError("That dataset belongs to another project.")
        parent = dataset.latest
        if parent is None:
            raise ActionError(f"The dataset {dataset.name} has no version to follow.")
        kept: list[tuple[int, list[dict[str, str]]]] = []
        if append:
            kept = list(parent.rows.order_by("index").values_list("index", "messages"))
        # Captured rows have no row in the parent (index -1): with `append` they join the train split.
        captured = [(-1, r.messages) for r in rows]
        version = derive_version(
            parent,
            user,
            [*kept, *captured],
            kind=DatasetVersion.EDIT,
            meta={**meta, "captured_after": len(kept)},
            keep_split=append,
        )
    RequestLog.objects.filter(pk__in=[e.pk for e in entries]).update(captured_into=version)
    return version
