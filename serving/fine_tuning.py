"""The OpenAI fine-tuning API under /v1, for scripts written against the
`openai` SDK: /v1/files (upload, list, retrieve, delete, content) stores
dataset versions of the key's project through the upload page's own import
(every format the workbench reads, the same limits and errors), and
/v1/fine_tuning/jobs (create, list, retrieve, cancel, events, checkpoints)
runs the workbench's own fine-tune job. Its `method` is "supervised" (the
rows as given) or "absorb" (a prompt version, or a system prompt with rules
inline: teacher, curation, fine-tune and the four-arm comparison, whose
summary the job object carries as `eval`).

Ids: file-N is dataset version N; ftjob-N is fine-tune job N (for an absorb,
the fine-tune that waits for its teacher). A job started here shows in the
UI like any other, and a fine-tune started in the UI is listed here. Every
error is OpenAI-shaped; another project's file or job is a 404."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import ProtectedError, RestrictedError
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)

from engines.protocol import OpenAIError
from engines.training import ConfigError, TrainConfig
from evals.models import ArmComparison
from jobs.actions import start_absorb, start_supervised
from jobs.models import Job, JobPoint, TeacherEndpoint
from serving import ft_models, limits
from serving.gateway import ApiRequest, api_view, authenticate, parse_body, resolve_model
from serving.models import ApiKey
from workbench.actions import ActionError
from workbench.actions.datasets import (
    DatasetRejected,
    datasets_dir,
    queue_import,
    run_import,
    stage_import,
    store_upload,
    with_held_out,
)
from workbench.actions.prompts import find_prompt_version, save_prompt
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, PromptVersion, Variant
from workbench.uploads import DataDirFile, DataDirUploadHandler, LimitedUploadHandler, refused

FILE_ID = re.compile(r"file-(\d{1,18})")
SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
# "[YYYY-MM-DD HH:MM:SS] message"; logs written before the date was stamped hold the time only.
LOG_LINE = re.compile(r"\[(?:(\d{4})-(\d\d)-(\d\d) )?(\d\d):(\d\d):(\d\d)\] (.*)")
MAX_METADATA = 16
MAX_LIST = 1000
HYPERPARAMETERS = {"n_epochs": ("epochs", 1, 50), "batch_size": ("batch_size", 1, 256)}
MAX_LR_MULTIPLIER = 100.0
JOB_FIELDS = {
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "hyperparameters",
    "method",
    "metadata",
    "integrations",
}
ABSORB_FIELDS = {
    "prompt",
    "system_prompt",
    "prompt_name",
    "rules",
    "facts",
    "hyperparameters",
    "curation",
    "teacher_endpoint",
    "synthesis",
}


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _ts(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when is not None else None


def endpoint(**handlers: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """One /v1 route answering the given methods: the key authenticated and
    held to its rate limits, the handler called with (request, key, *args)."""

    @api_view(None)
    def view(request: ApiRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        handler = handlers.get((request.method or "").lower())
        if handler is None:
            allowed = ", ".join(m.upper() for m in handlers)
            raise OpenAIError(
                405,
                f"{request.method} is not allowed on {request.path[:200]}; use {allowed}.",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )
        key = authenticate(request)
        try:
            lease = limits.acquire(key.pk, 0)
        except limits.RateLimited as exc:
            raise OpenAIError(
                429,
                exc.message,
                "rate_limit_error",
                code=exc.code,
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        try:
            return handler(request, key, *args, **kwargs)
        finally:
            lease.release()

    return view


def _limit(request: HttpRequest, default: int) -> int:
    raw = request.GET.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"limit must be a whole number from 1 to {MAX_LIST}, not {raw[:20]!r}.", "limit") from None
    if not 1 <= value <= MAX_LIST:
        raise _bad(f"limit must be from 1 to {MAX_LIST}, not {value}.", "limit")
    return value


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> JsonResponse:
    """A cursor page of `items` (in their order): those after the one with id `after`."""
    if after:
        at = next((i for i, item in enumerate(items) if item["id"] == after), None)
        if at is None:
            raise _bad(f"after: no item {after[:80]!r} in this list.", "after")
        items = items[at + 1 :]
    return JsonResponse({"object": "list", "data": items[:limit], "has_more": len(items) > limit})


# --- files ------------------------------------------------------------------------


def _version(key: ApiKey, file_id: str, param: str | None = None) -> DatasetVersion:
    """The key's project's dataset version a file id names; 404 (or, for a
    request field, 400) otherwise: another project's file is never found."""
    match = FILE_ID.fullmatch(file_id or "")
    version = (
        DatasetVersion.all_objects.select_related("dataset")
        .filter(pk=int(match.group(1)), dataset__project=key.project)
        .first()
        if match
        else None
    )
    if version is None:
        message = f"No such file: {str(file_id)[:80]!r} (GET /v1/files lists the files of the key's project)."
        if param is not None:
            raise _bad(message, param, "invalid_file")
        raise OpenAIError(404, message, code="file_not_found")
    return version


