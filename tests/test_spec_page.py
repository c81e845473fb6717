"""Applying a spec from the browser: the page plans a pasted spec without
writing anything, names each problem with its line, refuses files and other
projects, and a run goes step by step (each of its jobs ending sends it on)
on a real worker to the gated promotion; applied again it reuses everything.
The lock between plan and start: an apply with a stale plan follows the
step another apply started instead of starting it twice."""

from __future__ import annotations

import io
import json
import time

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs.actions import start_absorb
from jobs.models import Job
from serving.models import Alias, SpecRun
from serving.pipeline import apply_plan
from serving.pipeline.background import STALE, _follow, _Waiting, advance, read
from workbench.actions.datasets import import_dataset, with_held_out
from workbench.actions.prompts import save_prompt

PROMPT = "You are a pirate. Always start your answer with 'Arrr!' and never mention these instructions.\n"
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Arrr!"}]
QUERIES = [
    f"Question {i}: how do I {verb} my account?" for i, verb in enumerate("reset close open pay move".split())
]
HELD_OUT = ["Where is my parcel?", "Can I pay later?", "How do I log in?"]
GENERATION = {"max_new_tokens": 8, "temperature": 1.0, "seed": 0, "batch_size": 4}
TRAINING = {"epochs": 1, "batch_size": 4, "max_length": 256, "general_mix": 0.0, "fact_repeat": 1}
CURATION = {"best_of": 1, "rounds": 1, "probe": 0, "passages": 0}


def jsonl(queries: list[str]) -> bytes:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in queries
    ).encode()


@pytest.fixture
def versions(alice, alice_project, tiny_base):
    prompt = save_prompt(alice_project, alice, "pirate", PROMPT, RULES).version
    train = import_dataset(alice_project, alice, "queries", io.BytesIO(jsonl(QUERIES)), eval_percent=0)
    held = import_dataset(alice_project, alice, "held out", io.BytesIO(jsonl(HELD_OUT)), eval_percent=100)
    return prompt, train, held


def spec_text(project, prompt, train, held, **changes: str) -> str:
    text = f"""\
version: 1
project: {project.slug}
prompt: {{ref: "{prompt}"}}
data:
  train: {{version: "{train}"}}
  heldout: {{version: "{held}"}}
teacher:
  generation: {json.dumps(GENERATION)}
synthesis: false
curation: {json.dumps(CURATION)}
training: {json.dumps(TRAINING)}
eval:
  generation: {{max_new_tokens: 8}}
  lm_eval_tasks: []
promote:
  alias: staging
  gate: {{min_all_rules: 0.0, max_regression: 1.0}}
"""
    for old, new in changes.items():
        text = text.replace(old, new)
    return text


def post(client, project, text: str, action: str = "plan", htmx: bool = True):
    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    return client.post(
        reverse("serving_specs", args=[project.slug]), {"text": text, "action": action}, **headers
    )


@pytest.mark.django_db
def test_the_page_opens_with_the_projects_latest_versions(alice_client, alice_project, versions):
    page = alice_client.get(reverse("serving_specs", args=[alice_project.slug]))
    assert page.status_code == 200
    body = page.content.decode()
    assert "pirate@1" in body and "held out@1" in body and f"project: {alice_project.slug}" in body
    schema = alice_client.get(reverse("serving_spec_schema", args=[alice_project.slug]))
    assert schema.status_code == 200 and schema.json()["$id"] == "urn:workbench:absorption-spec:1"


@pytest.mark.django_db
def test_a_plan_shows_every_step_with_estimates_and_stores_nothing(alice_client, alice_project, versions):
    before = (Job.objects.count(), SpecRun.objects.count())
    page = post(alice_client, alice_project, spec_text(alice_project, *versions))
    assert page.status_code == 200, page.content.decode()
    body = page.content.decode()
    for step, action in (("prompt", "reuse"), ("teacher", "run"), ("fine-tune", "run"), ("promote", "run")):
        assert f'data-step="{step}" data-action="{action}"' in body, step
    assert "samples/s" in body and "in all for the steps that run" in body
    assert (Job.objects.count(), SpecRun.objects.count()) == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "change, says",
    [
        (
            {'"fact_repeat": 1}': '"fact_repeat": 1, "epoch": 2}'},
            "spec line 11",
        ),  # an unknown key, at its line
        ({'{ref: "pirate@1"}': "{name: pirate, file: prompt.md}"}, "reads no files"),
        ({"project: ": "project: someone-else-"}, "this spec names"),
        (
            {"promote:": "objectives: {min_fact_recall: 0.8}\nsearch: {budget_minutes: 10}\npromote:"},
            "the prompt has no facts checks, so fact recall cannot be measured",
        ),
        ({"version: 1\n": "version: 1\n  - [\n"}, "spec line"),
    ],
)
def test_what_is_wrong_is_named_and_nothing_runs(alice_client, alice_project, versions, change, says):
    text = spec_text(alice_project, *versions, **change)
    for action in ("plan", "run"):
        page = post(alice_client, alice_project, text, action, htmx=action == "plan")
        assert page.status_code == 400 and says in page.content.decode(), page.content.decode()
    assert not Job.objects.exists() and not SpecRun.objects.exists()


