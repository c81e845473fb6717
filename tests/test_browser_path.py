"""The whole path, walked as a user in a real browser (Debian's chromium):
log in, create a project, paste a prompt and add rules with the rule editor,
upload a bad dataset (refused, with the reason) and a good one, start an
absorb from the jobs form and watch it progress without a reload, review and
edit a teacher answer, open the leaderboard and the side-by-side and rate an
example, promote to staging through the gate, create an API key and call /v1
with the `openai` package.

Everything behind the pages is real: a Celery worker process runs the
teacher, the fine-tune and the four-arm eval on the tiny lively model, and an
in-process hf engine serves the promoted adapter. Every page visited is saved
as a full-page screenshot (NN-step.png) in $WORKBENCH_SCREENSHOTS or the
test's tmp dir, and any console error or failed request fails the walk."""

from __future__ import annotations

import os
import re
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Page, expect

from evals.models import ArmComparison, EvalRun, Rating
from jobs.forms import _version_label
from jobs.models import Job
from serving.forms import variant_label
from serving.models import Alias, AliasMove
from tests.processes import wait_for
from tests.test_ui_walk import watch
from workbench.models import DatasetVersion, Project, PromptVersion

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROMPT = (
    "You are Ada, the support assistant of Parcelly, a parcel delivery service. "
    "Greet the customer, answer in two short sentences about their order, and sign off."
)
QUERIES = [
    f"How do I {verb} my {thing}?"
    for verb, thing in [
        ("track", "parcel"),
        ("cancel", "order"),
        ("change", "delivery address"),
        ("return", "parcel"),
        ("reschedule", "delivery"),
        ("update", "phone number"),
        ("pay for", "order"),
        ("insure", "parcel"),
        ("reset", "password"),
        ("close", "account"),
        ("find", "invoice"),
        ("report", "damaged parcel"),
        ("claim", "refund"),
        ("contact", "courier"),
        ("print", "label"),
        ("redirect", "parcel"),
        ("check", "delivery time"),
        ("add", "second address"),
        ("pause", "deliveries"),
        ("rate", "courier"),
    ]
]
BAD_JSONL = (
    b'{"messages": [{"role": "user", "content": "Where is my order?"}]}\n'
    b'{"messages": [{"role": "user", "content": "cut off\n'
)
# Reads the live job fragment: progress, bar and status, as the user sees them.
RECORD_PROGRESS = """() => {
  window.__walkMarker = "same document";
  window.__progress = [];
  const read = () => {
    const live = document.getElementById("job-live");
    return [live.querySelector(".stat:nth-child(2) b").textContent.trim(),
            live.querySelector("progress").value, document.getElementById("job-status").textContent.trim()];
  };
  window.__progress.push(read());
  document.body.addEventListener("htmx:afterSwap", () => window.__progress.push(read()));
}"""


class Walk:
    """The browser walk: every page it lands on is screenshotted, in order,
    and must have loaded without a console error or a failed request."""

    def __init__(self, page: Page, out: Path) -> None:
        self.page, self.out, self.n = page, out, 0
        self.problems = watch(page)
        out.mkdir(parents=True, exist_ok=True)
        self.shots: list[str] = []

    def shot(self, step: str) -> None:
        self.page.wait_for_load_state("networkidle")
        self.n += 1
        name = f"{self.n:02d}-{step}.png"
        self.page.screenshot(path=str(self.out / name), full_page=True)
        self.shots.append(name)
        self.clean(step)

    def clean(self, step: str) -> None:
        assert not self.problems, f"{step}: {self.problems}"

    def expect_refused(self, step: str, path: str, status: int) -> None:
        """A refused form answers with its status: that one response, and
        chromium's console line about it, are expected; nothing else."""
        assert self.page.url.endswith(path), self.page.url
        response = f"HTTP {status}: {self.page.url}"
        console = f"console error: Failed to load resource: the server responded with a status of {status} "
        unexpected = [p for p in self.problems if p != response and not p.startswith(console)]
        assert response in self.problems and not unexpected, f"{step}: {self.problems}"
        self.problems.clear()


def screenshots_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("WORKBENCH_SCREENSHOTS") or tmp_path / "screenshots")


