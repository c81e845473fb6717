import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from engines.evaluation import (
    ARMS,
    EvalError,
    ExampleScore,
    general_skills_rows,
    general_skills_task,
    generate_arms,
    judge_answers,
    judge_format,
    judge_human_agreement,
    judge_messages,
    latency_summary,
    mean_ci,
    normalize_answer,
    paired_difference,
    parse_judge,
    prompt_effect_retained,
    run_lm_eval,
    score_example,
    single_request_latency,
    write_task,
)
from engines.generator import LocalGenerator
from engines.inference import (
    Completion,
    GenerationCancelled,
    GenerationSettings,
    SettingsError,
    generate,
    load_model,
    response_format_json,
)
from engines.rules import validate_rules

# One torch thread: see the one_torch_thread fixture.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "\n".join(
    ["You are the support assistant of Lumen Cloud Backup."]
    + [f"Rule {i}: answer in at most {i + 2} sentences and mention plan number {i}." for i in range(1, 8)]
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "How do I restore a file that I deleted last week?"}],
    [{"role": "user", "content": "Refund?"}],
    [{"role": "user", "content": "Is my data encrypted?"}],
    [{"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def adapter_dir(lively_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights: it changes the answers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def texts(completions):
    return [(c.text, c.completion_tokens) for c in completions]


# --- scoring one example -------------------------------------------------------


def test_it_normalises_answers_squad_style():
    assert normalize_answer("  The  Eiffel Tower!  ") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("«Théâtre»") == "théâtre"
    assert normalize_answer("Then") == "then"  # "the" only as a whole word


def test_it_scores_an_example_on_rules_reference_and_teacher():
    rules = validate_rules(
        [
            {"name": "greets", "kind": "starts_with", "text": "Hi"},
            {"name": "short", "kind": "max_words", "n": 3},
        ]
    )
    score = score_example(
        "Hi, the cat sat on the mat.",
        rules=rules,
        reference="the cat sat on the mat",
        teacher="the cat lay on the mat",
    )
    assert score.rules == {"greets": True, "short": False}
    assert score.all_rules is False
    assert score.exact_match == 0.0  # "hi" is extra
    # ROUGE-L: 6 of the answer's 7 words in order; F1 = 2 * (6/7 * 6/6) / (6/7 + 1)
    assert score.rouge_l == pytest.approx(12 / 13)
    # with the teacher: LCS "the cat on the mat" = 5 words of 7 and of 6
    assert score.agreement == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert 0.5 < score.chrf < 1.0
    assert score.metrics() == {
        "all_rules": 0.0,
        "rule:greets": 1.0,
        "rule:short": 0.0,
        "exact_match": 0.0,
        "chrf": score.chrf,
        "rouge_l": score.rouge_l,
        "agreement": score.agreement,
    }


def test_it_scores_exact_and_disjoint_answers_at_the_ends_of_the_scale():
    # Exact match normalises; ROUGE-L only lowercases and splits words ("the paris" vs "paris").
    same = score_example("The Paris.", reference="paris")
    assert (same.exact_match, same.rouge_l) == (1.0, pytest.approx(2 / 3))
    assert score_example("Paris", reference="Paris").chrf == 1.0
    other = score_example("xyz", reference="Paris")
    assert (other.exact_match, other.chrf, other.rouge_l) == (0.0, 0.0, 0.0)


def test_it_leaves_out_what_it_cannot_score():
    score = score_example("anything")
    assert score == ExampleScore(
        rules={}, all_rules=None, exact_match=None, chrf=None, rouge_l=None, agreement=None
    )
    assert score.metrics() == {}


# --- statistics -----------------------------------------------------------------


def test_it_puts_a_bootstrap_interval_around_a_mean():
    values = [0.0, 1.0] * 50
    est = mean_ci(values)
    assert est.value == 0.5 and est.n == 100
    # the normal approximation: 0.5 +- 1.96 * 0.05
    assert 0.38 < est.low < 0.44 and 0.56 < est.high < 0.62
    assert mean_ci(values) == est  # seeded
    assert mean_ci(values, confidence=0.5).high < est.high


def test_it_handles_no_one_and_constant_values():
    empty = mean_ci([])
    assert (empty.value, empty.low, empty.high, empty.n) == (None, None, None, 0) and empty.note
    one = mean_ci([0.7])
    assert (one.value, one.low, one.high, one.n) == (0.7, 0.7, 0.7, 1)
    constant = mean_ci([1.0] * 5)
    assert (constant.value, constant.low, constant.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, float("nan")])


def test_it_pairs_the_difference_over_the_same_examples():
    # Very different examples, but b is always a plus 0.1: paired, there is no doubt.
    a = [i / 20 for i in range(20)]
    b = [x + 0.1 for x in a]
    diff = paired_difference(b, a)
    assert diff.value == pytest.approx(0.1)
    assert diff.low == pytest.approx(0.1) and diff.high == pytest.approx(0.1)
    # Unpaired, the spread of the examples would swamp it.
    assert mean_ci(b).low < mean_ci(a).high
    noisy = paired_difference([1, 1, 1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 1, 0, 0, 1])
    assert noisy.value == pytest.approx(0.375) and noisy.low < 0.375 < noisy.high
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 0], [1])


