"""The cost calculator and deployment recommendation of a four-arm comparison:
figures from the comparison's own runs and the jobs that made the variant,
the price as the user's input, on the comparison page and in apply's summary."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from evals import actions
from evals.models import ArmComparison, EvalRun
from jobs.models import Job
from serving.costs import economics
from serving.models import Alias
from tests import test_evals
from tests.test_decisive_evals import make_variant

pytestmark = pytest.mark.django_db
world = test_evals.world

# Seconds a request (batched 8), prompt / answer tokens, single-request p50.
ARMS = {
    "floor": (0.50, 40, 50, 2.0),
    "teacher": (2.00, 1100, 50, 6.0),
    "student": (0.60, 40, 50, 2.4),
    "student+prompt": (2.10, 1100, 50, 6.2),
}


def finished(world, kind, seconds, **extra):
    now = timezone.now()
    return Job.objects.create(
        project=world["project"],
        kind=kind,
        status=Job.SUCCEEDED,
        started_at=now - timedelta(seconds=seconds),
        finished_at=now,
        **extra,
    )


def comparison_of(world, arms=ARMS, teacher_seconds=3600, training_seconds=1800, name="v"):
    suite = actions.create_suite(
        world["project"], world["user"], f"held out {name}", world["data"], prompt_version=world["prompt"]
    )
    variant = make_variant(world, name)
    teacher = finished(world, "teacher", teacher_seconds)
    finetune = finished(world, "finetune", training_seconds, depends_on=teacher, variant=variant)
    comparison = ArmComparison.objects.create(
        project=world["project"], suite=suite, variant=variant, absorb_job=finetune
    )
    EvalRun.objects.bulk_create(
        EvalRun(
            project=world["project"],
            suite=suite,
            base_model=world["base"],
            comparison=comparison,
            arm=arm,
            summary={
                "complete": True,
                "seconds_per_example": per,
                "batch_size": 8,
                "prompt_tokens": prompt,
                "completion_tokens": answer,
                "latency": {"p50": p50, "p95": p50 * 1.5, "mean": p50},
            },
        )
        for arm, (per, prompt, answer, p50) in arms.items()
    )
    return comparison


def test_costs_come_from_the_runs_and_the_jobs_at_the_given_price(world):
    money = economics(comparison_of(world), price_per_hour=3.6)
    # 0.6 s a request at 3.6 an hour = 0.0006 a request = 600 a million.
    assert money.student.per_million == pytest.approx(600)
    assert money.teacher.per_million == pytest.approx(2000)
    assert money.tokens_saved == 1060 and money.cost_ratio == pytest.approx(0.3)
    # Teacher 1 h + training 0.5 h at 3.6 = 5.4, paid back at 0.0014 saved a request.
    assert money.one_off_cost == pytest.approx(5.4)
    assert money.break_even_requests == pytest.approx(5.4 / 0.0014, abs=2)
    assert not money.problems
    # The price scales the money, not the break-even point.
    again = economics(comparison_of(world, name="w"), price_per_hour=36)
    assert again.student.per_million == pytest.approx(6000)
    assert again.break_even_requests == pytest.approx(money.break_even_requests, abs=2)


def test_a_student_that_costs_more_never_pays_back(world):
    slower = {**ARMS, "student": (2.5, 40, 300, 9.0)}
    money = economics(comparison_of(world, slower), price_per_hour=1)
    assert money.saving_per_million < 0 and money.break_even_requests is None


def test_an_unfinished_comparison_says_what_is_missing(world):
    money = economics(comparison_of(world, {"floor": ARMS["floor"]}), price_per_hour=1)
    assert money.problems == ["the student and teacher arms have not both answered yet"]
    assert money.break_even_requests is None and money.cost_ratio is None


def test_the_recommendation_weighs_the_adapters_cost_and_the_other_adapters_served(world):
    # The adapter costs 0.6/0.5 = 1.2x the bare base a token, and nothing else is served: merge.
    comparison = comparison_of(world)
    rec = economics(comparison, 1).recommendation
    assert rec.weights == "merged" and rec.backend == "hf engine" and rec.max_batch == 8
    assert any("1.20x the bare base per generated token" in r for r in rec.reasons)
    # Another adapter of the same base is served by an alias: share the base.
    other = make_variant(world, "other")
    Alias.objects.create(project=world["project"], name="prod", variant=other)
    rec = economics(comparison, 1).recommendation
    assert rec.weights == "adapter" and any("1 other adapter" in r for r in rec.reasons)
    # An adapter as cheap as the base a token stays an adapter.
    cheap = {**ARMS, "student": (0.51, 40, 50, 2.0)}
    Alias.objects.all().delete()
    assert economics(comparison_of(world, cheap, name="cheap"), 1).recommendation.weights == "adapter"


def test_the_page_takes_a_price_and_refuses_a_bad_one(world, alice_client, client, bob):
    comparison = comparison_of(world)
    url = reverse("serving_comparison_costs", args=[world["project"].slug, comparison.pk])
    body = alice_client.get(url, {"price_per_hour": "3.6"}).content.decode()
    assert 'id="cost-student"><b>600.00</b>' in body and 'id="cost-ratio">0.30x' in body
    assert "Serve it on the hf engine, as merged weights" in body
    for bad in ("-1", "lots", "1e400"):
        page = alice_client.get(url, {"price_per_hour": bad})
        assert page.status_code == 400 and "field-error" in page.content.decode()
    fragment = alice_client.get(url, HTTP_HX_REQUEST="true")  # the comparison page's fragment
    assert fragment.status_code == 200 and "<html" not in fragment.content.decode()
    detail = alice_client.get(reverse("comparison_detail", args=[world["project"].slug, comparison.pk]))
    assert url in detail.content.decode()
    client.force_login(bob)  # another project's member finds nothing
    assert client.get(url).status_code == 404
