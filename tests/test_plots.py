"""Plots worth reading (issue 23 item 6) and the Pareto view (issue 24 item
4): metric axes that fit the metric, loss curves from step 1 with the
learning rate and the validation loss from a real training run, several
runs' curves on one chart, the frontier of quality vs latency vs prompt
tokens with the recommended variant and its promote link; and the pages
in a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from engines.progress import Progress
from engines.training import train
from evals import actions as eval_actions
from evals.models import ArmComparison, EvalRun
from evals.views import comparison_chart, metric_axis, suite_charts
from jobs.curves import series
from jobs.models import Job, JobPoint
from serving.models import Alias
from serving.pareto import build, dominates, frontier
from tests.processes import REPO
from tests.test_evals import world
from tests.test_training import fast_config, make_examples
from tests.test_ui_walk import log_in, watch
from workbench.models import Variant

__all__ = ["world"]  # test_evals' fixture, used here by name

SHOTS = REPO / "test-artifacts" / "screenshots"


# --- the frontier, in plain Python ------------------------------------------------------------


def test_a_point_dominates_only_when_no_worse_on_all_three_and_better_on_one():
    assert dominates((0.9, 0.5, 30), (0.8, 0.5, 30))  # better quality
    assert dominates((0.9, 0.4, 30), (0.9, 0.5, 30))  # faster
    assert dominates((0.9, 0.5, 20), (0.9, 0.5, 30))  # fewer tokens
    assert not dominates((0.9, 0.5, 30), (0.9, 0.5, 30))  # equal
    assert not dominates((0.95, 0.6, 30), (0.9, 0.5, 30))  # better quality, but slower


def test_the_frontier_keeps_every_point_no_other_beats_and_skips_unmeasured_ones():
    points = [
        (0.2, 0.5, 30),  # 0 floor: beaten by 2
        (0.95, 0.9, 400),  # 1 teacher: beaten by 4
        (0.9, 0.5, 30),  # 2
        (0.7, 0.45, 30),  # 3 fastest
        (0.97, 0.7, 30),  # 4 best
        None,  # 5 not measured
        (0.9, 0.5, 30),  # 6 a tie with 2: neither beats the other
        (0.85, 0.6, 30),  # 7 beaten by 2
    ]
    assert frontier(points) == [2, 3, 4, 6]
    assert frontier([]) == [] and frontier([None]) == []


# --- chart data ---------------------------------------------------------------------------------


def _run(
    world, suite, label_variant=None, arm="", *, all_rules, latency, tokens, comparison=None, prompt=None
):
    rules = {"rule:greeting": all_rules, "rule:brief": min(1.0, all_rules + 0.1), "all_rules": all_rules}
    return EvalRun.objects.create(
        project=world["project"],
        suite=suite,
        base_model=world["base"],
        variant=label_variant,
        prompt_version=prompt,
        arm=arm,
        comparison=comparison,
        summary={
            "complete": True,
            "examples": 5,
            "prompt_tokens": tokens,
            "latency": {"p50": latency, "p95": latency * 2},
            "metrics": {
                name: {"value": v, "low": max(0.0, v - 0.15), "high": min(1.0, v + 0.1), "n": 5}
                for name, v in rules.items()
            },
        },
    )


@pytest.mark.django_db
def test_rate_axes_run_from_0_to_1_and_the_judge_from_1_to_10(world):
    for name in ("all_rules", "rule:greeting", "fact_recall", "chrf", "rouge_l", "agreement", "lm_eval:x"):
        assert metric_axis(name) == {"min": 0.0, "max": 1.0}, name
    assert metric_axis("judge") == {"min": 1.0, "max": 10.0}

    suite = eval_actions.create_suite(
        world["project"], world["user"], "s", world["data"], prompt_version=world["prompt"]
    )
    a = _run(world, suite, all_rules=0.6, latency=0.5, tokens=40)
    b = _run(world, suite, all_rules=0.8, latency=0.7, tokens=300, prompt=world["prompt"])
    c = _run(world, suite, all_rules=0.7, latency=0.6, tokens=40)  # the same label as a
    rows = [
        {
            "run": r,
            "value": r.metric("all_rules")["value"],
            "low": 0.1,
            "high": 0.9,
            "latency": r.summary["latency"]["p50"],
            "prompt_tokens": r.summary["prompt_tokens"],
        }
        for r in (b, c, a)
    ]
    charts = suite_charts([a, b, c], rows, "all_rules")
    assert charts["axis"] == {"min": 0.0, "max": 1.0}
    # Runs with one label are told apart, so no row of the heatmap hides another.
    assert len(set(charts["labels"])) == 3 and f"(run {a.pk})" in charts["labels"][2]
    assert [p["label"] for p in charts["latency"]] == charts["labels"]  # every point named
    assert charts["rules"] == ["rule brief", "rule greeting", "All rules"]
    assert len(charts["heat"]) == 9 and all(0 <= cell["v"] <= 1 for cell in charts["heat"])
    assert charts["ci"][0] == {"y": 0.8, "yMin": 0.1, "yMax": 0.9}

    arms = comparison_chart(
        [("floor", a), ("teacher", None), ("student", c)], ["all_rules", "chrf", "rule:brief"]
    )
    assert arms["axis"] == {"min": 0.0, "max": 1.0} and arms["labels"] == ["All rules", "rule brief"]
    assert [d["arm"] for d in arms["datasets"]] == ["floor", "student"]


# --- loss curves from a real training run --------------------------------------------------------


@pytest.fixture(scope="module")
def trained_points(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The curve points a real fine-tune of the tiny model reports: 2 epochs
    of 4 steps, the loss logged every 3 steps, a validation loss per epoch."""
    seen: list[Progress] = []
    config = fast_config(max_steps=None, epochs=2, logging_steps=3)
    train(
        tiny_model_dir,
        make_examples(8),
        tmp_path_factory.mktemp("run"),
        config,
        progress=seen.append,
        eval_examples=make_examples(3),
    )
    return [dict(p.point) for p in seen if p.point is not None]