def test_it_measures_the_prompt_effect_retained():
    n = 40
    floor, teacher = [0.0] * n, [1.0] * n
    half = [1.0, 0.0] * (n // 2)
    est = prompt_effect_retained(half, floor, teacher)
    assert est.value == pytest.approx(0.5) and est.n == n and est.note == ""
    # the denominator is 1 in every resample: the interval is the student mean's
    assert 0.3 < est.low < 0.5 < est.high < 0.7
    assert prompt_effect_retained([1.0] * 4, [0.0] * 4, [1.0, 0.0] * 2).value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same length"):
        prompt_effect_retained([1.0], [0.0, 1.0], [1.0, 1.0])


def test_it_says_the_ratio_is_undefined_when_the_teacher_is_not_above_the_floor():
    teacher = [1.0] * 4 + [0.0] * 16
    floor = [1.0] * 5 + [0.0] * 15
    est = prompt_effect_retained([1.0] * 20, floor, teacher)
    assert (est.value, est.low, est.high, est.n) == (None, None, None, 20)
    assert est.note == (
        "the prompted base is not better than the floor on this metric "
        "(teacher 0.20 vs floor 0.25): compare absolute scores instead"
    )


def test_it_drops_resamples_without_a_ratio_and_says_how_many():
    # The teacher beats the floor on one example of 10: a resample misses it
    # with probability 0.9 ** 10 = 0.35, so about 700 of 2000 have no ratio.
    teacher = [1.0] + [0.0] * 9
    est = prompt_effect_retained(teacher, [0.0] * 10, teacher)
    assert est.value == 1.0 and est.low == est.high == 1.0
    dropped = int(re.match(r"(\d+) of 2000 resamples dropped", est.note).group(1))
    assert 600 < dropped < 800


def test_it_summarises_latencies():
    assert latency_summary([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85)}
    assert latency_summary([]) == {"mean": None, "p50": None, "p95": None}


def test_it_measures_judge_human_agreement():
    same = judge_human_agreement([1, 5, 7, 10], [1, 5, 7, 10])
    assert (same["n"], same["spearman"], same["cohen_kappa"]) == (4, pytest.approx(1.0), pytest.approx(1.0))
    # reversed on a 3-point scale: quadratic kappa 1 - (2/3) / (1/3) = -1
    reverse = judge_human_agreement([1, 2, 3], [3, 2, 1])
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["cohen_kappa"] == pytest.approx(-1.0)
    # rounding: 6.6 and 7.4 are both 7
    assert judge_human_agreement([6.6, 2.0, 9.0], [7.4, 2.0, 9.0])["cohen_kappa"] == pytest.approx(1.0)
    constant = judge_human_agreement([5, 5, 5], [1, 2, 3])
    assert constant["spearman"] is None and "Spearman" in constant["note"]
    few = judge_human_agreement([1, 2], [1, 2])
    assert (few["spearman"], few["cohen_kappa"]) == (None, None) and "at least 3" in few["note"]


# --- LLM-as-judge ---------------------------------------------------------------


def test_it_writes_the_judge_prompt():
    system, user = judge_messages("Polite and correct.", "What is 2+2?", "4, obviously.", reference="4")
    assert system["role"] == "system" and "Polite and correct." in system["content"]
    assert "Score: N" in system["content"] and "from 1 to 10" in system["content"]
    assert user["role"] == "user"
    assert [part.split("\n")[0] for part in user["content"].split("\n\n")] == [
        "## Query",
        "## Reference answer",
        "## Answer to grade",
    ]
    assert "What is 2+2?" in user["content"] and "4, obviously." in user["content"]
    _, user = judge_messages("r", "q", "a", scale=(0, 5))
    assert "Reference" not in user["content"]


@pytest.mark.parametrize(
    "text, score, reasoning",
    [
        ("Correct and polite.\nScore: 8", 8.0, "Correct and polite."),
        ("Fine.\nscore = 7", 7.0, "Fine."),
        ("Good.\n\n**Score:** 9", 9.0, "Good."),
        ("Mostly right.\nI give it 6/10.", 6.0, "Mostly right."),
        (
            "On a 1-10 scale, where Score: 10 is perfect...\nIt misses a step.\nScore: 4",
            4.0,
            "On a 1-10 scale, where Score: 10 is perfect...\nIt misses a step.",
        ),
        ("Score: 7.5", 7.5, ""),
    ],
)
def test_it_parses_judge_scores(text, score, reasoning):
    verdict = parse_judge(text)
    assert (verdict.score, verdict.reasoning, verdict.error) == (score, reasoning, "")


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("A fine answer, I would rate it highly.", "no score found: expected a final line `Score: N`"),
        ("Great.\nScore: 11", "score 11 is outside the scale 1-10"),
        ("Bad.\nScore: 0", "score 0 is outside the scale 1-10"),
    ],
)
def test_it_reports_malformed_judge_output(text, error):
    verdict = parse_judge(text)
    assert verdict.score is None and error in verdict.error
    assert parse_judge("Score: 5", scale=(1, 5)).score == 5.0
    assert parse_judge("8/10", scale=(1, 5)).score is None  # not this scale's fraction


