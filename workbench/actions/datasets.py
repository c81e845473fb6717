"""Datasets: immutable versions of normalised rows, all-or-nothing imports,
derived versions (teacher answers, reviews) and token statistics."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Count, Max
from django.dispatch import Signal

from engines import formats
from engines.progress import Progress, ProgressFn, StopFn
from engines.rules import Rule
from workbench import data_quality
from workbench.actions import ActionError
from workbench.models import Dataset, DatasetRow, DatasetVersion, FoundationModel, Project
from workbench.tasks import compute_token_stats

ROW_BATCH = 2000
MAX_SKIPPED_KEPT = 1000


@dataclass
class DatasetRejected(Exception):
    errors: list[formats.RowError]
    error_count: int
    row_count: int
    format: str = ""

    @property
    def file_problem(self) -> formats.RowError | None:
        """The one problem of the whole file (empty, binary, too large...),
        when that is all there is to say: it is not a bad row."""
        if (
            self.error_count == 1
            and self.errors
            and self.errors[0].line == 0
            and self.errors[0].record is None
        ):
            return self.errors[0]
        return None

    def __str__(self) -> str:
        if self.file_problem is not None:
            return f"{self.file_problem}; nothing was stored"
        return f"{self.error_count} bad row(s); nothing was stored"


class AlreadyUploaded(ActionError):
    """The upload form with this token already made `version` (Back + resubmit): nothing new was stored."""

    def __init__(self, version: DatasetVersion) -> None:
        super().__init__(
            f"This upload was already submitted: it made {version.dataset.name}@{version.number}."
        )
        self.version = version


class ImportCancelled(Exception):
    """The import was asked to stop; its staging rows are deleted."""


# Sent once a staging version awaits its rows (kwargs: version, user). A
# receiver that queues the import as a job (jobs.signals) returns the job;
# with none, the caller imports in-process. workbench never imports jobs.
import_requested = Signal()

MAX_SEED = 2**31 - 1  # split_seed is a 32-bit integer column
DEFAULT_EVAL_PERCENT = 10


class _Counting:
    """Counts the bytes read, for the import's progress."""

    def __init__(self, src: BinaryIO) -> None:
        self.src, self.bytes_read = src, 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.bytes_read += len(data)
        return data


def _limits() -> formats.Limits:
    return formats.Limits(
        max_bytes=settings.UPLOAD_MAX_BYTES,
        max_rows=settings.DATASET_MAX_ROWS,
        max_row_chars=settings.DATASET_MAX_ROW_CHARS,
        max_depth=settings.DATASET_MAX_JSON_DEPTH,
    )


def datasets_dir() -> Path:
    path = Path(settings.MEDIA_ROOT) / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_import_options(name: str, fmt: str, eval_percent: int, seed: int, query_column: str | None) -> None:
    if not name.strip():
        raise ActionError("A dataset needs a name.")
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise ActionError(f"Unknown format '{fmt}' (expected auto or one of {', '.join(formats.FORMATS)}).")
    if not 0 <= eval_percent <= 100:
        raise ActionError("The eval split must be between 0 and 100 percent.")
    if not 0 <= seed <= MAX_SEED:
        raise ActionError(f"The split seed must be a whole number from 0 to {MAX_SEED:,}.")
    if fmt == "fields" and not query_column:
        raise ActionError(
            "The 'fields' format needs the name of the query field (Query column on the upload form)."
        )


def store_upload(fileobj: formats.ByteReader) -> Path:
    """Copy the upload into the data dir under a generated name (the user's
    filename is never a path). At most one byte past the limit is kept: the
    reader then says the file is too large."""
    tmp = tempfile.NamedTemporaryFile(dir=datasets_dir(), prefix=".upload-", delete=False)
    try:
        with tmp:
            left = settings.UPLOAD_MAX_BYTES + 1
            while left > 0 and (chunk := fileobj.read(min(left, 1 << 20))):
                tmp.write(chunk)
                left -= len(chunk)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    return Path(tmp.name)


