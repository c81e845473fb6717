"""The refine round: the student samples its own answers, those passing the
checks replace the rows' answers, and a short second fine-tune continues the
adapter; off by default, bounded, and a requeued attempt samples nothing twice."""

import io
import json
import shutil
from datetime import timedelta

import pytest

from engines.facts import validate_facts
from engines.rules import validate_rules
from engines.training import ConfigError, TrainConfig, choose_answer, refine_examples
from engines.training.refine import FAILS_RULE, FEWER_FACTS, NO_SAMPLE, THINNER
from jobs import lifecycle
from jobs.actions import start_finetune
from jobs.lifecycle import ProgressWriter
from jobs.models import Job
from jobs.runners.finetune import (
    REFINE_DIR,
    REFINE_SAMPLES_FILE,
    TRAINED_FILE,
    FinetuneRunner,
    _cached_samples,
    _refine_generation,
    training_examples,
)
from tests.test_teacher_curation import form_post
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

RULES = validate_rules(
    [
        {"name": "opening", "kind": "starts_with", "text": "Hi!"},
        {"name": "brand", "kind": "contains", "text": "Lumen"},
        {"name": "short", "kind": "max_words", "n": 12},
    ]
)
FACTS = validate_facts(
    [
        {"name": "price", "question": "price|cost", "expect": "9 euros"},
        {"name": "hours", "question": "open|hours", "expect": "from 9 to 5"},
    ]
)


# --- the selection ------------------------------------------------------------------


def test_a_passing_student_sample_replaces_a_failing_teacher_answer():
    choice = choose_answer(
        "What does it cost?",
        "Hello. Lumen costs 9 euros.",  # misses the opening
        ["Hi! Lumen is great.", "Hi! Lumen costs 9 euros a month."],
        RULES,
        FACTS,
    )
    assert choice.student and choice.sample == 1  # the one stating the fact as well
    assert choice.answer == "Hi! Lumen costs 9 euros a month."
    assert (choice.facts_before, choice.facts, choice.asked) == (1, 1, 1)
    assert (choice.rules_before, choice.rules_after) == (False, True)


def test_a_sample_failing_a_rule_does_not_replace_the_answer():
    teacher = "Hi! Lumen costs 9 euros."
    choice = choose_answer("What does it cost?", teacher, ["Hi! It costs 9 euros."], RULES, FACTS)
    assert not choice.student and choice.answer == teacher and choice.reason == FAILS_RULE
    # A failing teacher answer stays too when no sample passes: the round never trades one failure for another.
    failing = "Hello, 9 euros."
    choice = choose_answer("What does it cost?", failing, ["Hi! It costs 9 euros."], RULES, FACTS)
    assert choice.answer == failing and not choice.rules_after


def test_facts_are_counted_against_the_current_answer():
    teacher = "Hi! Lumen costs 9 euros."
    # Passes every rule but drops the fact the teacher stated: kept out.
    choice = choose_answer("What does it cost?", teacher, ["Hi! Lumen is cheap."], RULES, FACTS)
    assert not choice.student and choice.reason == FEWER_FACTS
    # As many facts as the teacher (none asked of this query): the student's own answer wins.
    choice = choose_answer(
        "Who are you?", "Hi! This is Lumen.", ["Hi! Lumen here, glad to help."], RULES, FACTS
    )
    assert choice.student and choice.asked == 0
    # More facts than a teacher that stated none: the student's, even with both facts asked.
    choice = choose_answer(
        "What does it cost and when are you open?",
        "Hi! Lumen can help.",
        ["Hi! Lumen: 9 euros, open from 9 to 5.", "Hi! Lumen: 9 euros."],
        RULES,
        FACTS,
    )
    assert choice.student and choice.sample == 0 and (choice.facts_before, choice.facts) == (0, 2)


