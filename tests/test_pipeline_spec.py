"""The absorption spec: its published schema is the one the settings
dataclasses make, every problem names its line and key, hostile YAML and
paths outside the spec's folder are refused, and the shipped scenarios'
specs are valid."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command

from engines.curation import ABSORB_COUNT, JOB_MAX_COUNT, CurationSettings, SynthesisSettings
from engines.inference import GenerationSettings
from engines.training import TrainConfig
from workbench.pipeline import SCHEMA_PATH, SpecError, build_schema, load_spec, parse_spec

REPO = Path(__file__).resolve().parent.parent
GOOD = """\
version: 1
project: pirates
prompt:
  name: pirate
  file: prompt.md
  rules:
    - {name: greeting, kind: starts_with, text: "Arrr!"}
data:
  train: train.jsonl
  heldout: heldout.jsonl
training:
  epochs: 2
  learning_rate: 3e-4
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "prompt.md").write_text("You are a pirate. Start every answer with 'Arrr!'.\n")
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "heldout.jsonl").write_text('{"messages": [{"role": "user", "content": "ho"}]}\n')
    return tmp_path


def problems(text: str, folder: Path) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(text, "spec.yaml", folder)
    return err.value.problems


def test_a_good_spec_reads_yaml_1_2_floats(folder):
    spec = parse_spec(GOOD, "spec.yaml", folder)
    assert spec.training == {"epochs": 2, "learning_rate": 0.0003}  # 3e-4, not the string "3e-4"
    assert spec.checked_prompt is not None and spec.checked_prompt.rules[0]["name"] == "greeting"
    assert spec.where("training", "epochs") == "spec.yaml line 12: training.epochs"


def test_each_problem_names_its_line_and_key(folder):
    text = GOOD.replace("  epochs: 2", "  epochs: 0\n  epoch: 3\n  rank: four").replace('text: "Arrr!"}', "}")
    text = (
        text.replace("data:\n  train: train.jsonl\n", "data:\n")
        + "curation: {best_of: 0}\nteacher:\n  generation: {max_new_tokens: 0}\n"
    )
    found = problems(text, folder)
    assert "spec.yaml line 8: data: missing required key 'train'" in found
    assert "spec.yaml line 12: training.epoch: unknown key (did you mean 'epochs'?)" in found
    assert "spec.yaml line 13: training.rank: must be an integer, got 'four'" in found
    assert "spec.yaml line 17: teacher.generation.max_new_tokens: must be >= 1, got 0" in found
    # Sections the schema accepted are checked by their own dataclass and validators:
    assert "spec.yaml line 7: prompt.rules[0]: rule 1 (\"greeting\"): missing parameter 'text'" in found
    assert (
        "spec.yaml line 11: training.epochs: must be >= 1, got 0" not in found
    )  # training failed the schema
    assert "spec.yaml line 15: curation.best_of: must be a whole number from 1 to 16, got 0" in found
    assert [int(p.split()[2].rstrip(":")) for p in found] == sorted(
        int(p.split()[2].rstrip(":")) for p in found
    )


def test_settings_are_checked_by_their_dataclasses(folder):
    found = problems(GOOD.replace("epochs: 2", "epochs: 0\n  lr_scheduler: constant"), folder)
    assert (
        "spec.yaml line 12: training.epochs: must be >= 1, got 0" not in found
    )  # the schema's enum came first
    assert any("training.lr_scheduler: must be one of 'cosine', 'linear'" in p for p in found)
    found = problems(GOOD.replace("epochs: 2", "epochs: 0"), folder)
    assert found == ["spec.yaml line 12: training.epochs: must be >= 1, got 0"]


def test_synthesis_is_on_unless_turned_off_and_its_settings_are_checked(folder):
    # As an absorb from the form or the command: the teacher first writes questions about the prompt.
    default = {"count": ABSORB_COUNT, "settings": {}}
    assert parse_spec(GOOD, "spec.yaml", folder).synthesis == default
    assert parse_spec(GOOD + "synthesis: true\n", "spec.yaml", folder).synthesis == default
    assert parse_spec(GOOD + "synthesis: false\n", "spec.yaml", folder).synthesis is None
    spec = parse_spec(GOOD + "synthesis: {count: 120, fact_turns: 3}\n", "spec.yaml", folder)
    assert spec.synthesis == {"count": 120, "settings": {"fact_turns": 3}}
    # min_words is checked against max_words, whichever key says it
    assert parse_spec(GOOD + "synthesis: {min_words: 50, max_words: 60}\n", "spec.yaml", folder).synthesis
    assert problems(GOOD + "synthesis: {min_words: 50}\n", folder) == [
        "spec.yaml line 14: synthesis: min_words (50) is above max_words (40)"
    ]
    assert problems(GOOD + "synthesis: {top_k: 0}\n", folder) == [
        "spec.yaml line 14: synthesis: top_k must be a whole number from 1 to 20, got 0"
    ]
    found = problems(GOOD + f"synthesis:\n  count: {JOB_MAX_COUNT + 1}\n  fact_turn: 2\n", folder)
    assert f"spec.yaml line 15: synthesis.count: must be <= {JOB_MAX_COUNT}, got {JOB_MAX_COUNT + 1}" in found
    assert any(p.startswith("spec.yaml line 16: synthesis.fact_turn: unknown key") for p in found)


