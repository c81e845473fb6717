"""Download a variant: its LoRA adapter (safetensors, adapter config and a
README with its lineage and eval results) or a merged model (the adapter
folded into the base weights, tokenizer with the chat template, and a
generation config whose EOS includes the template's end-of-turn token), each
as a zip.

The adapter zip is small: written to a temporary file per request and
unlinked as soon as it is open. The merged model is not made in a request
(a 7B merge takes tens of GB and minutes): a `merge` job (serving.runners)
writes it once per variant into the data directory, in the checkpoint's
dtype, under a temporary name renamed when complete; the download serves
that file, and until it exists answers 202 with the job that prepares it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotFound,
    JsonResponse,
)
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from evals.models import ArmComparison, EvalRun
from jobs.models import Job
from serving.actions import latest_merge, start_merge
from workbench.models import Variant
from workbench.shortcuts import AuthedHttpRequest, get_for_project

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class ExportError(Exception):
    """The variant cannot be exported this way; the message says why."""


def adapter_dir(variant: Variant) -> Path:
    """The variant's adapter directory, checked: ExportError for a base (or
    prompted) variant without an adapter, or when its files are missing."""
    if not variant.adapter_path:
        raise ExportError(
            f"{variant.name} has no adapter: it is {variant.base_model.name}"
            f"{' with a prompt' if variant.prepend_prompt else ''}, nothing to export."
        )
    path = Path(variant.adapter_path)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise ExportError(f"the adapter files of {variant.name} are missing in {path}: {', '.join(missing)}")
    return path


# --- README -------------------------------------------------------------------


def _estimate(value: Any) -> str:
    if not isinstance(value, dict) or value.get("value") is None:
        return "n/a"
    text = f"{value['value']:.3f}"
    if value.get("low") is not None and value.get("high") is not None:
        text += f" (95% CI {value['low']:.3f} to {value['high']:.3f})"
    if value.get("n") is not None:
        text += f", n={value['n']}"
    return text


def _eval_lines(variant: Variant) -> list[str]:
    lines: list[str] = []
    comparisons = (
        ArmComparison.objects.filter(variant=variant).select_related("suite").order_by("-created_at")
    )
    for comparison in comparisons:
        headline = comparison.headline or {}
        if not headline:
            continue
        lines.append(
            f'### Four-arm comparison on suite "{comparison.suite.name}" ({comparison.created_at:%Y-%m-%d})'
        )
        lines.append(f"- Main metric: {headline.get('metric', comparison.suite.main_metric)}")
        if "retained" in headline:
            lines.append(f"- Prompt effect retained without the prompt: {_estimate(headline['retained'])}")
        for arm, value in (headline.get("absolute") or {}).items():
            lines.append(f"- {arm}: {value:.3f}" if isinstance(value, (int, float)) else f"- {arm}: n/a")
        if "tokens_saved_per_1000" in headline:
            lines.append(f"- Prompt tokens saved per 1,000 requests: {headline['tokens_saved_per_1000']:,}")
        for task, value in (headline.get("lm_eval") or {}).items():
            lines.append(f"- lm-eval {task}, student minus base: {_estimate(value)}")
        lines.append("")
    runs = (
        EvalRun.objects.filter(variant=variant, summary__complete=True)
        .select_related("suite", "prompt_version")
        .order_by("suite__name", "arm", "-created_at")
    )
    if runs:
        lines.append("### Eval runs")
        lines.append("| Suite | Run | Arm | Metric | Value |")
        lines.append("|---|---|---|---|---|")
        for run in runs:
            for name, value in sorted((run.summary.get("metrics") or {}).items()):
                lines.append(
                    f"| {run.suite.name} | {run.label} | {run.arm or '-'} | {name} | {_estimate(value)} |"
                )
        lines.append("")
    return lines or ["No finished eval runs of this variant.", ""]


def readme(variant: Variant, merged: bool = False) -> str:
    """Lineage and eval results of the variant, in Markdown (for the adapter
    zip, or with `merged` for the merged model's)."""
    base = variant.base_model
    prompt = variant.prompt_version
    lines = [
        f"# {variant.name}",
        "",
        f"{'The merged model of a LoRA adapter' if merged else 'A LoRA adapter'} for **{base.name}**, "
        "exported from the workbench project "
        f'"{variant.project.name}" on {timezone.now():%Y-%m-%d %H:%M} UTC.',
        "",
        "## Lineage",
        f"- Variant: {variant.name} (id {variant.pk}, created {variant.created_at:%Y-%m-%d %H:%M})",
        f"- Base model: {base.name}" + (f" (source: {base.source})" if base.source else ""),
        f"- Absorbed prompt: {prompt} (sha256 {variant.prompt_sha256 or prompt.sha256})"
        if prompt
        else "- Absorbed prompt: none",
        f"- Served {'with' if variant.prepend_prompt else 'without'} the prompt as system prompt",
        *(
            [
                f"- Reads the absorbed prompt's {variant.student_passages} sentences most relevant to each "
                "question (BM25), added after the last user message as `(Information for your answer: ...)`: "
                "the workbench adds them when it serves this adapter; another server must too"
            ]
            if variant.student_passages
            else []
        ),
        f"- Training data: {variant.dataset_version}"
        if variant.dataset_version
        else "- Training data: not recorded",
        f"- Final training loss: {variant.final_loss:.4f}"
        if variant.final_loss is not None
        else "- Final training loss: not recorded",
    ]
    if variant.duration_seconds is not None:
        lines.append(f"- Training time: {variant.duration_seconds:.0f} s")
    lines += [
        "",
        "### Hyperparameters",
        "```json",
        json.dumps(variant.hyperparameters, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    if variant.metrics:
        lines += [
            "### Training metrics",
            "```json",
            json.dumps(variant.metrics, indent=2, sort_keys=True, default=str),
            "```",
            "",
        ]
    lines += ["## Eval results", "", *_eval_lines(variant)]
    load = (
        ['model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")']
        if merged
        else [
            f'base = AutoModelForCausalLM.from_pretrained("{base.name}")',
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
        ]
    )
    lines += [
        "## Use",
        "```python",
        *([] if merged else ["from peft import PeftModel"]),
        "from transformers import AutoModelForCausalLM",
        *load,
        "```",
        "Render conversations with the base model's own chat template"
        + (
            " and the absorbed prompt as the system message."
            if variant.prepend_prompt
            else " and no system prompt: the prompt is absorbed."
        ),
        "",
    ]
    return "\n".join(lines)


# --- zips ---------------------------------------------------------------------


def _write_zip(dest: Path, files: Iterable[tuple[str, Path]], texts: Iterable[tuple[str, str]] = ()) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for arcname, path in files:
            # Weights do not compress; text does.
            compress = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            zf.write(path, arcname, compress_type=compress)
        for arcname, text in texts:
            zf.writestr(arcname, text, compress_type=zipfile.ZIP_DEFLATED)
    return dest


def export_name(variant: Variant) -> str:
    return slugify(f"{variant.project.slug}-{variant.name}-{variant.pk}") or f"variant-{variant.pk}"


def write_adapter_zip(variant: Variant, dest: Path) -> Path:
    """adapter_model.safetensors, adapter_config.json and README.md under one folder."""
    source = adapter_dir(variant)
    folder = export_name(variant)
    return _write_zip(
        dest,
        [(f"{folder}/{name}", source / name) for name in ADAPTER_FILES],
        [(f"{folder}/README.md", readme(variant))],
    )


DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weights_dtype(model_dir: Path) -> str | None:
    """The dtype of the first floating tensor in the first safetensors file
    (read from its JSON header: no weights are loaded)."""
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if (
                name != "__metadata__"
                and isinstance(entry, dict)
                and entry.get("dtype") in SAFETENSORS_DTYPES
            ):
                return SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def checkpoint_dtype(model_dir: Path) -> str:
    """The base checkpoint's dtype: its config's (torch_)dtype, else its
    weights', else float32."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    if dtype in DTYPES:
        return str(dtype)
    return _weights_dtype(model_dir) or "float32"


def save_merged(variant: Variant, out_dir: Path) -> Path:
    """The adapter merged into the base weights in the base checkpoint's
    dtype (a bf16 7B needs ~15 GB, not the ~28 GB of float32), the tokenizer
    with its chat template, and a generation config whose eos_token_id lists
    every stop token the engines use."""
    import torch

    from engines.inference import load_model

    source = adapter_dir(variant)
    base_dir = Path(variant.base_model.path)
    loaded = load_model(
        base_dir, source, device="cpu", dtype=getattr(torch, checkpoint_dtype(base_dir)), merge=True
    )
    model = loaded.model
    out_dir.mkdir(parents=True, exist_ok=True)
    # load_model gave it a generation config with only bos/pad and eos = the stop tokens
    # (the template's end-of-turn included): what a plain `generate` needs to stop.
    model.generation_config.eos_token_id = list(loaded.stop_token_ids)
    model.save_pretrained(str(out_dir))
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"  # the library default; left padding was for batched generation here
    tokenizer.save_pretrained(str(out_dir))
    if not tokenizer.chat_template:
        raise ExportError(f"the tokenizer of {variant.base_model.name} has no chat template to export")
    (out_dir / "README.md").write_text(readme(variant, merged=True))
    return out_dir


def write_merged_zip(variant: Variant, dest: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="wb-merge-", dir=_tmp_dir()) as tmp:
        merged = save_merged(variant, Path(tmp) / "merged")
        folder = export_name(variant) + "-merged"
        files = [(f"{folder}/{p.relative_to(merged)}", p) for p in sorted(merged.rglob("*")) if p.is_file()]
        return _write_zip(dest, files)


# --- the merged model's cache -------------------------------------------------


def merged_cache_path(variant: Variant) -> Path:
    # Named by what the merge depends on, not the id alone: SQLite may give a deleted
    # variant's id to a new one.
    key = f"{variant.pk}|{variant.created_at.isoformat()}|{variant.base_model.path}|{variant.adapter_path}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(settings.DATA_DIR) / "exports" / f"variant-{variant.pk}" / f"merged-{digest}.zip"


def cached_merged_zip(variant: Variant) -> Path | None:
    """The finished merged zip of the variant, or None (never made, or its
    adapter is newer than it)."""
    path = merged_cache_path(variant)
    try:
        made = path.stat().st_mtime
    except OSError:
        return None
    try:
        if (Path(variant.adapter_path) / "adapter_model.safetensors").stat().st_mtime > made:
            return None
    except OSError:
        pass  # the adapter is gone: the zip is all that is left of it
    return path


def build_merged_zip(variant: Variant) -> Path:
    """Merge and zip into the cache: written under a temporary name in the
    same folder and renamed when complete, so a download never sees half a
    zip, and a crash leaves only a temporary file behind."""
    dest = merged_cache_path(variant)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".merging-", suffix=".zip.partial", dir=dest.parent)
    os.close(fd)
    try:
        write_merged_zip(variant, Path(name))
        os.replace(name, dest)
    finally:
        Path(name).unlink(missing_ok=True)
    for old in dest.parent.glob("merged-*.zip"):  # an earlier variant of the same id
        if old != dest:
            old.unlink(missing_ok=True)
    return dest


# --- views --------------------------------------------------------------------


def _tmp_dir() -> Path:
    # Next to the data, not /tmp: a merged model can be larger than a tmpfs.
    path = Path(settings.DATA_DIR) / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _send_zip(variant: Variant, suffix: str, write: Any) -> HttpResponseBase:
    fd, name = tempfile.mkstemp(prefix="wb-export-", suffix=".zip", dir=_tmp_dir())
    os.close(fd)
    path = Path(name)
    try:
        write(variant, path)
        handle = path.open("rb")
    except ExportError as exc:
        return HttpResponseNotFound(str(exc), content_type="text/plain; charset=utf-8")
    finally:
        # An open file stays readable after unlink: nothing is left on disk after the download.
        path.unlink(missing_ok=True)
    return FileResponse(
        handle,
        as_attachment=True,
        filename=f"{export_name(variant)}{suffix}.zip",
        content_type="application/zip",
    )


def _variant(request: HttpRequest, slug: str, variant_id: int) -> Variant:
    return get_for_project(
        request,
        slug,
        Variant.objects.select_related(
            "base_model", "project", "prompt_version__prompt", "dataset_version__dataset"
        ),
        pk=variant_id,
    )


@login_required
def export_adapter(request: AuthedHttpRequest, slug: str, variant_id: int) -> HttpResponseBase:
    return _send_zip(_variant(request, slug, variant_id), "-adapter", write_adapter_zip)


def _wants_html(request: HttpRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _preparing(request: HttpRequest, variant: Variant, job: Job) -> HttpResponse:
    """202 while the merge job runs (a page that reloads itself for a
    browser, JSON for a client); 409 when the last merge failed."""
    failed = job.status in (Job.FAILED, Job.CANCELLED)
    url = request.build_absolute_uri(
        reverse("variant_export_merged", args=[variant.project.slug, variant.pk])
    )
    retry_url = f"{url}?retry=1"
    status = 409 if failed else 202
    message = (
        f"Preparing the merged model failed ({job.status}): {job.error or 'see the job'}. "
        "Ask again with ?retry=1 to start a new merge."
        if failed
        else f"The merged model of {variant.name} is being prepared by {job} ({job.status}); "
        "ask again in a moment to download it."
    )
    if _wants_html(request):
        response = render(
            request,
            "serving/merge_preparing.html",
            {
                "project": variant.project,
                "variant": variant,
                "job": job,
                "failed": failed,
                "message": message,
                "retry_url": retry_url,
            },
            status=status,
        )
    else:
        response = JsonResponse(
            {
                "status": "failed" if failed else "preparing",
                "message": message,
                "job": job.pk,
                "job_status": job.status,
                "job_url": request.build_absolute_uri(job.get_absolute_url()),
                "status_url": request.build_absolute_uri(
                    reverse("job_status", args=[variant.project.slug, job.pk])
                ),
                "download_url": retry_url if failed else url,
            },
            status=status,
        )
    if not failed:
        response["Retry-After"] = "10"
    response["Cache-Control"] = "no-store"
    return response


@login_required
def export_merged(request: AuthedHttpRequest, slug: str, variant_id: int) -> HttpResponseBase:
    """The cached merged zip; without one, start (or show) the merge job
    that makes it and answer at once."""
    variant = _variant(request, slug, variant_id)
    try:
        adapter_dir(variant)
    except ExportError as exc:
        return HttpResponseNotFound(str(exc), content_type="text/plain; charset=utf-8")
    cached = cached_merged_zip(variant)
    if cached is not None:
        try:
            handle = cached.open("rb")
        except OSError:
            cached = None  # removed since the check: prepare it again
        else:
            return FileResponse(
                handle,
                as_attachment=True,
                filename=f"{export_name(variant)}-merged.zip",
                content_type="application/zip",
            )
    last = latest_merge(variant)
    if last is not None and last.status in (Job.FAILED, Job.CANCELLED) and "retry" not in request.GET:
        return _preparing(request, variant, last)  # no new merge on every reload of a failure
    return _preparing(request, variant, start_merge(request.user, variant))