def test_the_loss_series_starts_at_step_1_with_the_learning_rate_and_validation_loss(trained_points):
    curves = series(trained_points)
    assert [s for s, _ in curves["loss"]] == [1, 3, 6]  # step 1 although the loss is logged every 3
    assert [s for s, _ in curves["lr"]] == [1, 3, 6] and all(v > 0 for _, v in curves["lr"])
    assert [s for s, _ in curves["valid_loss"]] == [4, 8]
    assert all(v > 0 for _, v in curves["loss"] + curves["valid_loss"])


def test_a_resumed_attempt_replaces_the_steps_it_logs_again():
    points = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-4} for s in (1, 2, 3, 4)]
    points += [{"step": s, "loss": 1.0, "lr": 2e-4} for s in (3, 4, 5)]  # resumed from step 2
    curves = series(points)
    assert curves["loss"] == [(1, 2.9), (2, 2.8), (3, 1.0), (4, 1.0), (5, 1.0)]
    assert [v for _, v in curves["lr"]] == [1e-4, 1e-4, 2e-4, 2e-4, 2e-4]


def _finetune(world, points):
    job = Job.objects.create(project=world["project"], kind="finetune", status=Job.SUCCEEDED)
    JobPoint.append(job, points)
    return job


@pytest.mark.django_db
def test_the_curves_page_draws_several_fine_tunes_and_refuses_others(alice_client, world, bob, bob_project):
    points = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.5, "lr": 5e-5}]
    one, two = _finetune(world, points), _finetune(world, points[:1])
    url = reverse("job_curves", args=[world["project"].slug])
    page = alice_client.get(url, {"job": [one.pk, two.pk]})
    assert page.status_code == 200
    data = json.loads(page.context["chart"])
    assert [d["job"] for d in data] == [one.pk, two.pk]
    assert data[0]["loss"] == [[1, 2.0], [2, 1.5]] and data[1]["lr"] == [[1, 1e-4]]

    theirs = Job.objects.create(project=bob_project, kind="finetune", status=Job.SUCCEEDED)
    for bad in ([theirs.pk], [one.pk, 10**9]):
        response = alice_client.get(url, {"job": bad})
        assert response.status_code == 400 and b"not a fine-tune of this project" in response.content, bad
    assert b"not a job number" in alice_client.get(url, {"job": "x"}).content
    assert alice_client.get(url, {"job": [one.pk] * 9}).status_code == 200  # one job, asked 9 times
    assert alice_client.get(reverse("job_curves", args=[bob_project.slug])).status_code == 404