def test_a_new_user_walks_the_whole_path_in_a_browser(
    page, alice, tiny_base, worker, engine, live_server, tmp_path
):
    walk = Walk(page, screenshots_dir(tmp_path))

    # --- log in, create a project ----------------------------------------------------------------
    page.goto("/login/")
    walk.shot("login")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Projects", exact=True)).to_be_visible()
    walk.shot("projects")
    page.get_by_label("Name").fill("Parcel support")
    page.get_by_label("Description").fill("Absorb the support prompt of Parcelly.")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("heading", name="Parcel support")).to_be_visible()
    project = Project.objects.get(name="Parcel support")
    slug = project.slug
    walk.shot("project")

    # --- paste a prompt, add checkable rules with the rule editor --------------------------------
    page.locator("header.topbar nav").get_by_role("link", name="Prompts", exact=True).click()
    expect(page.get_by_role("heading", name="Prompts", exact=True)).to_be_visible()
    walk.shot("prompts")
    page.get_by_label("Name").fill("support")
    page.get_by_label("Text", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Save prompt").click()
    expect(page.locator("pre.prompt-text")).to_have_text(PROMPT)
    walk.shot("prompt")
    rules = [
        ("greeting", "starts_with", "Hello"),
        ("sign-off", "ends_with", "Bye!"),
        ("mentions the order", "contains", "order"),
    ]
    rows = page.locator("#rules-form fieldset.rule-edit")
    for n, (name, kind, text) in enumerate(rules):
        if n:
            page.get_by_role("button", name="+ Another rule").click()
        row = rows.nth(n)
        row.get_by_label("Rule name").fill(name)
        row.get_by_label("Kind", exact=True).select_option(kind)
        row.get_by_label("text", exact=True).fill(text)  # the kind's own field, loaded by htmx
    walk.shot("rules")
    page.get_by_role("button", name="Save rules").click()  # all three rules: one new version
    expect(page.get_by_text("Rules saved as version 2.")).to_be_visible()
    walk.shot("rules-saved")
    prompt = PromptVersion.objects.filter(prompt__project=project).order_by("-number").first()
    assert [r["name"] for r in prompt.rules] == [r[0] for r in rules] and prompt.number == 2

    # --- the playground: the base model WITH the prompt answers one question, its rules checked ---
    page.locator("header.topbar nav").get_by_role("link", name="Playground", exact=True).click()
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()
    picks = page.locator(".pg-pick")
    picks.nth(0).locator(".pg-model").select_option(f"base:{tiny_base.pk}")
    picks.nth(0).locator(".pg-prompt").select_option(str(prompt.pk))
    for i in range(1, picks.count()):
        picks.nth(i).locator(".pg-model").select_option("")
    page.get_by_label("Message").fill("Where is my parcel?")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="Send").click()
    column = page.locator(".pg-answer").first
    expect(column.locator(".pg-status")).to_have_text(re.compile("^(done|fails a rule)$"), timeout=60_000)
    expect(column.locator(".pg-rule")).to_have_count(len(rules))
    walk.shot("playground")

    # --- upload a bad dataset (refused, with the reason), then a good one with an eval split -----
    page.locator("header.topbar nav").get_by_role("link", name="Datasets", exact=True).click()
    walk.shot("datasets")
    page.get_by_label("File").set_input_files(
        {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": BAD_JSONL}
    )
    page.get_by_role("button", name="Upload and validate").click()
    refused = page.get_by_role("alert").filter(has_text="bad.jsonl was not stored")
    expect(refused).to_be_visible()
    expect(refused).to_contain_text("line 2")
    walk.expect_refused("bad upload", "/datasets/upload", 400)
    walk.shot("dataset-refused")
    assert not DatasetVersion.objects.filter(dataset__project=project).exists()  # nothing half-stored
    page.get_by_label("File").set_input_files(
        {"name": "queries.txt", "mimeType": "text/plain", "buffer": "\n".join(QUERIES).encode()}
    )
    page.get_by_label("Name", exact=True).fill("queries")
    page.get_by_text("Query/answer columns or fields, records key, split").click()
    page.get_by_label("Eval split %").fill("20")
    page.get_by_role("button", name="Upload and validate").click()
    expect(page.get_by_text(f"Stored queries@1: {len(QUERIES)} rows")).to_be_visible()
    upload = DatasetVersion.objects.get(dataset__project=project)
    assert upload.eval_percent == 20
    walk.shot("dataset")

    # --- start an absorb from the jobs form: curation defaults, tiny settings --------------------
    page.locator("header.topbar nav").get_by_role("link", name="Jobs", exact=True).click()
    walk.shot("jobs")
    page.get_by_label("Prompt version").select_option(label=str(prompt))
    page.get_by_label("Dataset version").select_option(label=_version_label(upload))
    page.get_by_label("Teacher, then fine-tune").check()
    # The form's live preview: the same absorb as a command line, a spec, and a time estimate.
    expect(page.locator("#preview-command")).to_contain_text("manage.py absorb", timeout=30_000)
    expect(page.locator("#preview-estimate")).to_contain_text("In all")
    expect(page.locator("#preview-spec")).to_contain_text("project:")
    for summary in ("Teacher", "Curation", "Training"):
        page.locator("summary", has_text=re.compile(f"^{summary}")).click()
    expect(page.get_by_label("curate the answers when the prompt has checkable rules")).to_be_checked()
    # Later rounds would open answers with the required phrase: switched off here, so some rows
    # still fail a rule and the review queue below has work to show.
    phrases = page.get_by_label("prefill a required phrase still missing")
    expect(phrases).to_be_checked()
    phrases.uncheck()
    for field, value in {
        "g_max_new_tokens": "16",
        "g_batch_size": "8",
        "t_max_steps": "24",
        "t_batch_size": "4",
        "t_max_length": "128",
        "t_logging_steps": "1",
        "t_save_steps": "100",
        "synthesize": "3",  # the teacher first writes questions about the prompt: a few here
    }.items():
        page.locator(f"#id_{field}").fill(value)
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("heading", name="Query synthesis #")).to_be_visible()
    synthesis = Job.objects.get(project=project, kind="synthesize")
    teacher = Job.objects.get(project=project, kind="teacher")
    finetune = Job.objects.get(project=project, kind="finetune")
    assert teacher.depends_on == synthesis and synthesis.params["count"] == 3
    assert teacher.params["curation"]["best_of"] > 1  # curated by default: the prompt has rules
    assert teacher.params["curation"]["phrases"] is False and teacher.params["curation"]["rounds"] == 3

    # progress on the job page moves without a reload (the page's htmx poll)
    page.evaluate(RECORD_PROGRESS)
    walk.shot("synthesis-job-queued")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    seen = page.evaluate("window.__progress")
    assert page.evaluate("window.__walkMarker") == "same document"  # the same document: no reload
    synthesis.refresh_from_db()
    asked = int(synthesis.progress["done"])
    assert seen[0][2] in ("queued", "running") and seen[-1] == [f"{asked} / {asked}", 100, "succeeded"], seen
    assert [s[1] for s in seen] == sorted(s[1] for s in seen), seen  # the bar only moves forward
    expect(page.locator("#synthesis-result")).to_contain_text("The absorb's teacher answers")
    walk.shot("synthesis-job-done")
    page.get_by_role("link", name=f"Teacher generation #{teacher.pk}").click()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    teacher.refresh_from_db()
    train_rows = teacher.dataset_version.rows.filter(split="train").count()
    expect(page.locator("#job-live .stat:nth-child(2) b").first).to_have_text(f"{train_rows} / {train_rows}")
    walk.shot("teacher-job-done")

    page.get_by_role("link", name=f"Fine-tune #{finetune.pk}").click()
    # Phrases off, many answers still fail a rule: the fine-tune waits for a look at the data.
    expect(page.locator("#job-held")).to_be_visible()
    walk.shot("finetune-held")
    page.get_by_role("button", name="Train anyway").click()
    expect(page.get_by_text(f"a retry of Fine-tune #{finetune.pk}")).to_be_visible()
    finetune = Job.objects.filter(project=project, kind="finetune").latest("pk")
    expect(page.locator("#job-status")).to_be_visible()
    page.evaluate(RECORD_PROGRESS)
    walk.shot("finetune-job")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    assert page.evaluate("window.__walkMarker") == "same document"
    steps = page.evaluate("window.__progress")
    # (On a fast machine the fine-tune may be done before its page opens: the teacher above proved the poll.)
    assert steps[-1] == ["24 / 24", 100, "succeeded"], steps
    assert [s[1] for s in steps] == sorted(s[1] for s in steps), steps
    page.wait_for_function(
        "() => window.Chart && Chart.getChart('loss-chart')"
        " && Chart.getChart('loss-chart').data.datasets[0].data.length === 24"
    )
    walk.shot("finetune-job-done")
    finetune.refresh_from_db()
    variant = finetune.variant
    assert variant is not None and variant.adapter_path

    # --- review the teacher's answers: failing rows first; edit one, save a new version ----------
    teacher.refresh_from_db()
    answers = teacher.output_dataset
    page.locator(".page-head").get_by_role("link", name=str(answers)).click()  # the fine-tune's input
    expect(page.get_by_role("link", name="review & edit")).to_be_visible()
    walk.shot("teacher-answers")
    page.get_by_role("link", name="review & edit").click()
    queue = page.locator("#review-queue")
    expect(queue).to_contain_text("still fail a rule; they come first")
    walk.shot("review")
    failing = answers.rows.exclude(failing=[]).count()
    assert failing > 0  # the random model never mentions the order by itself
    cards = page.locator("article.row-card")
    expect(cards.first.locator("header")).to_contain_text("fails rule: mentions the order")
    fixed = cards.first.locator("header").inner_text().split(" ")[0]  # "#1"
    cards.first.locator("textarea").fill("Hello! Your order is on its way and arrives tomorrow. Bye!")
    page.get_by_role("button", name="Save as a new version").click()
    expect(page.get_by_text(re.compile(r"Saved queries@\d+: 1 answer edited"))).to_be_visible()
    walk.shot("review-saved")
    reviewed = DatasetVersion.objects.filter(parent=answers).get()
    assert reviewed.rows.exclude(failing=[]).count() == failing - 1
    # The repaired row passes now, so it left the front of the queue: what still fails comes first.
    expect(page.locator("#review-queue")).to_contain_text(f"{failing - 1} rows still fail a rule")
    headers = {h.split(" ")[0]: "fails rule" in h for h in cards.locator("header").all_inner_texts()}
    fails = list(headers.values())
    assert fails[0] and fails == sorted(fails, reverse=True) and not headers.get(fixed, False), headers

    # --- the four-arm eval ran on the worker: comparison, leaderboard, side by side, a rating ----
    wait_for(lambda: ArmComparison.objects.filter(variant=variant).exists(), 60, "the four-arm comparison")
    comparison = ArmComparison.objects.get(variant=variant)
    page.locator("header.topbar nav").get_by_role("link", name="Evals", exact=True).click()
    walk.shot("evals")
    page.get_by_role("link", name=variant.name).click()
    expect(page.locator("#comparison-live:not([hx-get])")).to_be_attached(timeout=240_000)  # polling stopped
    comparison.refresh_from_db()
    assert comparison.job.status == Job.SUCCEEDED, comparison.job.error
    expect(page.locator("#retained")).to_be_visible()
    walk.shot("four-arms")
    # What it saves and how to serve it, from the comparison's own runs; then every variant's trade-off.
    expect(page.locator("#recommendation")).to_contain_text("Serve it on the hf engine", timeout=30_000)
    expect(page.locator("#cost-student")).not_to_be_empty()
    walk.shot("four-arms-costs")
    page.locator("#pareto-link").click()
    expect(page.get_by_role("heading", name=re.compile("^Pareto view"))).to_be_visible()
    walk.shot("pareto")
    page.goto(comparison.get_absolute_url())
    expect(page.locator("#retained")).to_be_visible()
    suite = comparison.suite
    page.get_by_role("link", name=suite.name).first.click()
    page.wait_for_function("() => window.Chart && Chart.getChart('ci-chart') && Chart.getChart('heat-chart')")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(4)
    walk.shot("leaderboard")
    page.get_by_role("button", name="Side by side").click()
    expect(page.get_by_role("heading", name="Side by side")).to_be_visible()
    walk.shot("side-by-side")
    runs = {r.arm: r for r in EvalRun.objects.filter(comparison=comparison)}
    page.get_by_label("A", exact=True).select_option(label=f"#{runs['teacher'].pk} {runs['teacher'].label}")
    page.get_by_label("B", exact=True).select_option(label=f"#{runs['student'].pk} {runs['student'].label}")
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("table.sbs tbody tr")).to_have_count(suite.examples.count())
    walk.shot("side-by-side-teacher-vs-student")
    page.get_by_role("button", name="B better").first.click()
    expect(page.get_by_role("button", name="B better").first).not_to_have_class(re.compile(r"\boutline\b"))
    walk.clean("rating")
    rating = Rating.objects.get()
    assert (rating.choice, rating.run_a, rating.run_b) == ("b", runs["teacher"], runs["student"])

    # --- promote to staging: set its gate, see the verdict, override the failed gate with a reason
    page.locator("header.topbar nav").get_by_role("link", name="Serving", exact=True).click()
    walk.shot("serving")
    page.locator("#aliases").get_by_role("link", name="staging").click()
    walk.shot("staging")
    page.get_by_label("Gating suite").select_option(label=suite.name)
    page.get_by_label("Minimum all-rules compliance").fill("0.9")
    page.get_by_role("button", name="Save gate").click()
    expect(page.get_by_text("Gate of")).to_be_visible()
    walk.shot("staging-gated")
    page.get_by_label("Variant to promote").select_option(label=variant_label(variant))
    page.get_by_role("button", name="Check the gate…").click()
    verdict = page.locator("#verdict")
    expect(verdict).to_be_visible()
    expect(page.locator("table.verdict")).to_contain_text("all-rules")  # the numbers, before confirming
    walk.shot("promote-verdict")
    assert Alias.objects.get(project=project, name="staging").variant is None  # nothing moved yet
    if verdict.inner_text() == "failed":  # a random tiny model fails a 0.9 bar: override, with a reason
        page.get_by_label("Reason to override the gate (required)").fill(
            "Walk-through on the tiny test model."
        )
        page.get_by_role("button", name="Override the gate and promote").click()
    else:
        page.get_by_role("button", name="Promote", exact=True).click()
    expect(page.get_by_text(f"{slug}/staging now serves")).to_be_visible()
    walk.shot("staging-promoted")
    move = AliasMove.objects.get(alias__project=project, alias__name="staging")
    assert move.to_variant == variant and move.user == alice and move.verdict["checks"]

    # --- an API key, read from the page once, calls /v1 with the openai package ------------------
    page.get_by_role("link", name="API keys").click()
    walk.shot("keys")
    page.get_by_label("Name", exact=True).fill("walk-through")
    page.get_by_role("button", name="Create key").click()
    raw_key = page.get_by_label("The new API key").input_value()
    assert raw_key
    walk.shot("key-created")
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=raw_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=f"{slug}/staging",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "Where is my parcel?"}],
    )
    assert reply.model == f"{slug}/staging"
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
    page.get_by_role("link", name="API keys").click()  # a GET: the key is not shown again, its use is
    expect(page.get_by_label("The new API key")).to_have_count(0)
    row = page.locator("#keys tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(3)).to_have_text(re.compile(r"ago$"))  # last used: not "never"
    walk.shot("keys-used")

    # --- the same absorb as a spec: planned in the browser, every step found by its fingerprint ---
    page.goto(finetune.get_absolute_url())
    page.get_by_role("link", name="Open as a spec").click()
    expect(page.locator("#spec-source")).to_contain_text(f"exported from {finetune}")
    page.get_by_role("button", name="Plan").click()
    for step in ("synthesis", "teacher", "fine-tune", "eval"):
        expect(page.locator(f'#plan-steps li[data-step="{step}"]')).to_have_attribute("data-action", "reuse")
    walk.shot("spec-plan")
    page.get_by_role("button", name="Run").click()  # everything reused: the run ends within the request
    expect(page.locator("#spec-run-status")).to_have_text(re.compile("^(Done|Refused by the gate)$"))
    expect(page.locator("#spec-run-log")).to_contain_text("eval:")
    walk.shot("spec-run")

    # --- objectives instead of settings: a search whose first trial (every step reused) meets them ---
    page.get_by_role("button", name="Edit and apply again").click()
    box = page.get_by_label("Spec (YAML)")
    box.fill(
        box.input_value()
        + "objectives: {max_prompt_tokens: 100000}\nsearch: {budget_minutes: 30, max_trials: 3}\n"
    )
    page.get_by_role("button", name="Plan").click()
    expect(page.locator("#plan-search")).to_contain_text("then a search of up to 3 trials within 30 minutes")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#spec-run-trials tbody tr")).to_have_count(1)
    expect(page.locator('#spec-run-trials tr[data-trial="1"]')).to_contain_text("meets every objective")
    expect(page.locator("#spec-run-stopped")).to_contain_text("trial 1 meets every objective")
    walk.shot("spec-search")
    assert len(walk.shots) == walk.n and not walk.problems
