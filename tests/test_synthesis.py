"""Queries synthesised from the prompt: parsing what the teacher wrote, the
filters (form, copying, round trip, near-duplicates of real queries and of
each other), the even spread under a total; then the job on the real
SmolLM2 teacher: a new version with the marked synthetic rows, and a
cancelled job that leaves nothing."""

from __future__ import annotations

import io
import re
from collections import Counter
from typing import Any

import pytest

from engines.curation import SynthesisSettings, parse_question, synthesize
from engines.curation.synthesis import (
    ABOUT_THE_TEXT,
    COPIES,
    LENGTH,
    NEAR_KEPT,
    NEAR_REAL,
    NOT_A_QUESTION,
    OVER_CAP,
    ROUND_TRIP,
    SYSTEM,
    copies,
    units,
)
from engines.facts import FactCheck
from engines.inference import Completion
from engines.progress import Progress

PROMPT = """You are the assistant of Gull Ferries.

## How every reply is written

Start every reply with "Ahoy!" and end every reply with "Safe travels!". Keep every reply short and friendly.

## Fares

A single adult ticket to Gull Island costs 12 euros. Children under five travel free on every boat. Bicycles cost 4 euros each way.

## Timetable

Boats leave Port Ellis every hour from 07:00 to 21:00 in summer. In winter the boats leave every two hours from 08:00 to 18:00. The crossing to Gull Island takes 40 minutes. The last boat back from Gull Island leaves at 21:30. Night boats run on Fridays only in August. Timetables change on the first of April every year.

## Luggage

Each traveller may bring two bags free of charge. Surfboards and kayaks cost 8 euros on any boat.
"""
FACTS = [
    FactCheck(
        "adult fare", "adult|ticket", "12 euros", source="A single adult ticket to Gull Island costs 12 euros"
    ),
    FactCheck("surfboards", "surf|kayak", "8 euros", source="Surfboards and kayaks cost 8 euros."),
    FactCheck("pet passports", "pet", "passport", source="Pets need a passport to travel abroad."),
]
EXCLUDE = ["Ahoy!", "Safe travels!"]


class Scripted:
    """A test double of the teacher: answers each piece of the prompt with the
    texts scripted for it (by unit name), sample after sample."""

    has_adapter = False

    def __init__(self, script: dict[str, list[str]]) -> None:
        found, _, _ = units(PROMPT, FACTS, EXCLUDE)
        self.by_text = {u.text: script.get(u.name, []) for u in found}
        self.calls: list[dict[str, Any]] = []

    def generate(self, *args: Any, **kwargs: Any) -> list[Completion]:
        raise AssertionError("synthesis asks for samples")

    def generate_samples(
        self, conversations, system_prompt, settings, samples, *, progress=None, should_stop=None, **kw
    ) -> list[list[Completion]]:
        self.calls.append(
            {"n": len(conversations), "system": system_prompt, "settings": settings, "samples": samples}
        )
        out = []
        for conversation in conversations:
            text = re.search(r'\n\n"(.*)"\n\n', conversation[-1]["content"], re.S).group(1)
            answers = self.by_text[text]
            out.append(
                [
                    Completion(answers[i] if i < len(answers) else "", 5, 10, "stop", 0.0)
                    for i in range(samples)
                ]
            )
            if progress is not None:  # as the generators count: one a sample
                progress(Progress(done=len(out) * samples, total=len(conversations) * samples, unit="x"))
        return out


def round_robin_alone(script: dict[str, list[str]], count: int) -> Any:
    """4 samples a piece, none of the questions that ask a fact going first."""
    settings = SynthesisSettings(samples=4, fact_first=0.0)
    return synthesize(Scripted(script), PROMPT, FACTS, count=count, exclude=EXCLUDE, settings=settings)


