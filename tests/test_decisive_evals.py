"""Evals that can carry a decision: a warning where a CI is too wide (or n
too small) to decide on, the headline in words where "prompt effect
retained" cannot be computed, and the absorb form's eval settings reaching
the four arms it starts."""

import io

import pytest
from django.urls import reverse

from engines import evaluation as ev
from evals import actions
from evals.models import ArmComparison, EvalRun
from evals.runner import estimate_json
from jobs.models import Job, job_finished
from tests import test_evals
from tests.test_teacher_curation import form_post
from workbench.actions.datasets import import_dataset
from workbench.models import Variant

pytestmark = pytest.mark.django_db


# tests/test_evals.py's world (20 answered queries, 5 held out), used here by name.
world = test_evals.world


def arm_runs(world, suite, values, n, half_width, comparison=None):
    """Finished runs with an all_rules estimate each: (arm, value) pairs."""
    return EvalRun.objects.bulk_create(
        [
            EvalRun(
                project=world["project"],
                suite=suite,
                base_model=world["base"],
                comparison=comparison,
                arm=arm,
                summary={
                    "complete": True,
                    "prompt_tokens": 40,
                    "metrics": {
                        "all_rules": {
                            "value": value,
                            "low": max(0.0, value - half_width),
                            "high": min(1.0, value + half_width),
                            "n": n,
                        }
                    },
                },
            )
            for arm, value in values
        ]
    )


def make_variant(world, name="v"):
    return Variant.objects.create(
        project=world["project"],
        name=name,
        base_model=world["base"],
        adapter_path="/a",
        prompt_version=world["prompt"],
        dataset_version=world["data"],
    )


# --- too wide to decide -------------------------------------------------------------------


def test_a_small_suite_warns_that_its_cis_are_too_wide_to_decide(world, alice_client, settings):
    settings.EVAL_MIN_HELD_OUT, settings.EVAL_DECISIVE_CI_WIDTH = 20, 0.3
    suite = actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    assert suite.examples.count() == 5
    comparison = ArmComparison.objects.create(
        project=world["project"], suite=suite, variant=make_variant(world)
    )
    arm_runs(world, suite, [("floor", 0.2), ("teacher", 0.6), ("student", 0.6)], 5, 0.4, comparison)
    slug = world["project"].slug
    for page in (
        alice_client.get(reverse("suite_detail", args=[slug, suite.pk])),
        alice_client.get(reverse("comparison_detail", args=[slug, comparison.pk])),
    ):
        body = page.content.decode()
        assert 'id="ci-warning"' in body, body
        warning = body.split('id="ci-warning">')[1].split("</div>")[0]
        assert "n = 5 held-out queries (fewer than 20)" in warning
        assert "95% CI width 0.80 (wider than 0.30)" in warning
        assert "Hold out more queries (at least 20" in warning
    assert (
        "too wide to decide"
        in alice_client.get(reverse("suite_detail", args=[slug, suite.pk])).content.decode()
    )


def test_a_large_suite_with_narrow_cis_shows_no_warning(world, alice_client, settings):
    settings.EVAL_MIN_HELD_OUT, settings.EVAL_DECISIVE_CI_WIDTH = 20, 0.3
    rows = "".join(f"How do I do thing {i}?\n" for i in range(200))
    data = import_dataset(
        world["project"], world["user"], "big", io.BytesIO(rows.encode()), filename="q.txt", eval_percent=50
    )
    suite = actions.create_suite(world["project"], world["user"], "big", data, prompt_version=world["prompt"])
    assert suite.examples.count() == 100
    comparison = ArmComparison.objects.create(
        project=world["project"], suite=suite, variant=make_variant(world)
    )
    arm_runs(world, suite, [("floor", 0.2), ("teacher", 0.6), ("student", 0.55)], 100, 0.08, comparison)
    slug = world["project"].slug
    for url in (
        reverse("suite_detail", args=[slug, suite.pk]),
        reverse("comparison_detail", args=[slug, comparison.pk]),
    ):
        body = alice_client.get(url).content.decode()
        assert 'id="ci-warning"' not in body and "too wide to decide" not in body


# --- the headline in words ----------------------------------------------------------------------


