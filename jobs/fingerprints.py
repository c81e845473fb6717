"""What a synthesis, teacher or fine-tune job computes from, as one hash kept in its
params ("fingerprint"): two jobs with the same fingerprint make the same
thing, so a declarative apply (serving.pipeline) finds a finished step with
one query instead of running it again.

Every input is content, never a row id: the prompt's text hash, rules and
facts; the hash of the train rows the teacher answers; who teaches; the
generation, curation and training settings as their dataclasses spell them
(defaults included, so leaving a setting out and writing its default agree).
A plan computes the same values from the files of a spec before anything is
stored."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import transaction

from jobs.models import Job, TeacherEndpoint
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, PromptVersion

KEY = "fingerprint"  # the Job.params key


def _plain(value: Any) -> Any:
    """JSON-ready, with 1.0 and 1 alike (a setting typed either way is the same setting)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def digest(value: Any) -> str:
    """The SHA-256 of a value's canonical JSON."""
    text = json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rows_digest(row_shas: Iterable[str]) -> str:
    """One hash of rows in order (each DatasetRow.sha256)."""
    h = hashlib.sha256()
    for sha in row_shas:
        h.update(sha.encode("ascii") + b"\n")
    return h.hexdigest()


def split_digest(version: DatasetVersion, split: str) -> str:
    """The hash of a version's rows in one split, in order."""
    shas = version.rows.filter(split=split).order_by("index").values_list("sha256", flat=True)
    return rows_digest(shas.iterator(chunk_size=5000))


def train_digest(version: DatasetVersion) -> str:
    return split_digest(version, DatasetRow.TRAIN)


def eval_digest(version: DatasetVersion) -> str:
    return split_digest(version, DatasetRow.EVAL)


def prompt_identity(sha256: str, rules: list[Any], facts: list[Any]) -> dict[str, Any]:
    return {"sha256": sha256, "rules": rules, "facts": facts}


def version_identity(version: PromptVersion) -> dict[str, Any]:
    return prompt_identity(version.sha256, version.rules or [], version.facts or [])


def model_identity(model: FoundationModel) -> str:
    return f"model:{model.name}|{model.path}"


def teacher_identity(model: FoundationModel, endpoint: TeacherEndpoint | None = None) -> str:
    """Who answers: an endpoint (its URL and model) or a registered model."""
    return endpoint.identity if endpoint is not None else model_identity(model)


def teacher_fingerprint(
    prompt: Mapping[str, Any],
    train_rows: str,  # queries_identity
    teacher: str,
    generation: Mapping[str, Any],
    curation: Mapping[str, Any] | None,
    keep_existing: bool,
) -> str:
    return digest(
        {
            "step": "teacher",
            "prompt": prompt,
            "train_rows": train_rows,
            "teacher": teacher,
            "generation": generation,
            "curation": curation,
            "keep_existing": keep_existing,
        }
    )


def synthesis_fingerprint(
    prompt: Mapping[str, Any],
    train_rows: str,
    eval_rows: str,
    teacher: str,
    count: int,
    settings: Mapping[str, Any],
) -> str:
    """The held-out rows count: synthesis drops questions close to any real query."""
    return digest(
        {
            "step": "synthesis",
            "prompt": prompt,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "teacher": teacher,
            "count": count,
            "settings": settings,
        }
    )


def queries_identity(version: DatasetVersion) -> str:
    """What a teacher on `version` answers: the synthesis job's fingerprint
    when the version is that job's output as it made it (so a plan names
    it before the questions exist), else the hash of its train rows."""
    return synthesis_identity(version) or train_digest(version)


def synthesis_identity(version: DatasetVersion) -> str | None:
    job = synthesis_of(version)
    return f"synthesis:{job.params[KEY]}" if job is not None else None


def synthesis_of(version: DatasetVersion) -> Job | None:
    """The fingerprinted synthesis job whose output `version` is, as it stored it."""
    job = (
        Job.objects.filter(output_dataset=version, kind="synthesize")
        .select_related("dataset_version")
        .first()
    )
    if job is None or not isinstance(job.params, dict) or not job.params.get(KEY):
        return None
    return job


def finetune_fingerprint(
    data: str,
    prompt: Mapping[str, Any] | None,
    base: str,
    train: Mapping[str, Any],
    passing_only: bool,
    kl_teacher: str | None = None,
) -> str:
    """`data` is "teacher:<its fingerprint>" for a teacher's own answers, else
    "rows:<train_digest>"; `kl_teacher` counts only when KL is on."""
    return digest(
        {
            "step": "finetune",
            "data": data,
            "prompt": prompt,
            "base": base,
            "train": train,
            "passing_only": passing_only,
            "kl_teacher": kl_teacher if float(train.get("kl_weight") or 0) > 0 else None,
        }
    )


def data_identity(version: DatasetVersion) -> str:
    """What a fine-tune on `version` learns from: the teacher job's
    fingerprint when the version is that job's answers as it made them,
    else the hash of its train rows."""
    if version.kind == DatasetVersion.TEACHER:
        made_by = (
            Job.objects.filter(output_dataset=version, kind="teacher")
            .values_list("params", flat=True)
            .first()
        )
        if isinstance(made_by, dict) and made_by.get(KEY):
            return f"teacher:{made_by[KEY]}"
    return f"rows:{train_digest(version)}"


def find(project_id: int, kind: str, fingerprint: str) -> Job | None:
    """The job of the project that makes this: the latest that succeeded, else one
    still queued or running (a step an interrupted apply left behind)."""
    jobs = Job.objects.filter(project_id=project_id, kind=kind, **{f"params__{KEY}": fingerprint})
    done = jobs.filter(status=Job.SUCCEEDED).order_by("-finished_at", "-pk").first()
    return done or jobs.filter(status__in=Job.ACTIVE).order_by("-pk").first()


def stamp(job: Job, fingerprint: str) -> None:
    """Record a fingerprint on a job made elsewhere (the four-arm comparison
    a fine-tune starts by itself), so the next lookup is one query."""
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.params.get(KEY) != fingerprint:
            locked.params = {**locked.params, KEY: fingerprint}
            locked.save(update_fields=["params"])
    job.params = {**job.params, KEY: fingerprint}