def test_samples_are_checked_after_repairs_and_a_cut_or_empty_one_is_never_taken():
    teacher = "Hi! Lumen costs 9 euros."
    long = "Hi! Lumen costs 9 euros. " + "More words here to say. " * 5
    # Too long as sampled; the max_words repair cuts it to whole sentences, and that text is what trains.
    choice = choose_answer("What does it cost?", teacher, [long], RULES, FACTS, repairs=("max_words",))
    assert choice.student and len(choice.answer.split()) <= 12 and choice.answer.startswith("Hi! Lumen costs")
    assert not choose_answer("What does it cost?", teacher, [long], RULES, FACTS).student  # no repairs
    # Cut at the token limit and not repaired: it would teach stopping mid-sentence.
    choice = choose_answer(
        "What does it cost?", teacher, ["Hi! Lumen costs 9 euros"], RULES, FACTS, finish_reasons=["length"]
    )
    assert not choice.student and choice.reason == NO_SAMPLE
    assert choose_answer("hi", teacher, ["  ", ""], RULES, FACTS).reason == NO_SAMPLE


def test_a_sample_saying_nothing_beyond_the_required_texts_is_not_taken():
    teacher = "Hi! Lumen can reset it from the settings page in two steps."  # 10 words besides the rules'
    # The cheapest passing answer: the required texts around nothing, or too little to replace the teacher's.
    for thin in ("Hi! Lumen.", "Hi! Lumen: press reset."):
        choice = choose_answer("How do I reset it?", teacher, [thin], RULES, FACTS)
        assert not choice.student and choice.reason == THINNER, thin
    choice = choose_answer(
        "How do I reset it?",
        teacher,
        ["Hi! Lumen: open the settings page and press reset.", "Hi! Lumen: just ask the crew for a new one."],
        RULES,
        FACTS,
    )
    assert choice.student and choice.sample == 0  # both pass; the first says more of what the teacher said


def test_the_round_keeps_order_prompts_and_counts_what_it_kept():
    examples = [
        {"messages": [{"role": "user", "content": "What does it cost?"}], "answer": "Hello, 9 euros."},
        {
            "messages": [{"role": "user", "content": "When are you open?"}],
            "answer": "Hi! Lumen: from 9 to 5.",
        },
        {"messages": [{"role": "user", "content": "Who are you?"}], "answer": "Hi! Lumen."},
    ]
    examples = [{**ex, "system_prompt": "p"} for ex in examples]
    samples = [["Hi! Lumen costs 9 euros."], ["Hi! Lumen is open."], ["hello"]]
    out, report = refine_examples(examples, samples, RULES, FACTS)
    assert [ex["answer"] for ex in out] == [
        "Hi! Lumen costs 9 euros.",
        "Hi! Lumen: from 9 to 5.",
        "Hi! Lumen.",
    ]
    assert [ex["messages"] for ex in out] == [ex["messages"] for ex in examples]
    assert all(ex["system_prompt"] == "p" for ex in out)
    assert report.to_dict() == {
        "rows": 3,
        "student": 1,
        "kept": {FEWER_FACTS: 1, FAILS_RULE: 1},
        "samples": 3,
        "fact_rows": 2,
        "facts_stated_before": 2,
        "facts_stated_after": 2,
        "all_rules_before": 2,
        "all_rules_after": 3,
    }
    assert report.summary().startswith("refine: 1 of 3 rows now the student's own passing answer; ")
    with pytest.raises(ValueError, match="2 groups of samples for 3 examples"):
        refine_examples(examples, samples[:2], RULES, FACTS)


# --- the option ---------------------------------------------------------------------


def test_it_is_off_by_default_and_out_of_range_values_are_refused():
    assert TrainConfig().refine_samples == 0 and TrainConfig().refine_epochs == 1
    assert TrainConfig.from_dict({"refine_samples": 8, "refine_epochs": 2}).refine_samples == 8
    assert TrainConfig.from_dict({"refine_samples": 2.0}).refine_samples == 2
    for bad, message in (
        (9, "must be <= 8, got 9"),
        (-1, "must be >= 0, got -1"),
        ("2", "must be an integer"),
    ):
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_dict({"refine_samples": bad})
        assert (
            set(caught.value.errors) == {"refine_samples"}
            and message in caught.value.errors["refine_samples"]
        )
    for bad in (0, 5, True):
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_dict({"refine_epochs": bad})
        assert set(caught.value.errors) == {"refine_epochs"}