def _stored(version: DatasetVersion) -> Path | None:
    path = Path(settings.MEDIA_ROOT) / version.file if version.file else None
    return path if path is not None and path.is_file() else None


def file_object(version: DatasetVersion) -> dict[str, Any]:
    stored = _stored(version)
    ready = version.state == DatasetVersion.READY
    return {
        "id": f"file-{version.pk}",
        "object": "file",
        "bytes": stored.stat().st_size if stored else 0,
        "created_at": _ts(version.created_at),
        "filename": version.source_filename or f"{version}.jsonl",
        "purpose": "fine-tune" if version.kind == DatasetVersion.UPLOAD else "fine-tune-results",
        "status": "processed" if ready else "uploaded",
        "status_details": None,
        "expires_at": None,
        # The workbench's own words for it.
        "dataset": str(version),
        "rows": version.row_count if ready else None,
        "format": version.format or None,
    }


def _files_list(request: HttpRequest, key: ApiKey) -> HttpResponse:
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _bad("order must be asc or desc.", "order")
    purpose = request.GET.get("purpose")
    versions = DatasetVersion.all_objects.filter(dataset__project=key.project).select_related("dataset")
    objects = [file_object(v) for v in versions.order_by("pk" if order == "asc" else "-pk")]
    if purpose:
        objects = [o for o in objects if o["purpose"] == purpose]
    return _page(objects, request.GET.get("after"), _limit(request, MAX_LIST))


def _files_upload(request: HttpRequest, key: ApiKey) -> HttpResponse:
    if not (request.content_type or "").startswith("multipart/form-data"):
        raise _bad("Upload the file as multipart/form-data with the fields `purpose` and `file`.", "file")
    request.upload_handlers = [LimitedUploadHandler(request), DataDirUploadHandler(request, datasets_dir())]
    request.POST  # noqa: B018  (parse now, under the limit)
    problem = refused(request)
    if problem:
        raise OpenAIError(413, problem, code="file_too_large")
    unknown = sorted(set(request.POST) - {"purpose"} | set(request.FILES) - {"file"})
    if unknown:
        raise _bad(f"Unknown field(s): {', '.join(unknown)[:200]}; this server takes purpose and file.")
    purpose = request.POST.get("purpose")
    if purpose != "fine-tune":
        raise _bad(f"purpose must be 'fine-tune', not {str(purpose)[:40]!r}.", "purpose")
    upload = request.FILES.get("file")
    if upload is None:
        raise _bad("No file: send it as the multipart field `file`.", "file")
    path = upload.keep() if isinstance(upload, DataDirFile) else store_upload(upload)
    filename = Path(upload.name or "upload").name[:200] or "upload"
    try:
        # Every row trains: the API names its validation rows in a file of their own.
        version = stage_import(key.project, key.created_by, filename, path, filename=filename, eval_percent=0)
    except ActionError as exc:
        raise _bad(str(exc), "file") from None
    if (upload.size or 0) > settings.DATASET_SYNC_IMPORT_BYTES and queue_import(version, key.created_by):
        return JsonResponse(file_object(version))  # "uploaded" until the import job has stored every row
    try:
        version = run_import(version)
    except DatasetRejected as rejected:
        shown = "; ".join(str(e) for e in rejected.errors[:5])
        more = rejected.error_count - min(len(rejected.errors), 5)
        detail = f"{shown}{f' (and {more} more)' if more > 0 else ''}"
        message = (
            f"{filename}: {rejected.file_problem}; nothing was stored."
            if rejected.file_problem is not None
            else f"{filename}: {rejected.error_count} bad row(s), nothing was stored: {detail}"
        )
        raise _bad(message, "file", "invalid_file") from None
    return JsonResponse(file_object(version))


