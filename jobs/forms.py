"""The absorb form: inputs of the project, teacher generation settings and
every fine-tune hyperparameter. The defaults come from the engines' own
settings objects (GenerationSettings, TrainConfig), never from here."""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms
from django.conf import settings

from engines.curation import REPAIRS, CurationSettings
from engines.curation.context import last_user_text
from engines.facts import FactsError, applicable, validate_facts
from engines.inference import GenerationSettings, SettingsError
from engines.training import DEVICES, LR_SCHEDULERS, ConfigError, TrainConfig
from jobs.actions import absorb_generation
from jobs.models import AbsorbPreset, Job, TeacherEndpoint
from jobs.runners.synthesis import ABSORB_COUNT as ABSORB_SYNTHESIS_COUNT
from jobs.runners.synthesis import DEFAULT_COUNT as SYNTHESIS_DEFAULT_COUNT
from jobs.runners.synthesis import KIND as SYNTHESIS_KIND
from jobs.runners.synthesis import MAX_COUNT as SYNTHESIS_MAX_COUNT
from workbench.data_quality import final_compliance, warning
from workbench.forms import form_token_field, model_choice
from workbench.models import DatasetRow, DatasetVersion, FoundationModel, Project, PromptVersion

TRAIN_HELP: dict[str, str] = {
    "rank": "LoRA rank r: size of the low-rank update. 8-32 is typical; higher learns more, costs more.",
    "alpha": "LoRA alpha: scales the update (alpha / r). Usually 2 x rank.",
    "dropout": "Dropout on the LoRA layers (0-0.1).",
    "target_modules": "Layers that get an adapter, comma-separated. Default: every attention and MLP projection.",
    "learning_rate": "Peak learning rate. LoRA wants ~1e-4 to 1e-3 (1e-3 measured with the reading student on SmolLM2; "
    "3e-4 when the prompt is absorbed whole).",
    "epochs": "Passes over the teacher answers.",
    "max_steps": "Stop after this many optimizer steps (overrides epochs; empty = use epochs).",
    "batch_size": "Examples per step. Lower it when memory runs out.",
    "grad_accum": "Steps to accumulate before an update: effective batch = batch x this.",
    "max_length": "Longest example in tokens; longer ones are truncated (answers first kept).",
    "warmup_ratio": "Share of steps spent warming up the learning rate.",
    "weight_decay": "L2 penalty on the adapter weights.",
    "lr_scheduler": "How the learning rate decays after warm-up: cosine or linear.",
    "seed": "Seed for shuffling and initialisation: same seed, same run.",
    "gradient_checkpointing": "Recompute activations in the backward pass: less memory, ~5-20% slower.",
    "group_by_length": "Batch examples of similar length: less padding, faster.",
    "save_steps": "Checkpoint every N steps; a crashed job resumes from the last one.",
    "save_total_limit": "Checkpoints kept on disk.",
    "logging_steps": "Record loss every N steps.",
    "kl_weight": "Token-level distillation: weight of KL(teacher || student) next to the cross-entropy. "
    "0 = off. Costs a teacher forward pass (with the prompt) per step.",
    "kl_temperature": "Softmax temperature of the KL term.",
    "general_mix": "Against forgetting: general instructions answered by the base itself, as a share of the "
    "training rows (0.1 = one per ten rows; 0 = off). The base answers them before training (~6 s each on CPU).",
    "fact_repeat": "Copies of each row whose answer states the facts its question asks (by the prompt's facts "
    "checks) in training: a small student rarely recalls a fact it saw once. 1 = once (1-8); each copy costs "
    "training time.",
    "student_passages": "The student reads the prompt's N sentences most relevant to each question (BM25), "
    "in training, in evals and when served: facts are copied from them instead of recalled. ~28 prompt tokens "
    "a passage. 0 = off: the prompt is absorbed whole (0-8). Measured with learning rate 1e-3.",
    "refine_samples": "Rejection sampling after training: the student (no prompt) samples this many answers per "
    "train query; one passing every rule, stating the facts asked and saying at least half as much replaces the "
    "row's answer, and the adapter trains a little more on that set. 0 = off (0-8); costs sampling plus refine_epochs of training.",
    "refine_epochs": "Epochs of the refine round's second fine-tune (at half the learning rate).",
    "device": "auto picks CUDA (bf16), then MPS, then CPU (float32).",
    "bf16": "auto: bf16 on CUDA. true on a CPU with native bf16 (avx512_bf16/AMX) is ~1.5x faster.",
}
GEN_HELP = {
    "max_new_tokens": "Longest teacher answer in tokens; longer answers are cut and flagged.",
    "batch_size": "Queries generated together. The system prompt is encoded once and reused for every batch.",
    "temperature": "0 = greedy (deterministic). Above 0 samples.",
    "repetition_penalty": "Above 1 penalises repeated tokens: small models loop without it (1 = off).",
    "no_repeat_ngram_size": "Never repeat an n-gram of this many tokens (0 = off).",
}
GEN_FIELDS = ("max_new_tokens", "batch_size", "temperature", "repetition_penalty", "no_repeat_ngram_size")
CURATION_FIELDS = (
    "curate",
    "best_of",
    "rounds",
    "reminders",
    "phrases",
    "fact_sentences",
    "probe",
    "passages",
    "sample_temperature",
    "sample_top_p",
    "prefill",
    "repairs",
)
CHOICES: dict[str, list[tuple[Any, str]]] = {
    "lr_scheduler": [(c, c) for c in LR_SCHEDULERS],
    "device": [(c, c) for c in DEVICES],
    "bf16": [("auto", "auto"), ("true", "true"), ("false", "false")],
}


