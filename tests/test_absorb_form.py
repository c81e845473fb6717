"""The absorb form prevents mistakes: the dataset picker never defaults to a
captured set, too few training rows are refused, the teacher-then-fine-tune
path checks the teacher's answers before training, the live preview shows
the equivalent command (which queues the same jobs), the spec and the time
each step takes, presets save and load the settings, and a finished run
starts again with its own settings."""

from __future__ import annotations

import io
import json
import re
import shlex
from html import unescape
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from jobs import fingerprints
from jobs.forms import AbsorbForm, initial_from_job
from jobs.models import AbsorbPreset, Job
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import DatasetVersion, FoundationModel
from workbench.pipeline.spec import parse_spec

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "test-artifacts" / "screenshots" / "absorb-form.png"
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"}]


def rows(n: int, answered: bool = False, prefix: str = "Question") -> bytes:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{prefix} {i}: how do I reset my password?"}]
        if answered:
            messages.append({"role": "assistant", "content": f"Hello, answer {i}."})
        out.append(json.dumps({"messages": messages}))
    return "\n".join(out).encode()


@pytest.fixture
def world(alice, alice_project, smollm2_dir, settings):
    settings.MIN_TRAIN_ROWS = 16
    base = FoundationModel.objects.create(name="smol", path=str(smollm2_dir), is_default=True)
    prompt = save_prompt(alice_project, alice, "support", "Start every answer with Hello.", RULES).version
    data = import_dataset(
        alice_project, alice, "faq", io.BytesIO(rows(40)), filename="faq.jsonl", eval_percent=25
    )
    return {"project": alice_project, "user": alice, "base": base, "prompt": prompt, "data": data}


def form_post(world, **changes):
    """The absorb form as a browser posts it with its defaults, then `changes`."""
    form = AbsorbForm(world["project"])
    data = {}
    for name in form.fields:
        value = form[name].value()
        if value is None or value is False or value == "":
            continue
        data[name] = "on" if value is True else value
    data.update(
        prompt_version=world["prompt"].pk, dataset_version=world["data"].pk, base_model=world["base"].pk
    )
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def preview(client, world, post):
    return client.post(reverse("serving_absorb_preview", args=[world["project"].slug]), post)


def command_of(html: str) -> str:
    import html as html_module

    return html_module.unescape(re.search(r'id="preview-command">([^<]*)</pre>', html).group(1))


# --- defaults ------------------------------------------------------------------------------------


def test_it_defaults_to_the_largest_dataset_never_a_captured_one(world, alice, alice_client):
    project = world["project"]
    import_dataset(project, alice, "tiny", io.BytesIO(rows(3)), filename="tiny.jsonl")
    captured = import_dataset(project, alice, "logged", io.BytesIO(rows(90)), filename="logged.jsonl")
    captured.meta = {"captured_requests": [1, 2, 3]}
    captured.save(update_fields=["meta"])
    newer = derive_version(world["data"], alice, [(r.index, r.messages) for r in world["data"].rows.all()])
    assert AbsorbForm(project)["dataset_version"].value() == newer.pk
    page = alice_client.get(reverse("job_list", args=[project.slug])).content.decode()
    assert re.search(rf'<option value="{newer.pk}" selected>', page)
    assert f'<option value="{captured.pk}" selected>' not in page


# --- few rows that ask a fact ----------------------------------------------------------------------


def test_the_preview_says_when_few_training_queries_ask_a_fact(world, alice, alice_client):
    text = "Start every answer with Hello. Refunds are paid within 30 days. Passwords reset by email."
    refund = [{"name": "refund window", "question": "refund", "expect": "30 days"}]
    prompt = save_prompt(world["project"], alice, "support", text, RULES, "", refund).version
    # By default the absorb synthesises questions about the prompt first: nothing to advise.
    page = preview(alice_client, world, form_post(world, prompt_version=prompt.pk)).content.decode()
    assert 'id="preview-fact-advice"' not in page and 'data-step="synthesis"' in page
    page = preview(
        alice_client, world, form_post(world, prompt_version=prompt.pk, synthesize=0)
    ).content.decode()
    advice = re.search(r'id="preview-fact-advice">(.*?)</p>', page, re.S)
    assert advice is not None, page
    assert "0 of 30 training queries ask one of the 1 fact of support@2" in advice.group(1)
    assert f"?prompt_version={prompt.pk}&amp;dataset_version={world['data'].pk}" in advice.group(1)
    synth = alice_client.get(
        reverse("synthesize", args=[world["project"].slug]), {"prompt_version": prompt.pk}
    )
    assert synth.context["form"]["prompt_version"].value() == str(prompt.pk)
    # Queries that ask it (every one names the password): no advice.
    reset = [{"name": "reset", "question": "password", "expect": "email"}]
    asked = save_prompt(world["project"], alice, "support", text, RULES, "", reset).version
    page = preview(
        alice_client, world, form_post(world, prompt_version=asked.pk, synthesize=0)
    ).content.decode()
    assert 'id="preview-fact-advice"' not in page


