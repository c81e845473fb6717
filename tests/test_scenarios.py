"""The shipped scenarios (scenarios/NAME) are sound data: their rules and
facts checks validate, the query files have the stated counts and shape,
train and held-out do not overlap, no opening is overused, every fact is
asked for by held-out queries, and the prompt is the stated size. Fast: the
tokenizer is the only model file read."""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engines.facts import FactCheck, applicable, states, validate_facts
from engines.rules import Rule, check_all, validate_rules

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
NAMES = sorted(p.name for p in SCENARIOS.iterdir() if (p / "prompt.md").is_file())
# (train, held-out) as scenarios/README.md states them.
COUNTS = {"lumen": (320, 60), "harbor": (320, 60), "fernhill": (300, 80)}
MIN_FACTS = 12
FACT_MIN_HELDOUT = 2
SAME_OPENING_MAX = 3
# Above this similarity (difflib ratio of the normalised texts) two queries are
# near-duplicates; the closest train/held-out pair of any scenario is ~0.76.
NEAR_DUPLICATE = 0.8
PROMPT_TOKENS = (800, 1400)


def _queries(name: str, split: str) -> list[str]:
    out = []
    path = SCENARIOS / name / f"{split}.jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        record = json.loads(line)
        assert set(record) == {"messages"}, f"{path.name} line {number}: keys {sorted(record)}"
        messages = record["messages"]
        assert len(messages) == 1 and messages[0]["role"] == "user", f"{path.name} line {number}"
        content = messages[0]["content"]
        assert isinstance(content, str) and content.strip(), f"{path.name} line {number}: empty"
        out.append(content)
    return out


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9£€$]+", text.casefold()))


def _rules(name: str) -> list[Rule]:
    return validate_rules(json.loads((SCENARIOS / name / "rules.json").read_text(encoding="utf-8")))


def _facts(name: str) -> list[FactCheck]:
    return validate_facts(json.loads((SCENARIOS / name / "facts.json").read_text(encoding="utf-8")))


def test_every_scenario_folder_is_complete_and_counted():
    assert set(NAMES) == set(COUNTS), "a scenario folder was added or removed: update COUNTS and the README"
    for name in NAMES:
        for file in ("prompt.md", "rules.json", "facts.json", "train.jsonl", "heldout.jsonl", "README.md"):
            assert (SCENARIOS / name / file).is_file(), f"{name}/{file} is missing"


@pytest.mark.parametrize("name", NAMES)
def test_rules_and_facts_validate(name):
    assert len(_rules(name)) >= 7
    facts = _facts(name)
    assert len(facts) >= MIN_FACTS, f"{name}: {len(facts)} facts checks; at least {MIN_FACTS}"


@pytest.mark.parametrize("name", NAMES)
def test_query_counts(name):
    assert (len(_queries(name, "train")), len(_queries(name, "heldout"))) == COUNTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_train_and_heldout_do_not_overlap_even_nearly(name):
    train = [_normalise(q) for q in _queries(name, "train")]
    close = []
    for query in _queries(name, "heldout"):
        held = _normalise(query)
        matcher = difflib.SequenceMatcher(None, "", held)  # it caches the second sequence
        for other in train:
            matcher.set_seq1(other)
            if (
                matcher.real_quick_ratio() >= NEAR_DUPLICATE
                and matcher.quick_ratio() >= NEAR_DUPLICATE
                and matcher.ratio() >= NEAR_DUPLICATE
            ):
                close.append((query, other))
    assert close == []


@pytest.mark.parametrize("name", NAMES)
def test_no_five_word_opening_is_overused(name):
    for split in ("train", "heldout"):
        queries = _queries(name, split)
        assert len({_normalise(q) for q in queries}) == len(queries), f"{name}/{split}: a repeated query"
        openings = Counter(" ".join(_normalise(q).split()[:5]) for q in queries)
        overused = {o: n for o, n in openings.items() if n > SAME_OPENING_MAX}
        assert overused == {}, f"{name}/{split}"


@pytest.mark.parametrize("name", NAMES)
def test_every_fact_is_asked_by_heldout_queries_and_stated_by_its_source(name):
    facts = _facts(name)
    heldout = _queries(name, "heldout")
    asked = Counter(f.name for q in heldout for f in applicable(facts, q))
    rare = {f.name: asked[f.name] for f in facts if asked[f.name] < FACT_MIN_HELDOUT}
    assert rare == {}, f"{name}: facts asked by fewer than {FACT_MIN_HELDOUT} held-out queries"
    prompt = " ".join((SCENARIOS / name / "prompt.md").read_text(encoding="utf-8").split())
    for fact in facts:
        assert " ".join(fact.source.split()) in prompt, (
            f"{name}: source of {fact.name!r} is not in the prompt"
        )
        assert states(fact, fact.source), f"{name}: the source of {fact.name!r} does not state its value"


@pytest.mark.parametrize("name", NAMES)
def test_the_prompt_is_about_a_thousand_tokens(name, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = (SCENARIOS / name / "prompt.md").read_text(encoding="utf-8")
    low, high = PROMPT_TOKENS
    assert low <= len(tokenizer(text)["input_ids"]) <= high


def test_fernhill_is_the_issue_20_third_scenario():
    """At least 8 rules with a contains rule and a negative regex; at least 60
    of the 80 held-out queries ask for a fact."""
    rules = _rules("fernhill")
    assert len(rules) >= 8
    assert any(r.kind == "contains" for r in rules)
    assert any(r.kind == "regex" and not r.params["must_match"] for r in rules)
    facts = _facts("fernhill")
    asking = [q for q in _queries("fernhill", "heldout") if applicable(facts, q)]
    assert len(asking) >= 60


FERNHILL_OK = (
    "Hello from Fernhill Vets! A standard consultation lasts 15 minutes and costs £48; book it in the app "
    "under Book a visit. If your pet is in distress, call our emergency line on 0161 496 0711. "
    "Give your pet a cuddle from us."
)


@pytest.mark.parametrize(
    ("answer", "broken"),
    [
        (FERNHILL_OK, set()),
        (FERNHILL_OK.replace("Hello from", "hello from"), {"greeting"}),
        (FERNHILL_OK + " Bye.", {"closing"}),
        (FERNHILL_OK.replace("0161 496 0711", "01614960711"), {"emergency line"}),
        (FERNHILL_OK.replace("15 minutes", "15 minutes" + " and more" * 30), {"short"}),
        (FERNHILL_OK.replace("; book", ".\n- book"), {"no lists"}),
        (FERNHILL_OK.replace("Give your", "We cannot Guarantee anything. Give your"), {"never guarantee"}),
        (FERNHILL_OK.replace("; book", "; give 2.5 ml twice a day and book"), {"no doses"}),
        (FERNHILL_OK.replace("; book", "; give 10mg and book"), {"no doses"}),
        (FERNHILL_OK.replace("in the app", "at www.fernhillvets.co.uk"), {"no links"}),
        (FERNHILL_OK.replace("in the app", "by writing to desk@fernhill.example"), {"no links"}),
        (FERNHILL_OK.replace("£48;", "£48!"), {"one exclamation mark"}),
    ],
)
def test_fernhill_rules_catch_what_the_prompt_forbids(answer, broken):
    failed = {name for name, ok in check_all(_rules("fernhill"), answer).items() if not ok}
    assert failed == broken