def _file_get(request: HttpRequest, key: ApiKey, file_id: str) -> HttpResponse:
    return JsonResponse(file_object(_version(key, file_id)))


def _file_delete(request: HttpRequest, key: ApiKey, file_id: str) -> HttpResponse:
    version = _version(key, file_id)
    if version.state != DatasetVersion.READY:
        raise OpenAIError(409, f"{file_id} is still being imported; delete it once it is processed.")
    stored = _stored(version)
    users = [f"ftjob-{j.pk}" if j.kind == "finetune" else f"{j}" for j in version.jobs.all()[:5]]
    try:
        with transaction.atomic():
            version.delete()
    except (ProtectedError, RestrictedError):
        uses = ", ".join(users) or "an eval suite or a variant"
        raise OpenAIError(409, f"{file_id} is in use ({uses}) and is kept.", code="file_in_use") from None
    if stored is not None:
        stored.unlink(missing_ok=True)
    return JsonResponse({"id": file_id, "object": "file", "deleted": True})


def _file_content(request: HttpRequest, key: ApiKey, file_id: str) -> HttpResponseBase:
    version = _version(key, file_id)
    stored = _stored(version)
    if stored is not None:
        return FileResponse(stored.open("rb"), content_type="application/octet-stream")

    def lines() -> Iterable[bytes]:  # a derived version (teacher answers): its rows as chat JSONL
        rows = version.rows.order_by("index").values_list("messages", flat=True)
        for messages in rows.iterator(chunk_size=2000):
            yield json.dumps({"messages": messages}, ensure_ascii=False).encode() + b"\n"

    return StreamingHttpResponse(lines(), content_type="application/jsonl")


files = endpoint(get=_files_list, post=_files_upload)
file_detail = endpoint(get=_file_get, delete=_file_delete)
file_content = endpoint(get=_file_content)


# --- fine-tuning jobs -------------------------------------------------------------


def _job(key: ApiKey, job_id: str) -> Job:
    match = ft_models.JOB_ID.fullmatch(job_id or "")
    job = (
        Job.objects.select_related("project", "base_model", "variant", "depends_on")
        .filter(pk=int(match.group(1)), project=key.project, kind="finetune")
        .first()
        if match
        else None
    )
    if job is None:
        raise OpenAIError(
            404,
            f"No such fine-tuning job: {str(job_id)[:80]!r} (GET /v1/fine_tuning/jobs lists the key's project's).",
            code="fine_tuning_job_not_found",
        )
    return job


def _comparison(job: Job) -> ArmComparison | None:
    return _comparisons([job]).get(job.pk)


def _comparisons(jobs: list[Job]) -> dict[int, ArmComparison]:
    """The latest four-arm comparison of each job, in one query for a whole page of jobs."""
    out: dict[int, ArmComparison] = {}
    for c in ArmComparison.objects.select_related("job").filter(absorb_job__in=jobs).order_by("pk"):
        if c.absorb_job_id is not None:
            out[c.absorb_job_id] = c  # ordered by pk: the latest wins
    return out


def _is_absorb(job: Job) -> bool:
    return job.prompt_version_id is not None


