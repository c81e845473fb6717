"""Facts checks on prompt versions (storage, the import command, the prompt
page's facts form and proposals), scored by the real eval runner, shown by
the headless commands and required by the promotion gate (issue 20 item 3)."""

import io
import json
import re
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from evals import actions as eval_actions
from evals.management.commands.compare_arms import substance_lines
from evals.models import ArmComparison, EvalResult, EvalRun, metric_label
from jobs.lifecycle import execute
from jobs.models import Job
from serving import actions as serving_actions
from serving.actions import GateRefused, ensure_default_aliases, promote
from serving.gate import evaluate_gate
from serving.models import Alias
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import restore_version, save_prompt
from workbench.models import FoundationModel, Prompt, Variant

HARBOR = Path(__file__).resolve().parent.parent / "scenarios" / "harbor" / "prompt.md"
FARE = {"name": "fare", "question": "gull island.*(fare|cost|price)", "expect": "12 euros"}
CROSSING = {"name": "crossing", "question": "how long.*gull island", "expect_regex": r"\b40\s*min"}
QUERIES = [
    f"How do I {verb} my {thing}?"
    for verb in ("reset", "close", "rename", "export")
    for thing in ("password", "account", "project", "invoice", "order")
]


def new_prompt(project, user, facts=None, text="You are Harbor's assistant. Gull Island is 12 euros."):
    return save_prompt(project, user, "harbor", text, [], facts_data=facts).version


# --- storage ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_version_stores_its_facts_and_the_next_keeps_them(alice, alice_project):
    v1 = new_prompt(alice_project, alice, [FARE])
    assert v1.facts == [FARE]
    v2 = save_prompt(alice_project, alice, "harbor", "New text.").version
    assert v2.number == 2 and v2.facts == [FARE]
    v3 = save_prompt(alice_project, alice, "harbor", "New text.", facts_data=[FARE, CROSSING]).version
    assert v3.facts == [FARE, CROSSING] and v3.note == "added fact crossing"
    assert (
        save_prompt(alice_project, alice, "harbor", "New text.", facts_data=[FARE, CROSSING]).created is False
    )
    v4 = restore_version(v1.prompt, alice, 1).version
    assert v4.facts == [FARE] and v4.text == v1.text


@pytest.mark.django_db
def test_bad_facts_are_refused_with_every_problem_named(alice, alice_project):
    with pytest.raises(ActionError) as caught:
        new_prompt(alice_project, alice, [FARE, {"name": "x", "question": "(", "expect": "y"}, FARE])
    message = str(caught.value)
    assert message.startswith("Invalid facts:\n")
    assert "fact 2 (\"x\"): invalid regex in 'question'" in message
    assert 'fact 3 ("fare"): duplicate name (fact 1 has the same name)' in message
    with pytest.raises(ActionError, match="facts must be a list, got object"):
        new_prompt(alice_project, alice, {"fare": "12"})
    assert not Prompt.objects.exists()


@pytest.mark.django_db
def test_the_import_command_reads_a_facts_file(alice_project, tmp_path):
    prompt, facts = tmp_path / "p.md", tmp_path / "facts.json"
    prompt.write_text("Gull Island is 12 euros.")
    facts.write_text(json.dumps([FARE]))
    out = io.StringIO()
    args = ["import_prompt", str(prompt), "--project", alice_project.slug, "--name", "p"]
    call_command(*args, "--facts", str(facts), stdout=out)
    assert "1 facts" in out.getvalue()
    assert Prompt.objects.get(name="p").latest.facts == [FARE]
    facts.write_text(json.dumps([{"name": "n", "question": "q"}]))
    with pytest.raises(CommandError, match=r"Invalid facts:\nfact 1 \(\"n\"\): give exactly one of 'expect'"):
        call_command(*args, "--facts", str(facts))
    facts.write_text("[{")
    with pytest.raises(CommandError, match=r"facts.json: line 1: invalid JSON"):
        call_command(*args, "--facts", str(facts))
    with pytest.raises(CommandError, match="missing.json"):
        call_command(*args, "--facts", str(tmp_path / "missing.json"))
    prompt.write_text("Changed text.")
    call_command(*args, stdout=io.StringIO())  # no --facts: the facts are kept
    assert Prompt.objects.get(name="p").latest.facts == [FARE]