def test_the_headline_says_why_retained_cannot_be_computed_when_the_teacher_equals_the_floor(
    world, alice_client
):
    suite = actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    floor = teacher = [1.0, 0.0, 1.0, 0.0, 1.0]
    retained = ev.prompt_effect_retained([1.0] * 5, floor, teacher)
    assert retained.value is None  # the denominator is 0
    comparison = ArmComparison.objects.create(
        project=world["project"],
        suite=suite,
        variant=make_variant(world),
        headline={
            "metric": "all_rules",
            "retained": estimate_json(retained),
            "absolute": {"floor": 0.6, "teacher": 0.6, "student": 1.0},
            "tokens_saved_per_1000": 40000,
        },
    )
    arm_runs(world, suite, [("floor", 0.6), ("teacher", 0.6), ("student", 1.0)], 5, 0.1, comparison)
    body = alice_client.get(comparison.get_absolute_url()).content.decode()
    assert "undefined" not in body
    reason = body.split('id="retained-reason">')[1].split("</p>")[0]
    assert reason.startswith("Prompt effect retained cannot be computed on All rules: the teacher")
    assert "scores 0.60, the same as the floor" in reason and "nothing for the student to retain" in reason
    assert reason.rstrip().endswith(".")


def test_the_headline_names_a_missing_arm(world, alice_client):
    suite = actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    comparison = ArmComparison.objects.create(
        project=world["project"], suite=suite, variant=make_variant(world)
    )
    arm_runs(world, suite, [("floor", 0.2), ("teacher", 0.6)], 5, 0.1, comparison)
    body = alice_client.get(comparison.get_absolute_url()).content.decode()
    assert "undefined" not in body
    assert "needs the floor, teacher and student arms, and the student arm has no results" in body


def test_the_comparison_explains_why_the_teacher_can_miss_what_its_data_passes(world, alice_client):
    suite = actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    comparison = ArmComparison.objects.create(
        project=world["project"], suite=suite, variant=make_variant(world)
    )
    body = alice_client.get(comparison.get_absolute_url()).content.decode()
    note = body.split('id="data-compliance-note">')[1].split("</p>")[0]
    assert "act on that data, not on the served teacher" in note


# --- the absorb form's eval settings ------------------------------------------------------------


def post_absorb(client, world, **changes):
    from jobs.forms import AbsorbForm

    post = form_post(
        AbsorbForm,
        world["project"],
        prompt_version=world["prompt"].pk,
        dataset_version=world["data"].pk,
        base_model=world["base"].pk,
        mode="finetune",
        **changes,
    )
    r = client.post(reverse("absorb_start", args=[world["project"].slug]), post)
    assert r.status_code == 302, r.content.decode()[-3000:]
    return Job.objects.filter(kind="finetune").latest("pk")


def finish(job, variant):
    Job.objects.filter(pk=job.pk).update(status=Job.SUCCEEDED, variant=variant)
    job.refresh_from_db()
    job_finished.send(sender=Job, job=job, status=Job.SUCCEEDED)
    job.refresh_from_db()


def test_the_absorb_forms_eval_settings_reach_the_four_arms(world, alice_client):
    page = alice_client.get(reverse("job_list", args=[world["project"].slug])).content.decode()
    assert 'name="eval_max_new_tokens"' in page and 'name="eval_auto"' in page
    job = post_absorb(alice_client, world, eval_max_new_tokens="48", eval_max_examples="3", eval_auto="on")
    assert job.params["eval"] == {"auto": True, "max_new_tokens": 48, "max_examples": 3}
    finish(job, make_variant(world))
    comparison = ArmComparison.objects.get(absorb_job=job)
    assert comparison.suite.examples.count() == 3  # of the 5 held out
    assert comparison.job.params["generation"]["max_new_tokens"] == 48
    assert {r.generation["max_new_tokens"] for r in comparison.runs.all()} == {48}
    assert comparison.runs.count() == 4


def test_the_default_eval_length_is_the_setting(world, alice_client, settings):
    settings.EVAL_MAX_NEW_TOKENS = 24
    job = post_absorb(alice_client, world)
    assert job.params["eval"]["max_new_tokens"] == 24 and "max_examples" not in job.params["eval"]
    finish(job, make_variant(world))
    comparison = ArmComparison.objects.get(absorb_job=job)
    assert comparison.job.params["generation"]["max_new_tokens"] == 24
    assert comparison.suite.examples.count() == 5