def _train_field(f: dataclasses.Field[Any], default: Any) -> forms.Field:
    help_text = TRAIN_HELP.get(f.name, "")
    if f.name in CHOICES:
        return forms.ChoiceField(choices=CHOICES[f.name], initial=str(default).lower(), help_text=help_text)
    if isinstance(default, bool):
        return forms.BooleanField(required=False, initial=default, help_text=help_text)
    if isinstance(default, list):
        return forms.CharField(required=False, initial=",".join(default), help_text=help_text)
    if isinstance(default, int) or f.name == "max_steps":
        return forms.IntegerField(required=False, initial=default, help_text=help_text)
    return forms.FloatField(required=False, initial=default, help_text=help_text)


def default_dataset_version(project: Project) -> DatasetVersion | None:
    """The latest version of the project's largest dataset, never a set captured
    from served requests (a few logged requests make a poor default to train on)."""
    latest: dict[int, DatasetVersion] = {}
    for dv in DatasetVersion.objects.filter(dataset__project=project).order_by("dataset_id", "number"):
        latest[dv.dataset_id] = dv
    kept = [dv for dv in latest.values() if not (dv.meta or {}).get("captured_requests")]
    return max(kept, key=lambda dv: (dv.row_count, dv.pk), default=None)


def _version_label(dv: DatasetVersion) -> str:
    label = f"{dv} · {dv.get_kind_display()} · {dv.row_count} rows"
    if dv.captured:
        label += " · captured from /v1"
    all_rules = final_compliance(dv)
    return label if all_rules is None else f"{label} · {all_rules:.0%} pass all rules"