class RecordingJudge:
    """A judge that answers every chat with a fixed verdict and keeps what it was given."""

    has_adapter = False

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, list]] = []

    def generate(
        self,
        conversations,
        system_prompt,
        settings=None,
        *,
        adapter=True,
        progress=None,
        should_stop=None,
        opening=None,
    ):
        self.calls.append((system_prompt, [list(c) for c in conversations]))
        return [
            Completion(f"It follows the rubric.\nScore: {len(self.calls) + 5}", 10, 5, "stop", 0.1)
            for _ in conversations
        ]


def test_the_judge_is_given_its_rubric():
    """The judge's instructions are its system prompt: a generator replaces any
    system message, so they must be passed as one (they were dropped before)."""
    judge = RecordingJudge()
    items = [("q1", "a1", "ref1"), ("q2", "a2", None), ("q3", "a3", "ref3")]
    verdicts = judge_answers(judge, "Be concise.", items, structured=False)
    assert len(judge.calls) == 2  # with and without a reference answer: two instructions
    for system, chats in judge.calls:
        assert system is not None and "## Rubric\nBe concise." in system and "Score: N" in system
        assert all(m["role"] == "user" for chat in chats for m in chat)
    assert "reference answer" in judge.calls[0][0] and "reference answer" not in judge.calls[1][0]
    assert [v.score for v, _text in verdicts] == [6.0, 7.0, 6.0]  # input order kept across the groups
    assert verdicts[1][0].reasoning == "It follows the rubric." and verdicts[1][1].endswith("Score: 7")


@pytest.mark.parametrize(
    "text, score, error",
    [
        ('{"reasoning": "Polite, and it answers.", "score": 8}', 8.0, ""),
        ('{"reasoning": "", "score": 1}', 1.0, ""),
        ('{"reasoning": "Too long, and cut', None, "cut off before its score"),
        ('{"reasoning": "x", "score": 11}', None, "outside the scale 1-10"),
        ('{"reasoning": "x", "score": "high"}', None, "not a number"),
        ('{"mood": "fine"}\nScore: 6', 6.0, ""),  # JSON without a score: read as free text
    ],
)
def test_it_parses_structured_verdicts(text, score, error):
    verdict = parse_judge(text)
    assert verdict.score == score and error in verdict.error
    if score is not None and text.startswith('{"reasoning"'):
        assert verdict.reasoning == json.loads(text)["reasoning"]