# --- too few rows --------------------------------------------------------------------------------


def test_it_refuses_too_few_training_rows_unless_told_to_go_ahead(world, alice, alice_client):
    project = world["project"]
    small = import_dataset(
        project, alice, "one", io.BytesIO(rows(2, answered=True)), filename="one.jsonl", eval_percent=50
    )
    url = reverse("absorb_start", args=[project.slug])
    post = form_post(world, dataset_version=small.pk, mode="finetune")
    r = alice_client.post(url, post)
    body = r.content.decode()
    assert r.status_code == 400 and "one@1 has 1 training row (and 1 held out)" in body
    assert "fewer than the 16 a fine-tune needs" in body and not Job.objects.exists()
    r = alice_client.post(url, {**post, "few_rows_ok": "on"})
    assert r.status_code == 302 and Job.objects.filter(kind="finetune").count() == 1
    # The default dataset (30 training rows) passes without the box.
    assert alice_client.post(url, form_post(world, mode="absorb")).status_code == 302


# --- the data check on the teacher-then-fine-tune path -------------------------------------------


def finish_teacher(teacher: Job, passing: int, failing: int) -> DatasetVersion:
    """The teacher job ends as a worker ends it, with answers of which `failing` fail the rule."""
    assert teacher.claim("test-worker")
    source = teacher.dataset_version
    answered = []
    for n, row in enumerate(source.rows.filter(split="train").order_by("index")):
        ok = n < passing
        if n >= passing + failing:
            break
        answer = {"role": "assistant", "content": "Hello, here is how." if ok else "Here is how."}
        answered.append((row.index, [*row.messages, answer], {"failing": [] if ok else ["greeting"]}))
    version = derive_version(source, None, answered, kind=DatasetVersion.TEACHER, meta={"rules": RULES})
    assert teacher.succeed(output_dataset=version)
    return version


def test_the_fine_tune_waits_for_confirmation_when_the_teachers_answers_fail(world, alice_client):
    project = world["project"]
    url = reverse("absorb_start", args=[project.slug])
    assert alice_client.post(url, form_post(world, mode="absorb", synthesize=0)).status_code == 302
    teacher, finetune = Job.objects.get(kind="teacher"), Job.objects.get(kind="finetune")
    assert finetune.params["data_check"] == 0.2
    answers = finish_teacher(teacher, passing=10, failing=20)
    finetune.refresh_from_db()
    assert finetune.status == Job.CANCELLED and finetune.dataset_version == answers
    assert (
        "67% of the training answers" in finetune.params["held"] and "greeting: 20" in finetune.params["held"]
    )
    page = alice_client.get(finetune.get_absolute_url()).content.decode()
    assert 'id="job-held"' in page and "Train anyway" in page and "Review the answers" in page
    assert "Retry as a new job" not in page
    listing = alice_client.get(reverse("job_list", args=[project.slug])).content.decode()
    assert f'href="{finetune.get_absolute_url()}" title="' in listing and ">waiting for you</a>" in listing
    r = alice_client.post(reverse("job_retry", args=[project.slug, finetune.pk]))
    again = Job.objects.filter(kind="finetune").latest("pk")
    assert r.status_code == 302 and again.status == Job.QUEUED and again.dataset_version == answers
    assert "held" not in again.params and "data_check" not in again.params