class AbsorbForm(forms.Form):
    MODES = [
        ("absorb", "Teacher, then fine-tune"),
        ("finetune", "Fine-tune only (the dataset already holds reviewed answers)"),
    ]

    prompt_version = forms.ModelChoiceField(
        queryset=PromptVersion.objects.none(), label="Prompt version", empty_label=None
    )
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.none(), label="Dataset version", empty_label=None
    )
    base_model = forms.ModelChoiceField(
        queryset=FoundationModel.objects.all(), label="Base model", empty_label=None
    )
    teacher_model = forms.ModelChoiceField(
        queryset=FoundationModel.objects.all(),
        required=False,
        label="Teacher model",
        empty_label="the base model (same as the student)",
        help_text="Any registered model can answer WITH the prompt, e.g. a larger one on GPU workers. "
        "KL distillation needs a teacher with the student's tokenizer.",
    )
    teacher_endpoint = forms.ModelChoiceField(
        queryset=TeacherEndpoint.objects.none(),
        required=False,
        label="Teacher endpoint",
        empty_label="none: the teacher model above answers",
        help_text="An OpenAI-compatible server of this project (e.g. vLLM with a large model, a hosted API) "
        "answers WITH the prompt instead; answers are cached per project, so a rerun pays only for new ones.",
    )
    g_stop = forms.CharField(
        required=False,
        label="stop",
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Stop strings, one per line: the answer ends before the first one.",
    )
    synthesize = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=SYNTHESIS_MAX_COUNT,
        initial=ABSORB_SYNTHESIS_COUNT,
        label="questions to synthesise first",
        help_text="The teacher first writes up to this many questions about the prompt's sections and facts "
        "(a synthesis job; none close to the data's queries), then answers them with the data's own: the "
        "student learns the facts real queries rarely ask about (0: the data's queries only).",
    )
    curate = forms.BooleanField(
        required=False,
        initial=True,
        label="curate the answers when the prompt has checkable rules",
        help_text="Best-of-N by rules, prefilled openings and recorded repairs: data better than the raw teacher.",
    )
    best_of = forms.IntegerField(
        min_value=1,
        max_value=16,
        initial=CurationSettings.best_of,
        label="best of N",
        help_text="Samples per query in each round; the one passing the most checks once repaired is kept.",
    )
    rounds = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=8,
        initial=CurationSettings.rounds,
        label="rounds",
        help_text="Later rounds ask again only for queries with no passing sample: hard queries cost more, "
        "easy ones stop at the first round.",
    )
    reminders = forms.BooleanField(
        required=False,
        initial=CurationSettings.reminders,
        label="remind the teacher of what still fails",
        help_text="A later round adds, after the question, the rules and facts the best sample missed "
        "(the teacher sees it; the training row keeps the user's words).",
    )
    phrases = forms.BooleanField(
        required=False,
        initial=CurationSettings.phrases,
        label="prefill a required phrase still missing",
        help_text="A later round opens an answer lacking a contains rule's text with it; the model writes the rest.",
    )
    fact_sentences = forms.BooleanField(
        required=False,
        initial=CurationSettings.fact_sentences,
        label="open with the fact a query asks for",
        help_text="A later round opens an answer that missed a fact its query asks for (facts checks) with the "
        "prompt's sentence stating it, so the data states it.",
    )
    probe = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=256,
        initial=CurationSettings.probe,
        label="probe queries",
        help_text="Round one asks this many queries first; a required phrase or the facts they rarely meet "
        "open the other answers from round one on, instead of costing a second round (0: later rounds only).",
    )
    passages = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=10,
        initial=CurationSettings.passages,
        label="relevant prompt passages",
        help_text="The prompt's sentences most relevant to each query (BM25) are shown to the teacher beside "
        "the question, so a small teacher finds the facts it needs (0: none).",
    )
    sample_temperature = forms.FloatField(
        min_value=0,
        max_value=2,
        initial=CurationSettings.temperature,
        label="sampling temperature (best-of-N)",
    )
    sample_top_p = forms.FloatField(
        min_value=0.01, max_value=1, initial=CurationSettings.top_p, label="sampling top-p (best-of-N)"
    )
    prefill = forms.BooleanField(
        required=False, initial=True, label="prefill the opening a starts_with rule fixes"
    )
    repairs = forms.MultipleChoiceField(
        required=False,
        choices=[(k, f"{k}: {v}") for k, v in REPAIRS.items()],
        initial=list(REPAIRS),
        widget=forms.CheckboxSelectMultiple,
        label="repairs",
        help_text="Each repair changes only answers failing its rule; every change is recorded for review.",
    )
    mode = forms.ChoiceField(choices=MODES, initial="absorb", widget=forms.RadioSelect)
    form_token = form_token_field()
    keep_existing = forms.BooleanField(
        required=False,
        initial=True,
        label="keep existing answers",
        help_text="Rows that already have an assistant answer keep it instead of asking the teacher. "
        "Picking a version captured from /v1 unticks it: those answers are what was served, so the "
        "teacher answers again.",
    )
    passing_only = forms.BooleanField(
        required=False,
        initial=True,
        label="train only on answers that pass every rule",
        help_text="Answers still failing a checkable rule (not repaired, edited or accepted in review) are left "
        "out while at least a quarter of the rows (and 32) pass; the student learns what the data shows.",
    )
    train_anyway = forms.BooleanField(
        required=False,
        label="train anyway on answers that fail rules",
        help_text="Left unticked, the data is checked before training: fine-tune only asks here when too many "
        "training answers fail a checkable rule; teacher then fine-tune checks the teacher's answers when they "
        "come back, and the fine-tune waits on its page for you to review them or to train anyway.",
    )
    few_rows_ok = forms.BooleanField(
        required=False,
        label="train on fewer rows than the minimum anyway",
        help_text="A fine-tune on a handful of rows learns little, and its eval has too few held-out queries "
        "to tell.",
    )
    review_first = forms.BooleanField(
        required=False,
        label="Review the teacher's answers before training",
        help_text="Only the teacher job is queued; start the fine-tune from the reviewed dataset version.",
    )
    eval_auto = forms.ChoiceField(
        required=False,
        choices=[("on", "run the four arms on the held-out queries"), ("off", "no eval (start it later)")],
        label="eval after training",
        help_text="When the fine-tune finishes: floor, teacher, student and student+prompt on the held-out "
        "queries of the data.",
    )
    eval_max_new_tokens = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=8192,
        label="eval answer length (max_new_tokens)",
        help_text="The longest answer of each arm in the eval; too short cuts answers before a rule can pass.",
    )
    eval_max_examples = forms.IntegerField(
        required=False,
        min_value=1,
        label="eval queries (at most)",
        help_text="Empty: every held-out query. Fewer run faster but widen the confidence intervals.",
    )

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.project = project
        prompts = PromptVersion.objects.filter(prompt__project=project).select_related("prompt")
        datasets = DatasetVersion.objects.filter(dataset__project=project).select_related("dataset")
        model_choice(self, "prompt_version").queryset = prompts
        model_choice(self, "dataset_version").queryset = datasets
        model_choice(self, "teacher_endpoint").queryset = TeacherEndpoint.objects.filter(project=project)
        # Django calls the field's label_from_instance(obj): this form's labels, set on its instance.
        model_choice(self, "dataset_version").label_from_instance = _version_label  # type: ignore[method-assign,assignment]
        largest = default_dataset_version(project)
        if largest is not None:
            self.fields["dataset_version"].initial = largest.pk
        base = FoundationModel.objects.filter(is_default=True).first()
        if base is not None:
            self.fields["base_model"].initial = base.pk
        gen = absorb_generation()
        for name in GEN_FIELDS:
            default = getattr(gen, name)
            field: forms.Field = (
                forms.FloatField(min_value=0)
                if isinstance(default, float)
                else forms.IntegerField(min_value=0 if default == 0 else 1)
            )
            field.initial, field.help_text, field.label = default, GEN_HELP[name], name
            self.fields[f"g_{name}"] = field
        for f in dataclasses.fields(TrainConfig):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            field = _train_field(f, default)
            field.label = f.name
            self.fields[f"t_{f.name}"] = field
        self.fields["eval_auto"].initial = "on" if settings.AUTO_EVAL else "off"
        self.fields["eval_max_new_tokens"].initial = settings.EVAL_MAX_NEW_TOKENS
        self.generation: GenerationSettings | None = None
        self.training: TrainConfig | None = None
        self.evaluation: dict[str, Any] = {}
        self.curation: dict[str, Any] | bool = False
        self.synthesis = 0  # questions the teacher writes before it answers (absorb only)
        # The share of failing answers above which an absorb's fine-tune waits for confirmation (None: trains).
        self.data_check: float | None = None

    def generation_fields(self) -> list[forms.BoundField]:
        return [self[f"g_{name}"] for name in (*GEN_FIELDS, "stop")]

    def curation_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in CURATION_FIELDS]

    def train_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.fields if name.startswith("t_")]

    def eval_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in ("eval_auto", "eval_max_new_tokens", "eval_max_examples")]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        gen: dict[str, Any] = {
            name: data.get(f"g_{name}") for name in GEN_FIELDS if data.get(f"g_{name}") is not None
        }
        stops = [line for line in (data.get("g_stop") or "").splitlines() if line.strip()]
        if stops:
            gen["stop"] = stops
        try:
            self.generation = GenerationSettings.from_dict(gen)
        except SettingsError as exc:
            for name, message in exc.errors.items():
                self.add_error(f"g_{name}" if f"g_{name}" in self.fields else None, message)
        train: dict[str, Any] = {}
        for f in dataclasses.fields(TrainConfig):
            value: Any = data.get(f"t_{f.name}")
            if f.name == "target_modules":
                value = [m.strip() for m in (value or "").split(",") if m.strip()] or None
            elif f.name == "bf16":
                value = {"true": True, "false": False}.get(value, value)
            if value is not None and value != "":
                train[f.name] = value
        if data.get("teacher_endpoint") is not None and data.get("teacher_model") is not None:
            self.add_error("teacher_endpoint", "Choose a teacher model or a teacher endpoint, not both.")
        version = data.get("dataset_version")
        if data.get("mode") == "finetune" and version is not None and not data.get("train_anyway"):
            warn = warning(version, settings.DATA_FAIL_WARN_SHARE)
            if warn:
                self.add_error("train_anyway", warn)
        if data.get("mode") == "absorb" and not data.get("train_anyway"):
            self.data_check = settings.DATA_FAIL_WARN_SHARE
        if version is not None and not data.get("few_rows_ok"):
            problem = too_few_rows(version, settings.MIN_TRAIN_ROWS)
            if problem:
                self.add_error("few_rows_ok", problem)
        if data.get("mode") == "absorb":
            self.synthesis = data.get("synthesize") or 0
        if data.get("curate"):
            try:
                self.curation = CurationSettings(
                    best_of=data.get("best_of") or CurationSettings.best_of,
                    rounds=data.get("rounds") or CurationSettings.rounds,
                    reminders=bool(data.get("reminders")),
                    phrases=bool(data.get("phrases")),
                    fact_sentences=bool(data.get("fact_sentences")),
                    probe=int(data.get("probe") or 0)
                    if data.get("probe") is not None
                    else CurationSettings.probe,
                    passages=int(data.get("passages") or 0)
                    if data.get("passages") is not None
                    else CurationSettings.passages,
                    temperature=data.get("sample_temperature", CurationSettings.temperature),
                    top_p=data.get("sample_top_p") or CurationSettings.top_p,
                    prefill=bool(data.get("prefill")),
                    repairs=tuple(data.get("repairs") or ()),
                ).to_dict()
            except ValueError as exc:
                self.add_error("best_of", str(exc))
        try:
            self.training = TrainConfig.from_dict(train)
        except ConfigError as exc:
            for name, message in exc.errors.items():
                self.add_error(f"t_{name}" if f"t_{name}" in self.fields else None, message)
        # What the four-arm eval after the fine-tune runs with; a field left out is the setting's default.
        auto = data.get("eval_auto")
        self.evaluation = {
            "auto": settings.AUTO_EVAL if not auto else auto == "on",
            "max_new_tokens": data.get("eval_max_new_tokens") or settings.EVAL_MAX_NEW_TOKENS,
            "max_examples": data.get("eval_max_examples"),
        }
        return data