@pytest.mark.parametrize(
    ("raw", "question"),
    [
        ("How much is a ticket to Gull Island?", "How much is a ticket to Gull Island?"),
        ('A customer might ask: "Do children travel free?"', "Do children travel free?"),
        ("Question: 1. When does the last boat leave?\n\nAnswer: at 21:30", "When does the last boat leave?"),
        ('Here\'s a possible question:\n\n"Can I bring a kayak?"', "Can I bring a kayak?"),
        (
            '"How long is the crossing? Is there a café?" she asked',
            "How long is the crossing? Is there a café?",
        ),
        ("**Q:** What do bicycles cost? (a question about fares)", "What do bicycles cost?"),
        ("The boats leave every hour.", None),
        ("", None),
        ("Here is a question:\n\nThe boats leave every hour.", None),
    ],
)
def test_it_parses_the_question_out_of_what_the_teacher_wrote(raw, question):
    assert parse_question(raw) == question


def test_it_writes_about_sections_in_chunks_and_about_facts_but_not_the_rules():
    found, skipped, _ = units(PROMPT, FACTS, EXCLUDE)
    names = [u.name for u in found]
    assert names == [
        "section: introduction",
        "section: Fares",
        "section: Timetable (1/2)",
        "section: Timetable (2/2)",
        "section: Luggage",
        "fact: adult fare",
        "fact: surfboards",
    ]
    assert not any("Ahoy" in u.text or "reply" in u.text for u in found)
    # Six sentences, at most four a chunk: two chunks of three.
    assert [len(u.own) for u in found if u.name.startswith("section: Timetable")] == [3, 3]
    adult = found[names.index("fact: adult fare")]
    assert adult.heading == "Fares" and [p.text for p in adult.own] == [
        "A single adult ticket to Gull Island costs 12 euros."
    ]
    # No passage of the prompt holds this fact's source: nothing to ask about, and it is said.
    assert skipped == ["pet passports"]


def test_a_question_that_copies_eight_words_of_its_piece_is_not_how_users_ask():
    text = "A single adult ticket to Gull Island costs 12 euros."
    assert copies("Does a single adult ticket to Gull Island cost 12 euros?", text, 8) is False  # 7 in a row
    assert copies("Is it true a single adult ticket to Gull Island costs 12 euros?", text, 8) is True


GOOD_FARES = [
    "How much does a bicycle cost on the boat?",
    "Do children under five pay for the ferry?",
    "What does an adult ticket to Gull Island cost?",
]


def test_each_filter_drops_what_it_should_and_the_report_counts_why():
    script = {
        "section: Fares": [
            *GOOD_FARES,
            "Fares are listed on the page.",  # no question
            "Bicycles?",  # too short
            "What does this text say about bicycles?",  # about the text, not the business
            "Is a single adult ticket to Gull Island costs 12 euros right?",  # copies 9 words
            "Can I park my spaceship at the moon base?",  # nothing in the prompt answers it
            "How much does a bicycle cost on the boats?",  # near the first one
            "How much is a ticket for my bike?",  # near a real query
        ],
    }
    teacher = Scripted(script)
    real = ["how much is a ticket for my bike"]
    made = synthesize(
        teacher,
        PROMPT,
        FACTS,
        real,
        count=50,
        exclude=EXCLUDE,
        settings=SynthesisSettings(samples=10, fact_turns=1),
    )
    assert sorted(q.text for q in made.queries) == sorted(GOOD_FARES)
    assert {q.unit for q in made.queries} == {"section: Fares"} and {q.kind for q in made.queries} == {
        "section"
    }
    report = made.report
    units_asked = 7
    assert report["asked"] == units_asked * 10
    # Every other piece answered "" ten times: not a question.
    assert report["dropped"][NOT_A_QUESTION] == (units_asked - 1) * 10 + 1
    assert report["parsed"] == report["asked"] - report["dropped"][NOT_A_QUESTION]
    assert {
        r: report["dropped"][r] for r in (LENGTH, ABOUT_THE_TEXT, COPIES, ROUND_TRIP, NEAR_KEPT, NEAR_REAL)
    } == {
        LENGTH: 1,
        ABOUT_THE_TEXT: 1,
        COPIES: 1,
        ROUND_TRIP: 1,
        NEAR_KEPT: 1,
        NEAR_REAL: 1,
    }
    assert report["dropped"][OVER_CAP] == 0 and report["kept"] == 3
    fares = next(u for u in report["per_unit"] if u["unit"] == "section: Fares")
    assert fares == {"unit": "section: Fares", "asked": 10, "passed": 5, "kept": 3}
    assert report["facts_without_passage"] == ["pet passports"]