def test_answers_that_pass_or_train_anyway_go_straight_to_training(world, alice_client):
    url = reverse("absorb_start", args=[world["project"].slug])
    alice_client.post(url, form_post(world, mode="absorb", synthesize=0))
    teacher, finetune = Job.objects.get(kind="teacher"), Job.objects.get(kind="finetune")
    finish_teacher(teacher, passing=28, failing=2)  # 7%: under the 20% that asks
    finetune.refresh_from_db()
    assert finetune.status == Job.QUEUED and "held" not in finetune.params
    alice_client.post(url, form_post(world, mode="absorb", train_anyway="on", synthesize=0))
    teacher = Job.objects.filter(kind="teacher").latest("pk")
    finetune = Job.objects.filter(kind="finetune").latest("pk")
    assert "data_check" not in finetune.params
    finish_teacher(teacher, passing=0, failing=30)
    finetune.refresh_from_db()
    assert finetune.status == Job.QUEUED


# --- the preview ---------------------------------------------------------------------------------


def test_the_preview_shows_a_command_that_queues_the_same_absorb(world, alice_client, tmp_path, settings):
    project = world["project"]
    post = form_post(
        world,
        mode="absorb",
        best_of="3",
        reminders=None,
        g_temperature="0.3",
        t_epochs="2",
        t_learning_rate="0.0005",
        t_rank="8",
        eval_max_examples="4",
        passing_only=None,
    )
    r = preview(alice_client, world, post)
    assert r.status_code == 200, r.content.decode()
    html = r.content.decode()
    line = command_of(html)
    assert line.startswith("python manage.py absorb --project alpha --prompt support@1 --dataset faq@1")
    assert "--best-of 3" in line and "--no-reminders" in line and "--epochs 2" in line
    assert "--train-on-failing" in line and "--check-data" in line and "--eval-max-examples 4" in line
    config = json.loads(
        re.search(r'id="preview-train-config">([^<]*)</pre>', html).group(1).replace("&quot;", '"')
    )
    assert config == {"learning_rate": 0.0005, "rank": 8}
    (tmp_path / "train.json").write_text(json.dumps(config))
    # The spec is one `apply` reads.
    spec = re.search(r'id="preview-spec">(.*?)</pre>', html, re.S).group(1).replace("&#x27;", "'")
    parsed = parse_spec(spec.replace("&quot;", '"'), "absorb.yaml", tmp_path)
    assert parsed.training == {"epochs": 2, "learning_rate": 0.0005, "rank": 8}
    assert parsed.synthesis == {"count": 120, "settings": {}}
    assert parsed.data["curation"] == {"best_of": 3, "reminders": False}
    # The command line, run, queues jobs with the fingerprints the form's own jobs get.
    args = shlex.split(line)[3:]
    args[args.index("train.json")] = str(tmp_path / "train.json")
    call_command("absorb", *args)
    by_command = {j.kind: j for j in Job.objects.all()}
    assert alice_client.post(reverse("absorb_start", args=[project.slug]), post).status_code == 302
    by_form = {j.kind: j for j in Job.objects.exclude(pk__in=[j.pk for j in by_command.values()])}
    for kind in ("synthesize", "teacher", "finetune"):
        assert by_command[kind].params[fingerprints.KEY] == by_form[kind].params[fingerprints.KEY], kind
    # The same eval: the command stores what differs from the settings, the form every value.
    defaults = {"auto": settings.AUTO_EVAL, "max_new_tokens": settings.EVAL_MAX_NEW_TOKENS}
    effective = [{**defaults, **jobs["finetune"].params["eval"]} for jobs in (by_command, by_form)]
    assert effective[0] == effective[1] and effective[0]["max_examples"] == 4
    assert by_command["finetune"].params["data_check"] == by_form["finetune"].params["data_check"]
    # "Open on the spec page" plans the same spec there: the absorbs just started are found by fingerprint.
    hidden = re.search(r'id="preview-spec-open">.*?name="text" value="(.*?)">', html, re.S).group(1)
    page = alice_client.post(
        reverse("serving_specs", args=[project.slug]), {"text": unescape(hidden), "action": "plan"}
    )
    assert page.status_code == 200, page.content.decode()
    for step in ("prompt", "synthesis", "teacher", "fine-tune"):
        assert f'data-step="{step}" data-action="reuse"' in page.content.decode(), step