# --- the prompt page -------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_prompt_takes_facts_as_json_and_refuses_bad_ones(alice_client, alice_project):
    url = reverse("prompt_create", args=[alice_project.slug])
    r = alice_client.post(url, {"name": "harbor", "text": "Text.", "facts": json.dumps([FARE])})
    assert r.status_code == 302 and Prompt.objects.get(name="harbor").latest.facts == [FARE]
    r = alice_client.post(
        url, {"name": "other", "text": "Text.", "facts": '[{"name": "n", "question": "("}]'}
    )
    assert r.status_code == 400
    assert b"Facts: fact 1 (&quot;n&quot;): invalid regex in &#x27;question&#x27;" in r.content
    r = alice_client.post(url, {"name": "other", "text": "Text.", "facts": "[1,"})
    assert r.status_code == 400 and b"Facts: line 1: invalid JSON" in r.content
    assert not Prompt.objects.filter(name="other").exists()


@pytest.mark.django_db
def test_the_facts_form_saves_a_new_version_with_the_same_text(alice_client, alice, alice_project):
    version = new_prompt(alice_project, alice)
    url = reverse("prompt_facts", args=[alice_project.slug, version.prompt_id])
    page = alice_client.get(version.prompt.get_absolute_url())
    assert page.status_code == 200 and b"Facts checks" in page.content and b"Propose facts" in page.content
    r = alice_client.post(url, {"facts": json.dumps([FARE, CROSSING])})
    latest = version.prompt.latest
    assert r.status_code == 302 and latest.number == 2 and latest.text == version.text
    assert latest.facts == [FARE, CROSSING]
    for bad, message in [
        ('{"name": "x"}', b"facts must be a list, got object"),
        ("[" * 100, b"nested more than"),
        (json.dumps([dict(FARE, expect="")]), b"&#x27;expect&#x27; must not be empty"),
    ]:
        r = alice_client.post(url, {"facts": bad})
        assert r.status_code == 400 and message in r.content, bad
    assert version.prompt.latest.number == 2
    r = alice_client.post(url, {"facts": ""})  # empty: no facts
    assert r.status_code == 302 and version.prompt.latest.facts == []