def test_the_round_trip_keeps_a_question_only_when_its_own_piece_answers_it():
    # A good question, but about the timetable: written for the luggage section, it does not come home.
    script = {
        "section: Luggage": [
            "How many bags can I bring for free?",
            "When does the last boat leave Gull Island?",
        ],
    }
    made = synthesize(
        Scripted(script), PROMPT, FACTS, count=10, exclude=EXCLUDE, settings=SynthesisSettings(samples=2)
    )
    assert [q.text for q in made.queries] == ["How many bags can I bring for free?"]
    assert made.report["dropped"][ROUND_TRIP] == 1


def test_it_asks_once_for_every_piece_with_its_own_instruction_and_sampling():
    teacher = Scripted({})
    seen: list[Progress] = []
    made = synthesize(teacher, PROMPT, FACTS, count=35, exclude=EXCLUDE, progress=seen.append)
    assert made.queries == [] and made.report["kept"] == 0
    # progress counts the questions asked, over both calls, up to all of them
    assert {p.unit for p in seen} == {"questions"} and {p.total for p in seen} == {made.report["asked"]}
    assert [p.done for p in seen] == sorted(p.done for p in seen) and seen[-1].done == made.report["asked"]
    # One call for the 5 section chunks, one for the 2 facts' pieces (two turns each by default):
    # the batches stay wide.
    sections, facts = teacher.calls
    assert sections["n"] == 5 and facts["n"] == 2
    for call in (sections, facts):
        assert call["system"] == SYSTEM and "Gull Ferries" not in call["system"]
        assert call["settings"].temperature > 0
    # 3 x 35 asked over 5 + 2 x 2 turns: 12 a turn.
    assert sections["samples"] == 12 and facts["samples"] == 24 and made.report["samples_per_unit"] == 12
    assert made.report["asked"] == 5 * 12 + 2 * 24


def test_the_kept_questions_are_spread_evenly_over_the_pieces_up_to_the_total():
    script = {
        "section: Fares": GOOD_FARES + ["Are bicycles carried on every boat and what do they cost?"],
        "section: Timetable (1/2)": [
            "How often do the boats leave Port Ellis in summer?",
            "How long does the crossing to Gull Island take?",
            "Do boats leave every two hours in winter?",
        ],
        "section: Luggage": [
            "How many bags can I bring for free?",
            "What does it cost to bring a kayak?",
        ],
        "fact: surfboards": ["Do I pay extra for my surfboard?"],
    }
    made = round_robin_alone(script, count=7)
    per_unit = Counter(q.unit for q in made.queries)
    assert len(made.queries) == 7
    # Round-robin: every piece with questions gets one before any gets a third.
    assert per_unit == {
        "section: Fares": 2,
        "section: Timetable (1/2)": 2,
        "section: Luggage": 2,
        "fact: surfboards": 1,
    }
    assert made.report["dropped"][OVER_CAP] == 3
    assert sum(u["kept"] for u in made.report["per_unit"]) == 7


