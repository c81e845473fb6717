"""The general-skills task, scored fairly: the answer is searched for in the
whole response, so an absorbed greeting and sign-off around a right answer
do not count against it, with the strict first-line exact match beside."""

import importlib.util
import json

import pytest
import yaml

from engines.evaluation import (
    GENERAL_SKILLS_SHOTS,
    general_skills_rows,
    general_skills_task,
    normalize_answer,
    run_lm_eval,
    write_task,
)
from engines.evaluation.harness import (
    SEARCH_MAX_GEN_TOKS,
    answer_found,
    first_line_match,
    lm_eval_process_results,
    lm_eval_search_results,
)
from engines.generator import LocalGenerator
from engines.inference import GenerationSettings, generate, load_model

STYLED = "Ahoy! The capital of France is Paris. Safe travels!"


@pytest.mark.parametrize(
    ("response", "answer", "found"),
    [
        (STYLED, "Paris", True),
        ("Ahoy!\nParis.\nSafe travels!", "Paris", True),
        ("ahoy! it's PARIS, matey", "paris", True),
        ("Ahoy! The answer is 17. Safe travels!", "7", False),
        ("Ahoy! 3 + 4 = 7. Safe travels!", "7", True),
        ("Ahoy! I cannot say. Safe travels!", "Paris", False),
        ("Ahoy! Parisian food is great.", "Paris", False),
        ("The gas is carbon dioxide, of course.", "carbon dioxide", True),
        ("It's CARBON   DIOXIDE!", "carbon dioxide", True),
        ("It is dioxide carbon.", "carbon dioxide", False),
        ("The symbol is Au.", "Au", True),
        ("anything", "", False),
        ("", "Paris", False),
    ],
)
def test_it_finds_the_answer_inside_a_styled_response(response, answer, found):
    assert answer_found(response, answer) is found


def test_it_keeps_the_strict_first_line_score_beside_the_search():
    assert not first_line_match(STYLED, "Paris")
    assert first_line_match("  Paris.\nSafe travels!", "paris")
    assert lm_eval_search_results({"answer": "Paris"}, [STYLED]) == {"search_match": 1.0, "exact_match": 0.0}
    assert lm_eval_search_results({"answer": "Paris"}, ["Paris"]) == {"search_match": 1.0, "exact_match": 1.0}
    assert lm_eval_search_results({"answer": "Paris"}, []) == {"search_match": 0.0, "exact_match": 0.0}
    # lm-eval takes the first metric a document returns as the primary one.
    assert next(iter(lm_eval_search_results({"answer": "x"}, ["x"]))) == "search_match"
    assert lm_eval_process_results({"answer": "Paris"}, [STYLED]) == {"exact_match": 0.0}


def test_it_writes_the_general_skills_task_scored_by_search(tmp_path):
    name = general_skills_task(tmp_path)
    text = (tmp_path / f"{name}.yaml").read_text()
    assert text.endswith("process_results: !function workbench_task_metrics.search_results\n")
    config = yaml.safe_load(text.split("\nprocess_results:")[0])
    # Not cut at the first newline: only the end of turn (lm-eval adds it) stops a styled answer.
    assert config["generation_kwargs"] == {
        "until": [],
        "max_gen_toks": SEARCH_MAX_GEN_TOKS,
        "do_sample": False,
    }
    assert [m["metric"] for m in config["metric_list"]] == ["search_match", "exact_match"]
    assert config["num_fewshot"] == len(GENERAL_SKILLS_SHOTS)
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert rows == general_skills_rows()

    # The written module gives lm-eval the engines' own functions.
    spec = importlib.util.spec_from_file_location("metrics", tmp_path / "workbench_task_metrics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.search_results is lm_eval_search_results
    assert module.process_results is lm_eval_process_results

    strict = general_skills_task(tmp_path / "strict", scoring="exact")
    config = yaml.safe_load(
        (tmp_path / "strict" / f"{strict}.yaml").read_text().split("\nprocess_results:")[0]
    )
    assert config["generation_kwargs"]["until"] == ["\n"]
    assert [m["metric"] for m in config["metric_list"]] == ["exact_match"]


def test_it_refuses_a_bad_scoring_or_token_limit(tmp_path):
    rows = [{"query": "q", "answer": "a"}]
    with pytest.raises(ValueError, match="scoring 'fuzzy'"):
        write_task(tmp_path, "t", rows, scoring="fuzzy")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_gen_toks"):
            write_task(tmp_path, "t", rows, max_gen_toks=bad)
    assert not (tmp_path / "t.yaml").exists()


def test_the_shipped_questions_are_many_short_and_unambiguous():
    rows = general_skills_rows()
    assert len(rows) >= 60
    queries = [normalize_answer(r["query"]) for r in rows]
    assert len(set(queries)) == len(rows)
    shots = {normalize_answer(s["query"]) for s in GENERAL_SKILLS_SHOTS}
    assert not shots & set(queries), "a few-shot question is also scored"
    for row in rows:
        assert 1 <= len(row["answer"].split()) <= 2 and normalize_answer(row["answer"]), row
        # An answer already in its question would be "found" in a response that only echoes it.
        assert not answer_found(row["query"], row["answer"]), row


@pytest.mark.usefixtures("one_torch_thread")
def test_lm_eval_scores_the_whole_response_by_search(lively_dir, tmp_path):
    """Through lm-eval and the engine path: a word from past the first line of
    what the model says is found (search 1, exact 0); a word it never says is not."""
    queries = ["What is 2 + 2?", "Name a colour."]
    loaded = load_model(lively_dir)
    settings = GenerationSettings(max_new_tokens=SEARCH_MAX_GEN_TOKS, batch_size=2)
    said = [
        c.text for c in generate(loaded, [[{"role": "user", "content": q}] for q in queries], None, settings)
    ]
    words = normalize_answer(said[0]).split()
    first = normalize_answer(said[0].strip().splitlines()[0])
    inside = next(w for w in reversed(words) if w != first)
    rows = [{"query": queries[0], "answer": inside}, {"query": queries[1], "answer": "zzqxv"}]
    name = write_task(tmp_path, "probe", rows, scoring="search")

    result = run_lm_eval(None, [name], task_dir=tmp_path, generator=LocalGenerator(loaded), batch_size=2)
    task = result.tasks[name]
    assert task.metric == "search_match"
    assert task.responses == said
    assert task.correct == [1.0, 0.0]
    assert task.metrics["search_match"].value == pytest.approx(0.5)
    assert task.metrics["exact_match"].value == pytest.approx(float(first == inside) / 2)
    assert task.per_document == {"search_match": [1.0, 0.0], "exact_match": [float(first == inside), 0.0]}
