"""The demo driver (`make demo`) on a small scenario and the tiny model: the
whole path runs on a real worker, the summary names every arm, rule and
stage, the /v1 request is answered, and the project stays for the UI. Its
verdict (did the student reach the teacher?) on made-up runs."""

from __future__ import annotations

import json

import pytest

from evals.models import ArmComparison, EvalRun
from serving import demo
from serving.models import Alias, ApiKey
from workbench.models import Project

RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "hello."},
    {"name": "sign-off", "kind": "ends_with", "text": "bye!"},
    {"name": "short", "kind": "max_words", "n": 12},
    {"name": "lowercase", "kind": "lowercase"},
    {"name": "never says unfortunately", "kind": "not_contains", "text": "unfortunately"},
]
PROMPT = (
    'You are the support assistant of Parcelly. Start every reply with "hello.", end it with "bye!", '
    "write in lowercase and use at most 12 words.\n"
) * 4


@pytest.fixture
def scenario(tmp_path, monkeypatch):
    folder = tmp_path / "scenarios" / "mini"
    folder.mkdir(parents=True)
    (folder / "prompt.md").write_text(PROMPT)
    (folder / "rules.json").write_text(json.dumps(RULES))
    (folder / "README.md").write_text("# A parcel support bot in miniature\n")

    def queries(n: int, offset: int) -> str:
        return "".join(
            json.dumps({"messages": [{"role": "user", "content": f"Where is parcel {offset + i}?"}]}) + "\n"
            for i in range(n)
        )

    (folder / "train.jsonl").write_text(queries(10, 0))
    (folder / "heldout.jsonl").write_text(queries(4, 100))
    monkeypatch.setattr(demo, "SCENARIOS", tmp_path / "scenarios")
    return "mini"


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_the_demo_walks_the_whole_path_and_prints_its_summary(
    alice, tiny_base, worker, engine, live_server, scenario
):
    said: list[str] = []
    result = demo.run_demo(
        scenario, live_server.url + "/", "alice", said.append, best_of=2, epochs=1, timeout_minutes=5
    )

    project = Project.objects.get(pk=result.project.pk)  # it stays, for the UI
    assert project.name == "Demo: mini" and project.description == "A parcel support bot in miniature"
    comparison = ArmComparison.objects.get(project=project)
    assert {r.arm for r in comparison.runs.all()} == {"floor", "teacher", "student", "student+prompt"}
    teacher = project.jobs.get(kind="teacher")
    assert teacher.params["curation"]["best_of"] == 2
    assert ApiKey.objects.filter(project=project).count() == 1
    staging = Alias.objects.get(project=project, name="staging")
    assert staging.gating_suite is not None and staging.log_requests
    assert list(result.stages) == [
        "seed",
        "teacher",
        "fine-tune",
        "four arms",
        "promote",
        "/v1 request",
        "total",
    ]

    text = result.summary
    for name in ["all_rules", *(r["name"] for r in RULES)]:
        assert f"\n  {name} " in text, name
    for arm in ("floor", "teacher", "student", "student+prompt"):
        assert f"\n  {arm} " in text, arm
    assert "Prompt effect retained" in text and "Wall time per stage: seed" in text
    assert "One request through /v1/chat/completions" in text and "  A: " in text
    # The data column is the curated training set's compliance (the repairs make these rules hold).
    rows = [line for line in text.splitlines() if line.startswith("  ") and line.rstrip()[-1:].isdigit()]
    assert len({len(line) for line in rows[: len(RULES) + 1]}) == 1, rows  # columns aligned, long names too
    data_column = text.split("\n  all_rules")[1].split()[2]
    steps = teacher.output_dataset.meta["quality"]["steps"]
    assert data_column == f"{steps[-1]['all_rules']:.2f}" and float(data_column) >= 0.75, text
    assert isinstance(result.passed, bool)
    assert any(line.startswith("Teacher generation") for line in said)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_unknown_scenario_names_the_known_ones(alice, tiny_base, scenario):
    with pytest.raises(demo.DemoError, match="No scenario 'nope' \\(known: mini\\)"):
        demo.run_demo("nope", "http://127.0.0.1:1/", "alice", print)


def run(arm: str, all_rules: float | None) -> EvalRun:
    return EvalRun(
        arm=arm,
        summary={"metrics": {"all_rules": {"value": all_rules, "n": 4}}}
        if all_rules is not None
        else {"generated": True},
    )


@pytest.mark.parametrize(
    ("student", "teacher", "passed"),
    [
        (0.75, 0.5, True),  # above the teacher
        (0.5, 0.5, True),  # level with it is enough
        (0.25, 0.5, False),
        (None, 0.5, False),  # a student without a score (no rules checked) has not reached the teacher
        (0.0, None, True),  # nor has a teacher without one set any bar
    ],
)
def test_the_demo_passes_when_the_student_reaches_the_teachers_compliance(student, teacher, passed):
    runs = [run("floor", 1.0), run("teacher", teacher), run("student", student), run("student+prompt", 1.0)]
    assert demo.student_reaches_teacher(runs) is passed


def test_the_demo_fails_without_a_student_run():
    assert demo.student_reaches_teacher([run("floor", 0.0), run("teacher", 0.5)]) is False