def test_fact_turns_ask_and_keep_more_questions_that_ask_a_fact():
    script = {
        "section: Fares": GOOD_FARES,
        "section: Luggage": ["How many bags can I bring for free?", "What does it cost to bring a kayak?"],
        "fact: surfboards": [
            "Do I pay extra for my surfboard?",
            "How much is it to take a kayak across?",
            "Is there a charge for surfboards on the ferry?",
        ],
    }

    def kept(turns: int) -> tuple[Counter[str], list[int]]:
        teacher = Scripted(script)
        made = synthesize(
            teacher,
            PROMPT,
            FACTS,
            count=6,
            exclude=EXCLUDE,
            settings=SynthesisSettings(samples=4, fact_turns=turns, fact_first=0.0),
        )
        assert len(made.queries) == 6
        return Counter(q.unit for q in made.queries), [c["samples"] for c in teacher.calls]

    one, calls = kept(1)
    assert calls == [4] and one["fact: surfboards"] == 2
    three, calls = kept(3)
    # the facts' pieces are asked in a call of their own, three times the samples
    assert calls == [4, 12]
    assert three == {"section: Fares": 2, "section: Luggage": 1, "fact: surfboards": 3}
    # at the same number of drafts: 3 x 35 over 5 sections and 2 facts taking 3 turns each
    teacher = Scripted({})
    made = synthesize(
        teacher, PROMPT, FACTS, count=35, exclude=EXCLUDE, settings=SynthesisSettings(fact_turns=3)
    )
    assert [c["samples"] for c in teacher.calls] == [10, 30] and made.report["asked"] == 110
    with pytest.raises(ValueError, match="fact_turns"):
        SynthesisSettings(fact_turns=0)


def test_questions_a_facts_check_recognises_go_first_up_to_their_share():
    # Luggage drafts three questions, two of which ask the surfboards fact ("surf|kayak"); Fares
    # drafts questions of which none asks a fact the checks know ("adult|ticket" is not asked).
    script = {
        "section: Fares": [
            "Do children under five pay on the boat?",
            "What does a bicycle cost each way?",
            "Are bikes allowed on every boat?",
        ],
        "section: Luggage": [
            "How many bags can I bring for free?",
            "What does it cost to bring a kayak?",
            "Can I take my surfboard across, and is it extra?",
        ],
    }

    def kept(share: float, count: int = 5) -> list[str]:
        made = synthesize(
            Scripted(script),
            PROMPT,
            FACTS,
            count=count,
            exclude=EXCLUDE,
            settings=SynthesisSettings(samples=3, fact_first=share),
        )
        assert made.report["asking_a_fact"] == sum(
            "kayak" in q.text or "surf" in q.text for q in made.queries
        )
        return [q.text for q in made.queries]

    fares, luggage = script["section: Fares"], script["section: Luggage"]
    # no share: the round robin alone, a question from each piece in turn
    assert kept(0.0) == [fares[0], luggage[0], fares[1], luggage[1], fares[2]]
    # a fifth of 5: one kayak question first, then the round robin over everything left
    assert kept(0.2) == [luggage[1], fares[0], luggage[0], fares[1], luggage[2]]
    # two fifths: both questions that ask a fact, then the round robin
    assert kept(0.4) == [luggage[1], luggage[2], fares[0], luggage[0], fares[1]]
    assert kept(1.0) == kept(0.4)
    # a total above what is drafted keeps everything, whatever goes first
    assert sorted(kept(1.0, count=20)) == sorted(fares + luggage)
    with pytest.raises(ValueError, match="fact_first"):
        SynthesisSettings(fact_first=1.5)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        SynthesisSettings(temperature=0)
    with pytest.raises(ValueError, match="unknown synthesis setting"):
        SynthesisSettings.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="count"):
        synthesize(Scripted({}), PROMPT, count=0)


# --- the job, on the real SmolLM2 teacher -------------------------------------------------------

REAL = [
    "how much is a ticket to gull island",
    "can my kids travel for free",
    "what time is the first boat in summer",
    "can i take my surfboard",
    "how long is the crossing",
    "do you run boats at night",
    "how many bags can i bring",
    "when do the winter timetables start",
]
RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "Ahoy!"},
    {"name": "closing", "kind": "ends_with", "text": "Safe travels!"},
]