def test_the_estimate_says_whether_it_was_measured_here(world, alice_client):
    post = form_post(world, mode="absorb")
    html = preview(alice_client, world, post).content.decode()
    for step in ("synthesis", "teacher", "training", "evaluation"):
        assert f'data-step="{step}"' in html
    assert html.count("default guess") == 4 and "measured here" not in html
    # The teacher answers the 30 training queries and up to 120 synthesised ones.
    assert "~360 questions drafted for 120" in html and "150 queries" in html
    assert "4 arms x 10 held-out queries" in html
    post = {**post, "synthesize": "0"}
    # A teacher job of the same model finished here: its rate is the teacher's estimate.
    Job.objects.create(
        project=world["project"],
        kind="teacher",
        status=Job.SUCCEEDED,
        base_model=world["base"],
        params={"curation": None},
        progress={"done": 60, "elapsed": 30.0, "unit": "queries"},
    )
    html = preview(alice_client, world, {**post, "curate": ""}).content.decode()
    teacher = html.split('data-step="teacher"')[1].split("</li>")[0]
    assert "measured here" in teacher and "2.00 samples/s" in teacher and "15 s" in teacher
    assert "--no-curation" in command_of(html)


def test_a_preview_of_bad_settings_says_what_is_wrong(world, alice, alice_client, bob_client_of):
    r = preview(alice_client, world, form_post(world, g_max_new_tokens="0", t_epochs="-1"))
    body = r.content.decode()
    assert r.status_code == 400 and "No preview yet" in body and "epochs" in body
    # A data problem is a warning in the preview, not a refusal.
    small = import_dataset(world["project"], alice, "two", io.BytesIO(rows(2)), filename="two.jsonl")
    r = preview(alice_client, world, form_post(world, dataset_version=small.pk))
    warning = re.search(r'preview-warning">([^<]*)<', r.content.decode())
    assert r.status_code == 200 and "two@1 has 1 training row (and 1 held out)" in warning.group(1)
    url = reverse("serving_absorb_preview", args=[world["project"].slug])
    assert alice_client.get(url).status_code == 405
    assert bob_client_of().post(url, form_post(world)).status_code == 404


@pytest.fixture
def bob_client_of(bob, bob_project):
    from django.test import Client

    def make():
        c = Client()
        c.force_login(bob)
        return c

    return make


# --- presets -------------------------------------------------------------------------------------


def test_presets_save_load_and_delete_in_their_project_only(world, alice_client, bob_client_of):
    slug = world["project"].slug
    save = reverse("absorb_preset_save", args=[slug])
    r = alice_client.post(save, form_post(world, t_epochs="5", best_of="2", preset_name="  five  epochs "))
    preset = AbsorbPreset.objects.get()
    assert r.status_code == 302 and r.url.endswith(f"?preset={preset.pk}")
    assert preset.name == "five epochs" and preset.values["t_epochs"] == "5"
    assert "dataset_version" not in preset.values and "form_token" not in preset.values
    page = alice_client.get(r.url).content.decode()
    assert "Preset “five epochs” loaded" in page
    assert re.search(r'name="t_epochs" value="5"', page) and re.search(r'name="best_of" value="2"', page)
    # Saved again under the same name: replaced. Bad settings: not saved.
    alice_client.post(save, form_post(world, t_epochs="6", preset_name="five epochs"))
    assert AbsorbPreset.objects.get().values["t_epochs"] == "6"
    r = alice_client.post(save, form_post(world, t_learning_rate="-1", preset_name="broken"))
    assert r.status_code == 400 and "The preset was not saved" in r.content.decode()
    r = alice_client.post(save, form_post(world, preset_name=""))
    assert r.status_code == 400 and AbsorbPreset.objects.count() == 1
    # Another project sees none of it.
    bob = bob_client_of()
    assert bob.get(reverse("job_list", args=[slug]) + f"?preset={preset.pk}").status_code == 404
    bobs = bob.get(reverse("job_list", args=["bravo"]) + f"?preset={preset.pk}")
    assert bobs.status_code == 404
    delete = reverse("absorb_preset_delete", args=[slug, preset.pk])
    assert bob.post(delete).status_code == 404 and AbsorbPreset.objects.exists()
    assert (
        alice_client.get(reverse("job_list", args=[slug]) + "?preset=99999999999999999999").status_code == 404
    )
    assert alice_client.post(delete).status_code == 302 and not AbsorbPreset.objects.exists()


# --- start again ---------------------------------------------------------------------------------