# --- the Pareto view -----------------------------------------------------------------------------


def pareto_world(world):
    """A prompt's variants on one suite: v-fast (fastest, below the bar),
    v-good (on the frontier, passes), v-slow (beaten by v-good), v-best (on
    the frontier, passes, slower); the base without and with the prompt."""
    suite = eval_actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    measures = {"v-fast": (0.7, 0.45), "v-good": (0.9, 0.5), "v-slow": (0.85, 0.6), "v-best": (0.97, 0.7)}
    variants = {}
    for name, (all_rules, latency) in measures.items():
        v = Variant.objects.create(
            project=world["project"],
            name=name,
            base_model=world["base"],
            adapter_path=f"/a/{name}",
            prompt_version=world["prompt"],
        )
        c = ArmComparison.objects.create(
            project=world["project"],
            suite=suite,
            variant=v,
            headline={
                "metric": "all_rules",
                "retained": {"value": all_rules, "low": all_rules - 0.2, "high": 1.0},
            },
        )
        _run(world, suite, None, "floor", all_rules=0.2, latency=0.5, tokens=30, comparison=c)
        _run(
            world,
            suite,
            None,
            "teacher",
            all_rules=0.95,
            latency=0.9,
            tokens=400,
            comparison=c,
            prompt=world["prompt"],
        )
        _run(world, suite, v, "student", all_rules=all_rules, latency=latency, tokens=30, comparison=c)
        variants[name] = v
    alias = Alias.objects.create(
        project=world["project"], name="production", gating_suite=suite, min_all_rules=0.8
    )
    return suite, variants, alias


@pytest.mark.django_db
def test_the_recommended_variant_is_the_fastest_frontier_point_that_passes_the_gate(world):
    suite, variants, alias = pareto_world(world)
    prompt = world["prompt"].prompt
    view = build(prompt, "all_rules", alias)
    by = {p.label: p for p in view.points}
    assert set(by) == {"v-fast", "v-good", "v-slow", "v-best", "m, no prompt", f"m + {world['prompt']}"}
    assert {name for name, p in by.items() if p.on_frontier} == {"v-fast", "v-good", "v-best"}
    assert by["v-fast"].verdict is not None and not by["v-fast"].verdict.passed
    assert view.recommended is by["v-good"] and view.recommended.variant == variants["v-good"]
    assert "all rules ≥ 0.8" in view.objective and "production" in view.objective
    assert view.chart["axis"] == {"min": 0.0, "max": 1.0}
    assert {p["label"] for p in view.chart["points"] if p["frontier"]} == {"v-fast", "v-good", "v-best"}
    # By the prompt effect retained, the references sit at 0 and 1 and v-best is alone at the top.
    retained = build(prompt, "retained", alias)
    assert {p.label: p.value for p in retained.points}["m, no prompt"] == 0.0
    assert retained.recommended is not None and retained.recommended.label == "v-good"
    # A bar no one passes: nothing is recommended, and the page says why.
    alias.min_all_rules = 0.99
    alias.save()
    assert build(prompt, "all_rules", alias).recommended is None


