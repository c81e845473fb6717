"""A walk through every page in a real browser: no console error, no failed
request (the favicon included) on any of them, and what the first-hour
walk found wrong on the job pages stays fixed."""

import io

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from evals.actions import create_suite
from evals.models import ArmComparison, EvalResult, EvalRun, Rating
from jobs.models import Job, JobPoint
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "Hello"},
    {"name": "brief", "kind": "max_words", "n": 60},
]


@pytest.fixture
def world(alice, alice_project, tiny_model_dir, tmp_path):
    """A project with something on every page."""
    project = alice_project
    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir), is_default=True)
    save_prompt(project, alice, "support", "You are Nova. Always start with 'Hello'.", RULES)
    prompt = save_prompt(
        project, alice, "support", "You are Nova. Always start with 'Hello'. Be brief."
    ).version
    upload = import_dataset(
        project,
        alice,
        "queries",
        io.BytesIO(b"How do I reset it?\nWhere is my parcel?\nCan I pay by invoice?\nWho are you?\n"),
        filename="q.txt",
        eval_percent=25,
    )
    answered = derive_version(
        upload,
        alice,
        [
            (r.index, [*r.messages, {"role": "assistant", "content": "Hello!"}])
            for r in upload.rows.order_by("index")
        ],
        kind="teacher",
    )
    teacher = Job.objects.create(
        project=project,
        kind="teacher",
        base_model=base,
        prompt_version=prompt,
        dataset_version=upload,
        status=Job.SUCCEEDED,
        output_dataset=answered,
        progress={"done": 3, "total": 3, "unit": "queries"},
        log="[10:00:00] done\n",
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 1024)
    variant = Variant.objects.create(
        project=project,
        name="support-absorbed",
        base_model=base,
        adapter_path=str(adapter),
        prompt_version=prompt,
        dataset_version=answered,
        hyperparameters={"rank": 16, "alpha": 32, "target_modules": ["q_proj"], "device": "auto"},
        final_loss=0.5,
        metrics={"steps": 3, "device": "cpu", "precision": "fp32"},
    )
    finetune = Job.objects.create(
        project=project,
        kind="finetune",
        base_model=base,
        prompt_version=prompt,
        dataset_version=answered,
        depends_on=teacher,
        status=Job.SUCCEEDED,
        variant=variant,
        progress={"done": 3, "total": 3, "unit": "steps", "metrics": {"loss": 0.5, "learning_rate": 3e-4}},
    )
    JobPoint.append(finetune, [{"step": i, "loss": 2.0 / i, "lr": 3e-4} for i in (1, 2, 3)])
    queued = Job.objects.create(
        project=project, kind="finetune", base_model=base, prompt_version=prompt, dataset_version=answered
    )
    suite = create_suite(project, alice, "held out", upload, prompt_version=prompt)
    comparison = ArmComparison.objects.create(
        project=project,
        suite=suite,
        variant=variant,
        absorb_job=finetune,
        headline={
            "metric": "all_rules",
            "tokens_saved_per_1000": 12000,
            "retained": {"value": 0.8, "low": 0.5, "high": 1.1, "n": 1},
            "data_compliance": {"all_rules": 1.0},
        },
    )
    for i, (arm, with_variant, with_prompt) in enumerate(
        [
            ("floor", False, False),
            ("teacher", False, True),
            ("student", True, False),
            ("student+prompt", True, True),
        ]
    ):
        run = EvalRun.objects.create(
            project=project,
            suite=suite,
            comparison=comparison,
            base_model=base,
            arm=arm,
            variant=variant if with_variant else None,
            prompt_version=prompt if with_prompt else None,
            summary={
                "complete": True,
                "prompt_tokens": 40 + 20 * with_prompt,
                "latency": {"p50": 0.4 + i / 10, "p95": 0.9},
                "metrics": {
                    "all_rules": {"value": i / 4, "low": 0, "high": 1, "n": 1},
                    "rule:greeting": {"value": i / 3, "low": 0, "high": 1, "n": 1},
                },
            },
        )
        EvalResult.objects.create(
            run=run,
            example=suite.examples.first(),
            output=f"Hello from {arm}",
            checks={"all_rules": float(i % 2), "rule:greeting": 1.0},
        )
    return {
        "project": project,
        "prompt": prompt,
        "upload": upload,
        "answered": answered,
        "teacher": teacher,
        "finetune": finetune,
        "queued": queued,
        "variant": variant,
        "suite": suite,
        "comparison": comparison,
        "run": run,
    }


def watch(page):
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    # ERR_ABORTED: a load the next navigation cancelled, not a failure.
    page.on(
        "requestfailed",
        lambda r: (
            problems.append(f"request failed: {r.url} {r.failure}")
            if "ERR_ABORTED" not in (r.failure or "")
            else None
        ),
    )
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    return problems