def too_few_rows(version: DatasetVersion, minimum: int) -> str | None:
    """A sentence when the version has fewer train rows than a fine-tune needs."""
    rows = version.rows.filter(split=DatasetRow.TRAIN).count()
    if rows >= minimum:
        return None
    held = version.rows.filter(split=DatasetRow.EVAL).count()
    return (
        f"{version} has {rows} training row{'s' if rows != 1 else ''} (and {held} held out): fewer than the "
        f"{minimum} a fine-tune needs to learn from, and too few for its eval to show anything. Add rows "
        "(upload more, or have the teacher write more queries), or tick “train on fewer rows anyway”."
    )


# A student learns the prompt's facts from rows that state them (bench/README, 2026-12-07: fernhill,
# 58 of 128 train queries asking a fact, reached fact recall 0.60; lumen and harbor, 11-12 of 128, 0.06).
FACT_ROWS_WANTED = 0.25
FACT_ROWS_READ = 500  # train queries read to tell (the facts checks' patterns run under a time bound)


def few_fact_rows(prompt: PromptVersion, version: DatasetVersion) -> str | None:
    """A sentence when few of the training queries ask a fact the prompt's facts checks cover."""
    try:
        checks = validate_facts(prompt.facts or [])
    except FactsError:
        return None
    if not checks:
        return None
    rows = version.rows.filter(split=DatasetRow.TRAIN).order_by("index")[:FACT_ROWS_READ]
    queries = [q for q in (last_user_text(m) for m in rows.values_list("messages", flat=True)) if q]
    asking = sum(bool(applicable(checks, q)) for q in queries)
    if not queries or asking >= FACT_ROWS_WANTED * len(queries):
        return None
    return (
        f"{asking} of {len(queries)} training queries ask one of the {len(checks)} fact{'s' if len(checks) != 1 else ''} of {prompt}: a student "
        "learns the facts from rows that state them, and with this few it answers around them (fernhill, "
        "58 of 128: fact recall 0.60; lumen, 12 of 128: 0.06). Have the teacher write questions about the "
        "prompt's sections first (questions to synthesise, under Teacher)."
    )


