"""Best-of-N choice, openings and recorded repairs on hand-made answers."""

import pytest

from engines.curation import REPAIRS, opening, pass_rates, pick_best, repair
from engines.rules import check, check_all, validate_rules

RULES = validate_rules(
    [
        {"name": "greeting", "kind": "starts_with", "text": "hi there!"},
        {"name": "sign-off", "kind": "ends_with", "text": "- lumen support"},
        {"name": "short", "kind": "max_words", "n": 25},
        {"name": "lower", "kind": "lowercase"},
        {"name": "no lists", "kind": "no_list_markup"},
        {"name": "no sorry", "kind": "not_contains", "text": "sorry", "case_sensitive": False},
    ]
)


def by_name(name):
    return next(r for r in RULES if r.name == name)


def test_best_of_n_keeps_the_sample_passing_most_rules():
    samples = [
        "Hello. Sorry about that.",
        "hi there! we fixed it. - lumen support",
        "hi there! Here is a long answer - lumen support",
    ]
    best, passed = pick_best(samples, RULES)
    assert best == 1
    assert passed[1] == 6 and passed[1] > passed[2] > passed[0]


def test_best_of_n_ties_go_to_the_judge_then_the_shortest():
    samples = ["hi there! a b c", "hi there! a", "hi there! a b"]
    assert pick_best(samples, RULES)[0] == 1
    assert pick_best(samples, RULES, judge_scores=[0.2, 0.1, 0.9])[0] == 2
    with pytest.raises(ValueError):
        pick_best([], RULES)


def test_opening_is_the_starts_with_text():
    assert opening(RULES) == "hi there!"
    assert opening([by_name("short")]) is None


def test_each_repair_on_its_own():
    fixed = repair("Sure. Sorry for the wait. It works now.", RULES, enabled={"not_contains"})
    assert fixed.text == "Sure. It works now."
    assert fixed.repairs == ["not_contains"]
    assert fixed.changes[0].before == "Sure. Sorry for the wait. It works now."

    fixed = repair("Do this:\n- open settings\n- click save", RULES, enabled={"no_list_markup"})
    assert check(by_name("no lists"), fixed.text)
    assert fixed.text == "Do this: open settings. click save."

    long = " ".join(f"Sentence number {i} is here." for i in range(10))
    fixed = repair(long, RULES, enabled={"max_words"})
    # Cut to 3/4 of the 25-word limit (18 words), whole sentences: a student's lengths scatter around its data's.
    assert fixed.text == " ".join(f"Sentence number {i} is here." for i in range(3))
    # With the sign-off still to append: 18 words minus its 3.
    fixed = repair(long, RULES, enabled={"max_words", "ends_with"})
    assert fixed.text == " ".join(f"Sentence number {i} is here." for i in range(3)) + " - lumen support"
    # An answer at the limit is left alone: only answers failing the rule are repaired.
    at_limit = " ".join(f"Sentence number {i} is here." for i in range(5))
    assert repair(at_limit, RULES, enabled={"max_words"}).text == at_limit

    fixed = repair("hi there! The App Works. - lumen support", RULES, enabled={"lowercase"})
    assert fixed.text == "hi there! the app works. - lumen support"
    # A phrase another rule requires verbatim keeps its case (the rules conflict; the data says so).
    named = validate_rules(
        [{"name": "lower", "kind": "lowercase"}, {"name": "name", "kind": "contains", "text": "Lumen Cloud"}]
    )
    assert repair("Try Lumen Cloud Today.", named).text == "try Lumen Cloud today."

    fixed = repair("all done.", RULES, enabled={"ends_with"})
    assert fixed.text == "all done. - lumen support"

    # Under the limit now, over it once the sign-off is appended: cut first, leaving room.
    near = "Sentence one is here. " + " ".join(["word"] * 19) + "."
    fixed = repair(near, RULES, enabled={"max_words", "ends_with"})
    assert check(by_name("short"), fixed.text) and check(by_name("sign-off"), fixed.text)
    assert fixed.text == "Sentence one is here. - lumen support"