def test_settings_carry_a_response_format_checked_as_the_gateway_checks_it():
    fmt = response_format_json(judge_format((1, 5)))
    settings = GenerationSettings(response_format=fmt)
    assert settings.to_openai()["response_format"] == judge_format((1, 5))
    assert "response_format" not in GenerationSettings().to_openai()
    assert GenerationSettings.from_dict({"response_format": judge_format((1, 5))}) == settings
    with pytest.raises(SettingsError) as bad:
        GenerationSettings(response_format='{"type": "xml"}')
    assert "response_format.type must be one of" in str(bad.value)
    with pytest.raises(SettingsError, match="not JSON"):
        GenerationSettings(response_format="{oops")


def test_a_structured_judge_scores_every_answer_even_a_random_model(lively_dir):
    """The tiny random model never writes `Score: N` by itself; under the
    grammar each verdict is JSON with a whole score on the scale."""
    judge = LocalGenerator(load_model(lively_dir, dtype="float32"))
    items = [("What is 2+2?", "4", None), ("Name a colour.", "Blue.", "Red"), ("hi", "hello", None)]
    settings = GenerationSettings(max_new_tokens=512, batch_size=4)
    free = judge_answers(judge, "Correct and brief.", items, settings, scale=(1, 5), structured=False)
    assert all(v.score is None for v, _ in free)
    verdicts = judge_answers(judge, "Correct and brief.", items, settings, scale=(1, 5))
    for verdict, text in verdicts:
        data = json.loads(text)
        assert set(data) == {"reasoning", "score"} and isinstance(data["score"], int)
        assert verdict.score == data["score"] and 1 <= verdict.score <= 5 and verdict.error == ""
        assert len(data["reasoning"]) <= 400


# --- four arms, one loaded model ------------------------------------------------------


def test_it_runs_four_arms_on_one_loaded_model(lively_dir, adapter_dir):
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    loaded = load_model(lively_dir, adapter_dir=adapter_dir)
    base = load_model(lively_dir)
    assert loaded.has_adapter and not base.has_adapter

    calls = []
    arms = generate_arms(
        loaded, CONVERSATIONS, SYSTEM, settings, progress=lambda p: calls.append((p.done, p.total, p.unit))
    )
    assert list(arms) == list(ARMS)
    # Each arm equals a model loaded for that arm alone (no KV prefix crosses arms).
    assert texts(arms["floor"]) == texts(generate(base, CONVERSATIONS, None, settings))
    assert texts(arms["teacher"]) == texts(generate(base, CONVERSATIONS, SYSTEM, settings))
    student = load_model(lively_dir, adapter_dir=adapter_dir)
    assert texts(arms["student"]) == texts(generate(student, CONVERSATIONS, None, settings))
    assert texts(arms["student+prompt"]) == texts(generate(student, CONVERSATIONS, SYSTEM, settings))
    # ...and the arms really differ.
    assert texts(arms["student"]) != texts(arms["floor"])
    assert texts(arms["teacher"]) != texts(arms["floor"])
    assert arms["teacher"][0].prompt_tokens > arms["floor"][0].prompt_tokens
    assert calls == [(d, 20, "generations") for d in (3, 5, 8, 10, 13, 15, 18, 20)]

    # A no-op without an adapter.
    with base.adapter_disabled():
        assert texts(generate(base, CONVERSATIONS[:2], None, settings)) == texts(arms["floor"][:2])