# Fields a preset leaves out: the inputs of one absorb (the prompt and the data), the checks made on
# that data, and the form's one-time token.
NOT_IN_PRESET = ("prompt_version", "dataset_version", "form_token", "train_anyway", "few_rows_ok")
# Errors that say the data is wrong, not the settings: a preset is saved in spite of them.
DATA_ERRORS = ("train_anyway", "few_rows_ok", "form_token")


def preset_values(form: AbsorbForm) -> dict[str, Any]:
    """The bound form's settings as posted, by field name (strings, booleans and lists: JSON)."""
    out: dict[str, Any] = {}
    for name in form.fields:
        if name in NOT_IN_PRESET:
            continue
        value = form[name].value()
        out[name] = list(value) if isinstance(value, list | tuple) else value
    return out


def preset_initial(preset: AbsorbPreset, form: AbsorbForm) -> dict[str, Any]:
    """A preset's values the form still has, as its initial values."""
    return {k: v for k, v in (preset.values or {}).items() if k in form.fields and k not in NOT_IN_PRESET}


class PresetForm(forms.Form):
    use_required_attribute = False  # the field sits in the absorb form, whose Start needs no preset name

    preset_name = forms.CharField(
        max_length=80,
        label="Preset name",
        help_text="Saves the settings below (not the prompt or the data) under this name; "
        "an existing preset of that name is replaced.",
        widget=forms.TextInput(attrs={"placeholder": "e.g. quick CPU run"}),
    )

    def clean_preset_name(self) -> str:
        name = " ".join(str(self.cleaned_data["preset_name"]).split())
        if not name:
            raise forms.ValidationError("Give the preset a name.")
        return name


