"""Curated teacher data on a tiny model: on by default when the prompt has
rules, every answer opened and repaired, each step recorded and reported;
off on request; KL refused across tokenizers."""

import io

import pytest

from engines.training import ConfigError, TrainConfig, tokenizers_match, train
from jobs import lifecycle
from jobs.actions import start_absorb
from jobs.models import Job
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

pytestmark = pytest.mark.django_db(transaction=True)

RULES = [
    {"name": "opening", "kind": "starts_with", "text": "ahoy, this is support."},
    {"name": "sign-off", "kind": "ends_with", "text": "fair winds, the crew"},
    {"name": "short", "kind": "max_words", "n": 30},
    {"name": "lowercase", "kind": "lowercase"},
    {"name": "no lists", "kind": "no_list_markup"},
    {"name": "no sorry", "kind": "not_contains", "text": "sorry", "case_sensitive": False},
]
QUERIES = [
    f"Question {i}: how do I {v} my {t}?"
    for i, (v, t) in enumerate(
        [
            ("reset", "password"),
            ("cancel", "order"),
            ("track", "parcel"),
            ("update", "address"),
            ("close", "account"),
            ("change", "plan"),
        ]
    )
]


@pytest.fixture
def world(alice, alice_project, lively_dir, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    prompt = save_prompt(
        alice_project, alice, "crew", "You are the crew's helper. Follow the rules.", RULES
    ).version
    data = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(QUERIES).encode()),
        filename="q.txt",
        eval_percent=0,
    )
    return alice_project, alice, base, prompt, data


def run_teacher(world, **kwargs):
    project, alice, base, prompt, data = world
    teacher, _ = start_absorb(
        project,
        alice,
        prompt,
        data,
        base,
        {"max_new_tokens": 24, "batch_size": 8, "seed": 3},
        review_first=True,
        **kwargs,
    )
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    assert teacher.status == Job.SUCCEEDED, teacher.error
    return teacher


def test_curation_is_on_by_default_and_every_row_is_opened_repaired_and_recorded(world):
    teacher = run_teacher(world, curation={"best_of": 3, "temperature": 1.0, "top_p": 1.0})
    assert teacher.params["curation"]["best_of"] == 3
    version = teacher.output_dataset
    rows = list(version.rows.order_by("index"))
    assert len(rows) == len(QUERIES)
    for row in rows:
        answer = row.messages[-1]["content"]
        assert answer.startswith("ahoy, this is support.")
        assert row.failing == [], (answer, row.failing)
        assert row.curation["samples"] == 3 and len(row.curation["passed"]) == 3
        assert row.curation["raw"].startswith("ahoy, this is support.")
    # A random model needs repairs: at least the sign-off, recorded with before and after.
    changes = [c for row in rows for c in row.curation["repairs"]]
    assert any(c["repair"] == "ends_with" for c in changes)
    assert all(c["before"] != c["after"] for c in changes)
    quality = version.meta["quality"]
    assert [s["step"] for s in quality["steps"]] == [
        "raw (first sample, prefilled)",
        "best of 3",
        "reminders and resampling, required phrases prefilled (up to 3 rounds, 9 samples)",
        "repairs",
    ]
    # Every rule here can be repaired: one round was enough, and the report says what it cost.
    assert quality["steps"][1]["samples"] == 3 * len(QUERIES) and quality["steps"][2]["queries"] == 0
    assert quality["steps"][0]["rules"]["opening"] == 1.0
    assert quality["steps"][-1]["all_rules"] == 1.0 and quality["steps"][-1]["rows"] == len(QUERIES)
    assert [r["name"] for r in version.meta["rules"]] == [r["name"] for r in RULES]


def test_curation_can_be_switched_off(world):
    teacher = run_teacher(world, curation=False)
    version = teacher.output_dataset
    assert teacher.params["curation"] is None
    rows = list(version.rows.order_by("index"))
    assert all(r.curation == {} for r in rows)
    assert not any(r.messages[-1]["content"].startswith("ahoy") for r in rows)  # no opening
    assert all("sign-off" in r.failing for r in rows) and all("fails rule: sign-off" in r.flags for r in rows)
    assert [s["step"] for s in version.meta["quality"]["steps"]] == ["teacher answers"]
    assert version.meta["quality"]["steps"][0]["all_rules"] == 0.0


