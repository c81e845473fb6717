"""A request log like OpenPipe (issue 23, item 8): search and filter by
text, alias, status, latency and date (bounded, a bad value is a 400 with
the form's message), paging that keeps the filters, latency p50/p95 and
tokens per day over the matching rows, rows picked and captured as a
dataset labelled "captured", and an absorb on captured traffic that asks the
teacher again unless told to keep the served answers."""

from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from jobs import actions as job_actions
from jobs.models import Job
from serving.log_views import PAGE_SIZE, per_day
from serving.models import Alias, RequestLog
from tests.processes import REPO
from tests.test_ui_walk import log_in, watch
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import Dataset

pytestmark = pytest.mark.django_db

SCREENSHOT = REPO / "test-artifacts" / "screenshots" / "request-log.png"
DAY = datetime.datetime(2026, 3, 2, 12, 0, tzinfo=datetime.UTC)


def logged(project, alias, question, answer, *, status=200, latency=100.0, when=DAY, tokens=(10, 3)):
    response = (
        {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
        }
        if status == 200
        else {"error": {"message": answer, "type": "engine_unavailable"}}
    )
    return RequestLog.objects.create(
        project=project,
        alias=alias,
        model=f"{project.slug}/{alias.name}",
        request={"model": "x", "messages": [{"role": "user", "content": question}]},
        response=response,
        status=status,
        latency_ms=latency,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        created_at=when,
    )


@pytest.fixture
def traffic(alice_project):
    prod = Alias.objects.create(project=alice_project, name="production", log_requests=True)
    staging = Alias.objects.create(project=alice_project, name="staging", log_requests=True)
    day2 = DAY + datetime.timedelta(days=1)
    return {
        "prod": prod,
        "staging": staging,
        "order": logged(alice_project, prod, "Where is my order?", "It ships today.", latency=80),
        "refund": logged(
            alice_project, prod, "Can I get a refund?", "Yes, within 30 days.", latency=400, when=day2
        ),
        "cafe": logged(
            alice_project, staging, "Is the café open?", "Until 5 (50% off)", latency=50, when=day2
        ),
        "down": logged(alice_project, staging, "Hello?", "engine down", status=503, latency=5, when=day2),
        "limit": logged(alice_project, prod, "Again?", "too many requests", status=429, latency=1, when=day2),
    }


def listed(client, project, **query):
    r = client.get(reverse("request_log", args=[project.slug]), query)
    assert r.status_code == 200, (query, r.status_code, r.content[:2000])
    return {row.pk for row in r.context["page"].object_list}


def ids(traffic, *names):
    return {traffic[n].pk for n in names}


def test_it_filters_by_text_alias_status_latency_and_date(alice_client, alice_project, traffic):
    p, t = alice_project, traffic
    assert listed(alice_client, p) == ids(t, "order", "refund", "cafe", "down", "limit")
    assert listed(alice_client, p, q="REFUND") == ids(t, "refund")  # in the request, any case
    assert listed(alice_client, p, q="ships today") == ids(t, "order")  # in the response
    assert listed(alice_client, p, q="café") == ids(t, "cafe")  # non-ASCII
    assert listed(alice_client, p, q="50%") == ids(t, "cafe")  # plain text, not a LIKE pattern
    assert listed(alice_client, p, q="(a+)+$") == set()  # nor a regex
    assert listed(alice_client, p, alias="staging") == ids(t, "cafe", "down")
    assert listed(alice_client, p, status="ok") == ids(t, "order", "refund", "cafe")
    assert listed(alice_client, p, status="failed") == ids(t, "down", "limit")
    assert listed(alice_client, p, status="5xx") == ids(t, "down")
    assert listed(alice_client, p, status="4xx") == ids(t, "limit")
    assert listed(alice_client, p, latency_min=50, latency_max=100) == ids(t, "order", "cafe")
    assert listed(alice_client, p, date_from="2026-03-03") == ids(t, "refund", "cafe", "down", "limit")
    assert listed(alice_client, p, date_to="2026-03-02") == ids(t, "order")
    both = listed(alice_client, p, alias="production", status="ok", date_from="2026-03-03", q="refund")
    assert both == ids(t, "refund")


@pytest.mark.parametrize(
    "query,field",
    [
        ({"latency_min": "abc"}, "latency_min"),
        ({"latency_min": "-1"}, "latency_min"),
        ({"latency_max": "1e400"}, "latency_max"),
        ({"latency_max": "nan"}, "latency_max"),
        ({"latency_min": "500", "latency_max": "10"}, "latency_max"),
        ({"date_from": "2026-13-01"}, "date_from"),
        ({"date_from": "0001-01-01"}, "date_from"),
        ({"date_to": "9999-12-31"}, "date_to"),
        ({"date_from": "2026-03-05", "date_to": "2026-03-01"}, "date_to"),
        ({"q": "x" * 201}, "q"),
        ({"alias": "nobody"}, "alias"),
        ({"status": "teapot"}, "status"),
    ],
)
def test_a_bad_filter_is_a_400_that_says_what_is_wrong(alice_client, alice_project, traffic, query, field):
    r = alice_client.get(reverse("request_log", args=[alice_project.slug]), query)
    assert r.status_code == 400
    assert field in r.context["form"].errors
    assert list(r.context["page"].object_list) == []
    assert "The filters have a problem" in r.content.decode()


def test_paging_keeps_the_filters(alice_client, alice_project, traffic):
    for i in range(PAGE_SIZE + 5):
        logged(alice_project, traffic["prod"], f"bulk question {i}", "bulk answer", latency=20)
    url = reverse("request_log", args=[alice_project.slug])
    r = alice_client.get(url, {"q": "bulk", "alias": "production"})
    page = r.content.decode()
    assert "page 1 of 2" in page
    assert "?q=bulk&amp;alias=production&amp;page=2" in page
    second = alice_client.get(url, {"q": "bulk", "alias": "production", "page": 2})
    assert len(second.context["page"].object_list) == 5
    assert "?q=bulk&amp;alias=production&amp;page=1" in second.content.decode()