@pytest.fixture
def job_world(alice, alice_project, smollm2_dir, one_torch_thread, settings, tmp_path):
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="smollm2", path=str(smollm2_dir), is_default=True)
    facts = [f.to_json() for f in FACTS[:2]]
    prompt = save_prompt(alice_project, alice, "ferries", PROMPT, RULES, facts_data=facts).version
    data = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(REAL).encode()),
        filename="q.txt",
        eval_percent=25,
    )
    return alice_project, alice, base, prompt, data


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_command_queues_a_job_that_stores_a_new_version_with_the_synthetic_rows_marked(job_world, capsys):
    from django.core.management import call_command

    from jobs import lifecycle
    from jobs.models import Job
    from jobs.runners.synthesis import SYNTHETIC

    project, _alice, _base, _prompt, data = job_world
    parent_rows = list(data.rows.order_by("index").values_list("messages", "split"))
    call_command(
        "synthesize_queries",
        "--project",
        project.slug,
        "--prompt-version",
        "ferries@1",
        "--dataset-version",
        "queries",
        "--count",
        "6",
        "--seed",
        "0",
    )
    assert "queued: Query synthesis" in capsys.readouterr().out
    job = Job.objects.get(kind="synthesize")
    assert job.params["count"] == 6 and job.dataset_version == data
    lifecycle.execute(job.pk, "test")
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.error
    version = job.output_dataset
    assert version.pk != data.pk and version.parent == data and version.number == 2
    rows = list(version.rows.order_by("index"))
    report = version.meta["synthesis"]
    kept = report["kept"]
    assert 1 <= kept <= 6 and len(rows) == len(REAL) + kept
    # The real rows first, as they were (split kept); the parent version is untouched.
    assert [(r.messages, r.split) for r in rows[: len(REAL)]] == parent_rows
    assert all(r.extra == {} and r.notes == [] for r in rows[: len(REAL)])
    assert data.rows.count() == len(REAL)
    units_named = {u["unit"] for u in report["per_unit"]}
    for row in rows[len(REAL) :]:
        [message] = row.messages  # a query only: the teacher job answers it
        assert message["role"] == "user" and message["content"].endswith("?")
        assert row.split == "train"
        assert row.extra["source"] == SYNTHETIC and row.extra["unit"] in units_named
        assert row.extra["unit_kind"] in ("section", "fact") and row.extra["job"] == job.pk
        assert row.notes == [f"synthetic: {row.extra['unit']}"]  # flagged in review until someone decides
        assert "Ahoy" not in message["content"]
    assert (
        report["asked"]
        == sum(u["asked"] for u in report["per_unit"])
        >= report["units"] * report["samples_per_unit"]
    )
    assert sum(report["dropped"].values()) + kept == report["asked"]
    assert "synthetic queries added" in version.meta["notes"][0]
    assert "kept" in job.log and job.progress["unit"] == "questions"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_cancelled_synthesis_leaves_no_version(job_world):
    from engines.inference import GenerationCancelled
    from jobs.actions import start_synthesis
    from jobs.lifecycle import ProgressWriter
    from jobs.models import Job
    from jobs.registry import JobCancelled
    from jobs.runners.synthesis import SynthesisRunner
    from workbench.models import DatasetVersion

    project, alice, base, prompt, data = job_world
    job = start_synthesis(project, alice, prompt, data, base, 6, {"seed": 0})
    assert job.claim("test-worker") and job.request_cancel() and job.status == Job.RUNNING
    with pytest.raises((GenerationCancelled, JobCancelled)):
        SynthesisRunner(job, ProgressWriter(job)).run()
    assert job.mark_cancelled()
    assert list(DatasetVersion.all_objects.filter(dataset=data.dataset)) == [data]
    assert Job.objects.get(pk=job.pk).output_dataset is None


