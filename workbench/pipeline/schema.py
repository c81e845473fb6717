"""The spec's JSON Schema. The settings sections (teacher and eval
generation, synthesis, curation, training) are derived from their
dataclasses (GenerationSettings and its bounds table, SynthesisSettings,
CurationSettings, TrainConfig), so a setting added there is a key of the
spec at once. The published copy,
spec.schema.json beside this module, is this function's output; a test
holds the two together (`manage.py apply --schema` prints it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engines.curation import ABSORB_COUNT, JOB_MAX_COUNT, REPAIRS, CurationSettings, SynthesisSettings
from engines.inference import BOUNDS, GenerationSettings
from engines.rules import KINDS
from engines.training import DEVICES, LR_SCHEDULERS, TrainConfig

SCHEMA_PATH = Path(__file__).with_name("spec.schema.json")
SCHEMA_ID = "urn:workbench:absorption-spec:1"

# Generation settings a spec does not take: token-id biases and grammars are per request.
NOT_IN_SPEC = ("logit_bias", "response_format")
# What the annotations of the settings dataclasses mean in JSON.
TYPES: dict[str, dict[str, Any]] = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
    "int | None": {"type": ["integer", "null"]},
    "str | None": {"type": ["string", "null"]},
    "list[str]": {"type": "array", "items": {"type": "string"}},
    "tuple[str, ...]": {"type": "array", "items": {"type": "string"}},
}
# Values a field takes from a fixed list (the engines' own tables).
CHOICES: dict[tuple[str, str], dict[str, Any]] = {
    ("TrainConfig", "lr_scheduler"): {"enum": list(LR_SCHEDULERS)},
    ("TrainConfig", "device"): {"enum": list(DEVICES)},
    ("TrainConfig", "bf16"): {"enum": ["auto", True, False]},
    ("CurationSettings", "repairs"): {"type": "array", "items": {"enum": list(REPAIRS)}, "uniqueItems": True},
}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


def _fields(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One property per dataclass field: its JSON type, its default, and a
    description naming where the value is checked."""
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = CHOICES.get((cls.__name__, f.name)) or TYPES.get(str(f.type))
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no JSON type for {f.type!r}")  # a new kind of field
        prop = {**kind, "description": f"{cls.__name__}.{f.name}"}
        default = _default(f)
        if default is not dataclasses.MISSING:
            prop["default"] = default
        props[f.name] = prop
    return props


def generation_schema(description: str) -> dict[str, Any]:
    props = _fields(GenerationSettings, NOT_IN_SPEC)
    for bound in BOUNDS:
        if bound.setting in props:
            prop = props[bound.setting]
            prop["exclusiveMinimum" if bound.low_open else "minimum"] = (
                int(bound.low) if bound.whole else bound.low
            )
            prop["maximum"] = int(bound.high) if bound.whole else bound.high
    props["stop"]["maxItems"] = GenerationSettings.MAX_STOP_STRINGS
    props["stop"]["items"]["minLength"] = 1
    return {"type": "object", "additionalProperties": False, "description": description, "properties": props}


def _training() -> dict[str, Any]:
    props = _fields(TrainConfig)
    props["train_on_failing"] = {
        "type": "boolean",
        "default": False,
        "description": "Also train on answers that still fail a rule (absorb --train-on-failing)",
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "TrainConfig (engines/training/config.py): ranges are checked by TrainConfig.problems()",
        "properties": props,
    }


def _curation() -> dict[str, Any]:
    return {
        "type": ["boolean", "object"],
        "additionalProperties": False,
        "description": "CurationSettings (engines/curation/settings.py); false: the teacher's raw answers; "
        "left out or true: the defaults when the prompt has rules",
        "properties": _fields(CurationSettings),
    }