# --- the job ------------------------------------------------------------------------

QUERIES = [
    "What does the plan cost?",
    "When are you open?",
    "How do I reset my password?",
    "Can I cancel my order?",
    "Where is my parcel?",
    "How do I change my plan?",
]


@pytest.fixture
def world(alice, alice_project, lively_dir, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    # Rules this random model's short answers can pass (its samples end at the first "e").
    rules = [
        {"name": "short", "kind": "max_words", "n": 40},
        {"name": "no sorry", "kind": "not_contains", "text": "sorry"},
    ]
    facts = [{"name": "price", "question": "cost", "expect": "9 euros"}]
    prompt = save_prompt(
        alice_project, alice, "crew", "You are the crew's helper.", rules, facts_data=facts
    ).version
    data = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(QUERIES).encode()),
        filename="q.txt",
        eval_percent=0,
    )
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": "Ahoy! Aye."}])
        for r in data.rows.order_by("index")
    ]
    generation = {"stop": ["e"], "max_new_tokens": 16, "batch_size": 4, "temperature": 0.7, "top_p": 0.95}
    version = derive_version(data, alice, answered, kind="teacher", meta={"generation": generation})
    return alice_project, alice, base, prompt, version


TRAIN = {"epochs": 1, "batch_size": 1, "max_length": 128, "general_mix": 0, "refine_samples": 2}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("one_torch_thread")
def test_the_job_refines_registers_the_refined_adapter_and_a_requeued_attempt_samples_nothing(world):
    from safetensors.torch import load_file

    project, alice, base, prompt, version = world
    job = start_finetune(project, alice, prompt, version, base, TRAIN)
    lifecycle.execute(job.pk, "test")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.SUCCEEDED, job.error

    saved = [json.loads(line) for line in (job.data_dir / REFINE_SAMPLES_FILE).read_text().splitlines()]
    assert len(saved) == len(QUERIES) and all(
        len(s["samples"]) == 2 == len(s["finish_reasons"]) for s in saved
    )
    refine = job.variant.metrics["refine"]
    assert (
        refine["rows"] == len(QUERIES) and refine["samples"] == 2 * len(QUERIES) and refine["fact_rows"] == 1
    )
    assert refine["student"] + sum(refine["kept"].values()) == len(QUERIES)
    assert refine["student"] > 0, job.log  # some short random answers pass both rules
    assert refine["train"]["steps"] == len(QUERIES)  # one more epoch, batch 1
    assert (
        f"refine: {refine['student']} of {len(QUERIES)} rows now the student's own passing answer" in job.log
    )
    assert job.variant.hyperparameters["refine_samples"] == 2
    # The variant is the refined adapter, trained on from the first one's weights (so not equal to them).
    refined, first = job.data_dir / REFINE_DIR / "adapter", job.data_dir / "adapter"
    assert job.variant.adapter_path == str(refined)
    a, b = load_file(refined / "adapter_model.safetensors"), load_file(first / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not a[k].equal(b[k]) for k in a)

    # The worker died during the second fine-tune: the next attempt trains the first adapter and
    # samples nothing again.
    before = (job.data_dir / REFINE_SAMPLES_FILE).read_bytes()
    shutil.rmtree(job.data_dir / REFINE_DIR)
    Job.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, variant=None, heartbeat_at=job.heartbeat_at - timedelta(hours=1)
    )
    job = Job.objects.get(pk=job.pk)
    assert job.requeue_if_stale(timedelta(minutes=5)) == Job.QUEUED
    lifecycle.execute(job.pk, "test")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.SUCCEEDED, job.error
    assert (job.data_dir / REFINE_SAMPLES_FILE).read_bytes() == before
    assert "the adapter an earlier attempt trained (6 steps) is reused" in job.log
    assert "refine: 6 queries' samples reused, 0 to sample" in job.log
    assert job.log.count("samples in") == 1  # the first attempt's sampling only
    assert job.variant.metrics["refine"]["student"] == refine["student"]
    assert (refined / "adapter_model.safetensors").is_file()

    # A line torn by a killed attempt is sampled again, and only that query.
    lines = (job.data_dir / REFINE_SAMPLES_FILE).read_text().splitlines()
    (job.data_dir / REFINE_SAMPLES_FILE).write_text("\n".join([*lines[:-1], lines[-1][:30]]))
    assert len(_cached_samples(job.data_dir / REFINE_SAMPLES_FILE, 2)) == len(QUERIES) - 1
    assert _cached_samples(job.data_dir / REFINE_SAMPLES_FILE, 3) == {}  # another N: all sampled again
    runner = FinetuneRunner(job, ProgressWriter(job))
    config = TrainConfig.from_dict(TRAIN)
    # The rows as the first attempt sampled them: with the passages the (reading) student reads.
    task = runner._with_passages(training_examples(version, prompt.text)[0], prompt, config.student_passages)
    gen = _refine_generation(version, {"stop": ["e"]}, config.seed)
    assert (gen.temperature, gen.top_p, gen.max_new_tokens, gen.stop, gen.seed) == (0.7, 0.95, 16, ("e",), 42)
    samples = runner._student_samples(task, 2, gen, first)
    assert len(samples) == len(QUERIES) and "1 to sample" in Job.objects.get(pk=job.pk).log
    assert len(_cached_samples(job.data_dir / REFINE_SAMPLES_FILE, 2)) == len(QUERIES)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("one_torch_thread")