def test_a_finished_run_starts_again_with_its_own_settings(world, alice_client, bob_client_of, settings):
    slug = world["project"].slug
    post = form_post(
        world,
        mode="absorb",
        best_of="2",
        g_stop="###",
        t_epochs="3",
        t_target_modules="q_proj,v_proj",
        eval_auto="off",
        keep_existing=None,
    )
    r = alice_client.post(reverse("absorb_start", args=[slug]), post)
    teacher, finetune = Job.objects.get(kind="teacher"), Job.objects.get(kind="finetune")
    # By default the teacher first writes questions about the prompt: the form lands on that job.
    synthesis = teacher.depends_on
    assert synthesis.kind == "synthesize" and synthesis.params["count"] == 120
    assert r.status_code == 302 and r.url == synthesis.get_absolute_url()
    assert synthesis.dataset_version == world["data"] and teacher.dataset_version is None
    for job in (synthesis, teacher):  # the teacher's data is not there yet
        assert alice_client.get(job.get_absolute_url()).status_code == 200
    teacher.fail("stopped for the test")
    finetune.refresh_from_db()
    page = alice_client.get(finetune.get_absolute_url()).content.decode()
    assert 'id="start-again"' in page and f"?from_job={finetune.pk}" in page
    page = alice_client.get(reverse("job_list", args=[slug]) + f"?from_job={finetune.pk}").content.decode()
    assert f"The settings of {finetune} are loaded" in page
    # The form as loaded, posted again, asks for the very same work.
    form = AbsorbForm(world["project"], initial=initial_from_job(finetune))
    again = {}
    for name in form.fields:
        value = form[name].value()
        if value is None or value is False or value == "" or name == "form_token":
            continue
        again[name] = "on" if value is True else value
    assert alice_client.post(reverse("absorb_start", args=[slug]), again).status_code == 302
    teacher2 = Job.objects.filter(kind="teacher").latest("pk")
    finetune2 = Job.objects.filter(kind="finetune").latest("pk")
    assert teacher2.pk != teacher.pk and teacher2.depends_on.dataset_version == world["data"]
    assert teacher2.params[fingerprints.KEY] == teacher.params[fingerprints.KEY]
    assert finetune2.params[fingerprints.KEY] == finetune.params[fingerprints.KEY]
    assert finetune2.params["eval"] == {"auto": False, "max_new_tokens": settings.EVAL_MAX_NEW_TOKENS}
    assert (
        bob_client_of().get(reverse("job_list", args=[slug]) + f"?from_job={finetune.pk}").status_code == 404
    )


# --- in a browser --------------------------------------------------------------------------------


def test_the_form_previews_as_it_changes_and_keeps_a_preset(page, world):
    from playwright.sync_api import expect

    from tests.test_ui_walk import log_in, watch

    expect.set_options(timeout=20_000)  # each preview counts tokens on a busy two-core box
    problems = watch(page)
    log_in(page)
    page.goto(reverse("job_list", args=[world["project"].slug]))
    command = page.locator("#preview-command")
    expect(command).to_contain_text("manage.py absorb --project alpha --prompt support@1 --dataset faq@1")
    expect(page.locator("#preview-estimate")).to_contain_text("default guess")
    before = page.locator("#preview-total").inner_text()
    page.locator("summary", has_text="Training").click()
    page.locator("#id_t_epochs").fill("6")
    page.locator("#id_t_epochs").dispatch_event("change")
    expect(command).to_contain_text("--epochs 6")
    expect(page.locator("#preview-spec")).to_contain_text("epochs: 6")
    assert page.locator("#preview-total").inner_text() != before
    page.locator("#id_preset_name").fill("six epochs")
    page.get_by_role("button", name="Save preset").click()
    expect(page.locator("#absorb-loaded")).to_contain_text("Preset “six epochs” loaded")
    expect(page.locator("#id_t_epochs")).to_have_value("6")
    expect(page.locator("#absorb-presets")).to_contain_text("six epochs")
    expect(command).to_contain_text("--epochs 6")
    page.goto(reverse("job_list", args=[world["project"].slug]))
    expect(page.locator("#id_t_epochs")).to_have_value("4")
    page.locator("#absorb-presets").get_by_role("link", name="six epochs").click()
    expect(page.locator("#id_t_epochs")).to_have_value("6")
    expect(command).to_contain_text("--epochs 6")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert not problems, problems