def test_auto_eval_off_in_the_absorb_form_starts_no_comparison(world, alice_client, settings):
    settings.AUTO_EVAL = True
    job = post_absorb(alice_client, world, eval_auto="off")
    assert job.params["eval"]["auto"] is False
    finish(job, make_variant(world))
    assert not ArmComparison.objects.exists() and not Job.objects.filter(kind="eval").exists()
    assert "turned off for this absorb" in job.log


def test_the_absorb_action_refuses_bad_eval_settings(world):
    from jobs.actions import start_finetune
    from workbench.actions import ActionError

    with pytest.raises(ActionError, match="max_new_tokens must be a whole number"):
        start_finetune(
            world["project"],
            world["user"],
            world["prompt"],
            world["data"],
            world["base"],
            evaluation={"max_new_tokens": 0},
        )
    assert not Job.objects.exists()


# --- what the eval job is doing -------------------------------------------------------------------

adapter_dir = test_evals.adapter_dir


def test_the_eval_job_names_each_stage_under_one_total_with_an_eta(
    world, tiny_model_dir, adapter_dir, monkeypatch, settings
):
    from jobs import lifecycle
    from workbench.models import FoundationModel

    settings.JOB_PROGRESS_SECONDS = 3600  # stored only when a stage begins (and at the end)
    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    variant = Variant.objects.create(
        project=world["project"],
        name="absorbed",
        base_model=base,
        adapter_path=str(adapter_dir),
        prompt_version=world["prompt"],
        dataset_version=world["data"],
    )
    suite = actions.create_suite(
        world["project"],
        world["user"],
        "held out",
        world["data"],
        prompt_version=world["prompt"],
        lm_eval_tasks=["suite"],
    )
    comparison = actions.start_comparison(
        world["project"], world["user"], suite, variant, generation={"max_new_tokens": 4}
    )
    saved = []
    original = Job.save_progress

    def record(self, progress, points=None):
        saved.append((progress.done, progress.total, progress.metrics.get("stage"), progress.eta_seconds))
        return original(self, progress, points)

    monkeypatch.setattr(Job, "save_progress", record)
    lifecycle.execute(comparison.job.pk, "test")
    comparison.job.refresh_from_db()
    assert comparison.job.status == Job.SUCCEEDED, comparison.job.log
    # 5 examples: 4 arms' answers, then lm-eval on the floor and the student, in one total of 30.
    assert {total for _d, total, _s, _e in saved} == {30}
    stages = [stage for _d, _t, stage, _e in saved]
    arms = list(dict.fromkeys(s for s in stages if s.startswith("answers of ")))
    assert [s[-12:] for s in arms] == ["(arm 1 of 4)", "(arm 2 of 4)", "(arm 3 of 4)", "(arm 4 of 4)"]
    lm = list(dict.fromkeys(s for s in stages if s.startswith("lm-eval")))
    assert [s[-12:] for s in lm] == ["(arm 1 of 2)", "(arm 2 of 2)"]  # the floor and the student
    assert stages[-1] == "scores and the headline" and saved[-1][0] == 30
    assert [d for d, *_ in saved] == sorted(d for d, *_ in saved)  # it only moves forward
    assert any(eta for *_x, eta in saved[1:-1])  # an ETA once something was done
    # The plan's eval estimate measures its rate by the answers alone, not the lm-eval passes.
    from serving.pipeline import estimate

    m = comparison.job.progress["metrics"]
    assert m["answers"] == 20 and 0 < m["answer_seconds"] < comparison.job.progress["elapsed"]
    guess = estimate.evaluation(base, 5, [])
    assert guess.measured and guess.rate == pytest.approx(20 / m["answer_seconds"])
    # Judge verdicts and lm-eval rows are counted as the job counts them, at the rate its other steps took.
    p = comparison.job.progress
    extra_rate = (p["done"] - 20) / (p["elapsed"] - m["answer_seconds"])
    full = estimate.evaluation(base, 5, ["general_skills"], judge=True)
    assert full.unit == "eval steps" and full.count == 5 * (4 + 4 + 2) and full.measured
    assert full.seconds == pytest.approx(20 / guess.rate + 30 / extra_rate)
    assert "20 judge verdicts" in full.counts and full.seconds_at_defaults == pytest.approx(
        20 / 0.4 + 30 / 0.2
    )