def test_the_charts_show_latency_percentiles_and_tokens_per_day(alice_project, traffic):
    day3 = DAY + datetime.timedelta(days=2)
    for latency in range(1, 101):  # 1..100 ms
        logged(alice_project, traffic["prod"], "q", "a", latency=float(latency), when=day3, tokens=(2, 1))
    d = per_day(RequestLog.objects.filter(project=alice_project))
    assert d["labels"] == ["2026-03-02", "2026-03-03", "2026-03-04"]
    assert d["requests"] == [1, 4, 100]
    assert d["p50"][0] == 80 and d["p95"][0] == 80
    assert d["p50"][2] == 50.5 and d["p95"][2] == pytest.approx(95.05, abs=0.06)
    assert d["prompt_tokens"] == [10, 40, 200] and d["completion_tokens"] == [3, 12, 100]
    assert not d["truncated"]


def test_no_one_sees_another_projects_log(client, alice_project, bob, bob_project, traffic):
    bob_alias = Alias.objects.create(project=bob_project, name="production", log_requests=True)
    mine = logged(bob_project, bob_alias, "Bob's refund question", "ok")
    client.force_login(bob)
    assert client.get(reverse("request_log", args=[alice_project.slug])).status_code == 404
    assert listed(client, bob_project, q="refund") == {mine.pk}
    r = client.post(
        reverse("request_capture", args=[bob_project.slug]), {"log": [traffic["order"].pk], "name": "x"}
    )
    assert r.status_code == 302 and not Dataset.objects.filter(name="x").exists()


def test_captured_datasets_are_labelled_and_an_absorb_on_them_asks_the_teacher_again(
    alice, alice_client, alice_project, traffic, tiny_base
):
    r = alice_client.post(
        reverse("request_capture", args=[alice_project.slug]),
        {"log": [traffic["order"].pk, traffic["refund"].pk], "name": "From production"},
    )
    assert r.status_code == 302
    captured = Dataset.objects.get(name="From production").latest
    assert captured.captured and captured.dataset.captured
    version_page = alice_client.get(captured.get_absolute_url()).content.decode()
    assert 'id="captured-label"' in version_page
    rows = "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
        for i in range(4)
    )
    uploaded = import_dataset(alice_project, alice, "uploaded", io.BytesIO(rows.encode()), filename="u.jsonl")
    assert not uploaded.captured
    listing = alice_client.get(reverse("dataset_list", args=[alice_project.slug])).content.decode()
    cards = listing.split('class="card"')
    [mine] = [c for c in cards if "From production" in c]
    [theirs] = [c for c in cards if ">uploaded<" in c]
    assert ">captured</span>" in mine and ">captured</span>" not in theirs
    prompt = save_prompt(alice_project, alice, "support", "Be brief.", []).version
    teacher, _ = job_actions.start_absorb(
        alice_project, alice, prompt, captured, tiny_base, review_first=True
    )
    assert teacher.params["keep_existing"] is False  # the served answers are asked for again
    teacher, _ = job_actions.start_absorb(
        alice_project, alice, prompt, uploaded, tiny_base, review_first=True
    )
    assert teacher.params["keep_existing"] is True
    kept, _ = job_actions.start_absorb(
        alice_project, alice, prompt, captured, tiny_base, review_first=True, keep_existing=True
    )
    assert kept.params["keep_existing"] is True  # unless told to keep them
    # The absorb form names captured versions (its script unticks "keep existing" on picking one),
    # and the command line, told nothing, asks the teacher again too.
    jobs_page = alice_client.get(reverse("job_list", args=[alice_project.slug])).content.decode()
    assert f"{captured} · " in jobs_page and "· captured from /v1" in jobs_page
    call_command(
        "absorb",
        "--project",
        alice_project.slug,
        "--prompt",
        "support",
        "--dataset",
        "From production",
        "--review-first",
        "--no-eval",
        stdout=io.StringIO(),
    )
    assert Job.objects.filter(kind="teacher").latest("pk").params["keep_existing"] is False


# --- the page in a real browser ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_request_log_in_a_browser(page, alice_project, traffic):
    now = timezone.now() - datetime.timedelta(minutes=5)
    for days in range(6):
        for i in range(4):
            logged(
                alice_project,
                traffic["prod"],
                f"Question {days}-{i} about my order",
                f"Answer {i}",
                latency=40.0 + 30 * i + 10 * days,
                when=now - datetime.timedelta(days=days),
                tokens=(120 + 10 * i, 30 + days),
            )
    problems = watch(page)
    log_in(page)
    page.goto(reverse("request_log", args=[alice_project.slug]))
    page.get_by_label("Text").fill("about my order")
    page.get_by_label("Alias").select_option("production")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**q=about+my+order**")
    assert page.locator("#request-log tbody tr").count() == 24
    page.locator("#latency-chart").wait_for()
    page.wait_for_function("window.Chart && Chart.getChart(document.getElementById('latency-chart'))")
    assert "24 matching requests" in page.locator("#chart-note").inner_text()
    Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    boxes = page.locator('#request-log input[name="log"]')
    boxes.nth(0).check()
    boxes.nth(1).check()
    page.get_by_label("New dataset name").fill("Picked in the browser")
    page.get_by_role("button", name="Capture selected").click()
    page.wait_for_url("**/datasets/**")
    assert page.locator("#captured-label").is_visible()
    assert Dataset.objects.get(name="Picked in the browser").latest.row_count == 2
    assert problems == [], problems
