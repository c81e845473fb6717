"""The spec that reproduces a finished absorb: applied again, every step is
found by its fingerprint and reused. Settings are written where they differ
from the defaults (the defaults fill in the same values again). The prompt
and the data are referenced by version, or with `folder` written beside the
spec as files (the train split and the held-out rows as two files, so any
version, uploaded, derived or combined, comes back with the same rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from engines.curation import ABSORB_COUNT, CurationSettings, SynthesisSettings
from engines.training import TrainConfig
from evals.actions import comparison_generation, eval_source
from evals.models import ArmComparison
from jobs import fingerprints
from jobs.actions import teacher_generation
from jobs.models import Job
from serving.models import Alias
from serving.pipeline.lookups import GATE_FIELDS, PlanError
from workbench.models import DatasetRow, DatasetVersion, Project, Variant


def _minimal(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in values.items()
        if k not in defaults or fingerprints.digest(v) != fingerprints.digest(defaults[k])
    }


def absorb_of(project: Project, variant: Variant | None = None, job: Job | None = None) -> Job:
    """The fine-tune job that made a variant (or the one a job id names:
    the fine-tune itself, or the teacher whose answers it learned from)."""
    if job is not None and job.kind == "teacher":
        job = (
            Job.objects.filter(project=project, kind="finetune", status=Job.SUCCEEDED)
            .filter(dataset_version=job.output_dataset_id)
            .order_by("-finished_at")
            .first()
        ) or job
    if job is None and variant is not None:
        job = Job.objects.filter(project=project, kind="finetune", variant=variant).first()
    if job is None or job.kind != "finetune" or job.project_id != project.pk:
        raise PlanError("No fine-tune job made this: export a variant an absorb made, or its fine-tune job.")
    if job.status != Job.SUCCEEDED or job.variant is None:
        raise PlanError(f"{job} is {job.status}: only a finished absorb can be exported.")
    return job


def export_spec(project: Project, finetune: Job, folder: Path | None = None) -> str:
    variant, version = finetune.variant, finetune.dataset_version
    assert variant is not None and version is not None
    teacher = (
        Job.objects.filter(kind="teacher", output_dataset=version, status=Job.SUCCEEDED)
        .order_by("-pk")
        .first()
    )
    if teacher is None or teacher.prompt_version is None or teacher.dataset_version is None:
        raise PlanError(
            f"{finetune} trained on {version}, which is not a teacher's answers as made (edited after "
            "review, or uploaded with answers): a spec runs the teacher itself."
        )
    spec: dict[str, Any] = {"version": 1, "project": project.slug}
    if finetune.base_model is not None:  # named even when it is the default: the default may change
        spec["base_model"] = finetune.base_model.name
    prompt = teacher.prompt_version
    source = teacher.dataset_version
    synthesis = fingerprints.synthesis_of(source)
    if synthesis is not None and synthesis.dataset_version is not None:
        source = synthesis.dataset_version  # the spec asks for the same synthesis on the same queries
    else:
        synthesis = None
    spec["prompt"] = {"ref": str(prompt)}
    spec["data"] = _data(source)
    if folder is not None:
        spec["prompt"], spec["data"] = _files(folder, prompt, source)
    spec["teacher"] = _teacher(teacher)
    if synthesis is None:
        spec["synthesis"] = False  # left out, a spec synthesises first
    elif (settings := _minimal(synthesis.params.get("synthesis") or {}, SynthesisSettings().to_dict())) or (
        synthesis.params["count"] != ABSORB_COUNT
    ):
        spec["synthesis"] = {"count": synthesis.params["count"], **settings}
    curation = teacher.params.get("curation")
    if curation is None:
        spec["curation"] = False
    elif minimal := _minimal(curation, CurationSettings().to_dict()):
        spec["curation"] = minimal
    training = _minimal(finetune.params.get("train") or {}, TrainConfig().to_dict())
    if not finetune.params.get("passing_only", True):
        training["train_on_failing"] = True
    if training:
        spec["training"] = training
    evaluation = _eval(variant)
    if evaluation:
        spec["eval"] = evaluation
    promote = _promote(variant)
    if promote:
        spec["promote"] = promote
    head = (
        f"# Reproduces {finetune} (variant {variant.name}, #{variant.pk}) of project {project.slug}:\n"
        "# python manage.py apply THIS_FILE reuses every finished step.\n"
    )
    text = head + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
    if folder is not None:
        (folder / "spec.yaml").write_text(text)
    return text


def _data(source: DatasetVersion) -> dict[str, Any]:
    held_out = source.meta.get("held_out_from") if isinstance(source.meta, dict) else None
    if held_out is not None and source.parent is not None:
        heldout = DatasetVersion.objects.filter(pk=held_out).select_related("dataset").first()
        if heldout is not None:
            return {"train": {"version": str(source.parent)}, "heldout": {"version": str(heldout)}}
    return {"train": {"version": str(source)}}


def _files(folder: Path, prompt: Any, source: DatasetVersion) -> tuple[dict[str, Any], dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.md").write_text(prompt.text)
    section: dict[str, Any] = {"name": prompt.prompt.name, "file": "prompt.md"}
    for key in ("rules", "facts"):
        if getattr(prompt, key):
            (folder / f"{key}.json").write_text(
                json.dumps(getattr(prompt, key), indent=1, ensure_ascii=False) + "\n"
            )
            section[key] = f"{key}.json"
    evals = eval_source(source)
    for name, version, split in (
        ("train.jsonl", source, DatasetRow.TRAIN),
        ("heldout.jsonl", evals, DatasetRow.EVAL),
    ):
        rows = version.rows.filter(split=split).order_by("index").values_list("messages", flat=True)
        with (folder / name).open("w") as out:
            for messages in rows.iterator(chunk_size=2000):
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    held = source.meta.get("held_out_from") if isinstance(source.meta, dict) else None
    heldout = DatasetVersion.objects.filter(pk=held).select_related("dataset").first() if held else None
    data = {
        "name": source.dataset.name,
        "train": "train.jsonl",
        "heldout_name": heldout.dataset.name if heldout else f"{source.dataset.name} held out",
        "heldout": "heldout.jsonl",
    }
    return section, data


def _teacher(teacher: Job) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if teacher.teacher_endpoint is None and teacher.params.get("teacher_endpoint"):
        gone = teacher.params["teacher_endpoint"].get("name")
        raise PlanError(f"{teacher} asked the teacher endpoint {gone!r}, which was deleted since.")
    if teacher.teacher_endpoint is not None:
        section["endpoint"] = teacher.teacher_endpoint.name
    elif teacher.base_model is not None:
        section["model"] = teacher.base_model.name
    generation = _minimal(teacher.params.get("generation") or {}, teacher_generation(None).to_dict())
    if generation:
        section["generation"] = generation
    return section


def _eval(variant: Variant) -> dict[str, Any]:
    comparisons = ArmComparison.objects.filter(variant=variant, job__status=Job.SUCCEEDED).select_related(
        "suite", "job"
    )
    comparison = (
        comparisons.filter(**{f"job__params__{fingerprints.KEY}__isnull": False}).first()
        or comparisons.first()
    )
    if comparison is None or comparison.job is None:
        return {}
    suite = comparison.suite
    section: dict[str, Any] = {}
    generation = _minimal(
        comparison.job.params.get("generation") or {}, comparison_generation(variant).to_dict()
    )
    if generation:
        section["generation"] = generation
    if suite.has_judge and (suite.judge_base or suite.judge_endpoint):
        section["judge"] = (
            {"endpoint": suite.judge_endpoint.name}
            if suite.judge_endpoint
            else {"model": suite.judge_base.name}  # type: ignore[union-attr]
        ) | {"rubric": suite.judge_rubric}
    section["lm_eval_tasks"] = list(suite.lm_eval_tasks)
    section["main_metric"] = suite.main_metric
    return section


def _promote(variant: Variant) -> dict[str, Any]:
    alias = Alias.objects.filter(variant=variant).order_by("name").first()
    if alias is None:
        return {}
    gate = {
        k: getattr(alias, k)
        for k in GATE_FIELDS
        if getattr(alias, k) is not None and getattr(alias, k) is not False
    }
    if alias.log_requests:
        gate["log_requests"] = True
    return {"alias": alias.name, **({"gate": gate} if gate or alias.gating_suite_id else {})}