def _before(job: Job) -> list[Job]:
    """The jobs an absorb's fine-tune waits for, first first: its synthesis job (when
    it has one) and its teacher."""
    out: list[Job] = []
    step = job.depends_on
    while step is not None and len(out) < 2:
        out.insert(0, step)
        step = step.depends_on
    return out


def _status(job: Job, comparison: ArmComparison | None) -> str:
    before = _before(job)
    if job.cancel_requested and not job.is_terminal:
        return "cancelled"  # as OpenAI answers a cancel at once; the worker stops at its next step
    if job.status == Job.QUEUED:
        return (
            "running"
            if any(j.status == Job.RUNNING or j.status == Job.SUCCEEDED for j in before)
            else "queued"
        )
    if job.status == Job.RUNNING:
        return "running"
    if job.status == Job.FAILED:
        return "failed"
    if job.status == Job.CANCELLED:
        return "failed" if any(j.status == Job.FAILED for j in before) else "cancelled"
    if _is_absorb(job) and settings.AUTO_EVAL:
        if comparison is None:
            # The comparison is queued just after the fine-tune ends, and the log says so (or why not).
            return "succeeded" if "] eval: " in job.log else "running"
        if comparison.job is not None and not comparison.job.is_terminal:
            return "running"
        if comparison.job is not None and comparison.job.status == Job.CANCELLED:
            return "cancelled"
    return "succeeded"


def _error(job: Job, status: str) -> dict[str, Any] | None:
    if status != "failed":
        return None
    failed = [j.error for j in _before(job) if j.status == Job.FAILED and j.error]
    message = job.error or (failed[0] if failed else "") or "the job failed"
    return {"code": "job_failed", "message": message, "param": None}


def _hyperparameters(train: dict[str, Any]) -> dict[str, Any]:
    default_lr = TrainConfig().learning_rate
    lr = train.get("learning_rate")
    return {
        "n_epochs": train.get("epochs"),
        "batch_size": train.get("batch_size"),
        "learning_rate_multiplier": round(lr / default_lr, 6) if isinstance(lr, int | float) else None,
    }