@pytest.mark.django_db
def test_the_dataset_page_links_to_the_form_that_queues_a_synthesis(alice_client, alice, alice_project):
    from jobs.models import Job
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    base = FoundationModel.objects.create(name="m", path="/nonexistent/model", is_default=True)
    prompt = save_prompt(alice_project, alice, "ferries", PROMPT, RULES).version
    data = import_dataset(
        alice_project, alice, "queries", io.BytesIO("\n".join(REAL).encode()), filename="q.txt"
    )
    page = alice_client.get(data.get_absolute_url()).content.decode()
    link = f"/p/{alice_project.slug}/jobs/synthesize?dataset_version={data.pk}"
    assert link in page
    form = alice_client.get(link)
    assert form.status_code == 200 and f'<option value="{data.pk}" selected>' in form.content.decode()
    refused = alice_client.post(
        link, {"prompt_version": prompt.pk, "dataset_version": data.pk, "base_model": base.pk, "count": 0}
    )
    assert refused.status_code == 400 and not Job.objects.exists()
    posted = alice_client.post(
        link, {"prompt_version": prompt.pk, "dataset_version": data.pk, "base_model": base.pk, "count": 50}
    )
    job = Job.objects.get()
    assert posted.status_code == 302 and posted["Location"] == job.get_absolute_url()
    assert job.kind == "synthesize" and job.params["count"] == 50 and job.status == Job.QUEUED
    assert "Query synthesis" in alice_client.get(job.get_absolute_url()).content.decode()


@pytest.mark.django_db
def test_another_projects_inputs_are_refused(alice, alice_project, bob, bob_project):
    from jobs.actions import start_synthesis
    from workbench.actions import ActionError
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    base = FoundationModel.objects.create(name="m", path="/nonexistent/model", is_default=True)
    prompt = save_prompt(alice_project, alice, "ferries", PROMPT, RULES).version
    theirs = import_dataset(bob_project, bob, "queries", io.BytesIO(b"hello there"), filename="q.txt")
    with pytest.raises(ActionError, match="belong to this project"):
        start_synthesis(alice_project, alice, prompt, theirs, base, 10)


def test_a_piece_whose_questions_repeat_each_other_loses_no_turn():
    script = {
        "section: Fares": [
            "How much does a bicycle cost on the boat?",
            "How much does a bicycle cost on the boats?",
            "How much does the bicycle cost on the boat?",
            "Do children under five pay for the ferry?",
        ],
        "section: Luggage": [
            "How many bags can I bring for free?",
            "What does it cost to bring a kayak?",
            "Can I bring a surfboard on any boat?",
            "Are two bags free for each traveller?",
        ],
    }
    made = round_robin_alone(script, count=4)
    assert Counter(q.unit for q in made.queries) == {"section: Fares": 2, "section: Luggage": 2}
    assert made.report["dropped"][NEAR_KEPT] == 2 and made.report["dropped"][OVER_CAP] == 2