def _bf16(value: Any) -> str:
    return {True: "true", False: "false"}.get(value, "auto") if value is not None else "auto"


def initial_from_job(job: Job) -> dict[str, Any]:
    """The absorb form's values that start `job`'s absorb again: the teacher's
    and the fine-tune's settings, whichever of the two `job` is."""
    if job.kind == "teacher":
        teacher: Job | None = job
        finetune = job.dependents.filter(kind="finetune").order_by("pk").first()
    else:
        finetune, teacher = (
            job,
            job.depends_on if job.depends_on and job.depends_on.kind == "teacher" else None,
        )
    out: dict[str, Any] = {}
    if teacher is not None:
        base = finetune.base_model if finetune is not None else teacher.base_model
        out.update(
            mode="absorb",
            prompt_version=teacher.prompt_version_id,
            dataset_version=teacher.dataset_version_id,
            base_model=base.pk if base else None,
            keep_existing=bool(teacher.params.get("keep_existing", True)),
            review_first=finetune is None,
        )
        if teacher.teacher_endpoint_id:
            out["teacher_endpoint"] = teacher.teacher_endpoint_id
        elif teacher.base_model_id and base is not None and teacher.base_model_id != base.pk:
            out["teacher_model"] = teacher.base_model_id
        gen = teacher.params.get("generation") or {}
        for name in GEN_FIELDS:
            if name in gen:
                out[f"g_{name}"] = gen[name]
        out["g_stop"] = "\n".join(gen.get("stop") or [])
        synthesis = (
            teacher.depends_on if teacher.depends_on and teacher.depends_on.kind == SYNTHESIS_KIND else None
        )
        out["synthesize"] = synthesis.params.get("count") if synthesis is not None else 0
        if synthesis is not None:  # the data it started from, not the version with its questions
            out["dataset_version"] = synthesis.dataset_version_id
        curation = teacher.params.get("curation")
        out["curate"] = curation is not None
        if isinstance(curation, dict):
            renamed = {"temperature": "sample_temperature", "top_p": "sample_top_p"}
            for key, value in curation.items():
                field_name = renamed.get(key, key)
                if field_name in CURATION_FIELDS:
                    out[field_name] = list(value) if isinstance(value, list | tuple) else value
    elif finetune is not None:
        out.update(
            mode="finetune",
            prompt_version=finetune.prompt_version_id,
            dataset_version=finetune.dataset_version_id,
            base_model=finetune.base_model_id,
        )
    if finetune is not None:
        for key, value in (finetune.params.get("train") or {}).items():
            if key == "target_modules":
                value = ",".join(value or [])
            elif key == "bf16":
                value = _bf16(value)
            out[f"t_{key}"] = value
        out["passing_only"] = bool(finetune.params.get("passing_only", True))
        if teacher is not None:
            out["train_anyway"] = "data_check" not in finetune.params
        ev = finetune.params.get("eval") or {}
        if "auto" in ev:
            out["eval_auto"] = "on" if ev["auto"] else "off"
        for key in ("max_new_tokens", "max_examples"):
            if ev.get(key) is not None:
                out[f"eval_{key}"] = ev[key]
    return {k: v for k, v in out.items() if v is not None}


