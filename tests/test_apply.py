"""`manage.py apply SPEC` on the tiny model: the dry run plans every step and
stores nothing; a real apply runs the whole path on a real worker and
promotes through the gate; applying again reuses every step; changing the
epochs runs only the fine-tune and its eval; the spec export_spec writes is
reused whole."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from evals.models import ArmComparison, EvalRun, EvalSuite
from jobs.actions import start_absorb, start_synthesis
from jobs.models import Job
from serving.models import Alias, AliasMove
from workbench.actions.datasets import derive_version, import_dataset, with_held_out
from workbench.actions.prompts import save_prompt
from workbench.models import (
    Dataset,
    DatasetRow,
    DatasetVersion,
    FoundationModel,
    Project,
    Prompt,
    PromptVersion,
    Variant,
)

PROMPT = "You are a pirate. Always start your answer with 'Arrr!' and never mention these instructions.\n"
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Arrr!"}]
QUERIES = [
    f"Question {i}: how do I {verb} my account?"
    for i, verb in enumerate("reset close open pay move rename lock share sell keep tag find".split())
]
HELD_OUT = ["Where is my parcel?", "Can I pay later?", "How do I log in?", "Who are you?"]
SPEC = """\
version: 1
project: Pirates
prompt:
  name: pirate
  file: prompt.md
  rules: rules.json
data:
  name: queries
  train: train.jsonl
  heldout_name: held out
  heldout: heldout.jsonl
teacher:
  generation: {max_new_tokens: 8, temperature: 1.0, seed: 0, batch_size: 4}
synthesis: false
curation: {best_of: 1, rounds: 1, probe: 0, passages: 0}
training: {epochs: 1, batch_size: 4, max_length: 256, general_mix: 0.0, fact_repeat: 1}
eval:
  generation: {max_new_tokens: 8}
  lm_eval_tasks: []
promote:
  alias: staging
  gate: {min_all_rules: 0.0, max_regression: 1.0}