def test_it_cancels_across_arms_and_refuses_arms_it_cannot_run(lively_dir, adapter_dir):
    settings = GenerationSettings(max_new_tokens=2, batch_size=5)
    loaded = load_model(lively_dir, adapter_dir=adapter_dir)
    calls = []
    with pytest.raises(GenerationCancelled) as cancelled:
        generate_arms(
            loaded,
            CONVERSATIONS,
            SYSTEM,
            settings,
            progress=lambda p: calls.append(p.done),
            should_stop=lambda: len(calls) >= 2,
        )
    assert (cancelled.value.done, cancelled.value.total) == (10, 20)

    base = load_model(lively_dir)
    assert set(generate_arms(base, CONVERSATIONS[:1], SYSTEM, settings, arms=("floor", "teacher"))) == {
        "floor",
        "teacher",
    }
    with pytest.raises(ValueError, match="adapter"):
        generate_arms(base, CONVERSATIONS, SYSTEM, settings)
    with pytest.raises(ValueError, match="unknown arm"):
        generate_arms(loaded, CONVERSATIONS, SYSTEM, settings, arms=("floor", "baseline"))


def test_it_times_single_requests(lively_dir, adapter_dir):
    loaded = load_model(lively_dir, adapter_dir=adapter_dir)
    settings = GenerationSettings(max_new_tokens=3)
    seconds = single_request_latency(loaded, CONVERSATIONS, SYSTEM, settings, sample=3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert (
        len(single_request_latency(loaded, CONVERSATIONS, SYSTEM, settings, sample=2, arm_name="teacher"))
        == 2
    )
    assert single_request_latency(loaded, [], SYSTEM, settings) == []


# --- lm-eval, in process and offline ------------------------------------------------


def test_it_writes_an_lm_eval_task(tmp_path):
    name = write_task(
        tmp_path / "tasks",
        "capitals",
        [{"query": "Capital of France?", "answer": "Paris"}],
        fewshot=[{"query": "Capital of Italy?", "answer": "Rome"}],
        max_gen_toks=4,
    )
    assert name == "capitals"
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "capitals.jsonl").read_text().splitlines()]
    assert rows == [{"query": "Capital of France?", "answer": "Paris"}]
    text = (tmp_path / "tasks" / "capitals.yaml").read_text()
    assert text.endswith("process_results: !function workbench_task_metrics.process_results\n")
    config = yaml.safe_load(text.split("\nprocess_results:")[0])
    assert config["output_type"] == "generate_until" and config["num_fewshot"] == 1
    assert config["generation_kwargs"]["max_gen_toks"] == 4

    with pytest.raises(ValueError, match=r"row 2: 'answer' must be a non-empty string"):
        write_task(tmp_path, "bad", [{"query": "q", "answer": "a"}, {"query": "q"}])
    with pytest.raises(ValueError, match="task name"):
        write_task(tmp_path, "../escape", [{"query": "q", "answer": "a"}])


def test_it_ships_a_general_skills_suite(tmp_path):
    rows = general_skills_rows()
    assert len(rows) >= 250  # a paired drop of 0.03 needs a few hundred items to be told from noise
    assert len({r["query"] for r in rows}) == len(rows)
    # an answer its own question states would be found in an echo of the question
    assert not [r for r in rows if re.search(rf"\b{re.escape(r['answer'])}\b", r["query"], re.I)]
    # one or two words each, and none that normalises away (an answer "A" would)
    assert all(1 <= len(r["answer"].split()) <= 2 and normalize_answer(r["answer"]) for r in rows)
    name = general_skills_task(tmp_path)
    assert (tmp_path / f"{name}.jsonl").read_text().count("\n") == len(rows)


