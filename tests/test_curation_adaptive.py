"""Adaptive best-of-N with reminders, relevant passages beside the question,
and picking on what a sample passes once repaired (engines.curation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines import curation
from engines.facts import validate_facts
from engines.inference import Completion, GenerationSettings
from engines.rules import validate_rules

HARBOR = Path(__file__).resolve().parent.parent / "scenarios" / "harbor"
RULES = validate_rules(
    [
        {"name": "greeting", "kind": "starts_with", "text": "Ahoy!"},
        {"name": "company", "kind": "contains", "text": "Harbor Ferries"},
        {"name": "short", "kind": "max_words", "n": 20},
    ]
)


class ScriptedTeacher:
    """A Generator whose answer depends on what it was told: it names the
    company only when a reminder asks for it, and the fare only when the
    passage with the fare is beside the question. Records every request."""

    has_adapter = False

    def __init__(self) -> None:
        self.asked: list[str] = []

    def _answer(self, conversation) -> str:
        text = conversation[-1]["content"]
        self.asked.append(text)
        body = "Ahoy! The ferry runs daily."
        if 'include the words "Harbor Ferries"' in text:
            body += " Harbor Ferries sails every hour."
        if "12 euros" in text:
            body += " A single costs 12 euros."
        return body

    def generate(self, conversations, system_prompt, settings=None, **kw):
        return [Completion(self._answer(c), 5, 5, "stop", 0.0) for c in conversations]

    def generate_samples(self, conversations, system_prompt, settings, samples, **kw):
        return [
            [Completion(self._answer(c), 5, 5, "stop", 0.0) for _ in range(samples)] for c in conversations
        ]


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_later_rounds_remind_only_the_failing_queries_and_stop_at_the_first_pass() -> None:
    teacher = ScriptedTeacher()
    queries = [conv("When do boats leave?"), conv("Is there wifi?")]
    out = curation.sample_until_pass(
        teacher,
        queries,
        "prompt",
        GenerationSettings(),
        RULES,
        best_of=2,
        rounds=4,
        repairs=tuple(curation.REPAIRS),
        phrases=False,
    )
    # Round 1 fails the contains rule (no repair can add it); round 2 reminds and passes: no round 3.
    assert [len(s) for s in out.samples] == [4, 4]
    assert [c.round for c in out.samples[0]] == [0, 0, 1, 1]
    assert [r.samples for r in out.rounds] == [4, 4]
    assert all("Important" not in a for a in teacher.asked[:4])
    assert all('include the words "Harbor Ferries"' in a for a in teacher.asked[4:])
    made = curation.curate(
        [s.text for s in out.samples[0]],
        RULES,
        curation.CurationSettings(),
        rounds=[s.round for s in out.samples[0]],
    )
    assert made.failing == [] and made.record["picked"] == 2 and made.record["rounds"] == [0, 0, 1, 1]
    # The stored row never carries what the teacher was told.
    assert queries[0] == conv("When do boats leave?")


class OpeningTeacher(ScriptedTeacher):
    """Continues whatever opening it is given, as the real generators do."""

    def generate_samples(self, conversations, system_prompt, settings, samples, *, opening=None, **kw):
        self.openings = [*getattr(self, "openings", []), opening]
        each = opening if isinstance(opening, list) else [opening] * len(conversations)
        assert len(each) == len(conversations)
        return [
            [Completion((start or "") + " we sail daily.", 5, 5, "stop", 0.0) for _ in range(samples)]
            for start in each
        ]


def test_a_later_round_opens_with_the_required_phrase_the_best_sample_lacks() -> None:
    teacher = OpeningTeacher()
    out = curation.sample_until_pass(
        teacher,
        [conv("When do boats leave?")],
        None,
        GenerationSettings(),
        RULES,
        best_of=1,
        rounds=3,
        repairs=(),
        opening="Ahoy!",
    )
    assert teacher.openings == ["Ahoy!", "Ahoy! Harbor Ferries"]
    assert [s.phrase for s in out.samples[0]] == [False, True]
    assert out.samples[0][1].text == "Ahoy! Harbor Ferries we sail daily."
    assert len(out.rounds) == 2  # passed in round two: no third round


def test_without_reminders_the_rounds_repeat_the_request_and_the_budget_holds() -> None:
    teacher = ScriptedTeacher()
    out = curation.sample_until_pass(
        teacher,
        [conv("hello")],
        None,
        GenerationSettings(),
        RULES,
        best_of=3,
        rounds=2,
        repairs=(),
        reminders=False,
    )
    assert len(out.samples[0]) == 6 and len(teacher.asked) == 6
    assert all(a == "hello" for a in teacher.asked)


def test_fact_checks_keep_sampling_and_the_reminder_quotes_the_fact_source() -> None:
    teacher = ScriptedTeacher()
    fare = validate_facts(
        [
            {
                "name": "fare",
                "question": "fare|cost",
                "expect": "12 euros",
                "source": "A single costs 12 euros.",
            }
        ]
    )[0]
    query = conv("What does the fare cost?")
    rules = RULES[:1]  # only the opening: passes at once, the fact does not
    out = curation.sample_until_pass(
        teacher,
        [query],
        None,
        GenerationSettings(),
        rules,
        best_of=1,
        rounds=3,
        repairs=(),
        checkers=[lambda text: {"fact:fare": "12 euros" in text}],
        sources=[{"fact:fare": fare.source}],
    )
    assert len(out.samples[0]) == 2
    assert "Use this information: A single costs 12 euros." in teacher.asked[1]
    made = curation.curate(
        [s.text for s in out.samples[0]],
        rules,
        curation.CurationSettings(),
        rounds=[s.round for s in out.samples[0]],
        extra=lambda text: {"fact:fare": "12 euros" in text},
    )
    assert made.record["picked"] == 1 and made.extra == {"fact:fare": True}


@pytest.mark.parametrize("fact_sentences", [True, False])
def test_a_later_round_opens_with_the_sentence_stating_the_missed_fact(fact_sentences: bool) -> None:
    teacher = OpeningTeacher()  # continues its opening and heeds no reminder: only a prefill helps
    rules = RULES[:1]
    out = curation.sample_until_pass(
        teacher,
        [conv("What does the fare cost?"), conv("Is there wifi?")],
        None,
        GenerationSettings(),
        rules,
        best_of=1,
        rounds=3,
        repairs=(),
        opening="Ahoy!",
        checkers=[lambda text: {"fact:fare": "12 euros" in text}, None],
        sources=[{"fact:fare": "A single costs 12 euros."}, {}],
        fact_sentences=fact_sentences,
    )
    if fact_sentences:
        # The query without a fact check passed in round one; the fare query passes in round two.
        assert teacher.openings == ["Ahoy!", "Ahoy! A single costs 12 euros."]
        assert (
            out.samples[0][1].text.startswith("Ahoy! A single costs 12 euros.") and out.samples[0][1].phrase
        )
        assert [len(s) for s in out.samples] == [2, 1]
    else:
        assert teacher.openings == ["Ahoy!", "Ahoy!", "Ahoy!"]
        assert not any("12 euros" in s.text for s in out.samples[0])
        assert [len(s) for s in out.samples] == [3, 1]


def test_a_round_is_one_call_with_each_query_opening_its_own_way() -> None:
    teacher = OpeningTeacher()
    out = curation.sample_until_pass(
        teacher,
        [conv("What does the fare cost?"), conv("Is there wifi?"), conv("Can I bring a dog?")],
        None,
        GenerationSettings(),
        RULES[:2],  # the greeting, and "Harbor Ferries" which the teacher never writes unasked
        best_of=2,
        rounds=3,
        repairs=(),
        opening="Ahoy!",
        checkers=[lambda text: {"fact:fare": "12 euros" in text}, None, None],
        sources=[{"fact:fare": "A single costs 12 euros."}, {}, {}],
    )
    # Round two: one call, each row its own opening (the fare query also opens with its fact).
    assert teacher.openings == [
        "Ahoy!",
        ["Ahoy! A single costs 12 euros. Harbor Ferries", "Ahoy! Harbor Ferries", "Ahoy! Harbor Ferries"],
    ]
    assert [len(s) for s in out.samples] == [4, 4, 4]
    assert all(s.phrase for group in out.samples for s in group[2:])


def test_the_word_limit_cut_keeps_the_sentence_with_a_required_phrase() -> None:
    answer = (
        "Ahoy! Boats leave every hour from the quay in the summer months. "
        "The crossing takes forty minutes in calm weather. Book with Harbor Ferries online."
    )
    fixed = curation.repair(answer, RULES)
    assert "Harbor Ferries" in fixed.text and fixed.text.startswith("Ahoy!")
    assert len(fixed.text.split()) <= 20
    assert fixed.changes[0].repair == "max_words"


def test_the_retriever_finds_the_passage_that_answers_and_skips_the_rules_prose() -> None:
    prompt = (HARBOR / "prompt.md").read_text()
    retriever = curation.Retriever(prompt, exclude=["Ahoy!", "Safe travels!"])
    found = retriever.relevant("How long is the crossing to Gull Island?", 3)
    assert any("40 minutes" in p.text for p in found)
    assert not any("Ahoy!" in p.text for p in retriever.passages)
    fares = retriever.relevant("how much is a return ticket for my dog and my bicycle", 3)
    assert any("Bicycles cost 4 euros" in p.text for p in fares)
    assert retriever.relevant("   ", 3) == [] and retriever.relevant("zzzz qqqq", 3) == []
    note = curation.facts_note(found)
    assert note.startswith("(Information for your answer:") and "40 minutes" in note


@pytest.mark.parametrize(
    "bad",
    [
        {"rounds": 0},
        {"rounds": 9},
        {"passages": -1},
        {"reminders": "yes"},
        {"best_of": 17},
        {"probe": -1},
        {"probe": 257},
        {"probe": 2.5},
        {"probe": True},
    ],
)
def test_curation_settings_refuse_out_of_range_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        curation.CurationSettings.from_dict(bad)


def test_figures_the_prompt_never_states_are_found_whatever_their_spelling() -> None:
    prompt = "Nurse appointments cost £25. Open 08:00 to 19:00. 10% off a plan. A single costs 12 euros."
    answer = (
        "It costs £25, not £320. We open at 8.00 and close at 19:00, or 9:30 on Sundays; 10 % off, 15 euros."
    )
    assert curation.unsupported_figures(answer, prompt) == ["£320", "9:30", "15 euros"]
    assert curation.unsupported_figures("No figures here, 3 dogs.", prompt) == []


def test_among_samples_passing_alike_the_pick_is_the_one_inventing_no_figure() -> None:
    prompt = "A single costs 12 euros."
    samples = [
        "Ahoy! A single costs 12 euros, and a return costs 30 euros.",
        "Ahoy! A single costs 12 euros, paid on board.",
    ]
    settings = curation.CurationSettings()
    fare = lambda text: {"fact:fare": "12 euros" in text}  # noqa: E731
    made = curation.curate(
        samples, RULES[:1], settings, extra=fare, invented=lambda t: curation.unsupported_figures(t, prompt)
    )
    assert made.record["picked"] == 1 and "invented_figures" not in made.record
    # Rules and facts still come first: an inventing sample that states the fact beats one that does not.
    made = curation.curate(
        [samples[0], "Ahoy! Ask on board."],
        RULES[:1],
        settings,
        extra=fare,
        invented=lambda t: curation.unsupported_figures(t, prompt),
    )
    assert made.record["picked"] == 0 and made.record["invented_figures"] == ["30 euros"]


def sample(teacher, queries, rules, **kw) -> curation.Sampled:
    """sample_until_pass with no system prompt, default settings and no repairs."""
    return curation.sample_until_pass(teacher, queries, None, GenerationSettings(), rules, repairs=(), **kw)


def test_a_probe_that_never_meets_a_phrase_opens_round_one_with_it_for_the_rest() -> None:
    """Round one asks the probe first; the phrase it never met opens the other
    queries' answers from round one on, and the probe's failures join round two."""
    teacher = OpeningTeacher()
    queries = [conv(f"Question {i}?") for i in range(6)]
    out = sample(
        teacher,
        queries,
        RULES[:2],
        best_of=2,
        rounds=3,
        opening="Ahoy!",
        probe=2,
    )
    assert out.early == curation.Early(("company",), False, (("company", 0.0),), 2)
    assert teacher.openings == ["Ahoy!", "Ahoy! Harbor Ferries", "Ahoy! Harbor Ferries"]
    assert [[(s.round, s.phrase) for s in group] for group in out.samples] == (
        [[(0, False)] * 2 + [(1, True)] * 2] * 2 + [[(0, True)] * 2] * 4
    )
    # Without the probe every query pays round one for nothing: 24 samples instead of 16.
    plain = sample(
        OpeningTeacher(),
        queries,
        RULES[:2],
        best_of=2,
        rounds=3,
        opening="Ahoy!",
    )
    assert sum(map(len, plain.samples)) == 24 and sum(map(len, out.samples)) == 16
    assert plain.early is None and [r.samples for r in out.rounds] == [4, 8, 4]


def test_a_probe_that_meets_the_phrase_leaves_round_one_alone_and_an_earlier_chunks_finding_skips_it() -> (
    None
):
    teacher = ScriptedTeacher()  # names the company when reminded; the probe's reminded queries don't count
    rules = [RULES[0]]  # the greeting only: nothing a probe could learn about
    out = sample(
        teacher,
        [conv("a?"), conv("b?"), conv("c?")],
        rules,
        best_of=1,
        rounds=2,
        probe=1,
    )
    assert out.early == curation.Early((), False, (), 1) and not out.early
    assert len(teacher.asked) == 3  # every query once: each passed round one
    known = curation.Early(("company",), False, (("company", 0.0),), 16)
    second = OpeningTeacher()
    again = sample(
        second,
        [conv("a?"), conv("b?")],
        RULES[:2],
        best_of=1,
        rounds=3,
        opening="Ahoy!",
        probe=1,
        early=known,
    )
    assert again.early is None and second.openings == ["Ahoy! Harbor Ferries"]


def test_a_probe_that_misses_the_facts_opens_round_one_with_each_querys_fact_sentence() -> None:
    teacher = OpeningTeacher()
    fare = {"fact:fare": "A single costs 12 euros."}
    checker = lambda text: {"fact:fare": "12 euros" in text}  # noqa: E731
    queries = [conv("Fare?"), conv("Price?"), conv("Wifi?"), conv("Cost?")]
    out = sample(
        teacher,
        queries,
        RULES[:1],
        best_of=1,
        rounds=3,
        opening="Ahoy!",
        checkers=[checker, checker, None, checker],
        sources=[fare, fare, {}, fare],
        probe=2,
    )
    assert out.early is not None and out.early.facts and dict(out.early.rates) == {"facts": 0.0}
    # Round one's rest: the wifi query asks no fact and opens plainly; the cost query opens with the fare.
    assert teacher.openings[1] == ["Ahoy!", "Ahoy! A single costs 12 euros."]
    assert [len(g) for g in out.samples] == [2, 2, 1, 1]
    assert (
        "after a probe of 2 queries, fact sentences prefilled"
        in curation.quality_report(
            [curation.curate([g[-1].text], RULES[:1], curation.CurationSettings()) for g in out.samples],
            RULES[:1],
            curation.CurationSettings(),
            "Ahoy!",
            [r.to_json() for r in out.rounds],
            out.early.to_json(),
        )["steps"][0]["step"]
    )