def test_without_refine_nothing_is_sampled(world):
    project, alice, base, prompt, version = world
    job = start_finetune(project, alice, prompt, version, base, {**TRAIN, "refine_samples": 0})
    lifecycle.execute(job.pk, "test")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.SUCCEEDED, job.error
    assert "refine" not in job.variant.metrics and job.variant.adapter_path == str(job.data_dir / "adapter")
    assert not (job.data_dir / REFINE_SAMPLES_FILE).exists() and not (job.data_dir / TRAINED_FILE).exists()


@pytest.mark.django_db(transaction=True)
def test_the_command_and_the_form_take_the_option_and_refuse_out_of_range(world, alice_client):
    from django.core.management import CommandError, call_command
    from django.urls import reverse

    from jobs.forms import AbsorbForm

    project, alice, base, prompt, version = world
    args = ["absorb", "--project", project.slug, "--prompt", "crew", "--dataset", "queries", "--skip-teacher"]
    with pytest.raises(CommandError, match="refine_samples: must be <= 8, got 9"):
        call_command(*args, "--refine", "9")
    assert not Job.objects.exists()
    call_command(*args, "--refine", "3")
    assert Job.objects.get(kind="finetune").params["train"]["refine_samples"] == 3

    post = form_post(
        AbsorbForm,
        project,
        prompt_version=prompt.pk,
        dataset_version=version.pk,
        base_model=base.pk,
        mode="finetune",
        t_refine_samples="9",
    )
    r = alice_client.post(reverse("absorb_start", args=[project.slug]), post)
    assert r.status_code == 400 and "must be &lt;= 8, got 9" in r.content.decode()
    assert Job.objects.filter(kind="finetune").count() == 1
    r = alice_client.post(reverse("absorb_start", args=[project.slug]), {**post, "t_refine_samples": "2"})
    assert r.status_code == 302, r.content.decode()[-3000:]
    assert Job.objects.filter(kind="finetune").order_by("-pk").first().params["train"]["refine_samples"] == 2