def test_a_small_total_asks_about_an_even_spread_of_the_pieces_not_the_first_ones():
    teacher = Scripted({})
    made = synthesize(teacher, PROMPT, FACTS, count=2, exclude=EXCLUDE)
    # 3 x 2 asks, 2 a piece at least: 3 of the 7 pieces, spread over the prompt.
    assert teacher.calls[0]["n"] == 3 and teacher.calls[0]["samples"] == 2
    assert [u["unit"] for u in made.report["per_unit"]] == [
        "section: introduction",
        "section: Timetable (1/2)",
        "section: Luggage",
    ]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_absorb_synthesises_first_and_its_teacher_answers_the_version_it_stores(job_world, alice_client):
    from jobs import fingerprints, lifecycle
    from jobs.actions import start_absorb
    from jobs.models import Job

    project, alice, base, prompt, data = job_world
    teacher, finetune = start_absorb(project, alice, prompt, data, base, synthesis={"count": 4, "seed": 0})
    synthesis = teacher.depends_on
    assert synthesis.kind == "synthesize" and synthesis.dataset_version == data
    assert synthesis.params["count"] == 4 and synthesis.params["synthesis"]["seed"] == 0
    assert teacher.dataset_version is None and finetune.depends_on == teacher
    lifecycle.execute(synthesis.pk, "test")
    synthesis.refresh_from_db()
    teacher.refresh_from_db()
    assert synthesis.status == Job.SUCCEEDED, synthesis.error
    made = synthesis.output_dataset
    assert made.row_count > data.row_count and teacher.dataset_version == made
    # The teacher's fingerprint names the questions before they existed: a plan finds it.
    assert teacher.params[fingerprints.KEY] == fingerprints.teacher_fingerprint(
        fingerprints.version_identity(prompt),
        fingerprints.queries_identity(made),
        fingerprints.teacher_identity(base, None),
        teacher.params["generation"],
        teacher.params["curation"],
        teacher.params["keep_existing"],
    )
    assert [j.pk for j in synthesis.ready_dependents()] == [teacher.pk]
    page = alice_client.get(synthesis.get_absolute_url()).content.decode()
    kept = made.meta["synthesis"]["kept"]
    assert (
        f"{kept} synthetic quer" in page
        and "The absorb's teacher answers them with the data's own, unreviewed" in page
    )
    asking = made.meta["synthesis"]["asking_a_fact"]
    assert (f"{asking} of them asking a fact your facts checks know" in page) == (asking > 0)
    assert ("asking a fact your facts checks know" in page) == (asking > 0)
    # the page reads the count from the version's report, whichever it is
    made.meta["synthesis"]["asking_a_fact"] = 3
    made.save(update_fields=["meta"])
    page = alice_client.get(synthesis.get_absolute_url()).content.decode()
    assert f"{kept} synthetic quer" in page and "3 of them asking a fact your facts checks know" in page


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_absorb_whose_synthesis_keeps_no_question_answers_the_data_as_it_is(job_world):
    from jobs import lifecycle
    from jobs.actions import start_absorb, start_synthesis
    from jobs.models import Job

    project, alice, base, prompt, data = job_world
    # threshold 1: every question is "close" to a real query, so none is kept
    never = {"count": 2, "seed": 0, "threshold": 1.0}
    teacher, _ = start_absorb(project, alice, prompt, data, base, synthesis=never)
    synthesis = teacher.depends_on
    lifecycle.execute(synthesis.pk, "test")
    synthesis.refresh_from_db()
    teacher.refresh_from_db()
    made = synthesis.output_dataset
    assert synthesis.status == Job.SUCCEEDED and made is not None and made.parent == data
    assert list(made.rows.order_by("index").values_list("messages", "split")) == list(
        data.rows.order_by("index").values_list("messages", "split")
    )
    assert teacher.status == Job.QUEUED and teacher.dataset_version == made
    assert f"the teacher answers the rows of {data} alone" in synthesis.log
    # On its own a synthesis that keeps nothing fails: there is nothing to review.
    alone = start_synthesis(project, alice, prompt, data, base, 2, {"seed": 0, "threshold": 1.0})
    lifecycle.execute(alone.pk, "test")
    alone.refresh_from_db()
    assert alone.status == Job.FAILED and "no version was stored" in alone.error


@pytest.mark.django_db
def test_a_failed_synthesis_is_retried_with_the_absorb_that_waited_for_it(job_world, alice_client):
    from django.urls import reverse

    from jobs.actions import ActionError, retry_job, start_absorb
    from jobs.models import Job

    project, alice, base, prompt, data = job_world
    teacher, finetune = start_absorb(project, alice, prompt, data, base, synthesis=5)
    synthesis = teacher.depends_on
    assert synthesis.claim("test-worker") and synthesis.fail("the teacher endpoint is down")
    teacher.refresh_from_db()
    finetune.refresh_from_db()
    assert teacher.status == finetune.status == Job.CANCELLED
    with pytest.raises(ActionError, match="retry that one"):
        retry_job(teacher, alice)
    page = alice_client.get(synthesis.get_absolute_url()).content.decode()
    assert "Retry as a new job" in page
    assert alice_client.post(reverse("job_retry", args=[project.slug, synthesis.pk])).status_code == 302
    again = Job.objects.filter(kind="synthesize").latest("pk")
    assert (
        again.pk != synthesis.pk
        and again.kind == "synthesize"
        and again.status == Job.QUEUED
        and again.dataset_version == data
    )
    assert again.params["fingerprint"] == synthesis.params["fingerprint"]
    (teacher2,) = again.dependents.all()
    (finetune2,) = teacher2.dependents.all()
    assert teacher2.kind == "teacher" and teacher2.dataset_version is None and teacher2.status == Job.QUEUED
    assert finetune2.kind == "finetune" and finetune2.params == finetune.params
    assert teacher2.params == teacher.params
