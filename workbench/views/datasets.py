from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.uploadedfile import UploadedFile
from django.core.paginator import Page, Paginator
from django.db.models import Case, Exists, IntegerField, OuterRef, Value, When
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_POST

from workbench import data_quality
from workbench.actions import ActionError
from workbench.actions.datasets import (
    AlreadyUploaded,
    DatasetRejected,
    queue_import,
    queue_token_stats,
    review_bulk,
    review_version,
    run_import,
    stage_import,
    store_upload,
)
from workbench.forms import DatasetUploadForm, TokenStatsForm, with_form_token
from workbench.models import Dataset, DatasetRow, DatasetRowQuerySet, DatasetVersion, FoundationModel, Project
from workbench.shortcuts import AuthedHttpRequest, get_for_project, get_project
from workbench.uploads import DataDirFile, limit_upload


def _get_dataset(request: HttpRequest, slug: str, dataset_id: int) -> Dataset:
    return get_for_project(request, slug, Dataset.objects.select_related("project"), pk=dataset_id)


def _get_version(request: HttpRequest, slug: str, dataset_id: int, number: int) -> DatasetVersion:
    return get_for_project(
        request,
        slug,
        DatasetVersion.objects.select_related("dataset__project"),
        "dataset__project",
        dataset_id=dataset_id,
        number=number,
    )


def _list_page(
    request: HttpRequest,
    project: Project,
    form: DatasetUploadForm,
    status: int = 200,
    rejected: DatasetRejected | None = None,
    upload_error: str = "",
) -> HttpResponse:
    visible = Exists(DatasetVersion.objects.filter(dataset=OuterRef("pk")))
    importing = DatasetVersion.all_objects.filter(dataset__project=project, state=DatasetVersion.IMPORTING)
    ctx = {
        "project": project,
        "datasets": project.datasets.filter(visible).prefetch_related("versions"),
        "importing": importing.select_related("dataset").prefetch_related("produced_by"),
        "form": form,
        "max_bytes": settings.UPLOAD_MAX_BYTES,
        "min_held_out": settings.EVAL_MIN_HELD_OUT,
        "rejected": rejected,
        "upload_error": upload_error,
        "filename": form.cleaned_data["file"].name if rejected else "",
        "needs_records_key": bool(
            rejected and rejected.file_problem and "JSON object" in str(rejected.file_problem)
        ),
    }
    return render(request, "workbench/dataset_list.html", ctx, status=status)