@pytest.mark.django_db
def test_the_pareto_page_names_the_recommendation_links_promote_and_is_the_projects_own(
    alice_client, world, bob, bob_project, client
):
    suite, variants, alias = pareto_world(world)
    slug, prompt = world["project"].slug, world["prompt"].prompt
    url = reverse("serving_pareto", args=[slug, prompt.pk])
    page = alice_client.get(url)
    assert page.status_code == 200
    body = page.content.decode()
    promote = (
        reverse("serving_promote", args=[slug]) + f"?alias=production&amp;variant={variants['v-good'].pk}"
    )
    assert "Recommended: v-good" in body and promote in body
    assert alice_client.get(promote.replace("&amp;", "&")).status_code == 200  # the confirm page
    assert url in alice_client.get(prompt.get_absolute_url()).content.decode()
    comparison = variants["v-good"].comparisons.get()
    assert url in alice_client.get(comparison.get_absolute_url()).content.decode()

    assert alice_client.get(url, {"quality": "vibes"}).status_code == 400
    assert alice_client.get(url, {"alias": "nope"}).status_code == 400
    assert alice_client.get(url, {"quality": "judge"}).status_code == 200
    client.force_login(bob)
    assert client.get(url).status_code == 404
    assert client.get(reverse("serving_pareto", args=[bob_project.slug, prompt.pk])).status_code == 404


# --- in a browser ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_charts_draw_in_a_browser(page, world, trained_points):
    suite, variants, alias = pareto_world(world)
    slug = world["project"].slug
    job = _finetune(world, trained_points)
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems = watch(page)
    log_in(page)

    page.goto(reverse("suite_detail", args=[slug, suite.pk]))
    for chart in ("ci-chart", "latency-chart", "tokens-chart", "heat-chart"):
        expect(page.locator(f"#{chart}")).to_be_visible()
    page.wait_for_function("Chart.getChart('heat-chart') && Chart.getChart('ci-chart')")
    scales = page.evaluate(
        "(() => { const s = Chart.getChart('latency-chart').scales.y; return [s.min, s.max]; })()"
    )
    assert scales == [0, 1]
    assert page.evaluate(
        "(() => { const s = Chart.getChart('ci-chart').scales.x; return [s.min, s.max]; })()"
    ) == [0, 1]
    page.screenshot(path=str(SHOTS / "suite-charts.png"), full_page=True)

    page.goto(reverse("job_detail", args=[slug, job.pk]))
    page.wait_for_function("Chart.getChart('loss-chart')")
    drawn = page.evaluate(
        "(() => { const c = Chart.getChart('loss-chart'); return [c.data.datasets.map(d => d.data.length), c.data.datasets[0].data[0].x]; })()"
    )
    assert drawn == [[3, 2, 3], 1]  # training loss and lr from step 1, a validation loss per epoch
    page.locator("#loss-chart").screenshot(path=str(SHOTS / "loss-chart.png"))

    other = _finetune(world, [{**p, "loss": p["loss"] * 0.9} for p in trained_points if "loss" in p])
    page.goto(reverse("job_curves", args=[slug]) + f"?job={job.pk}&job={other.pk}")
    page.wait_for_function("Chart.getChart('curves-chart') && Chart.getChart('lr-chart')")
    assert page.evaluate("Chart.getChart('curves-chart').data.datasets.length") == 3  # 2 losses, 1 validation
    page.screenshot(path=str(SHOTS / "loss-curves.png"), full_page=True)

    comparison = variants["v-good"].comparisons.get()
    page.goto(comparison.get_absolute_url())
    page.wait_for_function("Chart.getChart('arms-chart')")
    page.locator("#arms-card").screenshot(path=str(SHOTS / "comparison-chart.png"))
    page.locator("#pareto-link").click()

    expect(page.locator("#recommended")).to_contain_text("v-good")
    page.wait_for_function("Chart.getChart('pareto-latency') && Chart.getChart('pareto-tokens')")
    page.screenshot(path=str(SHOTS / "pareto.png"), full_page=True)
    page.locator("#promote-recommended").click()
    expect(page.get_by_role("heading", name="Promote v-good to production?")).to_be_visible()
    assert problems == []