def _eval(comparison: ArmComparison | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    h = comparison.headline or {}
    return {
        "status": comparison.job.status if comparison.job is not None else None,
        "suite": str(comparison.suite),
        "metric": h.get("metric"),
        "per_arm": h.get("absolute"),
        "retained": h.get("retained"),
        "fact_recall": {arm: (m or {}).get("value") for arm, m in (h.get("fact_recall") or {}).items()}
        or None,
        "url": comparison.get_absolute_url(),
    }


def job_object(job: Job, comparison: ArmComparison | None = None, looked_up: bool = False) -> dict[str, Any]:
    """The OpenAI job object; `looked_up` says `comparison` is already the job's (a listing
    fetches a page's comparisons at once)."""
    api = job.params.get("api") or {}
    train = job.params.get("train") or {}
    teacher = job.depends_on
    first = (_before(job) or [job])[0]  # the synthesis job or the teacher of an absorb
    if not looked_up:
        comparison = _comparison(job) if _is_absorb(job) else None
    status = _status(job, comparison)
    hyper = _hyperparameters(train)
    absorb = _is_absorb(job)
    data = first.dataset_version_id
    variant = job.variant
    started = first.created_at
    method: dict[str, Any] = (
        {"type": "absorb", "absorb": {"prompt": str(job.prompt_version), "hyperparameters": hyper}}
        if absorb
        else {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    )
    out: dict[str, Any] = {
        "id": f"ftjob-{job.pk}",
        "object": "fine_tuning.job",
        "created_at": _ts(started),
        "model": api.get("model") or (job.base_model.name if job.base_model else None),
        "fine_tuned_model": ft_models.model_name(job),
        "organization_id": job.project.slug,
        "status": status,
        "training_file": api.get("training_file") or (f"file-{data}" if data else None),
        "validation_file": api.get("validation_file"),
        "hyperparameters": hyper,
        "method": method,
        "result_files": [f"file-{teacher.output_dataset_id}"]
        if teacher is not None and teacher.output_dataset_id
        else [],
        "trained_tokens": (variant.metrics or {}).get("train_tokens") if variant is not None else None,
        "error": _error(job, status),
        "finished_at": _ts(job.finished_at) if status in ("succeeded", "failed", "cancelled") else None,
        "estimated_finish": None,
        "seed": train.get("seed"),
        "integrations": [],
        "metadata": api.get("metadata"),
        "user_provided_suffix": job.params.get("suffix") or None,
        "url": job.get_absolute_url(),
    }
    if absorb:
        out["eval"] = _eval(comparison)
    return out


def _checked_hyperparameters(value: Any, where: str) -> dict[str, Any]:
    """TrainConfig overrides from OpenAI's hyperparameters ("auto" keeps the default)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where} must be an object.", where)
    out: dict[str, Any] = {}
    for name, given in value.items():
        if given == "auto" or given is None:
            continue
        if name in HYPERPARAMETERS:
            field, low, high = HYPERPARAMETERS[name]
            if not isinstance(given, int) or isinstance(given, bool) or not low <= given <= high:
                raise _bad(
                    f"{where}.{name} must be 'auto' or a whole number from {low} to {high}.",
                    f"{where}.{name}",
                )
            out[field] = given
        elif name == "learning_rate_multiplier":
            if (
                not isinstance(given, int | float)
                or isinstance(given, bool)
                or not 0 < given <= MAX_LR_MULTIPLIER
            ):
                raise _bad(
                    f"{where}.{name} must be 'auto' or a number above 0 and at most {MAX_LR_MULTIPLIER:g}.",
                    f"{where}.{name}",
                )
            out["learning_rate"] = TrainConfig().learning_rate * float(given)
        else:
            raise _bad(
                f"{where}.{name} is not supported: this server takes n_epochs, batch_size and "
                "learning_rate_multiplier.",
                f"{where}.{name}",
            )
    return out


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise _bad(
            f"metadata must be an object of at most {MAX_METADATA} string pairs (keys up to 64 "
            "characters, values up to 512).",
            "metadata",
        )
    return value


def _start_model(key: ApiKey, name: Any) -> tuple[FoundationModel, Variant | None]:
    """The base to fine-tune and the adapter to continue from: a registered
    base model by name, or a model of the key's project (alias, variant, ft: name)."""
    if not isinstance(name, str) or not name.strip():
        raise _bad(
            "model is required: a base model's name or a model of this project (GET /v1/models).", "model"
        )
    base = FoundationModel.objects.filter(name=name).first()
    if base is not None:
        return base, None
    try:
        _alias, variant = resolve_model(key, name)
    except OpenAIError:
        names = ", ".join(FoundationModel.objects.order_by("name").values_list("name", flat=True)[:10])
        raise _bad(
            f"The model {name[:200]!r} is neither a base model ({names or 'none registered'}) nor a model "
            "of this key's project.",
            "model",
            "model_not_found",
        ) from None
    if variant.prepend_prompt:
        raise _bad(
            f"{name[:200]} serves its base with a system prompt; fine-tune {variant.base_model.name} "
            "instead, with the prompt in the rows (or absorb it with method absorb).",
            "model",
        )
    return variant.base_model, variant if variant.adapter_path else None


def _ready(key: ApiKey, file_id: Any, param: str) -> DatasetVersion:
    if not isinstance(file_id, str):
        raise _bad(f"{param} must be a file id (file-...).", param)
    version = _version(key, file_id, param)
    if version.state != DatasetVersion.READY:
        raise _bad(
            f"{file_id} is still being processed; try again once GET /v1/files/{file_id} says processed.",
            param,
            "file_not_ready",
        )
    return version


def _train_config(overrides: dict[str, Any], seed: Any) -> dict[str, Any]:
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad("seed must be a whole number.", "seed")
        overrides = {**overrides, "seed": seed}
    try:
        return TrainConfig.from_dict(overrides).to_dict()
    except ConfigError as exc:
        raise _bad(f"Training settings: {exc}", "hyperparameters") from None


def _jobs_create(request: ApiRequest, key: ApiKey) -> HttpResponse:
    body = parse_body(request)
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        raise _bad(f"Unknown field(s): {', '.join(unknown)[:200]}.", unknown[0])
    if body.get("integrations"):
        raise _bad(
            "integrations are not supported by this server; the job page shows its curves.", "integrations"
        )
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise _bad("suffix: 1 to 64 letters, digits, dots, dashes or underscores.", "suffix")
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "absorb"):
        kind = method.get("type") if isinstance(method, dict) else method
        raise _bad(
            f"method.type {str(kind)[:40]!r} is not supported: use 'supervised' or 'absorb'.", "method.type"
        )
    kind = method["type"]
    extra = set(method) - {"type", kind}
    if extra:
        raise _bad(f"Unknown field(s) in method: {', '.join(sorted(extra))[:200]}.", "method")
    spec = method.get(kind) or {}
    if not isinstance(spec, dict):
        raise _bad(f"method.{kind} must be an object.", f"method.{kind}")
    hyper = _checked_hyperparameters(body.get("hyperparameters"), "hyperparameters")
    hyper.update(_checked_hyperparameters(spec.get("hyperparameters"), f"method.{kind}.hyperparameters"))
    train = _train_config(hyper, body.get("seed"))
    training = _ready(key, body.get("training_file"), "training_file")
    validation = (
        _ready(key, body["validation_file"], "validation_file")
        if body.get("validation_file") is not None
        else None
    )
    base, start = _start_model(key, body.get("model"))
    api = {
        "model": body["model"],
        "training_file": body["training_file"],
        "validation_file": body.get("validation_file"),
        "metadata": _metadata(body.get("metadata")),
    }
    try:
        with transaction.atomic():
            if kind == "supervised":
                if set(spec) - {"hyperparameters"}:
                    raise _bad("method.supervised takes only hyperparameters.", "method.supervised")
                job = start_supervised(
                    key.project,
                    key.created_by,
                    training,
                    base,
                    train,
                    validation_version=validation,
                    init_variant=start,
                    params={"api": api, "suffix": suffix or ""},
                )
            else:
                if start is not None:
                    raise _bad("An absorb starts from a base model, not from a fine-tuned one.", "model")
                job = _start_absorb(key, spec, training, validation, base, train)
                job.params = {**job.params, "api": api, "suffix": suffix or "", "epoch_checkpoints": True}
                job.save(update_fields=["params"])
    except ActionError as exc:
        raise _bad(str(exc)) from None
    job.refresh_from_db()
    return JsonResponse(job_object(job))


def _start_absorb(
    key: ApiKey,
    spec: dict[str, Any],
    training: DatasetVersion,
    validation: DatasetVersion | None,
    base: FoundationModel,
    train: dict[str, Any],
) -> Job:
    unknown = sorted(set(spec) - ABSORB_FIELDS)
    if unknown:
        raise _bad(f"Unknown field(s) in method.absorb: {', '.join(unknown)[:200]}.", "method.absorb")
    prompt = _absorbed_prompt(key, spec)
    data = with_held_out(training, validation, key.created_by) if validation is not None else training
    if not data.rows.filter(split=DatasetRow.EVAL).exists():
        raise _bad(
            "An absorb compares the student with its teacher on held-out queries: pass them as validation_file.",
            "validation_file",
        )
    endpoint_name = spec.get("teacher_endpoint")
    teacher_endpoint = None
    if endpoint_name is not None:
        teacher_endpoint = TeacherEndpoint.objects.filter(project=key.project, name=endpoint_name).first()
        if teacher_endpoint is None:
            raise _bad(
                f"No teacher endpoint named {str(endpoint_name)[:100]!r} in this project.",
                "method.absorb.teacher_endpoint",
            )
    curation = spec.get("curation", True)
    if not isinstance(curation, bool | dict):
        raise _bad(
            "method.absorb.curation must be true, false or an object of settings.", "method.absorb.curation"
        )
    synthesis = spec.get("synthesis", True)
    if not isinstance(synthesis, bool | int | dict):
        raise _bad(
            "method.absorb.synthesis must be true, false, a number of questions or an object "
            '({"count": N, ...settings}).',
            "method.absorb.synthesis",
        )
    _teacher, finetune = start_absorb(
        key.project,
        key.created_by,
        prompt,
        data,
        base,
        training=train,
        curation=curation,
        teacher_endpoint=teacher_endpoint,
        synthesis=synthesis,
    )
    assert finetune is not None  # no review step: the fine-tune waits for the teacher
    return finetune


def _absorbed_prompt(key: ApiKey, spec: dict[str, Any]) -> PromptVersion:
    """The prompt version an absorb names (NAME or NAME@N), or a new version of
    a prompt from the system prompt, rules and facts given inline."""
    named, text = spec.get("prompt"), spec.get("system_prompt")
    if (named is None) == (text is None):
        raise _bad(
            "method.absorb needs either prompt (a prompt of this project, NAME or NAME@N) or "
            "system_prompt (with rules and facts inline).",
            "method.absorb",
        )
    if named is not None:
        if not isinstance(named, str):
            raise _bad("method.absorb.prompt must be a string: NAME or NAME@N.", "method.absorb.prompt")
        if spec.get("rules") is not None or spec.get("facts") is not None:
            raise _bad(
                "rules and facts come with a system_prompt; a named prompt has its own.", "method.absorb"
            )
        return find_prompt_version(key.project, named)
    if not isinstance(text, str) or not text.strip():
        raise _bad("method.absorb.system_prompt must be the prompt's text.", "method.absorb.system_prompt")
    name = spec.get("prompt_name") or "api-prompt"
    if not isinstance(name, str):
        raise _bad("method.absorb.prompt_name must be a string.", "method.absorb.prompt_name")
    saved = save_prompt(
        key.project,
        key.created_by,
        name,
        text,
        rules_data=spec.get("rules") or [],
        facts_data=spec.get("facts") or [],
        note="from the fine-tuning API",
    )
    return saved.version


def _metadata_filter(request: HttpRequest) -> dict[str, str]:
    return {
        k[len("metadata[") : -1]: request.GET[k]
        for k in request.GET
        if k.startswith("metadata[") and k.endswith("]")
    }


def _jobs_list(request: HttpRequest, key: ApiKey) -> HttpResponse:
    wanted = _metadata_filter(request)
    jobs = Job.objects.filter(project=key.project, kind="finetune").select_related(
        "project", "base_model", "variant", "depends_on", "prompt_version__prompt"
    )
    after = request.GET.get("after")
    if after:
        jobs = jobs.filter(pk__lt=_job(key, after).pk)
    limit = _limit(request, 20)
    picked: list[Job] = []
    for job in jobs.order_by("-pk").iterator(chunk_size=200):
        metadata = (job.params.get("api") or {}).get("metadata") or {}
        if all(metadata.get(k) == v for k, v in wanted.items()):
            picked.append(job)
            if len(picked) > limit:
                break
    page = picked[:limit]
    comparisons = _comparisons([j for j in page if _is_absorb(j)])
    out = [job_object(j, comparisons.get(j.pk), looked_up=True) for j in page]
    return JsonResponse({"object": "list", "data": out, "has_more": len(picked) > limit})


def _job_get(request: HttpRequest, key: ApiKey, job_id: str) -> HttpResponse:
    return JsonResponse(job_object(_job(key, job_id)))


def _job_cancel(request: HttpRequest, key: ApiKey, job_id: str) -> HttpResponse:
    job = _job(key, job_id)
    comparison = _comparison(job) if _is_absorb(job) else None
    status = _status(job, comparison)
    if status in ("succeeded", "failed"):
        raise _bad(f"{job_id} has already {status}: there is nothing to cancel.", code="job_ended")
    if job.status != Job.SUCCEEDED:
        comparison = None
    for target in (*_before(job), job, comparison.job if comparison else None):
        if target is not None and not target.is_terminal:
            target.request_cancel()  # a teacher's cancel cancels the fine-tune waiting for it
            break
    job.refresh_from_db()
    return JsonResponse(job_object(job))


def _log_events(job: Job) -> list[tuple[datetime, str, str]]:
    """(time, id, message) of each line of the job's log. A line stamped with
    the time of day only (an older log) takes its day from the job's start,
    rolling over at midnight."""
    day = job.created_at
    previous = None
    out = []
    for n, line in enumerate(job.log.splitlines()):
        m = LOG_LINE.fullmatch(line)
        if m is None:
            continue
        y, mo, d, h, mi, s = m.groups()[:6]
        if y is not None:
            when = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=day.tzinfo)
        else:
            when = day.replace(hour=int(h), minute=int(mi), second=int(s), microsecond=0)
        if y is None and previous is not None and when < previous - timedelta(hours=1):
            day, when = day + timedelta(days=1), when + timedelta(days=1)
        previous = when
        out.append((when, f"ftevent-{job.pk}-{n}", m.group(7)))
    return out