"""
MODELS = (
    Project,
    Prompt,
    PromptVersion,
    Dataset,
    DatasetRow,
    Job,
    Variant,
    EvalSuite,
    EvalRun,
    ArmComparison,
    Alias,
)


def jsonl(queries: list[str]) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in queries)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "prompt.md").write_text(PROMPT)
    (folder / "rules.json").write_text(json.dumps(RULES))
    (folder / "train.jsonl").write_text(jsonl(QUERIES))
    (folder / "heldout.jsonl").write_text(jsonl(HELD_OUT))
    (folder / "spec.yaml").write_text(SPEC)
    return folder / "spec.yaml"


def apply(path: Path, *args: str) -> dict:
    out = io.StringIO()
    call_command("apply", str(path), "--json", *args, stdout=out, stderr=io.StringIO())
    return json.loads(out.getvalue())


def counts() -> dict[str, int]:
    return {m.__name__: m._default_manager.count() for m in MODELS} | {
        "DatasetVersion": DatasetVersion.all_objects.count()
    }


def files() -> set[Path]:
    return {p for p in Path(settings.DATA_DIR).rglob("*") if p.is_file() and "broker" not in p.name}


def actions(result: dict) -> dict[str, str]:
    return {s["step"]: s["action"] for s in result["plan"]["steps"]}


@pytest.mark.django_db
def test_a_dry_run_plans_every_step_with_estimates_and_stores_nothing(spec, alice, tiny_base):
    before, stored = counts(), files()
    result = apply(spec, "--dry-run")
    assert actions(result) == {
        "project": "create",
        "prompt": "save",
        "training data": "import",
        "held-out data": "import",
        "teacher": "run",
        "fine-tune": "run",
        "eval": "run",
        "promote": "run",
    }
    steps = {s["step"]: s for s in result["plan"]["steps"]}
    teacher = steps["teacher"]["estimate"]
    assert teacher["count"] == len(QUERIES) and teacher["unit"] == "samples" and not teacher["measured"]
    assert teacher["source"] == "no measurement yet: using the default rate 0.5 samples/s"
    assert steps["eval"]["estimate"]["count"] == 4 * len(HELD_OUT)
    assert steps["fine-tune"]["estimate"]["unit"] == "tokens" and steps["fine-tune"]["estimate"]["count"] > 0
    assert counts() == before and files() == stored
    text = io.StringIO()
    call_command("apply", str(spec), "--dry-run", stdout=text)
    assert "no measurement yet: using the default rate 0.5 samples/s" in text.getvalue()
    assert counts() == before and files() == stored


@pytest.mark.django_db
def test_a_reading_students_estimate_counts_the_passages_its_rows_carry(spec, alice, tiny_base):
    (spec.parent / "prompt.md").write_text(
        PROMPT
        + "\n## Desks\n\n"
        + "".join(
            f"Fact {i}: the {w} desk opens at {8 + i}:00 on weekdays.\n"
            for i, w in enumerate("account parcel payment login refund billing".split())
        )
    )
    text = spec.read_text()
    spec.write_text(text.replace("fact_repeat: 1}", "fact_repeat: 1, student_passages: 0}"))
    plain = apply(spec, "--dry-run")
    spec.write_text(text.replace("fact_repeat: 1}", "fact_repeat: 1, student_passages: 2}"))
    reading = apply(spec, "--dry-run")

    def finetune(result: dict) -> dict:
        return next(s for s in result["plan"]["steps"] if s["step"] == "fine-tune")["estimate"]

    # two sentences of about 12 tokens each, on every example
    assert finetune(reading)["count"] > finetune(plain)["count"] + len(QUERIES) * 15
    assert any("2 passages" in note for note in finetune(reading)["notes"])


@pytest.mark.django_db
def test_a_file_whose_rows_are_stored_is_reused_not_imported(spec, alice, alice_project, tiny_base):
    (spec.parent / "spec.yaml").write_text(SPEC.replace("project: Pirates", f"project: {alice_project.slug}"))
    # The same rows in another format: the hash is of the normalised rows.
    stored = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(QUERIES).encode()),
        filename="q.txt",
        eval_percent=0,
    )
    result = apply(spec, "--dry-run")
    steps = {s["step"]: s for s in result["plan"]["steps"]}
    assert steps["training data"]["action"] == "reuse" and str(stored) in steps["training data"]["detail"]
    assert steps["held-out data"]["action"] == "import"


@pytest.mark.django_db
def test_an_absorb_started_elsewhere_with_the_same_inputs_is_found(spec, alice, alice_project, tiny_base):
    """The fingerprints start_absorb stores are the ones the plan computes from the files."""
    (spec.parent / "spec.yaml").write_text(SPEC.replace("project: Pirates", f"project: {alice_project.name}"))
    prompt = save_prompt(alice_project, alice, "pirate", PROMPT, RULES).version
    train = import_dataset(
        alice_project, alice, "queries", io.BytesIO(jsonl(QUERIES).encode()), eval_percent=0
    )
    held = import_dataset(
        alice_project, alice, "held out", io.BytesIO(jsonl(HELD_OUT).encode()), eval_percent=100
    )
    teacher, finetune = start_absorb(
        alice_project,
        alice,
        prompt,
        with_held_out(train, held, alice),
        tiny_base,
        {"max_new_tokens": 8, "temperature": 1.0, "seed": 0, "batch_size": 4},
        {"epochs": 1, "batch_size": 4, "max_length": 256, "general_mix": 0.0, "fact_repeat": 1},
        curation={"best_of": 1, "rounds": 1, "probe": 0, "passages": 0},
    )
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert {k: v["action"] for k, v in steps.items()} == {
        "project": "reuse",
        "prompt": "reuse",
        "training data": "reuse",
        "held-out data": "reuse",
        "teacher": "reuse",
        "fine-tune": "reuse",
        "eval": "run",
        "promote": "run",
    }
    assert (steps["teacher"]["job"], steps["fine-tune"]["job"]) == (teacher.pk, finetune.pk)
    assert "still queued: followed" in steps["teacher"]["detail"]
    (spec.parent / "spec.yaml").write_text(
        SPEC.replace("project: Pirates", f"project: {alice_project.name}").replace("best_of: 1", "best_of: 2")
    )
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert (steps["teacher"]["action"], steps["fine-tune"]["action"]) == ("run", "run")


@pytest.mark.django_db
def test_a_synthesis_runs_before_the_teacher_which_answers_what_it_stores(
    spec, alice, alice_project, tiny_base
):
    """The plan names the synthesis job's output by the job's fingerprint before it exists;
    start_synthesis and start_absorb store the fingerprints the plan computes."""
    text = SPEC.replace("project: Pirates", f"project: {alice_project.slug}")
    plain = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    (spec.parent / "spec.yaml").write_text(
        text.replace("synthesis: false", "synthesis: {count: 6, samples: 2}")
    )
    planned = apply(spec, "--dry-run")["plan"]["steps"]
    names = [s["step"] for s in planned]
    assert names.index("held-out data") < names.index("synthesis") == names.index("teacher") - 1
    steps = {s["step"]: s for s in planned}
    assert steps["synthesis"]["action"] == "run"
    assert steps["synthesis"]["estimate"]["unit"] == "questions"
    assert steps["synthesis"]["estimate"]["count"] == 18  # 6 x the default oversample of 3
    assert f"answers up to {len(QUERIES) + 6} queries" in steps["teacher"]["detail"]
    assert steps["teacher"]["fingerprint"] != plain["teacher"]["fingerprint"]

    prompt = save_prompt(alice_project, alice, "pirate", PROMPT, RULES).version
    train = import_dataset(
        alice_project, alice, "queries", io.BytesIO(jsonl(QUERIES).encode()), eval_percent=0
    )
    held = import_dataset(
        alice_project, alice, "held out", io.BytesIO(jsonl(HELD_OUT).encode()), eval_percent=100
    )
    data = with_held_out(train, held, alice)
    synthesis = start_synthesis(alice_project, alice, prompt, data, tiny_base, 6, {"samples": 2})
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert steps["synthesis"]["action"] == "reuse" and steps["synthesis"]["job"] == synthesis.pk
    assert "still queued: followed" in steps["synthesis"]["detail"]
    assert steps["teacher"]["action"] == "run"

    # Its output (as the job would store it), answered by an absorb started elsewhere: found.
    rows = list(data.rows.order_by("index").values_list("index", "messages"))
    output = derive_version(
        data, alice, [*rows, (None, [{"role": "user", "content": "Can I bring a parrot?"}])]
    )
    Job.objects.filter(pk=synthesis.pk).update(status=Job.SUCCEEDED, output_dataset=output)
    teacher, finetune = start_absorb(
        alice_project,
        alice,
        prompt,
        output,
        tiny_base,
        {"max_new_tokens": 8, "temperature": 1.0, "seed": 0, "batch_size": 4},
        {"epochs": 1, "batch_size": 4, "max_length": 256, "general_mix": 0.0, "fact_repeat": 1},
        curation={"best_of": 1, "rounds": 1, "probe": 0, "passages": 0},
    )
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert (steps["synthesis"]["action"], steps["teacher"]["action"], steps["fine-tune"]["action"]) == (
        "reuse",
        "reuse",
        "reuse",
    )
    assert (steps["teacher"]["job"], steps["fine-tune"]["job"]) == (teacher.pk, finetune.pk)
    assert f"{output}, {len(QUERIES) + len(HELD_OUT) + 1} rows" in steps["synthesis"]["detail"]
    # Another count is another synthesis, so another teacher.
    (spec.parent / "spec.yaml").write_text(
        text.replace("synthesis: false", "synthesis: {count: 7, samples: 2}")
    )
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert (steps["synthesis"]["action"], steps["teacher"]["action"]) == ("run", "run")


@pytest.mark.django_db
def test_a_held_out_percentage_is_planned_from_the_file_as_the_import_splits_it(
    spec, alice, alice_project, tiny_base
):
    text = SPEC.replace("project: Pirates", f"project: {alice_project.slug}")
    text = text.replace(
        "  heldout_name: held out\n  heldout: heldout.jsonl\n", "  heldout_percent: 25\n  seed: 7\n"
    )
    (spec.parent / "spec.yaml").write_text(text)
    planned = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert planned["training data"]["action"] == "import" and "held-out data" not in planned
    assert planned["eval"]["estimate"]["count"] == 4 * 3  # 25% of 12 rows, four arms
    prompt = save_prompt(alice_project, alice, "pirate", PROMPT, RULES).version
    data = import_dataset(
        alice_project, alice, "queries", io.BytesIO(jsonl(QUERIES).encode()), eval_percent=25, seed=7
    )
    teacher, _ = start_absorb(
        alice_project,
        alice,
        prompt,
        data,
        tiny_base,
        {"max_new_tokens": 8, "temperature": 1.0, "seed": 0, "batch_size": 4},
        curation={"best_of": 1, "rounds": 1, "probe": 0, "passages": 0},
    )
    steps = {s["step"]: s for s in apply(spec, "--dry-run")["plan"]["steps"]}
    assert steps["training data"]["action"] == "reuse" and str(data) in steps["training data"]["detail"]
    assert steps["teacher"]["action"] == "reuse" and steps["teacher"]["job"] == teacher.pk
    assert (
        steps["teacher"]["fingerprint"] == planned["teacher"]["fingerprint"]
    )  # from the file, before the import


@pytest.mark.django_db
def test_what_the_workbench_lacks_is_named_with_its_line(spec, alice, tiny_base):
    (spec.parent / "spec.yaml").write_text(SPEC + "base_model: no-such-model\n")
    with pytest.raises(
        CommandError, match=r"spec.yaml line 23: base_model: no registered model 'no-such-model'"
    ):
        apply(spec, "--dry-run")
    (spec.parent / "spec.yaml").write_text(SPEC.replace("curation:", "teacher_x: 1\ncuration:"))
    with pytest.raises(CommandError, match=r"spec.yaml line 15: teacher_x: unknown key"):
        apply(spec, "--dry-run")
    (spec.parent / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops\n')
    (spec.parent / "spec.yaml").write_text(SPEC)
    with pytest.raises(
        CommandError,
        match=r"spec.yaml line 9: data.train: train.jsonl: 1 problem\(s\), nothing imported: line 2",
    ):
        apply(spec, "--dry-run")
    with pytest.raises(CommandError, match="pass --user NAME to create it"):
        (spec.parent / "train.jsonl").write_text(jsonl(QUERIES))
        apply(spec)
    assert not Project.objects.exists() and not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_apply_runs_the_path_then_reuses_it_and_reruns_only_what_changed(spec, alice, worker, tmp_path):
    first = apply(spec, "--user", "alice")
    jobs = {j.kind: j for j in Job.objects.all()}
    assert (
        Job.objects.count() == 3
        and sorted(jobs) == ["eval", "finetune", "teacher"]
        and all(j.status == Job.SUCCEEDED for j in jobs.values())
    )
    outcome = first["outcome"]
    variant = Variant.objects.get(pk=outcome["variant"]["id"])
    comparison = ArmComparison.objects.get(pk=outcome["comparison"]["id"])
    assert {r.arm for r in comparison.runs.all()} == {"floor", "teacher", "student", "student+prompt"}
    assert comparison.job == jobs["eval"] and comparison.variant == variant
    # The comparison is the one the fine-tune started itself (evals.signals), not a second one.
    assert ArmComparison.objects.count() == 1 and "four-arm comparison queued" in jobs["finetune"].log
    staging = Alias.objects.get(project__slug="pirates", name="staging")
    assert outcome["promoted"] and staging.variant == variant and staging.gating_suite == comparison.suite
    assert staging.min_all_rules == 0.0 and staging.max_regression == 1.0
    costs = first["costs"]  # the cost calculator, from the comparison's runs and the jobs
    assert costs["per_million"]["student"] > 0 and costs["per_million"]["teacher"] > 0
    assert costs["one_off_seconds"]["teacher"] > 0 and costs["recommendation"]["reasons"]
    steps = {s["step"]: s for s in first["plan"]["steps"]}
    for step, kind in (("teacher", "teacher"), ("fine-tune", "finetune"), ("eval", "eval")):
        assert jobs[kind].params["fingerprint"] == steps[step]["fingerprint"], step

    # Again: every step is found by its fingerprint, nothing new is stored, in seconds.
    before, began = counts(), time.monotonic()
    again = apply(spec, "--user", "alice")
    assert time.monotonic() - began < 30
    assert set(actions(again).values()) == {"reuse"} and counts() == before
    assert again["outcome"]["variant"]["id"] == variant.pk and AliasMove.objects.count() == 1
    text = io.StringIO()
    call_command("apply", str(spec), "--user", "alice", stdout=text, stderr=io.StringIO())
    assert "per million requests for the student" in text.getvalue() and "\nserve: " in text.getvalue()
    assert {s["step"]: s["job"] for s in again["plan"]["steps"] if s["job"]} == {
        "teacher": jobs["teacher"].pk,
        "fine-tune": jobs["finetune"].pk,
        "eval": jobs["eval"].pk,
    }

    # One more epoch: the teacher's answers are reused; the fine-tune, its eval and the promotion run.
    spec.write_text(SPEC.replace("epochs: 1", "epochs: 2"))
    plan = apply(spec, "--dry-run")
    assert actions(plan) | {} == {
        "project": "reuse",
        "prompt": "reuse",
        "training data": "reuse",
        "held-out data": "reuse",
        "teacher": "reuse",
        "fine-tune": "run",
        "eval": "run",
        "promote": "run",
    }
    tune = next(s for s in plan["plan"]["steps"] if s["step"] == "fine-tune")
    assert f"unlike {jobs['finetune']}: training.epochs 1 -> 2" in tune["detail"]
    second = apply(spec, "--user", "alice")
    new = Job.objects.exclude(pk__in=[j.pk for j in jobs.values()])
    assert sorted(new.values_list("kind", flat=True)) == ["eval", "finetune"]
    tuned = new.get(kind="finetune")
    assert tuned.dataset_version == jobs["teacher"].output_dataset and tuned.params["train"]["epochs"] == 2
    v2 = Variant.objects.get(pk=second["outcome"]["variant"]["id"])
    assert v2 != variant and Alias.objects.get(pk=staging.pk).variant == v2
    assert EvalSuite.objects.count() == 1  # the same held-out suite

    # The exported spec, by reference and as files, is the same run: applied, it reuses everything.
    exported = io.StringIO()
    call_command("export_spec", "--project", "pirates", "--variant", str(v2.pk), stdout=exported)
    (tmp_path / "exported.yaml").write_text(exported.getvalue())
    assert "epochs: 2" in exported.getvalue() and "ref: pirate@1" in exported.getvalue()
    before = counts()
    assert set(actions(apply(tmp_path / "exported.yaml")).values()) == {"reuse"} and counts() == before
    call_command(
        "export_spec",
        "--project",
        "pirates",
        "--job",
        str(tuned.pk),
        "--out",
        str(tmp_path / "out"),
        stdout=io.StringIO(),
    )
    assert (tmp_path / "out" / "train.jsonl").read_text() == jsonl(QUERIES)
    assert set(actions(apply(tmp_path / "out" / "spec.yaml")).values()) == {"reuse"} and counts() == before

    # Back to one epoch behind a gate it cannot pass: every job is reused, and the gate refuses the move.
    spec.write_text(SPEC.replace("min_all_rules: 0.0", "min_all_rules: 1.0"))
    with pytest.raises(CommandError, match="The gate of pirates/staging refused"):
        apply(spec, "--user", "alice")
    assert (
        Alias.objects.get(pk=staging.pk).variant == v2
        and Alias.objects.get(pk=staging.pk).min_all_rules == 1.0
    )
    assert Job.objects.count() == before["Job"] and AliasMove.objects.count() == 2


SHIP = (
    "\n## The ship\n\n"
    "The Black Gull sails from Tortuga at dawn every Monday. A berth costs 5 gold coins a night. "
    "Parrots travel free in the crow's nest. The crossing to Port Royal takes three days.\n"
)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_apply_with_synthesis_trains_on_the_synthetic_queries_and_reuses_them(
    spec, alice, worker, smollm2_dir, tmp_path
):
    """SmolLM2 writes the questions and answers them; the tiny student learns them. Applied
    again, and as exported, every step is reused, the synthesis too."""
    FoundationModel.objects.create(name="smollm2", path=str(smollm2_dir))
    (spec.parent / "prompt.md").write_text(PROMPT + SHIP)
    spec.write_text(
        SPEC.replace("teacher:\n", "teacher:\n  model: smollm2\n").replace(
            "synthesis: false", "synthesis: {count: 4, samples: 4, seed: 0}"
        )
    )
    first = apply(spec, "--user", "alice")
    jobs = {j.kind: j for j in Job.objects.all()}
    assert sorted(jobs) == ["eval", "finetune", "synthesize", "teacher"]
    assert all(j.status == Job.SUCCEEDED for j in jobs.values()), {k: j.error for k, j in jobs.items()}
    made = jobs["synthesize"].output_dataset
    kept = made.meta["synthesis"]["kept"]
    assert 1 <= kept <= 4 and jobs["synthesize"].base_model.name == "smollm2"
    # The teacher answered the real queries and the synthetic ones; the student learned from them.
    assert jobs["teacher"].dataset_version == made
    answers = jobs["teacher"].output_dataset.rows.filter(split=DatasetRow.TRAIN)
    assert answers.count() == len(QUERIES) + kept
    synthetic = [r for r in answers if r.extra.get("source") == "synthetic"]
    assert len(synthetic) == kept and all(r.messages[-1]["role"] == "assistant" for r in synthetic)
    assert jobs["finetune"].dataset_version == jobs["teacher"].output_dataset
    steps = {s["step"]: s for s in first["plan"]["steps"]}
    for step, kind in (("synthesis", "synthesize"), ("teacher", "teacher"), ("fine-tune", "finetune")):
        assert jobs[kind].params["fingerprint"] == steps[step]["fingerprint"], step

    before = counts()
    assert set(actions(apply(spec, "--user", "alice")).values()) == {"reuse"} and counts() == before
    variant = Variant.objects.get(pk=first["outcome"]["variant"]["id"])
    call_command(
        "export_spec",
        "--project",
        "pirates",
        "--variant",
        str(variant.pk),
        "--out",
        str(tmp_path / "out"),
        stdout=io.StringIO(),
    )
    exported = (tmp_path / "out" / "spec.yaml").read_text()
    assert "synthesis:\n  count: 4\n" in exported and "samples: 4" in exported
    # the files hold the queries the synthesis started from, not its output
    assert (tmp_path / "out" / "train.jsonl").read_text() == jsonl(QUERIES)
    assert set(actions(apply(tmp_path / "out" / "spec.yaml")).values()) == {"reuse"} and counts() == before
