"""The project dashboard (issue 23): counts that do not take a base model for
a fine-tune, panels of what each alias serves and since when, the latest
four-arm result per variant, active jobs with progress, the engine, and the
next step as the project's state changes; the Models & serving page's engine
and the registration of a model folder. Another team's data never shows."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from playwright.sync_api import expect
from safetensors.numpy import save_file

from evals.actions import create_suite
from evals.models import ArmComparison
from jobs.models import Job
from serving import actions
from serving.engine_client import EngineClient
from serving.models import Alias
from serving.overview import next_step
from tests.conftest import build_random_lora
from tests.processes import REPO
from tests.test_ui_walk import log_in, watch
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"}]
QUERIES = "\n".join(f"How do I reset my {thing}?" for thing in ("password", "account", "order", "invoice"))
HEADLINE = {
    "metric": "all_rules",
    "retained": {"value": 0.8125, "low": 0.61, "high": 0.97, "n": 24},
    "tokens_saved_per_1000": 412000,
}


def panels(client, project) -> str:
    r = client.get(reverse("overview_panels", args=[project.slug]), headers={"HX-Request": "true"})
    assert r.status_code == 200
    return r.content.decode()


def step_of(project) -> str:
    return next_step(project).key


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_world(user, project, base, *, adapter_path="/adapters/a", name="absorbed-a"):
    prompt = save_prompt(project, user, "support", "Start with Hello.", RULES).version
    data = import_dataset(
        project, user, "queries", io.BytesIO(QUERIES.encode()), filename="q.txt", eval_percent=50
    )
    variant = Variant.objects.create(
        project=project,
        name=name,
        base_model=base,
        adapter_path=str(adapter_path),
        prompt_version=prompt,
        dataset_version=data,
    )
    return prompt, data, variant


@pytest.fixture
def base(db):
    return FoundationModel.objects.create(name="tiny-base", path="/models/tiny", is_default=True)


# --- counts --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_counts_fine_tuned_variants_and_not_the_base(alice_client, alice, alice_project, base):
    actions.ensure_base_variants(alice_project)  # the base, served as it is: a variant, not a fine-tune
    prompt, _data, _variant = make_world(alice, alice_project, base)
    Variant.objects.create(
        project=alice_project,
        name="base + prompt",
        base_model=base,
        prompt_version=prompt,
        prepend_prompt=True,
    )
    assert alice_project.variants.count() == 3
    r = alice_client.get(reverse("project_detail", args=[alice_project.slug]))
    body = r.content.decode()
    assert r.context["finetuned"] == 1
    assert "<b>1</b><span>fine-tuned variant</span>" in body
    assert "coming next" not in body
    assert f'hx-get="{reverse("overview_panels", args=[alice_project.slug])}"' in body


# --- panels ----------------------------------------------------------------------------------


@pytest.fixture
def alpha(alice, alice_project, base):
    """A project with a served variant, its four-arm result and a running fine-tune."""
    prompt, data, variant = make_world(alice, alice_project, base)
    suite = create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    ArmComparison.objects.create(project=alice_project, suite=suite, variant=variant, headline=HEADLINE)
    actions.ensure_default_aliases(alice_project)
    production = Alias.objects.get(project=alice_project, name="production")
    move = actions.promote(alice, production, variant)
    running = Job.objects.create(
        project=alice_project,
        kind="finetune",
        status=Job.RUNNING,
        progress={"done": 30, "total": 75, "unit": "steps", "eta_seconds": 90.0},
    )
    queued = Job.objects.create(project=alice_project, kind="teacher")
    return {"variant": variant, "suite": suite, "move": move, "running": running, "queued": queued}


@pytest.mark.django_db
def test_each_panel_shows_what_the_project_holds(alice_client, alice_project, alpha, settings):
    settings.ENGINE_URL = f"http://127.0.0.1:{closed_port()}"
    body = panels(alice_client, alice_project)
    # what each alias serves, and since when
    aliases = body[body.index('id="overview-aliases"') : body.index('id="overview-results"')]
    production = aliases[aliases.index("<b>production</b>") : aliases.index("<b>staging</b>")]
    assert "absorbed-a" in production
    assert f'title="{alpha["move"].created_at:%Y-%m-%d %H:%M}"' in production
    assert "nothing yet" in aliases[aliases.index("<b>staging</b>") :]
    # the latest four-arm result per variant
    results = body[body.index('id="overview-results"') : body.index('id="overview-jobs"')]
    assert "<b>0.81</b>" in results and "95% CI [0.61, 0.97]" in results and "412,000" in results
    assert "held out" in results
    # running and queued jobs with their progress, polled while they last
    jobs = body[body.index('id="overview-jobs"') :]
    assert f"Fine-tune #{alpha['running'].pk}" in jobs and "40% · 30 of 75 steps · about 90 s left" in jobs
    assert f"Teacher generation #{alpha['queued'].pk}" in jobs and "waiting for a worker" in jobs
    assert jobs.index("Fine-tune") < jobs.index("Teacher generation")
    assert f'hx-get="{reverse("overview_jobs", args=[alice_project.slug])}" hx-trigger="every 3s"' in body
    # the engine is asked by its own fragment
    assert f'hx-get="{reverse("overview_engine", args=[alice_project.slug])}"' in body


@pytest.mark.django_db
def test_the_jobs_panel_stops_polling_and_refreshes_the_dashboard_when_jobs_end(
    alice_client, alice_project, alpha
):
    url = reverse("overview_jobs", args=[alice_project.slug])
    r = alice_client.get(url, headers={"HX-Request": "true"})
    assert "hx-trigger" in r.content.decode() and "HX-Trigger" not in r
    alpha["running"].succeed()
    alpha["queued"].request_cancel()
    r = alice_client.get(url, headers={"HX-Request": "true"})
    body = r.content.decode()
    assert r.status_code == 200 and "No job is running or queued." in body and "hx-get" not in body
    assert r["HX-Trigger"] == "overview-changed"


@pytest.mark.django_db
def test_another_projects_data_never_shows(alice_client, alice_project, alpha, bob, bob_project, settings):
    settings.ENGINE_URL = f"http://127.0.0.1:{closed_port()}"
    bob_base = FoundationModel.objects.get(name="tiny-base")
    _p, _d, secret = make_world(bob, bob_project, bob_base, name="bravo-secret-variant")
    Job.objects.create(project=bob_project, kind="finetune", status=Job.RUNNING)
    ArmComparison.objects.create(
        project=bob_project,
        suite=create_suite(bob_project, bob, "bravo suite", secret.dataset_version),
        variant=secret,
        headline={"retained": {"value": 0.123}},
    )
    actions.ensure_default_aliases(bob_project)
    actions.promote(bob, Alias.objects.get(project=bob_project, name="staging"), secret)
    body = panels(alice_client, alice_project)
    assert "bravo" not in body.lower() and "0.12" not in body
    assert body.count('overview-job"') == 2  # alice's two jobs, not bob's
    for name in ("overview_panels", "overview_jobs", "overview_engine"):
        assert alice_client.get(reverse(name, args=[bob_project.slug])).status_code == 404
    assert Client().get(reverse("overview_panels", args=[alice_project.slug])).status_code == 302


# --- the next step -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_next_step_follows_the_projects_state(alice_client, alice, alice_project, base):
    project = alice_project
    assert step_of(project) == "prompt"
    assert 'href="{}"'.format(reverse("prompt_list", args=[project.slug])) in panels(alice_client, project)
    prompt = save_prompt(project, alice, "support", "Start with Hello.", RULES).version
    assert step_of(project) == "data"
    data = import_dataset(
        project, alice, "q", io.BytesIO(QUERIES.encode()), filename="q.txt", eval_percent=50
    )
    assert step_of(project) == "absorb"
    teacher = Job.objects.create(project=project, kind="teacher", status=Job.RUNNING)
    step = next_step(project)
    assert step.key == "wait" and step.url == teacher.get_absolute_url()
    teacher.succeed(output_dataset=data)
    step = next_step(project)
    assert step.key == "review" and step.url == reverse(
        "dataset_review", args=[project.slug, data.dataset_id, 1]
    )
    Job.objects.create(project=project, kind="finetune", status=Job.FAILED)
    assert step_of(project) == "absorb"

    variant = Variant.objects.create(
        project=project, name="absorbed", base_model=base, adapter_path="/a", prompt_version=prompt
    )
    assert step_of(project) == "evaluate"
    suite = create_suite(project, alice, "held out", data, prompt_version=prompt)
    evaluating = Job.objects.create(project=project, kind="eval", status=Job.RUNNING)
    comparison = ArmComparison.objects.create(project=project, suite=suite, variant=variant, job=evaluating)
    assert step_of(project) == "wait"
    evaluating.succeed()
    assert step_of(project) == "evaluate"  # ended without a headline
    comparison.headline = HEADLINE
    comparison.save()

    step = next_step(project)
    assert step.key == "promote" and "staging" in step.title
    assert (
        step.url == reverse("serving_promote", args=[project.slug]) + f"?alias=staging&variant={variant.pk}"
    )
    staging = Alias.objects.get(project=project, name="staging")
    actions.update_gate(
        alice,
        staging,
        gating_suite=suite,
        min_all_rules=0.9,
        min_retained_lower=None,
        max_regression=None,
        log_requests=False,
    )
    step = next_step(project)
    assert step.key == "improve" and "no finished eval run" in step.text
    actions.promote(alice, staging, variant, force=True, reason="a demo")
    step = next_step(project)
    assert step.key == "promote" and "production" in step.title
    actions.promote(alice, Alias.objects.get(project=project, name="production"), variant)
    assert step_of(project) == "call"
    actions.create_api_key(alice, project, "ci")
    step = next_step(project)
    assert step.key == "done" and step.url == reverse("playground", args=[project.slug])
    assert 'data-step="done"' in panels(alice_client, project)

    another = Job.objects.create(project=project, kind="finetune", status=Job.RUNNING)
    assert step_of(project) == "done"  # a second round training does not hide the first's next step
    newer = save_prompt(project, alice, "support", "Start with Hello. Be brief.", RULES).version
    assert next_step(project).url == another.get_absolute_url()  # stale, and the next round runs
    another.fail("out of memory")
    step = next_step(project)
    assert step.key == "reabsorb" and f"prompt_version={newer.pk}" in step.url


# --- the engine --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_with_no_engine_running_the_panels_say_so(alice_client, alice_project, settings, alice):
    settings.ENGINE_URL = f"http://127.0.0.1:{closed_port()}"
    for url in (reverse("overview_engine", args=[alice_project.slug]), reverse("engine_status")):
        r = alice_client.get(url, headers={"HX-Request": "true"})
        body = r.content.decode()
        assert r.status_code == 200 and "not reachable" in body and "No inference engine answers" in body
        assert settings.ENGINE_URL not in body  # the address is for administrators
    alice.is_staff = True
    alice.save()
    assert settings.ENGINE_URL in alice_client.get(reverse("engine_status")).content.decode()


@pytest.fixture(scope="module")
def lora_dir(lively_dir, tmp_path_factory):
    return build_random_lora(lively_dir, tmp_path_factory.mktemp("dash-lora"))


@pytest.mark.slow
@pytest.mark.django_db
def test_the_engine_panels_show_bases_adapters_and_the_queue(
    alice_client, alice, alice_project, bob, bob_project, engine, lively_dir, lora_dir
):
    base = FoundationModel.objects.create(name="tiny-lively", path=str(lively_dir), is_default=True)
    _p, _d, mine = make_world(alice, alice_project, base, adapter_path=lora_dir, name="alpha-adapter")
    _p, _d, theirs = make_world(bob, bob_project, base, adapter_path=lora_dir, name="bravo-adapter")
    client = EngineClient(engine.url, timeout=60)
    client.ensure_loaded(mine)
    client.ensure_loaded(theirs)
    status = client.status()
    assert status.reachable and status.bases == ["tiny-lively"] and status.queued == 0
    assert status.adapters == {mine.engine_model: "tiny-lively", theirs.engine_model: "tiny-lively"}

    body = alice_client.get(reverse("overview_engine", args=[alice_project.slug])).content.decode()
    assert "running" in body and "<b>0</b> requests waiting" in body and "<b>tiny-lively</b>" in body
    assert "alpha-adapter" in body and "bravo" not in body
    assert "1 more adapter of other projects loaded" in body
    body = alice_client.get(reverse("engine_status")).content.decode()
    assert f"{alice_project.name}</a> / " in body and "alpha-adapter" in body and "bravo" not in body
    client.close()


def test_the_status_reads_vllms_queue_from_its_metrics():
    from serving.engine_client import VLLM_WAITING

    metrics = (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
    )
    assert [float(v) for v in VLLM_WAITING.findall(metrics)] == [3.0]


# --- registering a model folder ------------------------------------------------------------------


def model_folder(root: Path, name: str = "tiny-folder", **changes) -> Path:
    """A small but real Hugging Face folder: config, safetensors weights, tokenizer files."""
    folder = root / name
    folder.mkdir(parents=True)
    config = changes.get("config", {"model_type": "llama"})
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if changes.get("weights", "safetensors") == "safetensors":
        save_file(
            {"w": np.zeros((4, 8), dtype=np.float32), "b": np.zeros(8, dtype=np.float32)},
            folder / "model.safetensors",
        )
    else:
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    if changes.get("tokenizer", True):
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def admin_client(client, alice):
    alice.is_staff = True
    alice.save()
    client.force_login(alice)
    return client


@pytest.fixture
def models_root():
    root = Path(settings.MODELS_DIR) / "dashboard-test"
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.django_db
def test_an_administrator_registers_a_model_folder(admin_client, models_root):
    folder = model_folder(models_root)
    r = admin_client.post(reverse("model_register"), {"path": str(folder), "name": "", "default": "on"})
    assert r.status_code == 302
    model = FoundationModel.objects.get()
    assert (model.name, model.path, model.parameters, model.is_default) == (
        "tiny-folder",
        str(folder),
        40,
        True,
    )
    page = admin_client.get(reverse("models")).content.decode()
    assert "tiny-folder" in page and 'id="register-model"' in page
    r = admin_client.post(reverse("model_register"), {"path": str(folder), "name": "again"})
    assert r.status_code == 400 and "already registered as “tiny-folder”" in r.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case, says",
    [
        ("outside", "is outside the folders models are registered from"),
        ("relative", "is not a full path"),
        ("missing", "There is no folder"),
        ("file", "is a file, not a model folder"),
        ("no config", "has no config.json"),
        ("bad config", "is not a readable JSON file"),
        ("not a model", "names no model_type"),
        ("remote code", "never runs"),
        ("pickled", "only pickled .bin/.pt weights"),
        ("no tokenizer", "has no complete tokenizer"),
        ("link out", "is outside the folders"),
        ("bad name", "cannot name a base model"),
        ("damaged", "cannot be read as safetensors"),
        ("empty", "Give the folder of the model on the server."),
    ],
)
def test_a_bad_model_folder_is_a_400_that_says_what(admin_client, models_root, tmp_path, case, says):
    name = ""
    if case == "outside":
        path = str(model_folder(tmp_path))
    elif case == "relative":
        path = "models/tiny"
    elif case == "missing":
        path = str(models_root / "nothing-here")
    elif case == "file":
        models_root.mkdir(parents=True)
        (models_root / "f.txt").write_text("x")
        path = str(models_root / "f.txt")
    elif case == "no config":
        folder = model_folder(models_root)
        (folder / "config.json").unlink()
        path = str(folder)
    elif case == "bad config":
        path = str(model_folder(models_root, config="not json"))
    elif case == "not a model":
        path = str(model_folder(models_root, config='["a list"]'))
    elif case == "remote code":
        path = str(model_folder(models_root, config={"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    elif case == "pickled":
        path = str(model_folder(models_root, weights="bin"))
    elif case == "no tokenizer":
        path = str(model_folder(models_root, tokenizer=False))
    elif case == "link out":
        models_root.mkdir(parents=True)
        (models_root / "link").symlink_to(model_folder(tmp_path))
        path = str(models_root / "link")
    elif case == "bad name":
        path, name = str(model_folder(models_root)), "../evil name"
    elif case == "damaged":
        folder = model_folder(models_root)
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
        path = str(folder)
    else:
        path = ""
    r = admin_client.post(reverse("model_register"), {"path": path, "name": name})
    assert r.status_code == 400, r.content
    assert says in r.content.decode()
    assert not FoundationModel.objects.exists()


@pytest.mark.django_db
def test_only_an_administrator_registers_a_model(alice_client, models_root):
    folder = model_folder(models_root)
    page = alice_client.get(reverse("models")).content.decode()
    assert 'id="register-model"' not in page and "an administrator registers them" in page
    r = alice_client.post(reverse("model_register"), {"path": str(folder)})
    assert r.status_code == 403 and "Only an administrator can register" in r.content.decode()
    assert not FoundationModel.objects.exists()
    assert alice_client.get(reverse("model_register")).status_code == 405


# --- in a browser --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_dashboard_and_models_pages_in_a_browser(
    page, alice, alice_project, engine, lively_dir, lora_dir
):
    alice.is_staff = True
    alice.save()
    base = FoundationModel.objects.create(
        name="tiny-lively", path=str(lively_dir), is_default=True, parameters=3_200_000
    )
    prompt, data, variant = make_world(alice, alice_project, base, adapter_path=lora_dir)
    suite = create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    ArmComparison.objects.create(project=alice_project, suite=suite, variant=variant, headline=HEADLINE)
    actions.ensure_default_aliases(alice_project)
    actions.promote(alice, Alias.objects.get(project=alice_project, name="staging"), variant)
    EngineClient(engine.url, timeout=60).ensure_loaded(variant)
    Job.objects.create(
        project=alice_project,
        kind="finetune",
        status=Job.RUNNING,
        progress={"done": 30, "total": 75, "unit": "steps", "eta_seconds": 90.0},
    )
    problems = watch(page)
    log_in(page)
    page.goto(reverse("project_detail", args=[alice_project.slug]))
    expect(page.locator("#next-step")).to_contain_text("Promote absorbed-a to production")
    expect(page.locator("#overview-aliases")).to_contain_text("absorbed-a")
    expect(page.locator("#overview-results")).to_contain_text("0.81")
    expect(page.locator("#overview-jobs")).to_contain_text("30 of 75 steps")
    expect(page.locator("#engine-state")).to_contain_text("running")
    expect(page.locator("#engine-models")).to_contain_text("absorbed-a")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    page.goto(reverse("models"))
    expect(page.locator("#engine-models")).to_contain_text("absorbed-a")
    assert problems == []
    page.locator("#register-model summary").click()
    page.get_by_label("Path").fill("/nowhere/model")
    page.get_by_role("button", name="Register").click()
    expect(page.locator("#id_path_helptext")).to_contain_text(
        "is outside the folders models are registered from"
    )
    expect(page.locator("#engine-models")).to_contain_text("absorbed-a")
    page.screenshot(path=str(SCREENSHOTS / "models.png"), full_page=True)
    assert all("400" in p for p in problems), problems  # only the refusal it was asked for
