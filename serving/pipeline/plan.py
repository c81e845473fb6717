"""The plan of a spec: every step, and for each whether a finished one is
reused (found by its fingerprint: one query) or what runs, with an
estimate. Making a plan reads files and the database and writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db.models import Q

from engines.curation import SynthesisSettings
from engines.facts import FactsError, validate_facts
from engines.training import TrainConfig
from evals.models import ArmComparison, EvalSuite
from jobs import fingerprints
from jobs.actions import resolve_curation, teacher_generation
from jobs.models import Job, TeacherEndpoint
from jobs.runners.synthesis import KIND as SYNTHESIS_KIND
from serving.models import Alias
from serving.pipeline import estimate
from serving.pipeline.lookups import (
    GATE_FIELDS,
    PlanError,
    eval_source_of,
    find_eval,
    find_finetune,
    find_suite,
    gate_changes,
    judge,
    lm_eval_tasks,
    teacher_input,
    unset,
)
from workbench.actions import ActionError
from workbench.actions.datasets import DatasetRejected, FileContent, eval_indices, read_content
from workbench.actions.prompts import CheckedPrompt, find_prompt_version
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Project, PromptVersion, Variant
from workbench.pipeline import Spec

__all__ = ["GATE_FIELDS", "DataPart", "Plan", "PlanError", "Step", "make_plan"]


@dataclass
class Step:
    name: str
    action: str  # reuse | create | import | save | run | skip
    detail: str
    job: int | None = None
    fingerprint: str | None = None
    estimate: estimate.Estimate | None = None

    def line(self) -> str:
        text = f"{self.name:<13} {self.action:<6} {self.detail}"
        if self.estimate is not None:
            text += f"\n{'':<24}{self.estimate.describe()}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "action": self.action,
            "detail": self.detail,
            "job": self.job,
            "fingerprint": self.fingerprint,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


@dataclass
class DataPart:
    """One dataset the spec names: a file (imported once) or a version."""

    role: str  # train | heldout
    where: str
    name: str
    eval_percent: int
    seed: int
    path: Path | None = None
    content: FileContent | None = None
    version: DatasetVersion | None = None
    _rows: dict[str | None, list[str]] = field(default_factory=dict, repr=False)

    def rows(self, split: str | None) -> list[str]:
        """Row hashes of a split (None: every row), in order: the stored
        version's, or the file's as its import will split it."""
        if split not in self._rows:
            self._rows[split] = self._read(split)
        return self._rows[split]

    def _read(self, split: str | None) -> list[str]:
        if self.version is not None:
            qs = self.version.rows.order_by("index")
            qs = qs.filter(split=split) if split else qs
            return list(qs.values_list("sha256", flat=True))
        assert self.content is not None
        shas = self.content.row_shas
        if split is None:
            return list(shas)
        held = set(eval_indices(len(shas), self.eval_percent, self.seed))
        return [s for i, s in enumerate(shas) if (i in held) == (split == DatasetRow.EVAL)]

    def head(self) -> list[list[dict[str, str]]]:
        if self.version is not None:
            rows = self.version.rows.filter(split=DatasetRow.TRAIN).order_by("index")
            return list(rows.values_list("messages", flat=True)[: estimate.SAMPLE_ROWS])
        assert self.content is not None
        return list(self.content.head)


@dataclass
class Plan:
    spec: Spec
    steps: list[Step] = field(default_factory=list)
    project: Project | None = None
    base: FoundationModel | None = None
    teacher_model: FoundationModel | None = None
    endpoint: TeacherEndpoint | None = None
    prompt_version: PromptVersion | None = None  # the version used, when it exists
    new_prompt: CheckedPrompt | None = None  # to save first
    prompt: dict[str, Any] = field(default_factory=dict)  # its identity (fingerprints)
    train: DataPart | None = None
    heldout: DataPart | None = None
    combined: DatasetVersion | None = None  # the train rows + the held-out file's, once made
    train_rows: str = ""
    eval_rows: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    curation: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    synthesis: dict[str, Any] | None = None  # {"count", "settings"} as the job stores them
    synthesis_fp: str = ""
    synthesis_job: Job | None = None
    teacher_rows: str = ""  # what the teacher answers (fingerprints.queries_identity)
    teacher_fp: str = ""
    finetune_fp: str = ""
    teacher_job: Job | None = None
    finetune_job: Job | None = None
    suite: EvalSuite | None = None
    comparison: ArmComparison | None = None
    eval_fp: str | None = None
    alias: Alias | None = None

    @property
    def variant(self) -> Variant | None:
        job = self.finetune_job
        return job.variant if job is not None and job.status == Job.SUCCEEDED else None

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    @property
    def seconds(self) -> float:
        return sum(s.estimate.seconds for s in self.steps if s.estimate is not None and s.action == "run")

    def text(self) -> str:
        lines = [f"Plan for {self.spec.name} (project {self.spec.project}):"]
        lines += [f"  {n}. {s.line()}" for n, s in enumerate(self.steps, start=1)]
        runs = [s for s in self.steps if s.estimate is not None and s.action == "run"]
        if runs:
            lines.append(f"  about {estimate.duration(self.seconds)} in all for the steps that run")
        else:
            lines.append("  nothing to run: every step is done")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.name,
            "project": self.project.slug if self.project else None,
            "steps": [s.to_dict() for s in self.steps],
            "seconds": round(self.seconds, 1),
            "duration": estimate.duration(self.seconds),
        }


def _short(fp: str) -> str:
    return fp[:12]


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{prefix}{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if fingerprints.digest(old.get(k)) != fingerprints.digest(new.get(k))
    ]


def make_plan(spec: Spec, project: Project | None = None) -> Plan:
    """Resolve everything the spec names and decide each step; writes nothing.
    `project`: the project the spec is applied to (the browser's), which its
    `project` key must name; else the key finds it, by slug or name."""
    plan = Plan(spec)
    _project(plan, project)
    _models(plan)
    _prompt(plan)
    _data(plan)
    _synthesis(plan)
    _teacher(plan)
    _finetune(plan)
    _eval(plan)
    _promote(plan)
    return plan


def _project(plan: Plan, project: Project | None) -> None:
    name = plan.spec.project
    if project is not None and name != project.slug and name.casefold() != project.name.casefold():
        raise PlanError(
            f"{plan.spec.where('project')}: this spec names {name!r}; it is applied here to "
            f"{project.name} ({project.slug}): name that project"
        )
    plan.project = project or (
        Project.objects.filter(Q(slug=name) | Q(name__iexact=name)).order_by("pk").first()
    )
    if plan.project is not None:
        plan.steps.append(Step("project", "reuse", f"{plan.project.name} ({plan.project.slug})"))
    else:
        plan.steps.append(Step("project", "create", f"{name} (apply --user NAME owns it)"))


def _models(plan: Plan) -> None:
    spec = plan.spec
    name = spec.data.get("base_model")
    base = (
        FoundationModel.objects.filter(name=name).first()
        if name
        else FoundationModel.objects.filter(is_default=True).first()
    )
    if base is None:
        raise PlanError(
            f"{spec.where('base_model')}: no registered model {name!r}"
            if name
            else f"{spec.name}: no default base model: run `python manage.py provision_model`"
        )
    plan.base = plan.teacher_model = base
    teacher = spec.section("teacher")
    if "model" in teacher:
        plan.teacher_model = FoundationModel.objects.filter(name=teacher["model"]).first()
        if plan.teacher_model is None:
            known = ", ".join(FoundationModel.objects.values_list("name", flat=True)) or "none"
            raise PlanError(
                f"{spec.where('teacher', 'model')}: no registered model {teacher['model']!r} (known: {known})"
            )
    if "endpoint" in teacher:
        plan.endpoint = (
            TeacherEndpoint.objects.filter(project=plan.project, name=teacher["endpoint"]).first()
            if plan.project
            else None
        )
        if plan.endpoint is None:
            raise PlanError(
                f"{spec.where('teacher', 'endpoint')}: no teacher endpoint {teacher['endpoint']!r} in the project"
            )


def _prompt(plan: Plan) -> None:
    spec, section = plan.spec, plan.spec.section("prompt")
    if "ref" in section:
        if plan.project is None:
            raise PlanError(
                f"{spec.where('prompt', 'ref')}: the project does not exist yet, so neither does {section['ref']!r}"
            )
        try:
            plan.prompt_version = find_prompt_version(plan.project, section["ref"])
        except (ActionError, ValueError) as exc:
            raise PlanError(f"{spec.where('prompt', 'ref')}: {exc}") from None
        plan.prompt = fingerprints.version_identity(plan.prompt_version)
        plan.steps.append(
            Step("prompt", "reuse", f"{plan.prompt_version} (sha256 {_short(plan.prompt_version.sha256)})")
        )
        return
    checked = spec.checked_prompt
    assert checked is not None
    plan.prompt = fingerprints.prompt_identity(checked.sha256, checked.rules, checked.facts)
    latest = (
        PromptVersion.objects.filter(prompt__project=plan.project, prompt__name=section["name"])
        .order_by("-number")
        .first()
        if plan.project
        else None
    )
    what = f"{len(checked.rules)} rules, {len(checked.facts)} facts, sha256 {_short(checked.sha256)}"
    if checked.same_as(latest):
        plan.prompt_version = latest
        plan.steps.append(Step("prompt", "reuse", f"{latest} unchanged ({what})"))
    else:
        plan.new_prompt = checked
        number = latest.number + 1 if latest else 1
        why = f"; {section['file']} differs from {latest}" if latest else ""
        plan.steps.append(
            Step("prompt", "save", f"{section['name']}@{number} from {section['file']} ({what}{why})")
        )


def _version(plan: Plan, where: str, ref: str) -> DatasetVersion:
    name, at, number = ref.rpartition("@")  # a dataset's name may hold an @ itself
    if not at or not number.isdigit():
        name, number = ref, ""
    qs = DatasetVersion.objects.filter(dataset__project=plan.project, dataset__name=name).select_related(
        "dataset"
    )
    version = qs.filter(number=int(number)).first() if number.isdigit() else qs.order_by("-number").first()
    if version is None:
        raise PlanError(f"{where}: no dataset version {ref!r} in the project")
    return version


def _part(plan: Plan, role: str, value: Any, name: str, eval_percent: int, seed: int) -> DataPart:
    spec, data = plan.spec, plan.spec.section("data")
    where = spec.where("data", role)
    part = DataPart(role, where, name, eval_percent, seed)
    if isinstance(value, dict):
        if plan.project is None:
            raise PlanError(f"{where}: the project does not exist yet, so neither does {value['version']!r}")
        part.version = _version(plan, where, value["version"])
        return part
    part.path = spec.file(value)
    try:
        with part.path.open("rb") as f:
            part.content = read_content(
                f,
                filename=value,
                fmt=data.get("format", "auto"),
                query_column=data.get("query_column"),
                answer_column=data.get("answer_column"),
            )
    except DatasetRejected as exc:
        errors = "; ".join(str(e) for e in exc.errors[:5])
        raise PlanError(
            f"{where}: {value}: {exc.error_count} problem(s), nothing imported: {errors}"
        ) from None
    except OSError as exc:
        raise PlanError(f"{where}: {value}: {exc.strerror or exc}") from None
    if plan.project is not None:
        same = DatasetVersion.objects.filter(
            dataset__project=plan.project,
            sha256=part.content.sha256,
            kind=DatasetVersion.UPLOAD,
            eval_percent=eval_percent,
        )
        if 0 < eval_percent < 100:
            same = same.filter(split_seed=seed)
        # The named dataset's own version first, then any with these rows.
        part.version = (
            same.filter(dataset__name=name).order_by("-number").first()
            or same.select_related("dataset").order_by("pk").first()
        )
    return part


def _data(plan: Plan) -> None:
    spec, data = plan.spec, plan.spec.section("data")
    prompt_name = (
        spec.section("prompt").get("name") or str(spec.section("prompt").get("ref", "")).partition("@")[0]
    )
    seed = int(data.get("seed", 0))
    percent = int(data.get("heldout_percent", 0))
    plan.train = _part(
        plan, "train", data["train"], data.get("name") or f"{prompt_name} queries", percent, seed
    )
    if "heldout" in data:
        plan.heldout = _part(
            plan, "heldout", data["heldout"], data.get("heldout_name") or f"{prompt_name} held out", 100, 0
        )
    for part in (plan.train, plan.heldout):
        if part is None:
            continue
        label = "training queries" if part.role == "train" else "held-out queries"
        if part.version is not None:
            plan.steps.append(
                Step(
                    "training data" if part.role == "train" else "held-out data",
                    "reuse",
                    f"{part.version} for the {label} ({part.version.row_count:,} rows, sha256 {_short(part.version.sha256)})",
                )
            )
        else:
            assert part.content is not None
            split = (
                f", {part.eval_percent}% held out (seed {part.seed})" if 0 < part.eval_percent < 100 else ""
            )
            plan.steps.append(
                Step(
                    "training data" if part.role == "train" else "held-out data",
                    "import",
                    f"{part.path.name if part.path else ''} into {part.name} as the {label} "
                    f"({len(part.content.row_shas):,} rows{split}, sha256 {_short(part.content.sha256)})",
                )
            )
    train = plan.train
    if plan.heldout is not None:
        plan.train_rows = fingerprints.rows_digest(train.rows(DatasetRow.TRAIN))
        plan.eval_rows = fingerprints.rows_digest(plan.heldout.rows(None))
        if train.version is not None and plan.heldout.version is not None:
            plan.combined = (
                DatasetVersion.objects.filter(
                    parent=train.version, meta__held_out_from=plan.heldout.version.pk
                )
                .order_by("-pk")
                .first()
            )
    else:
        plan.train_rows = fingerprints.rows_digest(train.rows(DatasetRow.TRAIN))
        evals = train.rows(DatasetRow.EVAL)
        if not evals:
            raise PlanError(f"{train.where}: {train.version} has no held-out (eval) rows: give data.heldout")
        plan.eval_rows = fingerprints.rows_digest(evals)
    if not train.rows(DatasetRow.TRAIN):
        raise PlanError(f"{train.where}: no rows are left to train on")


def _synthesis(plan: Plan) -> None:
    """Synthetic queries before the teacher (the spec's `synthesis`): the teacher then
    answers the synthesis job's output, named by the job's fingerprint until it exists."""
    wanted = plan.spec.synthesis
    source = teacher_input(plan)
    made_by = fingerprints.synthesis_identity(source) if source is not None else None
    plan.teacher_rows = made_by or plan.train_rows
    if wanted is None:
        return
    assert plan.teacher_model is not None
    settings = SynthesisSettings.from_dict(wanted["settings"])
    plan.synthesis = {"count": wanted["count"], "settings": settings.to_dict()}
    plan.synthesis_fp = fingerprints.synthesis_fingerprint(
        plan.prompt,
        plan.train_rows,
        plan.eval_rows,
        fingerprints.teacher_identity(plan.teacher_model, plan.endpoint),
        wanted["count"],
        settings.to_dict(),
    )
    plan.teacher_rows = f"synthesis:{plan.synthesis_fp}"
    job = fingerprints.find(plan.project.pk, SYNTHESIS_KIND, plan.synthesis_fp) if plan.project else None
    plan.synthesis_job = job
    teacher = plan.endpoint.name if plan.endpoint else plan.teacher_model.name
    if job is not None:
        made = (
            f"{job.output_dataset}, {job.output_dataset.row_count:,} rows"
            if job.output_dataset is not None
            else f"still {job.status}: followed"
        )
        plan.steps.append(Step("synthesis", "reuse", f"{job} ({made})", job.pk, plan.synthesis_fp))
        return
    plan.steps.append(
        Step(
            "synthesis",
            "run",
            f"{teacher} writes up to {wanted['count']:,} questions about the prompt's sections and facts, "
            "added to the training queries",
            fingerprint=plan.synthesis_fp,
            estimate=estimate.synthesis(
                wanted["count"], plan.teacher_model, plan.endpoint, settings.oversample
            ),
        )
    )


def _teacher(plan: Plan) -> None:
    spec = plan.spec
    assert plan.teacher_model is not None and plan.train is not None
    gen = teacher_generation(spec.section("teacher").get("generation"))
    plan.generation = gen.to_dict()
    plan.curation = resolve_curation(bool(plan.prompt["rules"]), spec.curation)
    who = fingerprints.teacher_identity(plan.teacher_model, plan.endpoint)
    plan.teacher_fp = fingerprints.teacher_fingerprint(
        plan.prompt, plan.teacher_rows, who, plan.generation, plan.curation, True
    )
    plan.teacher_job = (
        fingerprints.find(plan.project.pk, "teacher", plan.teacher_fp) if plan.project else None
    )
    teacher = plan.endpoint.name if plan.endpoint else plan.teacher_model.name
    if plan.teacher_job is not None:
        job = plan.teacher_job
        state = "" if job.status == Job.SUCCEEDED else f", still {job.status}: followed"
        plan.steps.append(Step("teacher", "reuse", f"{job} ({teacher}{state})", job.pk, plan.teacher_fp))
        if plan.synthesis is not None and plan.synthesis_job is None:  # its questions were answered
            plan.step("synthesis").action = "skip"
            plan.step("synthesis").detail = "its questions are in the reused teacher's answers"
        return
    queries, at_most = len(plan.train.rows(DatasetRow.TRAIN)), ""
    if plan.synthesis_job is not None and plan.synthesis_job.output_dataset is not None:
        queries = plan.synthesis_job.output_dataset.rows.filter(split=DatasetRow.TRAIN).count()
    elif plan.synthesis is not None:  # synthesis keeps what passes its filters
        queries, at_most = queries + plan.synthesis["count"], "up to "
    detail = f"{teacher} answers {at_most}{queries:,} queries WITH the prompt" + (
        f", curated (best of {plan.curation['best_of']}"
        + (f", up to {plan.curation['rounds']} rounds)" if plan.curation["rounds"] > 1 else ")")
        if plan.curation
        else ""
    )
    detail += _previous_teacher(plan)
    plan.steps.append(
        Step(
            "teacher",
            "run",
            detail,
            fingerprint=plan.teacher_fp,
            estimate=estimate.teacher(queries, plan.teacher_model, plan.endpoint, plan.curation),
        )
    )


def _previous_teacher(plan: Plan) -> str:
    """What differs from the latest finished teacher job of the same prompt."""
    if plan.project is None:
        return ""
    name = (
        plan.spec.section("prompt").get("name")
        or str(plan.spec.section("prompt").get("ref")).partition("@")[0]
    )
    last = (
        Job.objects.filter(
            project=plan.project, kind="teacher", status=Job.SUCCEEDED, prompt_version__prompt__name=name
        )
        .select_related("prompt_version", "dataset_version")
        .order_by("-finished_at")
        .first()
    )
    if last is None or last.prompt_version is None or last.dataset_version is None:
        return ""
    changed = []
    if fingerprints.version_identity(last.prompt_version) != plan.prompt:
        changed.append("the prompt")
    if fingerprints.queries_identity(last.dataset_version) != plan.teacher_rows:
        changed.append("the training queries")
    changed += _changes(last.params.get("generation") or {}, plan.generation, "teacher.generation.")
    changed += _changes(last.params.get("curation") or {}, plan.curation or {}, "curation.")
    return f"; unlike {last}: {', '.join(changed[:6])}" if changed else ""


def _finetune(plan: Plan) -> None:
    spec = plan.spec
    assert plan.base is not None and plan.teacher_model is not None and plan.train is not None
    plan.training = TrainConfig.from_dict(spec.training).to_dict()
    plan.finetune_fp = fingerprints.finetune_fingerprint(
        f"teacher:{plan.teacher_fp}",
        plan.prompt,
        fingerprints.model_identity(plan.base),
        plan.training,
        spec.passing_only,
        fingerprints.model_identity(plan.teacher_model),
    )
    job = find_finetune(plan.project, plan.finetune_fp) if plan.project else None
    plan.finetune_job = job
    if job is not None:
        made = f"variant #{job.variant_id}" if job.variant_id else f"still {job.status}: followed"
        plan.steps.append(Step("fine-tune", "reuse", f"{job} ({made})", job.pk, plan.finetune_fp))
        return
    answers = plan.teacher_job.output_dataset if plan.teacher_job is not None else None
    head = (
        list(
            answers.rows.filter(split=DatasetRow.TRAIN)
            .order_by("index")
            .values_list("messages", flat=True)[: estimate.SAMPLE_ROWS]
        )
        if answers is not None
        else plan.train.head()
    )
    answered = answers is not None
    rows = len(plan.train.rows(DatasetRow.TRAIN))
    detail = f"LoRA on {plan.base.name}: " + ", ".join(
        f"{k} {plan.training[k]}"
        for k in ("epochs", "max_steps", "batch_size", "learning_rate", "rank")
        if plan.training.get(k) is not None
    )
    detail += _previous_finetune(plan)
    plan.steps.append(
        Step(
            "fine-tune",
            "run",
            detail,
            fingerprint=plan.finetune_fp,
            estimate=estimate.training(
                plan.base,
                plan.training,
                rows,
                head,
                answered,
                int(plan.generation["max_new_tokens"]),
                _facts(plan),
                *_prompt_text(plan),
            ),
        )
    )


def _prompt_text(plan: Plan) -> tuple[str, list[Any]]:
    """The prompt's text and rules: a reading student's rows carry passages of it."""
    if plan.prompt_version is not None:
        return plan.prompt_version.text, list(plan.prompt_version.rules or [])
    checked = plan.spec.checked_prompt
    return (checked.text, checked.rules) if checked is not None else ("", [])


def _facts(plan: Plan) -> list[Any]:
    try:
        return validate_facts(plan.prompt.get("facts") or [])
    except FactsError:
        return []


def _previous_finetune(plan: Plan) -> str:
    """With the teacher reused: what differs from the last fine-tune on its answers."""
    job = plan.teacher_job
    if job is None or job.output_dataset_id is None:
        return ""
    last = (
        Job.objects.filter(kind="finetune", status=Job.SUCCEEDED, dataset_version_id=job.output_dataset_id)
        .order_by("-finished_at")
        .first()
    )
    if last is None:
        return ""
    changed = _changes(last.params.get("train") or {}, plan.training, "training.")
    if bool(last.params.get("passing_only")) != plan.spec.passing_only:
        changed.append("training.train_on_failing")
    return f"; unlike {last}: {', '.join(changed[:6])}" if changed else ""


# --- eval -----------------------------------------------------------------------------------------


def _eval(plan: Plan) -> None:
    lm = lm_eval_tasks(plan)
    judge(plan)  # a judge the workbench lacks is named before anything runs
    plan.suite = find_suite(plan, eval_source_of(plan))
    variant = plan.variant
    if variant is not None:
        plan.eval_fp, plan.comparison = find_eval(plan, variant)
    if plan.comparison is not None:
        job = plan.comparison.job
        assert job is not None
        state = "" if job.status == Job.SUCCEEDED else f", still {job.status}: followed"
        plan.suite = plan.comparison.suite
        plan.steps.append(
            Step(
                "eval",
                "reuse",
                f"four-arm comparison #{plan.comparison.pk} on {plan.suite} ({job}{state})",
                job.pk,
                plan.eval_fp,
            )
        )
        return
    suite = f"suite {plan.suite}" if plan.suite else "a new suite of the held-out queries"
    assert plan.base is not None and plan.train is not None
    heldout = len(plan.heldout.rows(None) if plan.heldout else plan.train.rows(DatasetRow.EVAL))
    plan.steps.append(
        Step(
            "eval",
            "run",
            f"four arms (floor, teacher, student, student+prompt) on {suite}"
            + (f", lm-eval {', '.join(lm)}" if lm else ""),
            fingerprint=plan.eval_fp,
            estimate=estimate.evaluation(
                plan.base, heldout, lm, judge=bool(plan.spec.section("eval").get("judge"))
            ),
        )
    )


# --- promote --------------------------------------------------------------------------------------


def _promote(plan: Plan) -> None:
    promote = plan.spec.promote
    if promote is None:
        plan.steps.append(Step("promote", "skip", "no alias to promote to (promote.alias)"))
        return
    name = promote["alias"]
    plan.alias = Alias.objects.filter(project=plan.project, name=name).first() if plan.project else None
    changes = gate_changes(plan, plan.alias, plan.suite)
    gate = ""
    if changes:
        bars = ", ".join(
            f"{k} {v}" if not unset(v) else f"no {k}" for k, v in changes.items() if k != "gating_suite"
        )
        gate = f"; gate: {bars or 'as it is'}" + (
            f" on {changes['gating_suite']}" if "gating_suite" in changes else ""
        )
    variant = plan.variant
    if plan.alias is not None and variant is not None and plan.alias.variant_id == variant.pk and not changes:
        plan.steps.append(
            Step("promote", "reuse", f"{plan.alias.model_name} already points at {variant} (#{variant.pk})")
        )
        return
    target = f"{plan.project.slug if plan.project else Project.unique_slug(plan.spec.project)}/{name}"
    plan.steps.append(Step("promote", "run", f"move {target} to the new variant when its gate passes{gate}"))