def test_exclusive_keys_the_wrong_version_and_unknown_top_level_keys(folder):
    found = problems(
        GOOD.replace("version: 1", "version: 2").replace(
            "  heldout: heldout.jsonl", "  heldout: heldout.jsonl\n  heldout_percent: 10"
        )
        + "teacher: {model: a, endpoint: b}\nevals: {}\n",
        folder,
    )
    assert found[0] == "spec.yaml line 1: version: must be 1, got 2"
    assert (
        "spec.yaml line 11: data.heldout_percent: give heldout (a file or a version) or heldout_percent, not both"
        in found
    )
    assert "spec.yaml line 15: teacher: give model or endpoint, not both" in found
    assert any(p.startswith("spec.yaml line 16: evals: unknown key (did you mean 'eval'?)") for p in found)
    assert problems(GOOD.replace("  heldout: heldout.jsonl\n", ""), folder) == [
        "spec.yaml line 8: data: missing the held-out set: heldout (a file) or heldout_percent"
    ]


def test_hostile_yaml_and_paths_outside_the_folder_are_refused(folder, tmp_path):
    assert problems("a: &x [1, 2]\nb: *x\n", folder) == [
        "spec.yaml line 2: YAML aliases (*name) are not allowed in a spec"
    ]
    assert problems(GOOD + "project: again\n", folder) == [
        "spec.yaml line 14: project: appears twice (also on line 2)"
    ]
    deep = "version: 1\nx: " + "[" * 20 + "]" * 20 + "\n"
    assert "nested deeper than" in problems(deep, folder)[0]
    deeper = (
        "version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n"
    )  # composing that tree would recurse past Python's limit
    assert problems(deeper, folder) == ["spec.yaml line 2: nested deeper than 12 levels"]
    assert problems("version: [1\n", folder)[0].startswith("spec.yaml line 2: not valid YAML")
    outside = GOOD.replace("file: prompt.md", "file: ../secret.md")
    (tmp_path.parent / "secret.md").write_text("secret")
    assert problems(outside, folder) == [
        "spec.yaml line 5: prompt.file: '../secret.md' is outside the spec's folder"
    ]
    assert problems(GOOD.replace("file: prompt.md", "file: /etc/hostname"), folder) == [
        "spec.yaml line 5: prompt.file: '/etc/hostname': give a path relative to the spec's folder"
    ]
    big = folder / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(SpecError, match="larger than"):
        load_spec(big)


def test_a_rules_file_problem_names_the_file(folder):
    (folder / "rules.json").write_text(json.dumps([{"name": "x", "kind": "max_words"}]))
    text = GOOD.replace(
        '  rules:\n    - {name: greeting, kind: starts_with, text: "Arrr!"}', "  rules: rules.json"
    )
    assert problems(text, folder) == [
        "spec.yaml line 6: prompt.rules: rules.json: rule 1 (\"x\"): missing parameter 'n'"
    ]
    (folder / "rules.json").write_text("[{")
    assert problems(text, folder)[0].startswith(
        "spec.yaml line 6: prompt.rules: rules.json: line 1: invalid JSON"
    )


def test_the_published_schema_is_the_one_the_dataclasses_make():
    assert json.loads(SCHEMA_PATH.read_text()) == build_schema(), (
        "regenerate it: python manage.py apply --schema > workbench/pipeline/spec.schema.json"
    )
    props = build_schema()["properties"]
    assert set(props["training"]["properties"]) == {f.name for f in dataclasses.fields(TrainConfig)} | {
        "train_on_failing"
    }
    assert set(props["curation"]["properties"]) == {f.name for f in dataclasses.fields(CurationSettings)}
    assert set(props["synthesis"]["properties"]) == {
        f.name for f in dataclasses.fields(SynthesisSettings)
    } | {"count"}
    generation = props["teacher"]["properties"]["generation"]["properties"]
    assert set(generation) == {f.name for f in dataclasses.fields(GenerationSettings)} - {
        "logit_bias",
        "response_format",
    }
    assert props["training"]["properties"]["epochs"]["default"] == TrainConfig().epochs
    out = io.StringIO()
    call_command("apply", "--schema", stdout=out)
    assert json.loads(out.getvalue()) == build_schema()


def test_every_shipped_scenario_has_a_valid_spec():
    scenarios = sorted(p for p in (REPO / "scenarios").iterdir() if (p / "prompt.md").is_file())
    assert scenarios
    for folder in scenarios:
        spec = load_spec(folder / "spec.yaml")
        assert spec.checked_prompt is not None and spec.checked_prompt.rules, folder
        assert spec.section("data")["heldout"] == "heldout.jsonl" and spec.promote is not None
