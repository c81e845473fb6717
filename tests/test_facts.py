"""engines.facts: facts checks validated, matched and scored, and drafted from a prompt."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engines.facts import (
    MAX_FACTS,
    FactCheck,
    FactsError,
    applicable,
    fact_checks,
    facts_to_json,
    propose_facts,
    states,
    validate_facts,
)

HARBOR = Path(__file__).resolve().parent.parent / "scenarios" / "harbor" / "prompt.md"
FARE = {
    "name": "gull island single fare",
    "question": "gull island.*(fare|cost|price|ticket)|(fare|cost|price|ticket).*gull island",
    "expect": "12 euros",
    "source": "A single adult foot ticket costs 12 euros to Gull Island",
}
CROSSING = {
    "name": "crossing",
    "question": r"how long.*gull island",
    "expect_regex": r"\b40\s*(minutes|mins?)\b",
}


def errors_of(data: object) -> list[str]:
    with pytest.raises(FactsError) as caught:
        validate_facts(data)
    return caught.value.errors


def test_it_reads_facts_and_writes_them_back():
    facts = validate_facts([FARE, CROSSING])
    assert facts[0] == FactCheck(FARE["name"], FARE["question"], expect="12 euros", source=FARE["source"])
    assert facts[1].expect is None and facts[1].expect_regex == CROSSING["expect_regex"]
    assert facts_to_json(facts) == [FARE, CROSSING]
    assert validate_facts(facts_to_json(facts)) == facts


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("fare", "fact 1: expected an object with 'name', 'question' and 'expect', got string"),
        ({"question": "q", "expect": "x"}, "fact 1: missing 'name'"),
        ({"name": 3, "question": "q", "expect": "x"}, "fact 1: 'name' must be a string, got number"),
        ({"name": " ", "question": "q", "expect": "x"}, "fact 1: 'name' must not be empty"),
        (
            {"name": "n" * 101, "question": "q", "expect": "x"},
            "fact 1: 'name' has 101 characters; the limit is 100",
        ),
        (
            {"name": "a\tb", "question": "q", "expect": "x"},
            "fact 1: 'name' must not contain control characters",
        ),
        ({"name": "a\ud800", "question": "q", "expect": "x"}, "fact 1: 'name' contains a lone surrogate"),
        ({"name": "n", "expect": "x"}, "fact 1 (\"n\"): missing 'question'"),
        ({"name": "n", "question": "(", "expect": "x"}, "fact 1 (\"n\"): invalid regex in 'question' '('"),
        ({"name": "n", "question": "a{100000}", "expect": "x"}, "repeat counts make it too large"),
        (
            {"name": "n", "question": "q" * 1001, "expect": "x"},
            "'question' has 1,001 characters; the limit is 1,000",
        ),
        ({"name": "n", "question": "q"}, "give exactly one of 'expect' (a phrase) and 'expect_regex'"),
        ({"name": "n", "question": "q", "expect": "x", "expect_regex": "x"}, "give exactly one of 'expect'"),
        ({"name": "n", "question": "q", "expect": ""}, "'expect' must not be empty"),
        ({"name": "n", "question": "q", "expect": " . "}, "'expect' has nothing left to look for"),
        ({"name": "n", "question": "q", "expect": ["x"]}, "'expect' must be a string, got list"),
        ({"name": "n", "question": "q", "expect_regex": "[a-"}, "invalid regex in 'expect_regex'"),
        ({"name": "n", "question": "q", "expect": "x", "source": 5}, "'source' must be a string, got number"),
        ({"name": "n", "question": "q", "expect": "x", "why": "?"}, "unknown key 'why'"),
    ],
)
def test_it_names_each_bad_item(item, message):
    errors = errors_of([FARE, item])
    assert len(errors) >= 1
    assert all(e.startswith("fact 2") for e in errors)
    assert any(message.replace("fact 1", "fact 2") in e for e in errors), errors


def test_it_lists_every_problem_and_refuses_duplicates_and_non_lists():
    errors = errors_of([{"name": "a"}, FARE, dict(FARE, expect="13 euros"), 7])
    assert errors == [
        "fact 1 (\"a\"): missing 'question' (a regex matched against the user's query)",
        "fact 1 (\"a\"): give exactly one of 'expect' (a phrase) and 'expect_regex' (a regex)",
        'fact 3 ("gull island single fare"): duplicate name (fact 2 has the same name)',
        "fact 4: expected an object with 'name', 'question' and 'expect', got number",
    ]
    assert errors_of({"facts": []}) == ["facts must be a list, got object"]
    many = [{"name": f"f{i}", "question": "q", "expect": "x"} for i in range(MAX_FACTS + 1)]
    assert errors_of(many) == [f"{MAX_FACTS + 1} facts; the limit is {MAX_FACTS} facts per prompt version"]
    assert len(validate_facts(many[:MAX_FACTS])) == MAX_FACTS


@pytest.mark.parametrize(
    ("expect", "answer", "stated"),
    [
        ("1,000 euros", "It costs 1000 euros.", True),
        ("1000 euros", "It costs 1,000 euros.", True),
        ("12 euros", "Ahoy! A ticket is 12 EUROS.", True),
        ("12 euros.", "It is 12 euros, Safe travels!", True),
        ("12 euros", "It is 12\n   euros", True),
        ("Port Ellis", "Boats leave from port ellis.", True),
        ("Port Ellis", "Boats leave from Port Elliston.", False),
        ("12 euros", "It is 112 euros.", False),
        ("12 euros", "It is 12 dollars.", False),
        ("06:30", "The first boat is at 06:30.", True),
        ("06:30", "The first boat is at 6:30.", False),
        ("O'Neill's", "Ask at O\u2019Neill\u2019s desk", True),
    ],
)
def test_it_matches_the_expected_phrase_after_normalising(expect, answer, stated):
    fact = validate_facts([{"name": "f", "question": "q", "expect": expect}])[0]
    assert states(fact, answer) is stated


def test_it_scores_only_the_facts_the_query_asks_for():
    facts = validate_facts([FARE, CROSSING])
    assert [f.name for f in applicable(facts, "What's the PRICE for Gull Island?")] == [FARE["name"]]
    assert applicable(facts, "Can I bring a dog?") == []
    assert fact_checks(facts, "Can I bring a dog?", "Yes.") == {}
    asked = "How long is it to Gull Island and what is the fare?"
    assert fact_checks(facts, asked, "40 minutes, and a ticket is 12 euros.") == {
        "fact:gull island single fare": 1.0,
        "fact:crossing": 1.0,
        "fact_recall": 1.0,
    }
    assert fact_checks(facts, asked, "About 40 mins.") == {
        "fact:gull island single fare": 0.0,
        "fact:crossing": 1.0,
        "fact_recall": 0.0,
    }


def test_a_hostile_pattern_times_out_as_a_failed_check_not_a_hang():
    slow = "^(a|aa)+$"
    facts = validate_facts(
        [
            {"name": "slow question", "question": slow, "expect": "x"},
            {"name": "slow answer", "question": "hello", "expect_regex": slow},
        ]
    )
    hostile = "a" * 40 + "!"
    started = time.monotonic()
    assert fact_checks(facts[:1], hostile, "x x x", timeout=0.05) == {
        "fact:slow question": 0.0,
        "fact_recall": 0.0,
    }
    assert applicable(facts[:1], hostile, timeout=0.05) == facts[:1]
    assert states(facts[1], hostile, timeout=0.05) is False
    assert fact_checks(facts[1:], "hello", hostile, timeout=0.05) == {
        "fact:slow answer": 0.0,
        "fact_recall": 0.0,
    }
    assert time.monotonic() - started < 2


def test_it_proposes_the_harbor_prompts_facts_quickly():
    text = HARBOR.read_text()
    started = time.perf_counter()
    drafts = propose_facts(text)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.25, elapsed  # < 50 ms on a quiet machine; slack for a shared one
    facts = validate_facts(drafts)  # every draft is a valid facts check, names unique
    assert propose_facts(text) == drafts
    by_expect = {d["expect"]: d for d in drafts}
    crossing, fare = by_expect["40 minutes"], by_expect["12 euros"]
    assert crossing["source"] == "Port Ellis to Gull Island takes 40 minutes."
    assert "Gull Island" in fare["source"] and "12 euros" in fare["source"]
    fact = {f.name: f for f in facts}
    asked = applicable(facts, "How long is the crossing to Gull Island?")
    assert fact[crossing["name"]] in asked and fact[fare["name"]] not in asked
    assert fact[fare["name"]] in applicable(facts, "How much is a ticket to Gull Island?")
    assert fact[crossing["name"]] not in applicable(facts, "How long does the boat to Marrow Bay take?")
    assert {"1 hour 50 minutes", "28 euros", "06:30", "20 percent", "40 knots"} <= set(by_expect)
    # The reply-format rules and their examples ("such as 06:30 or 18:30") are not facts.
    assert not any("reply" in d["source"] or "such as" in d["source"] for d in drafts)
    assert all(d["expect"] in d["source"] for d in drafts)


def test_it_proposes_addresses_names_and_nothing_from_an_empty_prompt():
    text = (
        "# Support\n\nWrite to help@lumen.example or call +44 20 7946 0958. "
        "The refund window is 14 days.\n\n- Our office is in Leeds, managed by Ada Byrne.\n"
    )
    by_expect = {d["expect"]: d for d in propose_facts(text)}
    assert {"help@lumen.example", "+44 20 7946 0958", "14 days", "Leeds", "Ada Byrne"} <= set(by_expect)
    facts = validate_facts(list(by_expect.values()))
    window = next(f for f in facts if f.expect == "14 days")
    assert window in applicable(facts, "How long is the refund window?")
    assert propose_facts("") == [] and propose_facts("hello there, how are you") == []