def test_it_runs_lm_eval_offline_with_and_without_an_adapter(lively_dir, adapter_dir, tmp_path):
    """lm-eval answers as the workbench's own generate does, so a row whose
    answer is what the model says scores 1 and a wrong one 0, in doc order."""
    questions = ["What is 2 + 2?", "Capital of France?", "Opposite of hot?"]
    settings = GenerationSettings(max_new_tokens=4)

    def first_lines(loaded, prompt):
        outs = generate(loaded, [[{"role": "user", "content": q}] for q in questions], prompt, settings)
        return [c.text.strip().splitlines()[0] if c.text.strip() else "" for c in outs]

    floor = first_lines(load_model(lively_dir), None)
    student = first_lines(load_model(lively_dir, adapter_dir=adapter_dir), None)
    assert floor != student and all(floor) and all(student)
    # Answers the floor gets right on docs 0 and 2, the student on doc 1.
    rows = [
        {"query": questions[0], "answer": floor[0]},
        {"query": questions[1], "answer": student[1]},
        {"query": questions[2], "answer": floor[2]},
        {"query": "never asked", "answer": "x"},
    ]
    name = write_task(tmp_path, "probe", rows, max_gen_toks=4)

    base = run_lm_eval(lively_dir, [name], task_dir=tmp_path, limit=3, batch_size=2)
    result = base.tasks[name]
    assert result.metric == "exact_match"
    assert [r.strip() for r in result.responses] == floor
    assert result.correct == [1.0, float(floor[1] == student[1]), 1.0]
    assert result.metrics["exact_match"].value == pytest.approx(sum(result.correct) / 3)
    assert result.metrics["exact_match"].stderr is not None

    tuned = run_lm_eval(lively_dir, [name], task_dir=tmp_path, adapter_dir=adapter_dir, limit=3)
    assert [r.strip() for r in tuned.tasks[name].responses] == student
    assert tuned.tasks[name].correct[1] == 1.0
    diff = paired_difference(tuned.tasks[name].correct, result.correct)
    assert diff.n == 3

    prompted = run_lm_eval(lively_dir, [name], task_dir=tmp_path, system_prompt=SYSTEM, limit=3)
    prompted_lines = first_lines(load_model(lively_dir), SYSTEM)
    assert [r.strip() for r in prompted.tasks[name].responses] == prompted_lines

    # Through a Generator (what the vLLM backend uses), lm-eval gets the same answers and scores.
    engine = LocalGenerator(load_model(lively_dir, adapter_dir=adapter_dir))
    for adapter, prompt, expected in (
        (False, None, floor),
        (True, None, student),
        (False, SYSTEM, prompted_lines),
    ):
        via = run_lm_eval(
            None, [name], task_dir=tmp_path, system_prompt=prompt, limit=3, generator=engine, adapter=adapter
        ).tasks[name]
        assert [r.strip() for r in via.responses] == expected, (adapter, prompt)
        assert via.correct == [
            float(normalize_answer(line) == normalize_answer(row["answer"]))
            for line, row in zip(expected, rows, strict=False)
        ]


def test_it_fails_clearly_when_a_dataset_is_not_on_disk(lively_dir, tmp_path):
    write_task(tmp_path, "ok", [{"query": "q", "answer": "a"}])
    config = yaml.safe_load((tmp_path / "ok.yaml").read_text().split("\nprocess_results:")[0])
    config.update(task="remote", dataset_path="workbench-tests/no-such-dataset", dataset_kwargs=None)
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(EvalError, match="lm-eval task 'remote' cannot be loaded offline"):
        run_lm_eval(lively_dir, ["ok", "remote"], task_dir=tmp_path)
    with pytest.raises(EvalError, match="not a model directory"):
        run_lm_eval(tmp_path, ["ok"], task_dir=tmp_path)


@pytest.mark.slow
def test_it_fails_clearly_on_installed_tasks_without_their_data(lively_dir, tmp_path):
    # Indexes lm-eval's ~15,000 installed tasks (10-30 s).
    with pytest.raises(EvalError, match="'arc_easy' cannot be loaded offline"):
        run_lm_eval(lively_dir, ["arc_easy"], task_dir=None, limit=1)
    with pytest.raises(EvalError, match="'no_such_task_xyz' does not exist"):
        run_lm_eval(lively_dir, ["no_such_task_xyz"], task_dir=tmp_path, limit=1)


def test_a_remote_judge_sends_the_verdict_format_and_gets_a_score(lively_dir):
    """A judge behind /v1 (here the hf engine server) gets judge_format as
    response_format and answers JSON verdicts."""
    from engines.engine_server import EngineServer
    from engines.generator import RemoteGenerator

    items = [("What is 2+2?", "4", None), ("hi", "hello", None)]
    settings = GenerationSettings(max_new_tokens=512, batch_size=2)
    with EngineServer({"lively": lively_dir}, dtype="float32", threads=1) as server:
        verdicts = judge_answers(
            RemoteGenerator(server.url, "lively"), "Brief.", items, settings, scale=(1, 3)
        )
    assert [json.loads(text)["score"] for _, text in verdicts] == [v.score for v, _ in verdicts]
    assert all(v.score in (1, 2, 3) for v, _ in verdicts)