class TeacherEndpointForm(forms.ModelForm):
    """A project's teacher endpoint; the model validates the URL and the
    variable name, this form the name's uniqueness within the project."""

    form_token = form_token_field()

    class Meta:
        model = TeacherEndpoint
        fields = [
            "name",
            "base_url",
            "model",
            "api_key_env",
            "max_concurrency",
            "price_input_per_million",
            "price_output_per_million",
        ]
        labels = {"base_url": "Base URL", "api_key_env": "API key environment variable"}

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.project = project
        self.instance.project = project
        self.fields["base_url"].widget.attrs["placeholder"] = "http://vllm:8000/v1"
        self.fields["api_key_env"].widget.attrs["placeholder"] = "TEACHER_API_KEY"

    def clean_name(self) -> str:
        name = str(self.cleaned_data["name"]).strip()
        if TeacherEndpoint.objects.filter(project=self.project, name__iexact=name).exists():
            raise forms.ValidationError("This project already has a teacher endpoint of that name.")
        return name


class SynthesisForm(forms.Form):
    """More queries, written by the teacher about the prompt's sections and
    facts, added to a new version of the dataset for review."""

    prompt_version = forms.ModelChoiceField(
        queryset=PromptVersion.objects.none(),
        label="Prompt version",
        empty_label=None,
        help_text="Its sections and facts checks are what the questions ask about.",
    )
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.none(),
        label="Dataset version",
        empty_label=None,
        help_text="The new version holds its rows and the synthetic queries; none close to its queries.",
    )
    base_model = forms.ModelChoiceField(
        queryset=FoundationModel.objects.all(),
        label="Teacher model",
        empty_label=None,
        help_text="The model that writes the questions.",
    )
    count = forms.IntegerField(
        min_value=1,
        max_value=SYNTHESIS_MAX_COUNT,
        initial=SYNTHESIS_DEFAULT_COUNT,
        label="queries to add, at most",
        help_text="Spread evenly over the prompt's sections and facts; fewer when too few pass the filters.",
    )
    form_token = form_token_field()

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model_choice(self, "prompt_version").queryset = PromptVersion.objects.filter(
            prompt__project=project
        ).select_related("prompt")
        model_choice(self, "dataset_version").queryset = DatasetVersion.objects.filter(
            dataset__project=project
        ).select_related("dataset")
        default = FoundationModel.objects.filter(is_default=True).first()
        if default is not None:
            self.fields["base_model"].initial = default.pk