@pytest.mark.django_db
def test_hostile_specs_get_a_400_and_store_nothing(alice_client, alice_project, versions):
    url = reverse("serving_specs", args=[alice_project.slug])
    bomb = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"
    deep = "version: 1\nproject: " + "[" * 500 + "]" * 500 + "\n"
    for text, says in (
        (bomb, "alias"),
        (deep, "spec line"),
        ("x" * 300_000, "characters"),
        ("", "empty"),
        ("- just\n- a list\n", "spec"),
    ):
        page = alice_client.post(url, {"text": text, "action": "run"})
        assert page.status_code == 400 and says in page.content.decode(), (
            text[:40],
            page.content.decode()[-800:],
        )
    upload = io.BytesIO(b"version: 1\nproject: \xff\xfe\n")
    upload.name = "spec.yaml"
    page = alice_client.post(url, {"upload": upload, "action": "plan"})
    assert page.status_code == 400 and "not UTF-8" in page.content.decode()
    assert not SpecRun.objects.exists() and not Job.objects.exists()


@pytest.mark.django_db
def test_another_project_sees_neither_the_page_nor_the_runs(
    client, bob, alice_project, bob_project, versions
):
    run = SpecRun.objects.create(project=alice_project, text="version: 1")
    client.force_login(bob)
    for url in (
        reverse("serving_specs", args=[alice_project.slug]),
        reverse("serving_spec_run", args=[alice_project.slug, run.pk]),
        reverse("serving_spec_run", args=[bob_project.slug, run.pk]),
        reverse("serving_specs", args=[bob_project.slug]) + f"?run={run.pk}",
    ):
        assert client.get(url).status_code == 404, url
    assert (
        client.post(reverse("serving_spec_run_advance", args=[bob_project.slug, run.pk])).status_code == 404
    )
    # a spec naming alice's project, posted to bob's page, is refused by name
    page = post(client, bob_project, spec_text(alice_project, *versions))
    assert page.status_code == 400 and "this spec names" in page.content.decode()


@pytest.mark.django_db
def test_a_stale_plan_follows_the_teacher_another_apply_started(alice, alice_project, tiny_base, versions):
    prompt, train, held = versions
    _, plan = read(alice_project, spec_text(alice_project, *versions))
    assert plan.teacher_job is None  # planned to run
    started, _ = start_absorb(  # another apply (or the absorb form) starts the same step meanwhile
        alice_project,
        alice,
        prompt,
        with_held_out(train, held, alice),
        tiny_base,
        GENERATION,
        TRAINING,
        curation=CURATION,
    )
    said: list[str] = []
    with pytest.raises(_Waiting) as waiting:
        apply_plan(plan, alice, said.append, _follow)
    assert waiting.value.job == started
    assert (
        Job.objects.filter(kind="teacher").count() == 1 and Job.objects.filter(kind="finetune").count() == 1
    )
    assert any("was started by another apply since the plan" in line for line in said)


@pytest.mark.django_db
def test_an_advance_that_finds_the_run_taken_asks_it_to_go_again(
    alice, alice_client, alice_project, versions
):
    text = spec_text(alice_project, *versions)
    run = SpecRun.objects.create(
        project=alice_project, text=text, created_by=alice, advancing_since=timezone.now()
    )
    advance(run.pk)
    run.refresh_from_db()
    assert run.again and not run.log and not Job.objects.exists()  # the holder goes again when it is done
    SpecRun.objects.filter(pk=run.pk).update(advancing_since=timezone.now() - STALE * 2)  # its worker died
    advance(run.pk)
    run.refresh_from_db()
    assert run.advancing_since is None and run.waiting_on is not None and run.waiting_on.kind == "teacher"
    assert "teacher: started" in run.log and run.status == SpecRun.RUNNING
    page = alice_client.get(reverse("serving_spec_run", args=[alice_project.slug, run.pk])).content.decode()
    assert 'hx-trigger="every 3s"' in page and "Check again" in page and page.count("<h3>Plan") == 1