def _events(job: Job) -> list[dict[str, Any]]:
    """Every stage's log lines and the training curve, newest first."""
    comparison = _comparison(job) if job.status == Job.SUCCEEDED else None
    stages = [j for j in (*_before(job), job, comparison.job if comparison else None) if j is not None]
    rows: list[tuple[datetime, int, dict[str, Any]]] = []
    for order, stage in enumerate(stages):
        for when, event_id, message in _log_events(stage):
            level = (
                "error"
                if message.startswith("FAILED")
                else "warn"
                if message.startswith("warning")
                else "info"
            )
            rows.append(
                (
                    when,
                    order,
                    {
                        "id": event_id,
                        "object": "fine_tuning.job.event",
                        "created_at": _ts(when),
                        "level": level,
                        "message": f"{stage.label}: {message}",
                        "type": "message",
                        "data": {"stage": stage.kind, "job": stage.pk},
                    },
                )
            )
    for point in JobPoint.objects.filter(job=job).order_by("seq"):
        data = {"step": point.data.get("step"), "train_loss": point.data.get("loss")}
        if point.data.get("valid_loss") is not None:
            data["valid_loss"] = point.data["valid_loss"]
        rows.append(
            (
                point.created_at,
                1,
                {
                    "id": f"ftevent-{job.pk}-p{point.seq}",
                    "object": "fine_tuning.job.event",
                    "created_at": _ts(point.created_at),
                    "level": "info",
                    "message": f"Step {data['step']}: training loss={data['train_loss']}",
                    "type": "metrics",
                    "data": data,
                },
            )
        )
    rows.sort(key=lambda r: (r[0], r[1]))
    return [event for _when, _order, event in reversed(rows)]


def _job_events(request: HttpRequest, key: ApiKey, job_id: str) -> HttpResponse:
    job = _job(key, job_id)
    return _page(_events(job), request.GET.get("after"), _limit(request, 20))


def _job_checkpoints(request: HttpRequest, key: ApiKey, job_id: str) -> HttpResponse:
    job = _job(key, job_id)
    out = []
    for c in reversed(ft_models.checkpoints(job)):
        metrics = {"step": c["step"], "train_loss": c.get("train_loss")}
        if c.get("valid_loss") is not None:
            metrics["valid_loss"] = c["valid_loss"]
        out.append(
            {
                "id": f"ftckpt-{job.pk}-{c['step']}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": _ts(job.finished_at),
                "fine_tuned_model_checkpoint": c["model"],
                "fine_tuning_job_id": f"ftjob-{job.pk}",
                "metrics": metrics,
                "step_number": c["step"],
            }
        )
    return _page(out, request.GET.get("after"), _limit(request, 10))


jobs = endpoint(get=_jobs_list, post=_jobs_create)
job_detail = endpoint(get=_job_get)
job_cancel = endpoint(post=_job_cancel)
job_events = endpoint(get=_job_events)
job_checkpoints = endpoint(get=_job_checkpoints)