def test_the_absorb_command_turns_curation_on_by_default(world):
    from django.core.management import call_command

    project, *_ = world
    call_command(
        "absorb",
        "--project",
        project.slug,
        "--prompt",
        "crew",
        "--dataset",
        "queries",
        "--best-of",
        "2",
        "--repairs",
        "ends_with,lowercase",
        "--max-new-tokens",
        "8",
    )
    teacher = Job.objects.get(kind="teacher")
    assert teacher.params["curation"] == {
        "best_of": 2,
        "rounds": 3,
        "reminders": True,
        "phrases": True,
        "fact_sentences": True,
        "probe": 16,
        "passages": 3,
        "temperature": 0.7,
        "top_p": 0.95,
        "prefill": True,
        "repairs": ["ends_with", "lowercase"],
    }
    call_command(
        "absorb",
        "--project",
        project.slug,
        "--prompt",
        "crew",
        "--dataset",
        "queries",
        "--no-curation",
        "--max-new-tokens",
        "8",
    )
    assert Job.objects.filter(kind="teacher").order_by("-pk").first().params["curation"] is None


def test_kl_is_refused_across_tokenizers(world, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, alice, base, prompt, data = world
    other_dir = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.add_tokens(["<ship>"])
    tokenizer.save_pretrained(other_dir)
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(other_dir)
    other = FoundationModel.objects.create(name="other", path=str(other_dir))
    assert not tokenizers_match(base.path, other.path) and tokenizers_match(base.path, tiny_model_dir)
    with pytest.raises(ActionError, match="shares the student's tokenizer"):
        start_absorb(project, alice, prompt, data, base, training={"kl_weight": 0.5}, teacher_model=other)
    # Without KL the other model can teach (its answers are text).
    teacher, finetune = start_absorb(
        project, alice, prompt, data, base, training={"kl_weight": 0.0}, teacher_model=other
    )
    assert teacher.base_model == other and finetune.base_model == base
    assert finetune.params["teacher_model"] == other.pk
    examples = [{"messages": [{"role": "user", "content": "hi"}], "answer": "ahoy", "system_prompt": "p"}]
    with pytest.raises(ConfigError, match="tokenizer"):
        train(
            base.path,
            examples,
            tmp_path / "out",
            TrainConfig(kl_weight=0.5, max_steps=1),
            teacher_dir=other.path,
        )


def form_post(form_cls, project, **changes):
    """The absorb form as a browser posts it with its defaults, then `changes`."""
    form = form_cls(project)
    data = {}
    for name in form.fields:
        value = form[name].value()
        if value is None or value is False or value == "":
            continue
        data[name] = "on" if value is True else value
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_the_absorb_form_curates_by_default_and_takes_every_setting(world, alice_client):
    from django.urls import reverse

    from jobs.forms import AbsorbForm

    project, alice, base, prompt, data = world
    post = form_post(
        AbsorbForm,
        project,
        prompt_version=prompt.pk,
        dataset_version=data.pk,
        base_model=base.pk,
        mode="absorb",
        best_of="3",
        repairs=["ends_with", "max_words"],
        g_repetition_penalty="1.3",
        g_stop="###\nEND",
    )
    r = alice_client.post(reverse("absorb_start", args=[project.slug]), post)
    assert r.status_code == 302, r.content.decode()[-3000:]
    teacher = Job.objects.get(kind="teacher")
    assert teacher.params["curation"]["best_of"] == 3 and teacher.params["curation"]["prefill"] is True
    assert teacher.params["curation"]["repairs"] == ["ends_with", "max_words"]
    assert teacher.params["generation"]["repetition_penalty"] == 1.3
    assert teacher.params["generation"]["stop"] == ["###", "END"]
    assert Job.objects.get(kind="finetune").params["passing_only"] is True  # ticked by default
    post.pop("curate")
    post.pop("passing_only")
    alice_client.post(reverse("absorb_start", args=[project.slug]), post)
    assert Job.objects.filter(kind="teacher").order_by("-pk").first().params["curation"] is None
    assert Job.objects.filter(kind="finetune").order_by("-pk").first().params["passing_only"] is False


def test_the_form_warns_before_training_on_answers_that_fail_rules(world, alice_client):
    from django.urls import reverse

    from jobs.forms import AbsorbForm

    project, alice, base, prompt, data = world
    version = run_teacher(world, curation=False).output_dataset  # raw answers: every one fails the sign-off
    post = form_post(
        AbsorbForm,
        project,
        prompt_version=prompt.pk,
        dataset_version=version.pk,
        base_model=base.pk,
        mode="finetune",
    )
    page = alice_client.get(reverse("job_list", args=[project.slug])).content.decode()
    assert "0% pass all rules" in page
    r = alice_client.post(reverse("absorb_start", args=[project.slug]), post)
    assert r.status_code == 400
    assert "100% of the training answers" in r.content.decode() and "sign-off: 6" in r.content.decode()
    assert not Job.objects.filter(kind="finetune").exists()
    r = alice_client.post(reverse("absorb_start", args=[project.slug]), {**post, "train_anyway": "on"})
    assert r.status_code == 302 and Job.objects.filter(kind="finetune").count() == 1


def test_an_absorbed_variant_keeps_its_teachers_guard_rails():
    """The fine-tune copies the teacher run's repetition penalty, no-repeat
    n-grams and stop strings to the variant (evals and /v1 then use them)."""
    from types import SimpleNamespace

    from jobs.registry import JobError
    from jobs.runners.finetune import _guard_rails

    teacher_run = {"repetition_penalty": 1.3, "stop": ["###"], "max_new_tokens": 112, "temperature": 0.7}
    assert _guard_rails(SimpleNamespace(meta={"generation": teacher_run})) == {
        "repetition_penalty": 1.3,
        "stop": ["###"],
    }
    assert _guard_rails(SimpleNamespace(meta={})) == {}  # an uploaded dataset: no teacher run
    # Rails that no longer validate stop the fine-tune (issue 19 item 9): served without them, the variant loops.
    with pytest.raises(JobError, match="guard rails stored with .* are invalid"):
        _guard_rails(SimpleNamespace(meta={"generation": {"repetition_penalty": 0}}))


def test_the_probe_prefills_a_phrase_the_teacher_never_writes_and_later_chunks_keep_its_finding(
    world, monkeypatch
):
    """The tiny teacher never writes the required phrase: the probe (2 queries)
    finds it and round one opens the other answers with it; the second chunk
    (3 queries a chunk here) starts from the stored finding, with no probe."""
    import json

    from jobs.runners import teacher as teacher_runner

    project, alice, base, _, data = world
    rules = [*RULES[:2], {"name": "line", "kind": "contains", "text": "call the crew line"}]
    prompt = save_prompt(
        project, alice, "line", "You are the crew's helper. Follow the rules.", rules
    ).version
    monkeypatch.setattr(teacher_runner, "CHUNK", 3)
    teacher = run_teacher((project, alice, base, prompt, data), curation={"probe": 2, "best_of": 1})
    assert teacher.log.count("curation: probe of 2 queries met unaided: line 0.00") == 1
    answers = [
        json.loads(line) for line in (teacher.data_dir / "teacher-answers.jsonl").read_text().splitlines()
    ]
    first = {a["index"]: (a["rounds"][0], a["phrases"][0]) for a in answers}
    assert sorted(first.values()) == [(0, False)] * 2 + [(0, True)] * 4  # 2 probed, the rest prefilled
    quality = teacher.output_dataset.meta["quality"]
    assert quality["early"] == {"phrases": ["line"], "facts": False, "rates": {"line": 0.0}, "probed": 2}
    assert "after a probe of 2 queries, 'line' prefilled" in quality["steps"][0]["step"]
    rows = teacher.output_dataset.rows.order_by("index").values_list("messages", flat=True)
    assert all("call the crew line" in r[-1]["content"] for r in rows)