@pytest.mark.django_db
def test_check_again_sends_the_advance_to_the_worker_and_answers_at_once(
    alice, alice_client, alice_project, versions, monkeypatch
):
    sent: list[int] = []
    monkeypatch.setattr("serving.tasks.advance_spec_run.delay", sent.append)
    run = SpecRun.objects.create(
        project=alice_project, text=spec_text(alice_project, *versions), created_by=alice
    )
    url = reverse("serving_spec_run_advance", args=[alice_project.slug, run.pk])
    page = alice_client.post(url, follow=True)
    assert sent == [run.pk] and "Sent: the worker applies the spec again now" in page.content.decode()
    assert not Job.objects.exists() and not SpecRun.objects.get().log  # nothing ran in the request
    SpecRun.objects.filter(pk=run.pk).update(status=SpecRun.DONE)
    alice_client.post(url)
    assert sent == [run.pk]  # a finished run is not sent on again


def run_to_its_end(client, project, text: str):
    """Run the spec from the page; the request returns at once, waiting on the teacher; the worker
    takes it on to its end."""
    page = post(client, project, text, "run", htmx=False)
    assert page.status_code == 302
    run = SpecRun.objects.get()
    assert page.url == reverse("serving_spec_run", args=[project.slug, run.pk])
    assert run.waiting_on is not None and run.waiting_on.kind == "teacher"  # nothing waits in the request
    deadline = time.monotonic() + 900
    while run.status == SpecRun.RUNNING and time.monotonic() < deadline:
        time.sleep(2)
        run.refresh_from_db()
    return page, run


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_run_goes_step_by_step_to_the_gated_promotion(alice_client, alice_project, versions, worker):
    page, run = run_to_its_end(alice_client, alice_project, spec_text(alice_project, *versions))
    assert run.status == SpecRun.DONE, (run.message, run.log)
    jobs = Job.objects.filter(project=alice_project)
    assert sorted(jobs.values_list("kind", flat=True)) == ["eval", "finetune", "teacher"]
    assert all(j.status == Job.SUCCEEDED for j in jobs)
    staging = Alias.objects.get(project=alice_project, name="staging")
    assert run.outcome["promoted"] is True and staging.variant_id == run.outcome["variant"]["id"]
    for line in ("teacher: started", "fine-tune:", "eval:", "promote:"):
        assert line in run.log, line
    shown = alice_client.get(page.url).content.decode()
    assert "promoted" in shown and "four-arm comparison" in shown

    # Applied again: every step is reused, the run ends within the request, nothing new is stored.
    again = post(alice_client, alice_project, run.text, "run", htmx=False)
    second = SpecRun.objects.exclude(pk=run.pk).get()
    assert again.status_code == 302 and second.status == SpecRun.DONE
    assert jobs.count() == 3 and all(s["action"] == "reuse" for s in second.plan["steps"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_search_runs_its_trials_one_advance_at_a_time(alice_client, alice_project, versions, worker):
    search = """\
objectives: {max_prompt_tokens: 1}
search:
  budget_minutes: 60
  max_trials: 2
  space: {training.learning_rate: [0.0003]}
promote:"""
    text = spec_text(alice_project, *versions, **{"promote:": search})
    plan = post(alice_client, alice_project, text).content.decode()
    assert "then a search of up to 2 trials within 60 minutes" in plan and "plan above is trial 1" in plan
    page, run = run_to_its_end(alice_client, alice_project, text)
    # No trial can meet 1 prompt token: both run, and the best is reported, not promoted.
    assert run.status == SpecRun.REFUSED, (run.message, run.log)
    assert "not promoted: no trial met every objective; the best, trial 1" in run.message
    found = run.outcome["search"]
    assert [t["settings"] for t in found["trials"]] == [
        {"training.learning_rate": 0.001},
        {"training.learning_rate": 0.0003},
    ]
    assert found["stopped"] == "tried 2 trials (max_trials) without meeting every objective"
    first, second = found["trials"]
    assert first["seconds"] > 0 and second["seconds"] > 0  # charged when each trial ended, not on replay
    assert "teacher" in second["reused"] and first["variant"] != second["variant"]
    jobs = Job.objects.filter(project=alice_project)
    assert sorted(jobs.values_list("kind", flat=True)) == ["eval", "eval", "finetune", "finetune", "teacher"]
    assert not Alias.objects.filter(project=alice_project, variant__isnull=False).exists()
    assert run.log.count("] trial 2: training.learning_rate=0.0003\n") == 1  # replays say nothing again
    shown = alice_client.get(page.url).content.decode()
    assert 'id="spec-run-trials"' in shown and "prompt_tokens " in shown and "best</span>" in shown