def log_in(page):
    page.goto("/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state("networkidle")


def test_every_page_loads_without_a_console_error_or_failed_request(page, world, tmp_path):
    w, slug = world, world["project"].slug
    problems = watch(page)
    log_in(page)
    prompt, upload, answered = w["prompt"], w["upload"], w["answered"]
    urls = [
        reverse("project_list"),
        reverse("project_detail", args=[slug]),
        reverse("prompt_list", args=[slug]),
        prompt.prompt.get_absolute_url(),
        prompt.get_absolute_url(),
        prompt.prompt.versions.get(number=1).get_absolute_url(),
        reverse("prompt_diff", args=[slug, prompt.prompt_id]) + "?a=1&b=2",
        reverse("dataset_list", args=[slug]),
        upload.get_absolute_url(),
        answered.get_absolute_url(),
        reverse("dataset_review", args=[slug, answered.dataset_id, answered.number]),
        reverse("job_list", args=[slug]),
        w["teacher"].get_absolute_url(),
        w["finetune"].get_absolute_url(),
        w["queued"].get_absolute_url(),
        reverse("variant_detail", args=[slug, w["variant"].pk]),
        reverse("models"),
        reverse("evals_home", args=[slug]),
        w["suite"].get_absolute_url(),
        reverse("side_by_side", args=[slug, w["suite"].pk]),
        w["run"].get_absolute_url(),
        w["comparison"].get_absolute_url(),
        reverse("serving_home", args=[slug]),
        reverse("serving_alias", args=[slug, "production"]),
        reverse("serving_promote", args=[slug]) + f"?alias=production&variant={w['variant'].pk}",
        reverse("serving_variants", args=[slug]),
        reverse("serving_keys", args=[slug]),
    ]
    for n, url in enumerate(urls):
        page.goto(url)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / f"page-{n:02d}.png"), full_page=True)
        assert not problems, f"{url}: {problems}"
    # The 404 page is styled, has the navigation, and loads its own assets.
    response = page.goto(f"/p/{slug}/jobs/999999/")
    assert response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_role("button", name="Your projects")).to_be_visible()
    page.wait_for_load_state("networkidle")
    expected = [
        f"HTTP 404: {page.url}",
        "console error: Failed to load resource: the server responded with a status of 404 (Not Found)",
    ]
    assert sorted(problems) == sorted(expected)  # the page itself, nothing it loads


def test_a_finished_job_has_no_cancel_button_and_a_queued_one_does(page, world):
    log_in(page)
    page.goto(world["finetune"].get_absolute_url())
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    page.goto(world["teacher"].get_absolute_url())
    expect(
        page.get_by_role("link", name=f"Fine-tune #{world['finetune'].pk}")
    ).to_be_visible()  # what it starts
    page.goto(world["queued"].get_absolute_url())
    dismissed = []
    page.once("dialog", lambda dialog: (dismissed.append(dialog.message), dialog.dismiss()))
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("queued")  # asked first; "no" changes nothing
    assert dismissed and "Cancel this job?" in dismissed[0]
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)


def test_the_queued_message_goes_once_the_job_runs(page, world):
    log_in(page)
    page.goto(reverse("job_list", args=[world["project"].slug]))
    page.get_by_label("Dataset version").select_option(
        label=f"{world['answered']} · Teacher answers · 4 rows"
    )
    page.get_by_label("Fine-tune only (the dataset already holds reviewed answers)").check()
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_text("queued.", exact=False)).to_be_visible()
    job = Job.objects.order_by("-pk").first()
    job.claim("w1")  # a worker takes it
    expect(page.locator("#job-status")).to_have_text("running", timeout=10_000)
    expect(page.locator("#messages .flash")).to_have_count(0)


def test_checkbox_labels_do_not_overlap_their_help(page, world):
    log_in(page)
    page.goto(reverse("job_list", args=[world["project"].slug]))
    for summary in page.locator("summary").all():
        summary.click()
    checks = page.locator("label.check")
    assert checks.count() >= 4  # keep existing, review first, gradient_checkpointing, group_by_length
    for i in range(checks.count()):
        label = checks.nth(i).bounding_box()
        help_box = checks.nth(i).locator("xpath=following-sibling::small[1]").bounding_box()
        assert label and help_box
        assert label["y"] + label["height"] <= help_box["y"] + 1, (
            checks.nth(i).inner_text(),
            label,
            help_box,
        )


def test_the_leaderboard_draws_its_charts_and_a_rating_is_stored(page, world):
    log_in(page)
    page.goto(world["suite"].get_absolute_url())
    page.wait_for_function("() => window.Chart && Chart.getChart('ci-chart') && Chart.getChart('heat-chart')")
    assert page.evaluate("() => Chart.getChart('ci-chart').data.labels.length") == 4
    assert page.evaluate("() => Chart.getChart('heat-chart').data.datasets[0].data.length") == 4 * 2
    assert page.evaluate("() => Chart.getChart('latency-chart').data.datasets[0].data.length") == 4
    page.get_by_role("button", name="Side by side").click()
    page.get_by_role("button", name="B better").first.click()
    expect(page.get_by_role("button", name="B better").first).not_to_have_class("small-btn outline")
    assert Rating.objects.get().choice == "b"


def test_the_loss_chart_draws_the_points_as_they_are(page, world):
    """A smoothed curve overshot between points (a peak at 3.0 between 2.1 and 1.8).
    An epoch's validation loss is a curve of its own on the same step axis."""
    JobPoint.append(world["finetune"], [{"step": 3, "valid_loss": 1.5}])
    log_in(page)
    page.goto(world["finetune"].get_absolute_url())
    page.wait_for_function("() => window.Chart && Chart.getChart('loss-chart')")
    tension = page.evaluate("() => Chart.getChart('loss-chart').data.datasets[0].tension")
    data = page.evaluate("() => Chart.getChart('loss-chart').data.datasets[0].data")
    assert tension == 0 and [(p["x"], p["y"]) for p in data] == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    valid = page.evaluate("() => Chart.getChart('loss-chart').data.datasets[1].data")
    assert valid == [{"x": 3, "y": 1.5}]


def test_the_server_error_page_is_styled_and_needs_no_context():
    from django.template.loader import get_template

    html = get_template("500.html").render()  # how Django renders it: no request, no context
    assert "Something went wrong on our side" in html and "css/app.css" in html and "favicon.svg" in html