def _synthesis() -> dict[str, Any]:
    return {
        "type": ["boolean", "object"],
        "additionalProperties": False,
        "description": "Before the teacher: questions users would ask about the prompt's sections and facts, "
        "written by the teacher and added to the training queries (the synthesis job). SynthesisSettings "
        "(engines/curation/synthesis.py) and count; left out or true: the defaults; false: none",
        "properties": {
            "count": {
                "type": "integer",
                "minimum": 1,
                "maximum": JOB_MAX_COUNT,
                "default": ABSORB_COUNT,
                "description": "Synthetic queries to add at most",
            },
            **_fields(SynthesisSettings),
        },
    }


def _string(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": description, **more}


def _fraction(description: str) -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": 1, "description": description}


RULE = {
    "type": "object",
    "required": ["name", "kind"],
    "properties": {"name": {"type": "string"}, "kind": {"enum": sorted(KINDS)}},
    "description": "A checkable rule (engines/rules.py); its parameters are checked by validate_rules",
}
FACT = {
    "type": "object",
    "required": ["name", "question"],
    "description": "A facts check (engines/facts.py), checked by validate_facts",
}
VERSION_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["version"],
    "properties": {"version": _string("An existing dataset version of the project: NAME@N")},
}


def build_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Workbench absorption spec",
        "description": "What `manage.py apply SPEC` runs: prompt, data, teacher, curation, fine-tune, "
        "four-arm eval, gated promotion. Paths are relative to the spec's folder.",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "project", "prompt", "data"],
        "properties": {
            "version": {"const": 1, "description": "The spec format's version"},
            "project": _string(
                "A project's slug or name; a missing one is created (apply --user owns it)", maxLength=100
            ),
            "base_model": _string("The registered base model the student is (default: the default model)"),
            "prompt": {
                "type": "object",
                "additionalProperties": False,
                "description": "file (+ name, rules, facts): saved as a new version when it changed; "
                "ref: an existing version, NAME or NAME@N",
                "properties": {
                    "name": _string("The prompt's name in the project", maxLength=200),
                    "file": _string("The prompt's text (a file)"),
                    "ref": _string("An existing prompt version: NAME or NAME@N"),
                    "rules": {
                        "type": ["string", "array"],
                        "items": RULE,
                        "description": "A rules.json file, or the rules inline",
                    },
                    "facts": {
                        "type": ["string", "array"],
                        "items": FACT,
                        "description": "A facts.json file, or the facts inline",
                    },
                },
            },
            "data": {
                "type": "object",
                "additionalProperties": False,
                "required": ["train"],
                "description": "Training queries and the held-out set (a file, a version, or a percentage "
                "of the training file). Files are imported once: one whose rows a version already "
                "holds is that version.",
                "properties": {
                    "train": {"type": ["string", "object"], **_ref_or_file("training queries")},
                    "name": _string("The dataset the training file is imported into", maxLength=200),
                    "heldout": {"type": ["string", "object"], **_ref_or_file("held-out queries")},
                    "heldout_name": _string("The dataset the held-out file is imported into", maxLength=200),
                    "heldout_percent": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 99,
                        "description": "Hold out this share of the training file instead (a seeded split)",
                    },
                    "seed": {
                        "type": "integer",
                        "minimum": 0,
                        "default": 0,
                        "description": "The split's seed",
                    },
                    "format": {"type": "string", "description": "The files' format (default: auto)"},
                    "query_column": _string("The query field (format fields or csv)"),
                    "answer_column": _string("The answer field (format fields or csv)"),
                },
            },
            "teacher": {
                "type": "object",
                "additionalProperties": False,
                "description": "Who answers WITH the prompt: a registered model or a teacher endpoint of "
                "the project (default: the student's base model)",
                "properties": {
                    "model": _string("A registered base model's name"),
                    "endpoint": _string("A teacher endpoint of the project, by name"),
                    "generation": generation_schema(
                        "GenerationSettings of the teacher (engines/inference/settings.py)"
                    ),
                },
            },
            "synthesis": _synthesis(),
            "curation": _curation(),
            "training": _training(),
            "eval": {
                "type": "object",
                "additionalProperties": False,
                "description": "The four-arm comparison on the held-out queries",
                "properties": {
                    "generation": generation_schema("GenerationSettings of the four arms"),
                    "judge": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["rubric"],
                        "properties": {
                            "model": _string("A registered model judges"),
                            "endpoint": _string("A teacher endpoint of the project judges"),
                            "rubric": _string("What a good answer is"),
                        },
                    },
                    "lm_eval_tasks": {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "description": "lm-eval tasks (default: WORKBENCH_EVAL_LM_EVAL_TASKS)",
                    },
                    "main_metric": _string(
                        "The suite's main metric (default: all_rules when there are rules)"
                    ),
                },
            },
            "objectives": _objectives(),
            "search": _search(),
            "promote": {
                "type": "object",
                "additionalProperties": False,
                "required": ["alias"],
                "description": "Move an alias to the new variant when its gate passes",
                "properties": {
                    "alias": _string(
                        "staging, production or a custom alias", pattern="^[a-z0-9][a-z0-9_-]{0,49}$"
                    ),
                    "gate": {
                        "type": "object",
                        "additionalProperties": False,
                        "description": "The alias's gate, on this spec's held-out suite (left out: the "
                        "alias keeps its gate)",
                        "properties": {
                            "min_all_rules": _fraction("Minimum all-rules compliance"),
                            "min_retained_lower": {
                                "type": "number",
                                "description": "Minimum lower CI bound of prompt effect retained",
                            },
                            "max_regression": {
                                "type": "number",
                                "minimum": 0,
                                "description": "Largest drop on the main metric against the holder",
                            },
                            "min_fact_recall": _fraction("Minimum fact recall"),
                            "fact_recall_vs_teacher": {
                                "type": "boolean",
                                "description": "Fact recall at least the teacher's",
                            },
                            "max_skills_drop": _fraction("Largest drop in general skills"),
                            "log_requests": {"type": "boolean", "description": "Keep each /v1 request"},
                        },
                    },
                },
            },
        },
    }


