"""fact_repeat: a row whose answer states the facts its question asks (by
the prompt's facts checks) is trained that many times; rows that ask no fact,
or miss one, once. 3 by default; the option validates."""

import io

import pytest

from engines import facts
from engines.training import ConfigError, TrainConfig, repeat_fact_rows
from jobs import lifecycle
from jobs.actions import start_finetune
from jobs.models import Job
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

CHECKS = [
    {"name": "open late", "question": r"\blate\b", "expect": "19:00", "source": "open until 19:00"},
    {"name": "parking", "question": r"\bpark", "expect": "12 spaces", "source": "a car park with 12 spaces"},
]


def row(query: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": query}], "answer": answer, "system_prompt": "P"}


def test_the_option_is_three_by_default_and_validates():
    assert TrainConfig().fact_repeat == 3
    assert TrainConfig.from_dict({"fact_repeat": 8}).fact_repeat == 8
    for bad in (0, 9, -1, 2.5, "3", True, None):
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_dict({"fact_repeat": bad})
        assert set(caught.value.errors) == {"fact_repeat"}, bad


def test_only_rows_stating_every_fact_their_question_asks_are_repeated():
    checks = facts.validate_facts(CHECKS)
    rows = [
        row("How late are you open?", "We are open until 19:00."),  # asks one, states it
        row("How late, and can I park?", "Until 19:00, and there are 12 spaces."),  # asks two, states both
        row("How late, and can I park?", "Until 19:00."),  # misses one: once
        row("Where can I park?", "Somewhere nearby."),  # misses it: once
        row("Hello there", "Hello, 19:00."),  # asks none: once
    ]
    out, covered = repeat_fact_rows(rows, checks, 3)
    assert [out.count(r) for r in rows] == [3, 3, 1, 1, 1]
    assert len(out) == 9 and covered == ["open late", "parking"]
    # Copies sit next to their row, and the input is not changed.
    assert out[:3] == [rows[0]] * 3 and len(rows) == 5
    assert repeat_fact_rows(rows, checks, 1) == (rows, [])
    assert repeat_fact_rows(rows, [], 3) == (rows, [])


QUERIES = ["How late are you open on Fridays?", "Can I park at the clinic?", "Do you see rabbits?"]
ANSWERS = ["We close at 19:00.", "There is no parking.", "Yes, we do."]


@pytest.fixture
def world(alice, alice_project, lively_dir, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    prompt = save_prompt(
        alice_project,
        alice,
        "clinic",
        "We are open until 19:00. A car park with 12 spaces.",
        facts_data=CHECKS,
    ).version
    data = import_dataset(
        alice_project, alice, "q", io.BytesIO("\n".join(QUERIES).encode()), filename="q.txt", eval_percent=0
    )
    answered = [
        (r.index, [*r.messages, {"role": "assistant", "content": ANSWERS[r.index]}])
        for r in data.rows.order_by("index")
    ]
    version = derive_version(data, alice, answered, kind="teacher")
    return alice_project, alice, base, prompt, version


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("repeat", [1, 4])
def test_the_fine_tune_trains_the_fact_rows_that_many_times(world, repeat):
    project, alice, base, prompt, version = world
    train = {"epochs": 1, "batch_size": 1, "max_length": 96, "general_mix": 0, "fact_repeat": repeat}
    job = start_finetune(project, alice, prompt, version, base, train)
    lifecycle.execute(job.pk, "test")
    job = Job.objects.get(pk=job.pk)
    assert job.status == Job.SUCCEEDED, job.error
    # One step per example at batch 1: only the first row states the fact its question asks.
    assert job.progress["total"] == 3 + (repeat - 1)
    assert job.variant is not None and job.variant.metrics["fact_rows_repeated"] == (1 if repeat > 1 else 0)
    if repeat > 1:
        assert (
            "fact_repeat 4: 1 of 3 rows state the facts their query asks "
            "(1 of the prompt's 2 facts checks); each is trained 4 times" in job.log
        )
    else:
        assert "fact_repeat" not in job.log
