"""The request log page and "capture": logged /v1 requests become a dataset
version (the client's messages and the answer served)."""

import io

import pytest
from django.urls import reverse

from serving.capture import capture
from serving.models import Alias, RequestLog
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.models import DatasetRow

pytestmark = pytest.mark.django_db


def logged(project, alias, question, answer, status=200, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    response = (
        {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        }
        if status == 200
        else {"error": {"message": "engine down", "type": "engine_unavailable"}}
    )
    return RequestLog.objects.create(
        project=project,
        alias=alias,
        model=f"{project.slug}/{alias.name}",
        request={"model": "x", "messages": messages, "temperature": 0},
        response=response,
        status=status,
        latency_ms=12.5,
        prompt_tokens=10 if status == 200 else 0,
        completion_tokens=3,
    )


@pytest.fixture
def production(alice_project):
    return Alias.objects.create(project=alice_project, name="production", log_requests=True)


def test_it_captures_selected_requests_into_a_new_dataset(alice_client, alice_project, production):
    first = logged(alice_project, production, "Where is my order?", "It ships today.", system="Be brief.")
    second = logged(alice_project, production, "Can I return it?", "Yes, within 30 days.")
    failed = logged(alice_project, production, "Hello?", "", status=503)
    url = reverse("request_capture", args=[alice_project.slug])
    r = alice_client.post(url, {"log": [first.pk, second.pk, failed.pk], "name": "From production"})
    assert r.status_code == 302
    first.refresh_from_db()
    version = first.captured_into
    assert r["Location"] == version.get_absolute_url()
    assert version.dataset.name == "From production" and version.number == 1 and version.row_count == 2
    rows = list(version.rows.order_by("index").values_list("messages", flat=True))
    assert rows[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships today."},
    ]
    assert rows[1][-1] == {"role": "assistant", "content": "Yes, within 30 days."}
    assert version.meta["captured_requests"] == [first.pk, second.pk]
    failed.refresh_from_db()
    assert failed.captured_into is None  # only answered requests become rows
    page = alice_client.get(reverse("request_log", args=[alice_project.slug]))
    assert "From production@1" in page.content.decode()


def test_it_adds_a_new_version_to_an_existing_dataset(alice, alice_project, production):
    jsonl = "".join(
        f'{{"messages": [{{"role": "user", "content": "q{i}"}}, '
        f'{{"role": "assistant", "content": "a{i}"}}]}}\n'
        for i in range(10)
    )
    v1 = import_dataset(
        alice_project, alice, "support", io.BytesIO(jsonl.encode()), filename="s.jsonl", eval_percent=20
    )
    logs = [logged(alice_project, production, f"new {i}", f"answer {i}") for i in range(2)]
    v2 = capture(alice_project, alice, [e.pk for e in logs], dataset=v1.dataset, append=True)
    assert (v2.number, v2.parent, v2.row_count) == (2, v1, 12)
    # the old rows keep their split (no eval row leaks into training); captured rows train
    old_eval = set(v1.rows.filter(split=DatasetRow.EVAL).values_list("index", flat=True))
    assert set(v2.rows.filter(split=DatasetRow.EVAL).values_list("index", flat=True)) == old_eval
    assert v2.rows.get(index=11).messages[-1]["content"] == "answer 1"
    v3 = capture(alice_project, alice, [logs[0].pk], dataset=v1.dataset, append=False)
    assert (v3.number, v3.row_count) == (3, 1)
    logs[0].refresh_from_db()
    assert logs[0].captured_into == v3


def test_capture_refuses_nothing_selected_and_a_taken_name(alice, alice_project, production):
    with pytest.raises(ActionError, match="at least one"):
        capture(alice_project, alice, [], name="x")
    entry = logged(alice_project, production, "q", "a")
    capture(alice_project, alice, [entry.pk], name="taken")
    with pytest.raises(ActionError, match="already exists"):
        capture(alice_project, alice, [entry.pk], name="taken")


def test_the_log_page_filters_by_alias_and_keeps_projects_apart(
    alice_client, client, bob, alice_project, production, bob_project
):
    staging = Alias.objects.create(project=alice_project, name="staging", log_requests=True)
    logged(alice_project, production, "asked production", "p")
    logged(alice_project, staging, "asked staging", "s")
    url = reverse("request_log", args=[alice_project.slug])
    page = alice_client.get(url).content.decode()
    assert "asked production" in page and "asked staging" in page
    page = alice_client.get(url, {"alias": "staging"}).content.decode()
    assert "asked staging" in page and "asked production" not in page

    client.force_login(bob)
    assert client.get(url).status_code == 404
    # bob cannot capture alice's requests into his own project
    theirs = RequestLog.objects.filter(project=alice_project).values_list("pk", flat=True)
    r = client.post(
        reverse("request_capture", args=[bob_project.slug]),
        {"log": list(theirs), "name": "stolen"},
        follow=True,
    )
    assert "Select at least one" in r.content.decode()
    assert not RequestLog.objects.filter(captured_into__isnull=False).exists()
