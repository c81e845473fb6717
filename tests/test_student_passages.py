"""student_passages: a student that reads its prompt's passages most relevant
to the question (BM25, after the last user message), the same way in
training, in evals and when served through /v1. Off (0) by default."""

import io

import pytest

from engines import curation
from engines.rules import validate_rules
from engines.training import ConfigError, TrainConfig
from evals import actions as eval_actions
from evals.actions import RunSpec
from evals.models import EvalResult
from jobs import lifecycle
from jobs.actions import start_finetune
from jobs.models import Job
from serving.calls import with_variant_prompt
from serving.exports import readme
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

PROMPT = """You are the assistant of Fernhill Vets.

## How every reply is written

Start every reply with exactly "Hello from Fernhill Vets!" and never use a list.

## Finding us

The clinic is at 27 Orchard Lane, Ashbury. There is a free car park with 12 spaces behind the clinic.

## Prices

A standard consultation lasts 15 minutes and costs £48. Microchipping on its own costs £20.
"""
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello from Fernhill Vets!"}]
PARK = "There is a free car park with 12 spaces behind the clinic."


def ask(text):
    return [{"role": "user", "content": text}]


def test_the_student_reads_the_passages_that_answer_the_question_and_never_the_rules():
    literals = curation.rule_literals(RULES)
    assert literals == curation.rule_literals(validate_rules(RULES)) == ["Hello from Fernhill Vets!"]
    question = ask("Is there parking at the clinic?")
    seen = curation.with_passages(question, PROMPT, 1, literals)
    assert seen[-1]["content"] == f"Is there parking at the clinic?\n\n(Information for your answer: {PARK})"
    assert question == ask("Is there parking at the clinic?")  # the input is left as it was
    two = curation.with_passages(ask("How much is a consultation?"), PROMPT, 2, literals)[-1]["content"]
    assert "£48" in two and "Start every reply" not in two
    assert curation.with_passages(question, PROMPT, 0, literals) == question
    assert curation.with_passages(ask("zzz qqq"), PROMPT, 2, literals) == ask("zzz qqq")  # nothing matches


def test_the_student_reads_two_passages_by_default_and_the_option_validates():
    assert (
        TrainConfig().student_passages == 2
        and TrainConfig.from_dict({"student_passages": 0}).student_passages == 0
    )
    assert TrainConfig.from_dict({"student_passages": 8}).student_passages == 8
    for bad in (-1, 9, 1.5, "2", True):
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_dict({"student_passages": bad})
        assert set(caught.value.errors) == {"student_passages"}, bad


@pytest.mark.django_db
def test_v1_sends_an_absorbed_variant_the_passages_it_learned_to_read(alice, alice_project):
    base = FoundationModel.objects.create(name="m", path="/m")
    pv = save_prompt(alice_project, alice, "vets", PROMPT, RULES).version

    def variant(**fields):
        return Variant.objects.create(
            project=alice_project, name="v", base_model=base, prompt_version=pv, **fields
        )

    reads = variant(adapter_path="/a", hyperparameters={"student_passages": 1})
    plain = variant(adapter_path="/a", hyperparameters={"student_passages": 0})
    prompted = variant(prepend_prompt=True, hyperparameters={"student_passages": 1})
    question = ask("Is there parking at the clinic?")
    assert with_variant_prompt(question, reads)[-1]["content"].endswith(
        f"(Information for your answer: {PARK})"
    )
    assert with_variant_prompt(question, plain) == question
    # A prompted variant reads the whole prompt, not passages.
    assert with_variant_prompt(question, prompted)[0]["role"] == "system"
    assert with_variant_prompt(question, prompted)[-1] == question[-1]
    assert reads.student_passages == 1 and prompted.student_passages == 0
    assert "Reads the absorbed prompt's 1 sentences" in readme(reads)
    assert "Reads the absorbed prompt's" not in readme(plain)


QUERIES = ["Is there parking at the clinic?", "How much is a consultation?", "Do you see rabbits?"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("one_torch_thread")
def test_the_student_trains_and_is_evaluated_with_the_passages(
    alice, alice_project, lively_dir, settings, tmp_path, monkeypatch
):
    import jobs.runners.finetune as finetune

    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    pv = save_prompt(alice_project, alice, "vets", PROMPT, RULES).version
    data = import_dataset(
        alice_project,
        alice,
        "q",
        io.BytesIO("\n".join(QUERIES * 4).encode()),
        filename="q.txt",
        eval_percent=25,
    )
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": "Hello from Fernhill Vets! Yes."}])
        for r in data.rows.filter(split="train").order_by("index")
    ]
    version = derive_version(data, alice, answered, kind="teacher")
    seen = []
    real_train = finetune.train

    def recording_train(model_dir, examples, *args, **kwargs):
        seen.extend(examples)
        return real_train(model_dir, examples, *args, **kwargs)

    monkeypatch.setattr(finetune, "train", recording_train)
    train = {"epochs": 1, "batch_size": 4, "max_length": 160, "general_mix": 0, "student_passages": 1}
    job = start_finetune(alice_project, alice, pv, version, base, train)
    lifecycle.execute(job.pk, "test")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.SUCCEEDED, job.error
    assert "student_passages 1: every row carries the prompt's 1 passages" in job.log
    parking = [e for e in seen if e["query"] == "Is there parking at the clinic?"]
    assert parking and all(
        e["messages"][-1]["content"].endswith(f"(Information for your answer: {PARK})") for e in parking
    )
    variant = job.variant
    assert variant is not None and variant.student_passages == 1

    # The four arms' student and a plain run of the variant read the passages; the base does not.
    suite = eval_actions.create_suite(alice_project, alice, "held out", data, prompt_version=pv)
    runs = eval_actions.start_runs(
        alice_project, alice, suite, [RunSpec(base), RunSpec(base, variant)], {"max_new_tokens": 4}
    )
    lifecycle.execute(runs[0].job_id, "test")
    assert Job.objects.get(pk=runs[0].job_id).status == Job.SUCCEEDED
    tokens = {
        run.pk: {r.example_id: r.prompt_tokens for r in EvalResult.objects.filter(run=run)} for run in runs
    }
    [student_run] = [r for r in runs if r.variant_id]
    [base_run] = [r for r in runs if not r.variant_id]
    noted = [
        e
        for e in suite.examples.all()
        if curation.with_passages(e.messages, PROMPT, 1, ["Hello from Fernhill Vets!"]) != e.messages
    ]
    assert noted
    for e in suite.examples.all():
        more = tokens[student_run.pk][e.pk] - tokens[base_run.pk][e.pk]
        more = tokens[student_run.pk][e.pk] - tokens[base_run.pk][e.pk]
        assert (more > 10) if e in noted else (more == 0), (e.messages, more)