def test_all_repairs_together_make_a_failing_answer_pass_and_record_each_step():
    answer = (
        "hi there! Sorry, I cannot do that. Here is what you can do:\n1. Open The App\n2. Tap Sync\n"
        + "This keeps going with many more words than allowed in a short answer, " * 3
    )
    fixed = repair(answer, RULES)
    results = check_all(RULES, fixed.text)
    assert all(results.values()), (fixed.text, results)
    assert set(fixed.repairs) == {"not_contains", "no_list_markup", "max_words", "lowercase", "ends_with"}
    for change in fixed.changes:
        assert change.repair in REPAIRS and change.before != change.after


def test_a_passing_answer_is_untouched_and_unknown_repairs_are_refused():
    good = "hi there! it works. - lumen support"
    assert repair(good, RULES).changes == []
    with pytest.raises(ValueError, match="unknown repair"):
        repair(good, RULES, enabled={"capitalise"})


def test_pass_rates():
    report = pass_rates(["hi there! ok - lumen support", "nope"], RULES)
    assert report["rows"] == 2 and report["all_rules"] == 0.5
    assert report["rules"]["greeting"] == 0.5 and report["rules"]["lower"] == 1.0


@pytest.fixture(scope="module")
def lively(lively_dir, one_torch_thread):
    from engines.inference import load_model

    return load_model(lively_dir, device="cpu", dtype=__import__("torch").float32)


def test_an_opening_starts_every_answer_and_the_model_continues_it(lively):
    from engines.inference import GenerationSettings, encode, generate

    convs = [[{"role": "user", "content": q}] for q in ("where is my photo?", "how much is the plan?", "hi")]
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    answers = generate(lively, convs, "You are a bot.", settings, opening="hi there!")
    assert all(a.text.startswith("hi there!") and len(a.text) > len("hi there!") for a in answers)
    # The prompt tokens include the opening: the model continues it rather than starting over.
    assert answers[0].prompt_tokens == len(encode(lively.tokenizer, convs[0], "You are a bot.", "hi there!"))


def test_best_of_n_picks_the_rule_maximising_sample_on_a_seeded_model(lively):
    from engines.inference import GenerationSettings, generate_samples

    rules = validate_rules(
        [
            {"name": "short", "kind": "max_words", "n": 3},
            {"name": "no e", "kind": "not_contains", "text": "e"},
        ]
    )
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    groups = generate_samples(lively, convs, None, settings, samples=4)
    again = generate_samples(lively, convs, None, settings, samples=4)
    assert [[c.text for c in g] for g in groups] == [[c.text for c in g] for g in again]  # seeded
    assert [len(g) for g in groups] == [4, 4, 4]
    assert any(len({c.text for c in g}) > 1 for g in groups)  # sampling gives different answers
    for group in groups:
        texts = [c.text for c in group]
        best, passed = pick_best(texts, rules)
        assert passed[best] == max(passed)
        assert passed == [sum(check_all(rules, t).values()) for t in texts]


def test_an_opening_through_the_engine_protocol_matches_the_in_process_one(lively, lively_dir):
    """continue_final_message on the hf engine server (vLLM's parameter) gives
    the same prefilled answers as in-process generation."""
    from engines.engine_server import EngineServer
    from engines.inference import GenerationSettings, generate
    from engines.remote import generate_remote

    convs = [[{"role": "user", "content": q}] for q in ("where is my photo?", "how much is the plan?")]
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    local = generate(lively, convs, "Be brief.", settings, opening="hi there!")
    with EngineServer({"lively": lively_dir}, dtype="float32", threads=1) as server:
        remote = generate_remote(server.url, "lively", convs, "Be brief.", settings, opening="hi there!")
    assert [c.text for c in remote] == [c.text for c in local]
    assert all(c.text.startswith("hi there!") for c in remote)


def test_curation_sampling_follows_the_generation_bounds():
    # The samples are generated with these settings: a value the generation table refuses
    # (temperature above 2) is refused here, not by the teacher job after it started.
    from engines.curation import CurationSettings

    with pytest.raises(ValueError, match="temperature must be between 0 and 2"):
        CurationSettings(temperature=3)
    with pytest.raises(ValueError, match="top_p must be greater than 0"):
        CurationSettings(top_p=0)
    assert CurationSettings(temperature=2, top_p=1).temperature == 2
