"""The absorb form's live preview: the `manage.py absorb` command and the
pipeline spec that start the same absorb, and how long each step will take
on this workbench. The form lives in jobs (which cannot import serving): it
posts here with htmx on every change, and nothing is written."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from engines.curation import ABSORB_COUNT as ABSORB_SYNTHESIS_COUNT
from engines.curation import CurationSettings, SynthesisSettings
from engines.facts import FactsError, validate_facts
from engines.training import TrainConfig
from jobs import fingerprints
from jobs.actions import absorb_generation, resolve_curation, teacher_generation
from jobs.forms import DATA_ERRORS, AbsorbForm, few_fact_rows
from serving.pipeline import estimate
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Project, PromptVersion
from workbench.pipeline.spec import SpecError, parse_spec
from workbench.shortcuts import AuthedHttpRequest, get_project

# The training settings `manage.py absorb` takes as flags; the others go in its --train-config file.
TRAIN_FLAGS = {"epochs": "--epochs", "max_steps": "--max-steps", "batch_size": "--batch-size"}
GEN_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "batch_size": "--teacher-batch",
    "temperature": "--temperature",
    "seed": "--seed",
    "repetition_penalty": "--repetition-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
}
CURATION_FLAGS = {
    "best_of": "--best-of",
    "rounds": "--rounds",
    "probe": "--probe",
    "passages": "--passages",
    "temperature": "--sample-temperature",
    "top_p": "--sample-top-p",
}
CURATION_SWITCHES = {
    "reminders": "--no-reminders",
    "phrases": "--no-phrases",
    "fact_sentences": "--no-fact-sentences",
    "prefill": "--no-prefill",
}


def _differs(a: Any, b: Any) -> bool:
    return fingerprints.digest(a) != fingerprints.digest(b)


def _minimal(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in values.items()
        if k not in defaults or _differs(v, defaults[k])
    }


def _train_changes(form: AbsorbForm) -> dict[str, Any]:
    assert form.training is not None
    return _minimal(form.training.to_dict(), TrainConfig().to_dict())


def _curation(form: AbsorbForm, prompt: PromptVersion) -> dict[str, Any] | None:
    return resolve_curation(bool(prompt.rules), form.curation)


def command(form: AbsorbForm, project: Project) -> tuple[str, dict[str, Any] | None]:
    """The `manage.py absorb` line that queues the same jobs, and the JSON of
    its --train-config file when a training setting has no flag of its own."""
    data = form.cleaned_data
    prompt: PromptVersion = data["prompt_version"]
    version: DatasetVersion = data["dataset_version"]
    base: FoundationModel = data["base_model"]
    args = ["python", "manage.py", "absorb", "--project", project.slug, "--prompt", str(prompt)]
    args += ["--dataset", str(version), "--base-model", base.name]
    train = _train_changes(form)
    for key, flag in TRAIN_FLAGS.items():
        if key in train:
            args += [flag, str(train.pop(key))]
    if "refine_samples" in train:
        args += ["--refine", str(train.pop("refine_samples"))]
    config = train or None
    if config:
        args += ["--train-config", "train.json"]
    if not data.get("passing_only"):
        args.append("--train-on-failing")
    if data["mode"] == "finetune":
        args.append("--skip-teacher")
        if not data.get("train_anyway"):
            args.append("--check-data")
    else:
        assert form.generation is not None
        gen, defaults = form.generation.to_dict(), absorb_generation().to_dict()
        for key, flag in GEN_FLAGS.items():
            if _differs(gen.get(key), defaults.get(key)):
                args += [flag, str(gen[key])]
        for stop in gen.get("stop") or []:
            args += ["--stop", stop]
        if form.synthesis != ABSORB_SYNTHESIS_COUNT:
            args += ["--synthesize", str(form.synthesis)]
        if data.get("teacher_endpoint") is not None:
            args += ["--teacher-endpoint", data["teacher_endpoint"].name]
        elif data.get("teacher_model") is not None and data["teacher_model"].pk != base.pk:
            args += ["--teacher-model", data["teacher_model"].name]
        curation = form.curation
        if not curation:
            args.append("--no-curation")
        elif isinstance(curation, dict):
            cur_defaults = CurationSettings().to_dict()
            for key, flag in CURATION_FLAGS.items():
                if _differs(curation.get(key), cur_defaults.get(key)):
                    args += [flag, str(curation[key])]
            for key, flag in CURATION_SWITCHES.items():
                if not curation.get(key) and cur_defaults.get(key):
                    args.append(flag)
            if _differs(list(curation.get("repairs") or []), list(cur_defaults.get("repairs") or [])):
                args += ["--repairs", ",".join(curation.get("repairs") or []) or "none"]
        if not data.get("keep_existing"):
            args.append("--no-keep-existing")
        elif version.captured:  # the command's own default answers again
            args.append("--keep-existing")
        if data.get("review_first"):
            args.append("--review-first")
        if not data.get("train_anyway") and not data.get("review_first"):
            args.append("--check-data")
    ev = form.evaluation
    if not ev.get("auto"):
        args.append("--no-eval")
    else:
        if ev.get("max_new_tokens") != settings.EVAL_MAX_NEW_TOKENS:
            args += ["--eval-max-new-tokens", str(ev["max_new_tokens"])]
        if ev.get("max_examples"):
            args += ["--eval-max-examples", str(ev["max_examples"])]
    return shlex.join(args), config


def spec(form: AbsorbForm, project: Project) -> tuple[str | None, list[str]]:
    """The pipeline spec (`manage.py apply`) of the same absorb, with what it
    cannot say; None when the form's path is not one a spec describes."""
    data = form.cleaned_data
    if data["mode"] == "finetune":
        return None, [
            "A spec runs the teacher itself: it describes the teacher-then-fine-tune path, "
            "not a fine-tune on answers the dataset already holds."
        ]
    notes: list[str] = []
    prompt: PromptVersion = data["prompt_version"]
    version: DatasetVersion = data["dataset_version"]
    out: dict[str, Any] = {"version": 1, "project": project.slug, "base_model": data["base_model"].name}
    out["prompt"] = {"ref": str(prompt)}
    out["data"] = {"train": {"version": str(version)}}
    teacher: dict[str, Any] = {}
    if data.get("teacher_endpoint") is not None:
        teacher["endpoint"] = data["teacher_endpoint"].name
    elif data.get("teacher_model") is not None and data["teacher_model"] != data["base_model"]:
        teacher["model"] = data["teacher_model"].name
    assert form.generation is not None
    gen = _minimal(form.generation.to_dict(), teacher_generation(None).to_dict())
    if gen:
        teacher["generation"] = gen
    if not form.synthesis:
        out["synthesis"] = False
    elif form.synthesis != ABSORB_SYNTHESIS_COUNT:
        out["synthesis"] = {"count": form.synthesis}
    if teacher:
        out["teacher"] = teacher
    curation = form.curation
    if not curation:
        out["curation"] = False
    elif isinstance(curation, dict) and (changed := _minimal(curation, CurationSettings().to_dict())):
        out["curation"] = changed
    training = _train_changes(form)
    if not data.get("passing_only"):
        training["train_on_failing"] = True
    if training:
        out["training"] = training
    ev = form.evaluation
    if ev.get("max_new_tokens") != settings.EVAL_MAX_NEW_TOKENS:
        out["eval"] = {"generation": {"max_new_tokens": ev["max_new_tokens"]}}
    if not ev.get("auto"):
        notes.append("A spec always runs the four-arm eval after the fine-tune.")
    if ev.get("max_examples"):
        notes.append("A spec evaluates on every held-out query (no limit on their number).")
    if not data.get("keep_existing"):
        notes.append("A spec keeps the answers rows already have (keep existing answers).")
    if data.get("review_first"):
        notes.append("A spec trains right after the teacher: review first is not part of it.")
    notes.append(
        "Applied, a spec trains on the teacher's answers without the data check: "
        "review its plan before it runs."
    )
    head = "# python manage.py apply absorb.yaml: reuses every step already done\n"
    text = head + yaml.safe_dump(out, sort_keys=False, allow_unicode=True, width=100)
    try:
        parse_spec(text, "absorb.yaml", Path(settings.BASE_DIR))
    except SpecError as exc:
        notes += exc.problems
    return text, notes