@pytest.mark.django_db
def test_proposed_facts_are_shown_and_the_checked_ones_added(alice_client, alice, alice_project, bob, client):
    version = new_prompt(alice_project, alice, [FARE], text=HARBOR.read_text())
    propose = reverse("prompt_facts_propose", args=[alice_project.slug, version.prompt_id])
    add = reverse("prompt_facts_add", args=[alice_project.slug, version.prompt_id])
    page = alice_client.get(propose)
    assert page.status_code == 200 and b"Add the checked facts" in page.content
    assert b"Port Ellis to Gull Island takes 40 minutes." in page.content
    fragment = alice_client.get(propose, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and b"<html" not in fragment.content
    assert b'id="fact-drafts"' in fragment.content and b"40 minutes" in fragment.content
    picks = re.findall(rb'name="pick" value="(\d+)" aria-label="Add ([^"]*)"', page.content)
    wanted = [i.decode() for i, name in picks if b"40 minutes" in name or b"12 euros" in name]
    assert len(wanted) == 2
    r = alice_client.post(add, {"version": version.number, "pick": wanted})
    latest = version.prompt.latest
    assert r.status_code == 302 and latest.number == 2 and latest.text == version.text
    assert latest.facts[0] == FARE and {f["expect"] for f in latest.facts[1:]} == {"40 minutes", "12 euros"}
    for data, message in [
        ({"version": version.number}, b"Check at least one proposed fact to add."),
        ({"version": version.number, "pick": "9999"}, b"9999 is not one of the proposed facts"),
        ({"version": version.number, "pick": "x"}, b"x is not one of the proposed facts"),
        ({"version": "99", "pick": "0"}, b"Propose the facts again"),
        ({"version": "1" * 40, "pick": "0"}, b"Propose the facts again"),
        ({"version": version.number, "pick": wanted[0]}, b"already in the prompt"),
    ]:
        r = alice_client.post(add, data)
        assert r.status_code == 400 and message in r.content, data
    assert version.prompt.latest.number == 2
    client.force_login(bob)
    assert client.get(propose).status_code == 404
    assert client.post(add, {"version": 1, "pick": "0"}).status_code == 404


# --- scored by the real runner, shown, gated ------------------------------------------------


@pytest.fixture
def adapter_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A LoRA adapter that changes the tiny model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def run_arms(project, user, suite, variant) -> ArmComparison:
    comparison = eval_actions.start_comparison(
        project, user, suite, variant, generation={"max_new_tokens": 12, "batch_size": 8}
    )
    assert comparison.job is not None
    execute(comparison.job.pk, "test")
    comparison.refresh_from_db()
    assert comparison.job.status == Job.SUCCEEDED, comparison.job.log
    return comparison


def outputs(comparison: ArmComparison, arm: str) -> list[str]:
    run = comparison.runs.get(arm=arm)
    return list(run.results.order_by("example__index").values_list("output", flat=True))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_runner_scores_facts_per_arm_and_the_gate_holds_the_student_to_them(
    alice, alice_project, tiny_model_dir, adapter_dir, one_torch_thread
):
    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    prompt = save_prompt(alice_project, alice, "support", "You are the support assistant.", []).version
    rows = "\n".join(json.dumps({"messages": [{"role": "user", "content": q}]}) for q in QUERIES)
    data = import_dataset(
        alice_project, alice, "faq", io.BytesIO(rows.encode()), filename="q.jsonl", eval_percent=25
    )
    variant = Variant.objects.create(
        project=alice_project,
        name="absorbed",
        base_model=base,
        adapter_path=str(adapter_dir),
        prompt_version=prompt,
        dataset_version=data,
    )
    suite = eval_actions.suite_for_variant(variant)
    assert suite is not None and suite.facts == []
    # Facts, not general skills (tests/test_evals.py runs those): 288 questions an arm, twice, were 3/4 of its time.
    suite.lm_eval_tasks = []
    suite.save(update_fields=["lm_eval_tasks"])
    first = run_arms(alice_project, alice, suite, variant)
    assert "fact_recall" not in first.headline  # no facts: nothing to recall
    examples = list(suite.examples.order_by("index"))
    said = outputs(first, "student")[0]
    assert said.strip()
    # One fact the student's answer to the first query states (its own words, as written),
    # one no answer of a random model states; the other queries ask for no fact.
    suite.facts = [
        {"name": "stated", "question": "^" + re.escape(examples[0].query) + "$", "expect": said.strip()},
        {"name": "missing", "question": re.escape(examples[1].query), "expect": "12 euros to Gull Island"},
    ]
    suite.save(update_fields=["facts"])
    second = run_arms(alice_project, alice, suite, variant)
    assert outputs(second, "student") == outputs(first, "student")  # greedy: the same answers
    student = second.runs.get(arm="student")
    checks = list(student.results.order_by("example__index").values_list("checks", flat=True))
    assert checks[0]["fact:stated"] == 1.0 and checks[0]["fact_recall"] == 1.0
    assert checks[1]["fact:missing"] == 0.0 and checks[1]["fact_recall"] == 0.0
    assert all(not any(k.startswith("fact") for k in c) for c in checks[2:])
    assert "all_rules" not in checks[0] or checks[0]["all_rules"] in (0.0, 1.0)
    recall = student.metric("fact_recall")
    assert recall is not None and recall["value"] == 0.5 and recall["n"] == 2
    assert student.metric("fact:stated")["n"] == 1 and student.metric("fact:missing")["value"] == 0.0
    headline = second.headline
    assert headline["fact_recall"]["student"]["value"] == 0.5
    teacher_stated = EvalResult.objects.get(run__comparison=second, run__arm="teacher", example=examples[0])
    teacher_value = teacher_stated.checks["fact_recall"] / 2
    assert headline["fact_recall"]["teacher"]["value"] == teacher_value
    assert headline["fact_recall_vs_teacher"]["value"] == pytest.approx(0.5 - teacher_value)
    assert headline["fact_recall_vs_teacher"]["n"] == 2
    lines = substance_lines(headline)
    assert lines[0].startswith("fact recall per arm: ") and "student 0.50" in lines[0]

    # The gate: a student that states half the facts asked for is refused a bar of 0.6.
    ensure_default_aliases(alice_project)
    alias = Alias.objects.get(project=alice_project, name="production")
    serving_actions.update_gate(
        alice,
        alias,
        gating_suite=suite,
        min_all_rules=None,
        min_retained_lower=None,
        max_regression=None,
        log_requests=False,
        min_fact_recall=0.6,
    )
    alias.refresh_from_db()
    verdict = evaluate_gate(alias, variant)
    failed = {c.name: c for c in verdict.failed}
    assert not verdict.passed and failed["fact recall"].value == 0.5
    assert "0.500 < minimum 0.600" in failed["fact recall"].detail
    with pytest.raises(GateRefused):
        promote(alice, alias, variant)
    alias.min_fact_recall = 0.5
    alias.save()
    assert evaluate_gate(alias, variant).passed


# --- the gate and the labels on recorded numbers ----------------------------------------------


@pytest.fixture
def gated(alice, alice_project):
    base = FoundationModel.objects.create(name="tiny-base", path="/models/tiny")
    prompt = new_prompt(alice_project, alice, [FARE])
    rows = io.BytesIO("\n".join(QUERIES).encode())
    data = import_dataset(alice_project, alice, "q", rows, filename="q.txt", eval_percent=50)
    suite = eval_actions.create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    variant = Variant.objects.create(
        project=alice_project, name="absorbed", base_model=base, adapter_path="/a", prompt_version=prompt
    )
    ensure_default_aliases(alice_project)
    alias = Alias.objects.get(project=alice_project, name="production")
    return {"suite": suite, "variant": variant, "alias": alias, "user": alice}


def record(gated, student, teacher, metrics=True):
    """A finished student run and a four-arm headline with these fact recalls."""
    suite, variant = gated["suite"], gated["variant"]
    summary = {"complete": True, "examples": 4, "metrics": {}}
    if metrics:
        summary["metrics"]["fact_recall"] = {"value": student, "low": 0.0, "high": 1.0, "n": 4}
    EvalRun.objects.create(
        project=suite.project,
        suite=suite,
        base_model=variant.base_model,
        variant=variant,
        arm="student",
        summary=summary,
    )
    arms = {"student": {"value": student}, "teacher": {"value": teacher}}
    diff = {"value": student - teacher, "low": -1.0, "high": 1.0, "n": 4, "note": ""}
    ArmComparison.objects.create(
        project=suite.project,
        suite=suite,
        variant=variant,
        headline={"metric": "all_rules", "retained": {"value": 1.0, "low": 0.5, "high": 1.0, "n": 4}}
        | ({"fact_recall": arms, "fact_recall_vs_teacher": diff} if metrics else {}),
    )


def set_gate(gated, **fields):
    alias = gated["alias"]
    serving_actions.update_gate(
        gated["user"],
        alias,
        gating_suite=gated["suite"],
        min_all_rules=None,
        min_retained_lower=None,
        max_regression=None,
        log_requests=False,
        **fields,
    )
    alias.refresh_from_db()
    return alias


@pytest.mark.django_db
def test_the_gate_requires_fact_recall_and_at_least_the_teachers(gated):
    assert gated["suite"].facts == [FARE]  # copied from the prompt version
    alias = set_gate(gated, min_fact_recall=0.5, fact_recall_vs_teacher=True)
    record(gated, student=0.4, teacher=0.6)
    verdict = evaluate_gate(alias, gated["variant"])
    failed = {c.name: c.detail for c in verdict.failed}
    assert set(failed) == {"fact recall", "fact recall vs teacher"}
    assert "student 0.400 vs teacher 0.600" in failed["fact recall vs teacher"]
    record(gated, student=0.7, teacher=0.6)
    assert evaluate_gate(alias, gated["variant"]).passed


@pytest.mark.django_db
def test_the_gate_fails_without_fact_numbers_and_refuses_bad_bars(gated):
    alias = set_gate(gated, min_fact_recall=0.5, fact_recall_vs_teacher=True)
    record(gated, student=0.0, teacher=0.0, metrics=False)
    failed = {c.name: c.detail for c in evaluate_gate(alias, gated["variant"]).failed}
    assert "has no fact recall" in failed["fact recall"]
    assert "no fact recall in its headline" in failed["fact recall vs teacher"]
    with pytest.raises(ActionError, match="Minimum fact recall must be between 0 and 1"):
        set_gate(gated, min_fact_recall=1.5)
    with pytest.raises(ActionError, match="need a gating suite"):
        serving_actions.update_gate(
            gated["user"],
            alias,
            gating_suite=None,
            min_all_rules=None,
            min_retained_lower=None,
            max_regression=None,
            log_requests=False,
            fact_recall_vs_teacher=True,
        )


@pytest.mark.django_db
def test_the_gate_form_takes_the_fact_recall_bars(alice_client, gated):
    alias = gated["alias"]
    url = reverse("serving_alias_gate", args=[alias.project.slug, alias.name])
    form = {"gating_suite": gated["suite"].pk, "min_fact_recall": "0.7", "fact_recall_vs_teacher": "on"}
    assert alice_client.post(url, form).status_code == 302
    alias.refresh_from_db()
    assert alias.min_fact_recall == 0.7 and alias.fact_recall_vs_teacher is True
    r = alice_client.post(url, {**form, "min_fact_recall": "7"})
    assert r.status_code == 400 and b"Minimum fact recall must be between 0 and 1" in r.content


def test_fact_metrics_are_labelled_and_printed():
    assert metric_label("fact_recall") == "Fact recall"
    assert metric_label("fact:gull island fare") == "fact gull island fare"
    headline = {
        "fact_recall": {"floor": None, "teacher": {"value": 0.25, "low": 0.0, "high": 0.5, "n": 8}},
        "fact_recall_vs_teacher": {"value": 0.5, "low": 0.125, "high": 0.875, "n": 8},
        "judge": {"student": {"value": 3.5, "low": 3.0, "high": 4.0, "n": 8}},
    }
    assert substance_lines(headline) == [
        "fact recall per arm: floor —; teacher 0.25 (95% CI 0.00 to 0.50, n=8)",
        "fact recall, student - teacher: 0.50 (95% CI 0.12 to 0.88, n=8)",
        "judge score per arm: student 3.50 (95% CI 3.00 to 4.00, n=8)",
    ]
    assert substance_lines({}) == []


@pytest.mark.parametrize("scenario", ["fernhill", "harbor", "lumen"])
def test_the_teacher_is_handed_a_whole_prompt_sentence_that_states_each_fact(scenario):
    """A later round may open an answer with the sentence a fact comes from:
    it must be the prompt's whole sentence (a source may be a fragment) and
    it must state the fact, or the opening would not make the sample pass."""
    from engines import facts as facts_engine
    from engines.rules import validate_rules
    from jobs.runners.teacher import Guide

    root = Path(__file__).resolve().parent.parent / "scenarios" / scenario
    prompt = (root / "prompt.md").read_text()
    fact_list = facts_engine.validate_facts(json.loads((root / "facts.json").read_text()))
    guide = Guide(prompt, validate_rules(json.loads((root / "rules.json").read_text())), fact_list, 3)
    for fact in fact_list:
        statement = guide._statements[fact.name]
        assert facts_engine.states(fact, statement), (fact.name, statement)
        assert statement in prompt.replace("\n", " ") or statement in prompt, (fact.name, statement)
        assert len(statement) >= len(fact.source), fact.name
    saturday = {f.name: f for f in fact_list}.get("saturday hours")
    if saturday is not None:  # fernhill's source is a fragment of a longer sentence
        assert guide._statements["saturday hours"].startswith("It is open Monday to Friday")
