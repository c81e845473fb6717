from __future__ import annotations

import json
from collections.abc import Iterator

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_POST

from engines import formats
from workbench.actions import ActionError
from workbench.actions_data import DatasetRejected, edits_changed, import_dataset, review_version
from workbench.models import BaseModel, Dataset, DatasetRow, DatasetVersion
from workbench.views import get_project


@login_required
def dataset_list(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    return render(request, "workbench/dataset_list.html", _list_context(project))


def _list_context(project, **extra):  # type: ignore[no-untyped-def]
    return {"project": project, "datasets": project.datasets.prefetch_related("versions"),
            "formats": formats.FORMATS, "max_bytes": settings.UPLOAD_MAX_BYTES, **extra}


@login_required
@require_POST
def dataset_upload(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    upload = request.FILES.get("file")
    form = {k: request.POST.get(k, "") for k in ("name", "format", "query_column", "answer_column",
                                                 "eval_percent", "seed")}
    if upload is None:
        return render(request, "workbench/dataset_list.html",
                      _list_context(project, form=form, error="Choose a file to upload."), status=400)
    if upload.size and upload.size > settings.UPLOAD_MAX_BYTES:
        return render(request, "workbench/dataset_list.html", _list_context(
            project, form=form, error=f"The file is {filesizeformat(upload.size)}; the limit is "
            f"{filesizeformat(settings.UPLOAD_MAX_BYTES)}."), status=400)
    try:
        version = import_dataset(
            project, request.user, form["name"] or upload.name.rsplit(".", 1)[0], upload.file,
            filename=upload.name, fmt=form["format"] or "auto",
            query_column=form["query_column"] or None, answer_column=form["answer_column"] or None,
            eval_percent=int(form["eval_percent"] or 10), seed=int(form["seed"] or 0),
        )
    except ValueError as exc:  # int() of a bad number
        return render(request, "workbench/dataset_list.html",
                      _list_context(project, form=form, error=f"Invalid number: {exc}"), status=400)
    except ActionError as exc:
        return render(request, "workbench/dataset_list.html",
                      _list_context(project, form=form, error=str(exc)), status=400)
    except DatasetRejected as rej:
        return render(request, "workbench/dataset_list.html", _list_context(
            project, form=form, rejected=rej, filename=upload.name), status=400)
    messages.success(request, f"Stored {version}: {version.row_count:,} rows ({version.format}).")
    return redirect(version)


def _get_dataset(request: HttpRequest, slug: str, dataset_id: int) -> Dataset:
    project = get_project(request, slug)
    return get_object_or_404(Dataset.objects.select_related("project"), pk=dataset_id, project=project)


@login_required
def dataset_detail(request: HttpRequest, slug: str, dataset_id: int) -> HttpResponse:
    dataset = _get_dataset(request, slug, dataset_id)
    latest = dataset.latest
    if latest is None:
        return redirect("dataset_list", slug)
    return dataset_version(request, slug, dataset_id, latest.number)


@login_required
def dataset_version(request: HttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    dataset = _get_dataset(request, slug, dataset_id)
    version = get_object_or_404(dataset.versions, number=number)
    split = request.GET.get("split", "")
    rows = version.rows.all()
    if split in (DatasetRow.TRAIN, DatasetRow.EVAL):
        rows = rows.filter(split=split)
    if request.GET.get("flagged"):
        rows = rows.exclude(flags=[])
    page = Paginator(rows, 20).get_page(request.GET.get("page"))
    eval_count = version.eval_count
    ctx = {
        "project": dataset.project, "dataset": dataset, "version": version, "page": page, "split": split,
        "versions": dataset.versions.all(), "eval_count": eval_count, "train_count": version.row_count - eval_count,
        "base_models": BaseModel.objects.all(), "stats": version.token_stats,
        "stats_pending": any(v.get("status") == "queued" for v in version.token_stats.values()),
    }
    if request.htmx and request.htmx.target == "rows":
        return render(request, "workbench/dataset_version.html#rows", ctx)
    return render(request, "workbench/dataset_version.html", ctx)


@login_required
@require_POST
def dataset_stats(request: HttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    """Queue token-length statistics under a base model's tokenizer."""
    from workbench.tasks import compute_token_stats

    dataset = _get_dataset(request, slug, dataset_id)
    version = get_object_or_404(dataset.versions, number=number)
    model_id = request.POST.get("base_model", "")
    model = get_object_or_404(BaseModel, pk=int(model_id) if model_id.isdigit() else None)
    stats = dict(version.token_stats)
    stats[model.name] = {"status": "queued"}
    DatasetVersion.objects.filter(pk=version.pk).update(token_stats=stats)
    compute_token_stats.delay_on_commit(version.pk, model.pk)
    return redirect(version)


@login_required
def dataset_stats_fragment(request: HttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    dataset = _get_dataset(request, slug, dataset_id)
    version = get_object_or_404(dataset.versions, number=number)
    return render(request, "workbench/dataset_version.html#stats",
                  {"project": dataset.project, "dataset": dataset, "version": version,
                   "stats": version.token_stats,
                   "stats_pending": any(v.get("status") == "queued" for v in version.token_stats.values())})


@login_required
def dataset_export(request: HttpRequest, slug: str, dataset_id: int, number: int) -> StreamingHttpResponse:
    """The normalised rows as chat JSONL, with their split."""
    dataset = _get_dataset(request, slug, dataset_id)
    version = get_object_or_404(dataset.versions, number=number)

    def lines() -> Iterator[str]:
        for messages_, split in version.rows.values_list("messages", "split").iterator(chunk_size=2000):
            yield json.dumps({"messages": messages_, "split": split}, ensure_ascii=False) + "\n"

    response = StreamingHttpResponse(lines(), content_type="application/jsonl; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{dataset.project.slug}-{dataset.pk}-v{version.number}.jsonl"'
    return response


@login_required
def dataset_review(request: HttpRequest, slug: str, dataset_id: int, number: int) -> HttpResponse:
    """Review answers (teacher output): edit answers, drop rows; saving makes
    a new version, the reviewed one stays as it was."""
    dataset = _get_dataset(request, slug, dataset_id)
    version = get_object_or_404(dataset.versions, number=number)
    rows = version.rows.all()
    if request.GET.get("flagged"):
        rows = rows.exclude(flags=[])
    page = Paginator(rows, 10).get_page(request.GET.get("page"))
    if request.method == "POST":
        drop = {int(i) for i in request.POST.getlist("drop") if i.isdigit()}
        edits = {int(k[7:]): v for k, v in request.POST.items() if k.startswith("answer_") and k[7:].isdigit()}
        try:
            new = review_version(version, request.user, edits, drop)
        except ActionError as exc:
            messages.error(request, str(exc))
            return redirect(request.get_full_path())
        if new is None:
            messages.info(request, "No changes.")
            return redirect(request.get_full_path())
        messages.success(request, f"Saved {new}: {len(edits_changed(version, edits))} answer(s) edited, "
                                  f"{len(drop)} row(s) dropped, {new.row_count} rows.")
        return redirect(reverse("dataset_review", args=[slug, dataset_id, new.number]) +
                        f"?page={page.number}" + ("&flagged=1" if request.GET.get("flagged") else ""))
    ctx = {"project": dataset.project, "dataset": dataset, "version": version, "page": page,
           "flagged_count": version.rows.exclude(flags=[]).count(), "flagged": bool(request.GET.get("flagged"))}
    return render(request, "workbench/dataset_review.html", ctx)