@login_required
def dataset_list(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    return _list_page(request, get_project(request, slug), DatasetUploadForm(initial=with_form_token()))


def _upload_refused(request: HttpRequest, message: str, slug: str) -> HttpResponse:
    return _list_page(
        request, get_project(request, slug), DatasetUploadForm(), status=413, upload_error=message
    )


def _stored_path(upload: UploadedFile) -> Path:
    """The upload as a file in the data dir, which the import then owns."""
    if isinstance(upload, DataDirFile):
        return upload.keep()
    return store_upload(upload)  # an UploadedFile reads from its file


@login_required
@require_POST
@limit_upload(_upload_refused)
def dataset_upload(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """Store the upload and stage a version; a small file is imported here and
    then, a large one by a job (progress, cancel): the page answers at once.
    Either way rows go in short batches into a version no one sees until done."""
    project = get_project(request, slug)
    form = DatasetUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _list_page(request, project, form, status=400)
    data = form.cleaned_data
    upload = data["file"]
    try:
        version = stage_import(
            project,
            request.user,
            data["name"],
            _stored_path(upload),
            filename=upload.name,
            fmt=data["format"],
            query_column=data["query_column"],
            answer_column=data["answer_column"],
            eval_percent=data["eval_percent"],
            seed=data["seed"],
            skip_bad=data["skip_bad"],
            use_chosen=data["use_chosen"],
            records_key=data["records_key"],
            form_token=data["form_token"],
        )
    except AlreadyUploaded as done:
        messages.info(request, str(done))
        made = done.version
        if made.state == DatasetVersion.READY:
            return redirect(made)
        job = made.produced_by.order_by("-pk").first()  # its import job, while it runs
        return redirect(job) if job is not None else redirect("dataset_list", slug)
    except ActionError as exc:
        form.add_error(None, str(exc))
        return _list_page(request, project, form, status=400)
    if upload.size > settings.DATASET_SYNC_IMPORT_BYTES:
        job = queue_import(version, request.user)
        if job is not None:
            messages.info(
                request,
                f"Importing {upload.name} as {version.dataset.name}@{version.number}: the "
                "version appears when every row is stored.",
            )
            return redirect(job)
    try:
        version = run_import(version)
    except DatasetRejected as rejected:
        return _list_page(request, project, form, status=400, rejected=rejected)
    messages.success(
        request,
        f"Stored {version}: {version.row_count:,} row{pluralize(version.row_count)} ({version.format}).",
    )
    skipped = version.meta.get("skipped")
    if skipped:
        messages.warning(
            request,
            f"Skipped {skipped['count']:,} bad row{pluralize(skipped['count'])}; "
            "they are listed on the version page.",
        )
    return redirect(version)


@login_required
def dataset_detail(request: AuthedHttpRequest, slug: str, dataset_id: int) -> HttpResponse:
    latest = _get_dataset(request, slug, dataset_id).latest
    if latest is None:
        return redirect("dataset_list", slug)
    return dataset_version(request, slug, dataset_id, latest.number)


def _stats_context(version: DatasetVersion) -> dict[str, object]:
    dataset = version.dataset
    return {
        "project": dataset.project,
        "dataset": dataset,
        "version": version,
        "stats": version.token_stats,
        "stats_pending": any(v.get("status") == "queued" for v in version.token_stats.values()),
    }


@login_required
def dataset_version(request: AuthedHttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    version = _get_version(request, slug, dataset_id, number)
    split = request.GET.get("split", "")
    rows = version.rows.all()
    if split in (DatasetRow.TRAIN, DatasetRow.EVAL):
        rows = rows.filter(split=split)
    if request.GET.get("flagged"):
        rows = rows.flagged()
    page = Paginator(rows, 20).get_page(request.GET.get("page"))
    eval_count = version.eval_count
    ctx = {
        **_stats_context(version),
        "page": page,
        "split": split,
        "versions": version.dataset.versions.all(),
        "eval_count": eval_count,
        "train_count": version.row_count - eval_count,
        "base_models": FoundationModel.objects.all(),
    }
    if request.htmx and request.htmx.target == "rows":
        return render(request, "workbench/dataset_version.html#rows", ctx)
    return render(request, "workbench/dataset_version.html", ctx)


@login_required
@require_POST
def dataset_stats(request: AuthedHttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    """Queue token-length statistics under a base model's tokenizer."""
    version = _get_version(request, slug, dataset_id, number)
    form = TokenStatsForm(request.POST)
    if not form.is_valid():
        raise Http404("No such base model.")
    queue_token_stats(version, form.cleaned_data["base_model"])
    return redirect(version)


@login_required
def dataset_stats_fragment(
    request: AuthedHttpRequest, slug: str, dataset_id: int, number: int
) -> HttpResponse:
    version = _get_version(request, slug, dataset_id, number)
    return render(request, "workbench/dataset_version.html#stats", _stats_context(version))


@login_required
def dataset_export(
    request: AuthedHttpRequest, slug: str, dataset_id: int, number: int
) -> StreamingHttpResponse:
    """The normalised rows as chat JSONL, with their split and the extra
    fields kept from the upload (under their own names, as they came)."""
    version = _get_version(request, slug, dataset_id, number)

    def lines() -> Iterator[str]:
        rows = version.rows.values_list("messages", "split", "extra").iterator(chunk_size=2000)
        for messages_, split, extra in rows:
            yield (
                json.dumps({**(extra or {}), "messages": messages_, "split": split}, ensure_ascii=False)
                + "\n"
            )

    response = StreamingHttpResponse(lines(), content_type="application/jsonl; charset=utf-8")
    filename = f"{version.dataset.project.slug}-{version.dataset_id}-v{version.number}.jsonl"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _review_page(
    request: HttpRequest,
    version: DatasetVersion,
    page: Page,
    flagged: bool,
    *,
    typed: dict[int, str] | None = None,
    dropped: set[int] | None = None,
    error: str = "",
    status: int = 200,
) -> HttpResponse:
    """The review form; after a refused save it holds what was typed and ticked."""
    rows = list(page)
    for row in rows:
        row.typed_answer = (typed or {}).get(row.index)
        row.dropped = row.index in (dropped or ())
    rules_error = ""
    try:
        names = [r.name for r in data_quality.rules_of(version)]
    except data_quality.StoredRulesError as exc:
        names, rules_error = [], str(exc)
    counts = data_quality.failing_counts(version.rows.all(), names)
    ctx = {
        "project": version.dataset.project,
        "dataset": version.dataset,
        "version": version,
        "page": page,
        "rows": rows,
        "flagged_count": version.rows.flagged().count(),
        "flagged": flagged,
        "failing_count": counts.failing,
        "failing_counts": counts.by_rule,
        "rule": request.GET.get("rule", ""),
        "error": error,
        "rules_error": rules_error,
    }
    return render(request, "workbench/dataset_review.html", ctx, status=status)


def _review_rows(version: DatasetVersion, flagged: bool, rule: str) -> DatasetRowQuerySet:
    """The review queue: rows that still fail a rule first, then flagged
    ones, then the rest; optionally only the rows failing one rule."""
    rows = version.rows.all()
    if flagged:
        rows = rows.flagged()
    if rule:
        rows = rows.failing_rule(rule)
    first = Case(When(failing=[], then=Value(1)), default=Value(0), output_field=IntegerField())
    then = Case(When(DatasetRow.FLAGGED, then=Value(0)), default=Value(1), output_field=IntegerField())
    return rows.annotate(_fails=first, _flagged=then).order_by("_fails", "_flagged", "index")


ROW_INDEX = re.compile(r"[0-9]{1,10}")


def _row_index(raw: str) -> int:
    """A row index as the review form posts it; anything else is refused
    (not a 500 on a huge number, nor silently dropped)."""
    if not ROW_INDEX.fullmatch(raw) or int(raw) >= 2**31:
        raise ValueError(f"'{raw[:40]}' is not a row of this version")
    return int(raw)


def _review_edits(request: HttpRequest) -> tuple[dict[int, str], set[int]]:
    """Fields are named by row index: answer_<index> (edited text) and drop=<index>."""
    drop = {_row_index(i) for i in request.POST.getlist("drop")}
    # A posted field always has a value (str); the stubs also allow an empty list.
    edits = {
        _row_index(k[7:]): v
        for k, v in request.POST.items()
        if k.startswith("answer_") and isinstance(v, str)
    }
    return edits, drop


def _review_url(version: DatasetVersion, page: int, flagged: bool, rule: str) -> str:
    query: dict[str, str | int] = {
        "page": page,
        **({"flagged": 1} if flagged else {}),
        **({"rule": rule} if rule else {}),
    }
    return (
        reverse("dataset_review", args=[version.dataset.project.slug, version.dataset_id, version.number])
        + "?"
        + urlencode(query)
    )


@login_required
def dataset_review(request: AuthedHttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    """Review answers (teacher output): edit answers, drop rows; saving makes
    a new version, the reviewed one stays as it was. Moving to another page
    submits the form: the page's edits are saved first (`goto`), never lost."""
    version = _get_version(request, slug, dataset_id, number)
    flagged = bool(request.GET.get("flagged"))
    rule = request.GET.get("rule", "")
    rows = _review_rows(version, flagged, rule)
    page = Paginator(rows, 10).get_page(request.GET.get("page"))
    if request.method == "POST" and request.POST.get("bulk"):
        try:
            new = review_bulk(version, request.user, request.POST["bulk"], request.POST.get("rule", ""))
        except ActionError as exc:
            return _review_page(request, version, page, flagged, error=str(exc), status=400)
        messages.success(
            request, f"Saved {new}: {new.meta['bulk']}; {new.row_count:,} row{pluralize(new.row_count)}."
        )
        return redirect(reverse("dataset_review", args=[slug, dataset_id, new.number]))
    if request.method == "POST":
        goto = request.POST.get("goto", "")
        target = int(goto) if goto.isascii() and goto.isdigit() and len(goto) < 10 else page.number
        try:
            edits, drop = _review_edits(request)
        except ValueError as exc:
            return _review_page(
                request, version, page, flagged, error=f"{str(exc).capitalize()}.", status=400
            )
        try:
            reviewed = review_version(version, request.user, edits, drop)
        except ActionError as exc:
            return _review_page(
                request, version, page, flagged, typed=edits, dropped=drop, error=str(exc), status=400
            )
        if reviewed is None:
            if target == page.number:
                messages.info(request, "No changes.")
            return redirect(_review_url(version, target, flagged, rule))
        edited, dropped = len(reviewed.meta["edited"]), len(reviewed.meta["dropped"])
        messages.success(
            request,
            f"Saved {reviewed}: {edited} answer{pluralize(edited)} edited, "
            f"{dropped} row{pluralize(dropped)} dropped, "
            f"{reviewed.row_count:,} row{pluralize(reviewed.row_count)}.",
        )
        return redirect(_review_url(reviewed, target, flagged, rule))
    return _review_page(request, version, page, flagged)
