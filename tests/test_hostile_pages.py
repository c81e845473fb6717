"""Hostile and careless input on the pages: forged ids are a 400 that names
them (never a 500), pages read one page of rows and never the large texts
they do not show, and a form posted twice (reload, Back, double click) does
its work once."""

from __future__ import annotations

import io
import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from evals import actions as eval_actions
from evals.models import ArmComparison, EvalExample, EvalResult, EvalRun
from jobs.models import Job
from serving.models import Alias, ApiKey, RequestLog
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

pytestmark = pytest.mark.django_db

HUGE = "99999999999999999999"
RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"}]


@pytest.fixture
def world(alice, alice_project):
    base = FoundationModel.objects.create(name="m", path="/m")
    prompt = save_prompt(alice_project, alice, "support", "Start every answer with Hello.", RULES).version
    rows = "\n".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Hello, answer {i}."},
                ]
            }
        )
        for i in range(16)
    )
    data = import_dataset(
        alice_project, alice, "faq", io.BytesIO(rows.encode()), filename="faq.jsonl", eval_percent=25
    )
    return {"project": alice_project, "user": alice, "base": base, "prompt": prompt, "data": data}


def two_runs(world, examples: int = 4):
    suite = eval_actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    have = suite.examples.count()
    EvalExample.objects.bulk_create(
        [
            EvalExample(
                suite=suite, index=i, source_index=i, messages=[{"role": "user", "content": f"Extra {i}?"}]
            )
            for i in range(have, examples)
        ]
    )
    runs = EvalRun.objects.bulk_create(
        [
            EvalRun(
                project=world["project"], suite=suite, base_model=world["base"], summary={"complete": True}
            )
            for _ in range(2)
        ]
    )
    # Run A fails the greeting on every third example; B passes everywhere.
    EvalResult.objects.bulk_create(
        [
            EvalResult(
                run=run,
                example=ex,
                output=f"answer {ex.index} of run {run.pk}",
                checks={"rule:greeting": 0.0 if run == runs[0] and ex.index % 3 == 0 else 1.0},
            )
            for run in runs
            for ex in suite.examples.all()
        ]
    )
    return suite, runs


# --- item 9: forged ids are a 400 ------------------------------------------------------------


def test_the_rate_form_refuses_ids_that_are_not_ids(world, alice_client):
    suite, (a, b) = two_runs(world)
    example = suite.examples.first()
    url = reverse("rate", args=[world["project"].slug, suite.pk])
    for query, field in (
        (f"?a=abc&b={b.pk}", "run a"),
        (f"?a={a.pk}&b={HUGE}", "run b"),
        (f"?a=-3&b={b.pk}", "run a"),
        ("", "run a"),
    ):
        r = alice_client.post(url + query, {"example": example.pk, "choice": "a"})
        assert r.status_code == 400 and field in r.content.decode(), (query, r.content)
    for bad in ("abc", HUGE, "1e3"):
        r = alice_client.post(url + f"?a={a.pk}&b={b.pk}", {"example": bad, "choice": "a"})
        assert r.status_code == 400 and "example" in r.content.decode().lower(), (bad, r.content)
    ok = alice_client.post(url + f"?a={a.pk}&b={b.pk}", {"example": example.pk, "choice": "a"})
    assert ok.status_code == 302


def test_the_comparison_form_refuses_ids_that_are_not_ids(world, alice_client):
    url = reverse("comparison_start", args=[world["project"].slug])
    for bad in ("abc", HUGE, "", "-1"):
        r = alice_client.post(url, {"variant": bad})
        assert r.status_code == 400 and "variant" in r.content.decode().lower(), (bad, r.content)
    assert not ArmComparison.objects.exists() and not Job.objects.exists()


def test_capture_refuses_ids_that_are_not_ids(world, alice_client):
    alias = Alias.objects.create(project=world["project"], name="production", log_requests=True)
    entry = RequestLog.objects.create(
        project=world["project"],
        alias=alias,
        model="alpha/production",
        request={"messages": [{"role": "user", "content": "hi"}]},
        response={"choices": [{"message": {"role": "assistant", "content": "Hello"}}]},
    )
    url = reverse("request_capture", args=[world["project"].slug])
    for data, named in (
        ({"log": [str(entry.pk), HUGE], "name": "caught"}, "Selected request"),
        ({"log": ["abc"], "name": "caught"}, "Selected request"),
        ({"log": [str(entry.pk)], "dataset": HUGE}, "Dataset"),
        ({"log": [str(entry.pk)], "dataset": "x1"}, "Dataset"),
    ):
        r = alice_client.post(url, data)
        assert r.status_code == 400 and named in r.content.decode(), (data, r.content)
    assert RequestLog.objects.get().captured_into is None  # nothing half-done
    ok = alice_client.post(url, {"log": [str(entry.pk)], "name": "caught"})
    assert ok.status_code == 302 and RequestLog.objects.get().captured_into is not None


# --- item 12: no large texts, one page of rows ------------------------------------------------