def estimates(form: AbsorbForm) -> list[dict[str, Any]]:
    """Each step's estimate (teacher, training, eval) from what this
    workbench's workers measured, or a default rate, said so."""
    data = form.cleaned_data
    prompt: PromptVersion = data["prompt_version"]
    version: DatasetVersion = data["dataset_version"]
    base: FoundationModel = data["base_model"]
    train_rows = version.rows.filter(split=DatasetRow.TRAIN)
    rows = train_rows.count()
    steps: list[tuple[str, estimate.Estimate]] = []
    assert form.generation is not None and form.training is not None
    absorb = data["mode"] == "absorb"
    if absorb:
        teacher_model = data.get("teacher_model") or base
        curation = _curation(form, prompt)
        endpoint = data.get("teacher_endpoint")
        if form.synthesis:
            oversample = SynthesisSettings().oversample
            steps.append(
                ("Synthesis", estimate.synthesis(form.synthesis, teacher_model, endpoint, oversample))
            )
        steps.append(("Teacher", estimate.teacher(rows + form.synthesis, teacher_model, endpoint, curation)))
    head = list(train_rows.order_by("index").values_list("messages", flat=True)[: estimate.SAMPLE_ROWS])
    try:
        facts = validate_facts(prompt.facts or [])
    except FactsError:
        facts = []
    steps.append(
        (
            "Training",
            estimate.training(
                base,
                form.training.to_dict(),
                rows,
                head,
                not absorb,
                form.generation.max_new_tokens,
                facts,
            ),
        )
    )
    if form.evaluation.get("auto"):
        heldout = version.rows.filter(split=DatasetRow.EVAL).count()
        limit = form.evaluation.get("max_examples")
        n = min(heldout, limit) if limit else heldout
        steps.append(("Evaluation", estimate.evaluation(base, n, settings.EVAL_AUTO_LM_EVAL_TASKS)))
    return [
        {
            "name": name,
            "seconds": e.seconds,
            "duration": estimate.duration(e.seconds),
            "counts": e.counts,
            "rate": f"{e.rate:.2f} {e.unit}/s",
            "measured": e.measured,
            "source": e.source,
            "notes": e.notes,
            "waits": name == "Training" and absorb and bool(data.get("review_first")),
        }
        for name, e in steps
    ]