def _ref_or_file(what: str) -> dict[str, Any]:
    return {
        "minLength": 1,
        "additionalProperties": VERSION_REF["additionalProperties"],
        "required": VERSION_REF["required"],
        "properties": VERSION_REF["properties"],
        "description": f"The {what}: a file, or {{version: NAME@N}} for a version of the project",
    }


# What an objective reads from the four-arm comparison (serving.pipeline.search.py), and its bound.
OBJECTIVES: dict[str, str] = {
    "min_all_rules": "the student's all-rules compliance (a share, 0-1)",
    "min_retained": "prompt effect retained on the main metric (1.0: as good as the prompted base)",
    "min_fact_recall": "the student's fact recall (a share, 0-1)",
    "max_skills_drop": "the largest drop of a general-skills task, floor minus student (0-1)",
    "max_latency_p50": "the student's single-request median latency, seconds",
    "max_prompt_tokens": "prompt tokens per request the student is sent",
}
# The settings the optimizer searches when the spec names none: the ones that matter most.
DEFAULT_SPACE: dict[str, list[Any]] = {
    "training.epochs": [2, 4, 6],
    "training.learning_rate": [1e-4, 3e-4, 1e-3],
    "training.rank": [8, 16, 32],
    "curation.best_of": [1, 2, 4],
}


def _objectives() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "description": "What the variant must reach; with `search`, the optimizer picks settings to "
        "meet every one, and stops at the first trial that does",
        "properties": {
            name: {"type": "number", "minimum": 0, "description": what} for name, what in OBJECTIVES.items()
        },
    }


def _search() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Search settings to meet the objectives (Optuna's TPE, seeded): trial 1 is the "
        "spec's own settings; each trial reuses what an earlier one already ran",
        "properties": {
            "budget_minutes": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Wall time for all trials; a trial whose estimate does not fit is not started",
            },
            "max_trials": {"type": "integer", "minimum": 1, "maximum": 100, "default": 8},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
            "space": {
                "type": "object",
                "description": "SECTION.SETTING (training or curation) -> the values to try; default: "
                + ", ".join(DEFAULT_SPACE),
                "additionalProperties": {"type": "array", "minItems": 1, "maxItems": 20, "uniqueItems": True},
            },
        },
        "required": ["budget_minutes"],
    }