def test_the_variants_page_does_not_read_prompt_texts(world, alice_client):
    big = "You are Acme's assistant. " + "Be kind. " * 100_000  # ~0.9 MB
    old = world["prompt"]
    new = save_prompt(world["project"], world["user"], "support", big).version
    Variant.objects.create(
        project=world["project"],
        name="student",
        base_model=world["base"],
        adapter_path="/a",
        prompt_version=old,
        dataset_version=world["data"],
    )
    with CaptureQueriesContext(connection) as queries:
        page = alice_client.get(reverse("serving_variants", args=[world["project"].slug]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "student" in html and str(new) in html  # the lineage still names the newer prompt version
    reads_text = [q["sql"] for q in queries if re.search(r'"workbench_promptversion"\."text"', q["sql"])]
    assert not reads_text, reads_text[0][:300]
    assert len(page.content) < 200_000


def test_side_by_side_reads_one_page_and_counts_in_sql(world, alice_client):
    suite, (a, b) = two_runs(world, examples=65)
    url = reverse("side_by_side", args=[world["project"].slug, suite.pk])
    with CaptureQueriesContext(connection) as queries:
        page = alice_client.get(url, {"a": a.pk, "b": b.pk, "page": 2})
    html = page.content.decode()
    assert page.status_code == 200 and "page 2 of 4" in html
    assert (
        html.count('name="choice" value="a"') == 20
        and "answer 20 of run" in html
        and "answer 40 " not in html
    )
    outputs = [q["sql"] for q in queries if '"evals_evalresult"."output"' in q["sql"]]
    assert outputs and all('"example_id" IN (' in sql for sql in outputs)
    assert all(sql.split('"example_id" IN (')[1].split(")")[0].count(",") < 20 for sql in outputs)

    # The filters run in SQL too: 22 of the 65 examples fail the greeting in run A.
    page = alice_client.get(url, {"a": a.pk, "b": b.pk, "only": "fail:rule:greeting"}).content.decode()
    assert "page 1 of 2" in page and page.count('name="choice" value="a"') == 20
    page = alice_client.get(url, {"a": a.pk, "b": b.pk, "only": "disagree", "page": 2}).content.decode()
    assert "page 2 of 2" in page and page.count('name="choice" value="a"') == 2
    assert "answer 63 of run" in page


# --- item 14: POST/redirect/GET and form tokens -------------------------------------------------


def form_token(html: str) -> str:
    return re.search(r'name="form_token" value="([0-9a-f-]{36})"', html).group(1)


def test_posting_the_key_form_twice_makes_one_key(world, alice_client):
    url = reverse("serving_keys", args=[world["project"].slug])
    token = form_token(alice_client.get(url).content.decode())
    first = alice_client.post(url, {"name": "ci", "form_token": token})
    again = alice_client.post(url, {"name": "ci", "form_token": token})  # Back + resubmit, or a double click
    assert first.status_code == again.status_code == 302
    assert ApiKey.objects.count() == 1
    page = alice_client.get(url).content.decode()
    assert "shown this once" in page and "already submitted" in page
    assert alice_client.get(url).content.decode().count('id="raw-key"') == 0  # a reload shows it no more
    assert ApiKey.objects.count() == 1


def test_posting_the_absorb_form_twice_starts_one_job(world, alice_client):
    from jobs.forms import AbsorbForm

    page = alice_client.get(reverse("job_list", args=[world["project"].slug])).content.decode()
    token = form_token(page)
    form = AbsorbForm(world["project"])
    post = {
        name: ("on" if value is True else value)
        for name in form.fields
        if (value := form[name].value()) is not None and value is not False and value != ""
    }
    post.update(
        prompt_version=world["prompt"].pk,
        dataset_version=world["data"].pk,
        base_model=world["base"].pk,
        mode="absorb",
        form_token=token,
    )
    url = reverse("absorb_start", args=[world["project"].slug])
    first = alice_client.post(url, post)
    assert first.status_code == 302, re.findall(r"field-error[^<]*", first.content.decode())
    first_job = Job.objects.get(kind="teacher").depends_on  # the synthesis job the teacher waits for
    again = alice_client.post(url, post, follow=True)
    assert again.redirect_chain[0] == (first_job.get_absolute_url(), 302)
    assert "already submitted" in again.content.decode()
    assert (
        Job.objects.filter(kind="synthesize").count() == 1
        and Job.objects.filter(kind="teacher").count() == 1
        and Job.objects.filter(kind="finetune").count() == 1
    )
    # A new form (a new token) is a new absorb.
    post["form_token"] = form_token(
        alice_client.get(reverse("job_list", args=[world["project"].slug])).content.decode()
    )
    assert alice_client.post(url, post).status_code == 302 and Job.objects.filter(kind="teacher").count() == 2


def test_posting_the_eval_forms_twice_starts_one_run_and_one_comparison(world, alice_client):
    suite = eval_actions.create_suite(
        world["project"], world["user"], "held out", world["data"], prompt_version=world["prompt"]
    )
    token = form_token(alice_client.get(reverse("evals_home", args=[world["project"].slug])).content.decode())
    url = reverse("runs_start", args=[world["project"].slug])
    post = {"suite": suite.pk, "base_models": [world["base"].pk], "form_token": token}
    assert alice_client.post(url, post).status_code == 302
    assert alice_client.post(url, post).status_code == 302
    assert EvalRun.objects.count() == 1 and Job.objects.filter(kind="eval").count() == 1

    variant = Variant.objects.create(
        project=world["project"],
        name="student",
        base_model=world["base"],
        adapter_path="/a",
        prompt_version=world["prompt"],
        dataset_version=world["data"],
    )
    url = reverse("comparison_start", args=[world["project"].slug])
    post = {"variant": variant.pk, "form_token": "0f8b8c1e-7d3a-4f1e-9a55-2b7c6d1e0a42"}
    first = alice_client.post(url, post)
    again = alice_client.post(url, post)
    comparison = ArmComparison.objects.get()
    assert first["Location"] == again["Location"] == comparison.get_absolute_url()