def stage_import(
    project: Project,
    user: User | None,
    name: str,
    path: Path,
    *,
    filename: str = "",
    fmt: str = "auto",
    query_column: str | None = None,
    answer_column: str | None = None,
    eval_percent: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    use_chosen: bool = False,
    records_key: str | None = None,
    form_token: uuid.UUID | None = None,
) -> DatasetVersion:
    """A staging version (invisible) for the stored file at `path` (inside
    the data dir, which the version then owns), in one short transaction;
    `run_import` fills it. On a refused option, or a form token that already
    made a version (AlreadyUploaded), the file is deleted."""
    name = name.strip()
    eval_percent, eval_min = default_split(eval_percent)
    try:
        check_import_options(name, fmt, eval_percent, seed, query_column)
        with transaction.atomic():
            dataset, _ = Dataset.objects.get_or_create(
                project=project, name=name, defaults={"created_by": user}
            )
            dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
            if form_token is not None:  # checked under the dataset's lock: a double post makes one version
                made = (
                    DatasetVersion.all_objects.select_related("dataset")
                    .filter(dataset__project=project, meta__form_token=str(form_token))
                    .first()
                )
                if made is not None:
                    raise AlreadyUploaded(made)
            number = (
                DatasetVersion.all_objects.filter(dataset=dataset).aggregate(n=Max("number"))["n"] or 0
            ) + 1
            options = {
                "format": fmt,
                "query_column": query_column,
                "answer_column": answer_column,
                "skip_bad": skip_bad,
                "use_chosen": use_chosen,
                "records_key": records_key,
            }
            return DatasetVersion.all_objects.create(
                dataset=dataset,
                number=number,
                kind=DatasetVersion.UPLOAD,
                source_filename=filename[:255],
                eval_percent=eval_percent,
                eval_min=eval_min,
                split_seed=seed,
                created_by=user,
                sha256="",
                state=DatasetVersion.IMPORTING,
                file=str(path.relative_to(settings.MEDIA_ROOT)),
                meta={"import": options, **({"form_token": str(form_token)} if form_token else {})},
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def queue_import(version: DatasetVersion, user: User | None) -> Any:
    """Hand the staging version to whoever runs imports as jobs: returns the
    job, or None when no receiver took it (then call run_import)."""
    responses = import_requested.send(sender=DatasetVersion, version=version, user=user)
    return next((job for _, job in responses if job is not None), None)


def import_dataset(
    project: Project,
    user: User | None,
    name: str,
    fileobj: BinaryIO,
    *,
    filename: str = "",
    fmt: str = "auto",
    query_column: str | None = None,
    answer_column: str | None = None,
    eval_percent: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    use_chosen: bool = False,
    records_key: str | None = None,
) -> DatasetVersion:
    """Validate the upload as a stream and store it as a new dataset version,
    in-process, or raise DatasetRejected/ActionError having stored nothing:
    no row, no file.

    With skip_bad, rows that are bad on their own are left out and listed in
    the version's meta (the first MAX_SKIPPED_KEPT, and their count); a file
    with no good row, or a problem that stops parsing, still stores nothing.
    With use_chosen, DPO pairs load their chosen answers; with records_key,
    the rows are the array under that key of a file that is one JSON object.
    An eval_percent left out is the default split (see default_split)."""
    check_import_options(name, fmt, default_split(eval_percent)[0], seed, query_column)
    version = stage_import(
        project,
        user,
        name,
        store_upload(fileobj),
        filename=filename,
        fmt=fmt,
        query_column=query_column,
        answer_column=answer_column,
        eval_percent=eval_percent,
        seed=seed,
        skip_bad=skip_bad,
        use_chosen=use_chosen,
        records_key=records_key,
    )
    return run_import(version)


@dataclass(frozen=True)
class FileContent:
    """What an import of a file would store, known without storing it: the
    version's hash (DatasetVersion.sha256) and each row's (DatasetRow.sha256)."""

    sha256: str
    row_shas: tuple[str, ...]
    format: str
    head: tuple[list[dict[str, str]], ...] = ()  # the first rows' messages, for estimates


def read_content(
    fileobj: BinaryIO,
    *,
    filename: str = "",
    fmt: str = "auto",
    query_column: str | None = None,
    answer_column: str | None = None,
    use_chosen: bool = False,
    records_key: str | None = None,
    head: int = 200,
) -> FileContent:
    """Parse a file as import_dataset would and hash its rows the same way,
    storing nothing (the first `head` rows' messages are kept); a file an
    import would refuse raises DatasetRejected."""
    reader = formats.DatasetReader(
        fileobj,
        fmt,
        limits=_limits(),
        query_column=query_column,
        answer_column=answer_column,
        filename=filename,
        use_chosen=use_chosen,
        records_key=records_key,
    )
    digest = hashlib.sha256()
    shas: list[str] = []
    first: list[list[dict[str, str]]] = []
    for row in reader:
        digest.update(row.to_json().encode("utf-8") + b"\n")  # as _store_rows hashes
        shas.append(row.sha)
        if len(first) < head:
            first.append([dict(m) for m in row.messages])
    if reader.row_count == 0 or reader.stopped or reader.error_count:
        errors = reader.errors[: formats.MAX_KEPT_ERRORS] or [formats.RowError(0, "the file has no rows")]
        raise DatasetRejected(errors, reader.error_count or 1, reader.row_count, reader.format)
    return FileContent(digest.hexdigest(), tuple(shas), reader.format, tuple(first))


def run_import(
    version: DatasetVersion, progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> DatasetVersion:
    """Parse the staging version's stored file and insert its rows in
    batches, each its own short transaction (a long import never holds the
    database's write lock for long: on SQLite that lock is the whole file),
    then make the version visible in one short transaction. Any failure,
    refusal or stop deletes the staging rows, the version and the file."""
    try:
        return _run_import(version, progress, should_stop)
    except BaseException:
        discard_staging(version.pk)
        raise


def _run_import(
    version: DatasetVersion, progress: ProgressFn | None, should_stop: StopFn | None
) -> DatasetVersion:
    opts = version.meta.get("import", {})
    skip_bad, use_chosen = bool(opts.get("skip_bad")), bool(opts.get("use_chosen"))
    path = Path(settings.MEDIA_ROOT) / version.file
    _delete_rows(version.pk)  # a retried job starts again from the first row
    started, total = time.monotonic(), path.stat().st_size
    with path.open("rb") as f:
        src = _Counting(f)
        # The options were checked when staged: an error the reader raises here is a bug, not the user's.
        reader = formats.DatasetReader(
            src,
            opts.get("format", "auto"),
            limits=_limits(),
            query_column=opts.get("query_column"),
            answer_column=opts.get("answer_column"),
            filename=version.source_filename,
            use_chosen=use_chosen,
            keep_errors=MAX_SKIPPED_KEPT if skip_bad else formats.MAX_KEPT_ERRORS,
            records_key=opts.get("records_key"),
        )

        def batch_stored(rows: int) -> None:
            if should_stop is not None and should_stop():
                raise ImportCancelled(f"stopped after {rows:,} rows; nothing was stored")
            if progress is not None:
                progress(Progress.since(started, src.bytes_read, total, "bytes", metrics={"rows": rows}))

        digest = _store_rows(version, ((r.line, r.messages, r.extra) for r in reader), batch_stored)
        f.seek(0)
        head = f.read(4096)
    if reader.row_count == 0 or reader.stopped or (reader.error_count and not skip_bad):
        errors = reader.errors[: formats.MAX_KEPT_ERRORS] or [formats.RowError(0, "the file has no rows")]
        fatal = [e for e in reader.errors if e.fatal]
        if fatal and fatal[0] not in errors:
            errors.append(fatal[0])
        raise DatasetRejected(errors, reader.error_count or 1, reader.row_count, reader.format)
    meta = _import_meta(reader, skip_bad, use_chosen)
    if opts.get("records_key"):
        meta["records_key"] = opts["records_key"]
    if version.meta.get("form_token"):
        meta["form_token"] = version.meta["form_token"]
    is_array = head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    ext = {"csv": "csv", "lines": "txt"}.get(reader.format, "json" if is_array else "jsonl")
    final = datasets_dir() / f"{uuid.uuid4().hex}.{ext}"
    version.meta, version.format = meta, reader.format
    version.file = str(final.relative_to(settings.MEDIA_ROOT))
    os.replace(path, final)
    try:
        _finish_version(version, digest)
    except BaseException:
        os.replace(final, path)  # discard_staging deletes the file the row names
        raise
    return version


def discard_staging(version_id: int) -> None:
    """Delete a staging version's rows (in short batches), its stored file,
    the version, and its dataset if that has no version left. A version
    that became visible is left alone."""
    version = DatasetVersion.all_objects.filter(pk=version_id, state=DatasetVersion.IMPORTING).first()
    if version is None:
        return
    _delete_rows(version_id)
    if version.file:
        (Path(settings.MEDIA_ROOT) / version.file).unlink(missing_ok=True)
    with transaction.atomic():
        DatasetVersion.all_objects.filter(pk=version_id, state=DatasetVersion.IMPORTING).delete()
        if not DatasetVersion.all_objects.filter(dataset_id=version.dataset_id).exists():
            Dataset.objects.filter(pk=version.dataset_id).delete()


def _delete_rows(version_id: int) -> None:
    while True:
        ids = list(DatasetRow.objects.filter(version_id=version_id).values_list("pk", flat=True)[:ROW_BATCH])
        if not ids:
            return
        DatasetRow.objects.filter(pk__in=ids).delete()


def _import_meta(reader: formats.DatasetReader, skip_bad: bool, use_chosen: bool) -> dict[str, Any]:
    """What the version's page shows about its import beyond the rows."""
    meta: dict[str, Any] = {}
    if reader.kept_fields:
        meta["kept_fields"] = reader.kept_fields
    if reader.notes:
        meta["notes"] = reader.notes
    if reader.warnings:
        meta["warnings"] = reader.warnings
    options = [name for name, on in (("skip_bad", skip_bad), ("use_chosen", use_chosen)) if on]
    if options:
        meta["options"] = options
    if reader.error_count:
        meta["skipped"] = {"count": reader.error_count, "rows": [str(e) for e in reader.errors]}
    return meta


ROW_FIELDS = ("notes", "failing", "review", "curation")  # what a derived row may set besides its messages


def _store_rows(
    version: DatasetVersion, rows: Iterable[tuple[Any, ...]], on_batch: Callable[[int], None] | None = None
) -> Any:
    """Insert rows in batches (memory stays flat), each batch in its own
    transaction unless the caller holds one; returns the content hash.
    A row is (line, messages), (line, messages, extra fields kept) or
    (line, messages, extra, {notes, failing, review, curation}). `on_batch` gets
    the count stored so far (it may raise to stop)."""
    digest = hashlib.sha256()
    batch: list[DatasetRow] = []
    stored = 0

    def flush() -> None:
        nonlocal batch, stored
        with transaction.atomic():
            DatasetRow.objects.bulk_create(batch)
        stored += len(batch)
        batch = []
        if on_batch is not None:
            on_batch(stored)

    for index, (line, messages, *rest) in enumerate(rows):
        row = formats.Row(line, messages)
        digest.update(row.to_json().encode("utf-8") + b"\n")
        more = rest[1] if len(rest) > 1 and rest[1] else {}
        batch.append(
            DatasetRow(
                version=version,
                index=index,
                line=line,
                messages=messages,
                sha256=row.sha,
                extra=rest[0] if rest and rest[0] else {},
                **{k: more[k] for k in ROW_FIELDS if k in more},
            )
        )
        if len(batch) >= ROW_BATCH:
            flush()
    if batch:
        flush()
    return digest


def _finish_version(version: DatasetVersion, digest: Any) -> None:
    """Count, split (short updates), then make the version visible in one
    short transaction, unless it was discarded meanwhile."""
    rows = version.rows
    version.row_count = rows.count()
    distinct = rows.values("sha256").annotate(n=Count("id")).count()
    version.duplicate_count = version.row_count - distinct
    version.sha256 = digest.hexdigest()
    apply_split(version)
    with transaction.atomic():
        fields = ["row_count", "duplicate_count", "sha256", "meta", "format", "file"]
        flipped = DatasetVersion.all_objects.filter(pk=version.pk, state=DatasetVersion.IMPORTING).update(
            state=DatasetVersion.READY, **{f: getattr(version, f) for f in fields}
        )
        if not flipped:
            raise ImportCancelled(f"{version} was discarded while it was imported")
    version.state = DatasetVersion.READY


def eval_count(n: int, percent: int, minimum: int = 0) -> int:
    """How many of n rows the split holds out. With `minimum`, a split below
    100 percent holds out at least that many rows, but never more than half
    of them (the rest must still teach)."""
    if percent == 100:
        return n
    if percent and n > 1:
        return max(1, min(round(n * percent / 100), n - 1), min(minimum, n // 2))
    return 0


def eval_indices(n: int, percent: int, seed: int, minimum: int = 0) -> list[int]:
    """The row indices apply_split puts in the eval split of n rows, sorted
    (a plan can know a split before anything is stored)."""
    return sorted(random.Random(seed).sample(range(n), eval_count(n, percent, minimum)))


def default_split(percent: int | None) -> tuple[int, int]:
    """(eval percent, minimum held out) of an import: a percent the user
    chose is kept as it is; none chosen is DEFAULT_EVAL_PERCENT with at least
    settings.EVAL_MIN_HELD_OUT rows held out, so a small upload still gives
    an eval with enough queries to decide on."""
    if percent is None:
        return DEFAULT_EVAL_PERCENT, settings.EVAL_MIN_HELD_OUT
    return percent, 0


def held_out_count(n: int, percent: int | None) -> int:
    """How many of n rows an import with this eval percent (None: the default) holds out."""
    return eval_count(n, *default_split(percent))


def apply_split(version: DatasetVersion) -> None:
    """Deterministic split: exactly round(N * percent / 100) eval rows (but at
    least one, and never every row, when 0 < percent < 100 and N > 1; and at
    least the version's eval_min, at most half the rows), chosen by a seeded
    sample of row indices (same seed, same rows). 100 percent is a held-out
    set: every row is eval."""
    # Only rows already marked eval are reset: a fresh import has none, so no long update.
    version.rows.filter(split=DatasetRow.EVAL).update(split=DatasetRow.TRAIN)
    chosen = eval_indices(version.row_count, version.eval_percent, version.split_seed, version.eval_min)
    for i in range(0, len(chosen), 500):
        version.rows.filter(index__in=chosen[i : i + 500]).update(split=DatasetRow.EVAL)


@transaction.atomic
def derive_version(
    parent: DatasetVersion,
    user: User | None,
    rows: Iterable[tuple[Any, ...]],
    kind: str = DatasetVersion.EDIT,
    meta: dict[str, Any] | None = None,
    keep_split: bool = True,
) -> DatasetVersion:
    """A new version of the same dataset from edited rows (teacher answers,
    review edits), given as (parent index, messages) or (parent index,
    messages, {notes, failing, review, curation}). Each row keeps the source line and
    the extra fields of the parent row it came from and, with keep_split,
    its split."""
    dataset = Dataset.objects.select_for_update().get(pk=parent.dataset_id)
    number = (DatasetVersion.all_objects.filter(dataset=dataset).aggregate(n=Max("number"))["n"] or 0) + 1
    version = DatasetVersion.objects.create(
        dataset=dataset,
        number=number,
        kind=kind,
        parent=parent,
        format=parent.format,
        eval_percent=parent.eval_percent,
        eval_min=parent.eval_min,
        split_seed=parent.split_seed,
        created_by=user,
        meta=meta or {},
        sha256="",
    )
    parent_split = dict(parent.rows.values_list("index", "split")) if keep_split else {}
    parent_row = {i: (line, extra) for i, line, extra in parent.rows.values_list("index", "line", "extra")}
    source: list[int] = []

    def numbered() -> Iterable[tuple[Any, ...]]:
        for parent_index, messages, *more in rows:
            source.append(parent_index)
            line, extra = parent_row.get(parent_index, (0, {}))
            yield line, messages, extra, (more[0] if more else None)

    digest = _store_rows(version, numbered())
    if not source:
        raise ActionError("The new version would have no rows.")
    version.row_count = len(source)
    version.duplicate_count = version.row_count - version.rows.values("sha256").distinct().count()
    version.sha256 = digest.hexdigest()
    if keep_split:
        evals = [i for i, p in enumerate(source) if parent_split.get(p) == DatasetRow.EVAL]
        for i in range(0, len(evals), 500):
            version.rows.filter(index__in=evals[i : i + 500]).update(split=DatasetRow.EVAL)
    else:
        apply_split(version)
    version.save()
    return version


def _as_posted(text: str) -> str:
    """The text as a browser posts it back from a <textarea>: HTML turns CR LF
    and a lone CR into LF; the form sends CR LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def edits_changed(version: DatasetVersion, edits: dict[int, str]) -> dict[int, str]:
    """Only the edits whose text differs from the stored answer as the page
    showed it (a model's stray CR is not the reviewer's edit)."""
    current = dict(version.rows.filter(index__in=list(edits)).values_list("index", "messages"))
    return {
        i: _as_posted(text)
        for i, text in edits.items()
        if i in current
        and current[i][-1]["role"] == "assistant"
        and _as_posted(current[i][-1]["content"]) != _as_posted(text)
    }


Reviewed = tuple[int, list[dict[str, str]], dict[str, Any]]


def _reviewed_rows(
    version: DatasetVersion,
    row: Callable[[Reviewed], Reviewed | None],
) -> tuple[list[Reviewed], list[list[dict[str, str]]], list[int]]:
    """The review actions' one walk over a version: each row as `row` keeps
    it (None drops it), the train conversations kept (for the report) and
    the indices dropped."""
    rows: list[Reviewed] = []
    train: list[list[dict[str, str]]] = []
    dropped: list[int] = []
    source = version.rows.order_by("index").values_list(
        "index", "messages", "notes", "failing", "review", "curation", "split"
    )
    for index, messages, notes, failing, review, curation, split in source.iterator(chunk_size=2000):
        kept = row(
            (index, messages, {"notes": notes, "failing": failing, "review": review, "curation": curation})
        )
        if kept is None:
            dropped.append(index)
            continue
        rows.append(kept)
        if split == DatasetRow.TRAIN:
            train.append(kept[1])
    return rows, train, dropped


def _rules_of(version: DatasetVersion) -> list[Rule]:
    try:
        return data_quality.rules_of(version)
    except data_quality.StoredRulesError as exc:
        raise ActionError(f"{exc} Nothing was saved.") from exc


@transaction.atomic
def review_version(
    version: DatasetVersion,
    user: User | None,
    edits: dict[int, str],
    drop: set[int],
) -> DatasetVersion | None:
    """A new version with edited answers and dropped rows, or None when
    nothing changes. Unedited rows keep their review state."""
    changed = edits_changed(version, edits)
    drop = {i for i in drop if version.rows.filter(index=i).exists()}
    if not changed and not drop:
        return None
    if any(not text.strip() for text in changed.values()):
        raise ActionError("An answer cannot be empty; drop the row instead.")
    rules = _rules_of(version)

    def row(r: Reviewed) -> Reviewed | None:
        index, messages, more = r
        if index in drop:
            return None
        if index not in changed:
            return r
        messages = [*messages[:-1], {"role": "assistant", "content": changed[index]}]
        # An edited answer is checked again; the notes were about the old answer.
        return (
            index,
            messages,
            {
                "notes": [],
                "failing": data_quality.failing(rules, messages),
                "review": DatasetRow.EDITED,
                "curation": {**more["curation"], "edited": True},
            },
        )

    rows, train, _ = _reviewed_rows(version, row)
    meta: dict[str, Any] = {"reviewed": str(version), "edited": sorted(changed), "dropped": sorted(drop)}
    return derive_version(
        version, user, rows, kind=DatasetVersion.EDIT, meta=_carry_quality(version, meta, train)
    )


def _carry_quality(
    parent: DatasetVersion, meta: dict[str, Any], train: list[list[dict[str, str]]]
) -> dict[str, Any]:
    """A reviewed version keeps the parent's rules and report, with the
    human edits measured as one more step."""
    if parent.meta.get("rules"):
        meta["rules"] = parent.meta["rules"]
    try:
        quality = data_quality.with_human_edits(parent, train)
    except data_quality.StoredRulesError as exc:
        raise ActionError(f"{exc} Nothing was saved.") from exc
    if quality:
        meta["quality"] = quality
    return meta


@transaction.atomic
def review_bulk(version: DatasetVersion, user: User | None, action: str, rule: str = "") -> DatasetVersion:
    """The review queue's bulk actions, each making a new version:
    "drop_failing" drops every row that fails `rule`; "accept_all" accepts
    every answer as it is, which clears the rows' warnings (their failing
    rules stay recorded, and in the report)."""
    if action == "drop_failing":
        if rule not in {r.name for r in _rules_of(version)}:
            raise ActionError(f"{version} has no rule called {rule!r}.")
    elif action != "accept_all":
        raise ActionError(f"Unknown review action {action!r}.")

    def row(r: Reviewed) -> Reviewed | None:
        index, messages, more = r
        if action == "accept_all":
            return index, messages, {**more, "review": DatasetRow.ACCEPTED}
        return None if rule in more["failing"] else r

    rows, train, dropped = _reviewed_rows(version, row)
    if action == "drop_failing" and not dropped:
        raise ActionError(f"No row fails the rule {rule!r}: nothing to drop.")
    meta: dict[str, Any] = {
        "reviewed": str(version),
        "edited": [],
        "dropped": dropped,
        "bulk": f"dropped every row failing {rule!r}"
        if action == "drop_failing"
        else "accepted every answer as it is",
    }
    return derive_version(
        version, user, rows, kind=DatasetVersion.EDIT, meta=_carry_quality(version, meta, train)
    )


@transaction.atomic
def queue_token_stats(version: DatasetVersion, model: FoundationModel) -> DatasetVersion:
    """Mark the statistics under `model` as queued and send the task on commit.
    The read-modify-write of token_stats is done on the locked row, so the
    entries of other models (queued or finished meanwhile) are kept."""
    locked = DatasetVersion.objects.select_for_update().get(pk=version.pk)
    locked.token_stats = {**locked.token_stats, model.name: {"status": "queued"}}
    locked.save(update_fields=["token_stats"])
    compute_token_stats.delay_on_commit(locked.pk, model.pk)
    return locked


@transaction.atomic
def with_held_out(train: DatasetVersion, held_out: DatasetVersion, user: User | None) -> DatasetVersion:
    """A new version of `train`'s dataset: its train rows, then every row of
    `held_out` as the eval split (the /v1 fine-tuning API's validation_file
    becomes the held-out queries of an absorb's four-arm comparison)."""
    kept = list(train.rows.filter(split=DatasetRow.TRAIN).order_by("index").values_list("index", "messages"))
    extra = list(held_out.rows.order_by("index").values_list("messages", flat=True))
    # Indices the parent lacks: the held-out rows carry no line or extra fields of a train row.
    rows = [*kept, *((-1 - j, m) for j, m in enumerate(extra))]
    version = derive_version(train, user, rows, meta={"held_out_from": held_out.pk}, keep_split=True)
    version.rows.filter(index__gte=len(kept)).update(split=DatasetRow.EVAL)
    return version