@login_required
@require_POST
def absorb_preview(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """The preview fragment of the absorb form as posted (400, with what is wrong, when it cannot be read)."""
    project = get_project(request, slug)
    form = AbsorbForm(project, request.POST)
    form.is_valid()
    blocking = {name: errs for name, errs in form.errors.items() if name not in DATA_ERRORS}
    if blocking:
        problems = [
            f"{form.fields[name].label or name}: {' '.join(map(str, errs))}"
            if name in form.fields
            else " ".join(map(str, errs))
            for name, errs in blocking.items()
        ]
        return render(request, "serving/_absorb_preview.html", {"problems": problems}, status=400)
    warnings = [e for name in DATA_ERRORS if name != "form_token" for e in form.errors.get(name, [])]
    data = form.cleaned_data
    fact_advice = (
        few_fact_rows(data["prompt_version"], data["dataset_version"])
        if data.get("prompt_version") and data.get("dataset_version") and not form.synthesis
        else None
    )
    line, config = command(form, project)
    text, notes = spec(form, project)
    steps = estimates(form)
    ctx = {
        "command": line,
        "train_config": json.dumps(config, indent=2) if config else "",
        "spec": text,
        "spec_notes": notes,
        "steps": steps,
        "total": estimate.duration(sum(s["seconds"] for s in steps if not s["waits"])),
        "warnings": warnings,
        "project": project,
        "fact_advice": fact_advice,
        "prompt_version": data.get("prompt_version"),
        "dataset_version": data.get("dataset_version"),
    }
    return render(request, "serving/_absorb_preview.html", ctx)
