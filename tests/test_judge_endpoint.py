"""A suite judged by an OpenAI-compatible endpoint (a model larger than the
student: a 135M judge scores an empty greeting 10). Against a LIVE hf engine
server behind a recording proxy: the judge's requests carry the rubric and
the JSON verdict format, every answer gets a verdict, and the endpoint
cannot be deleted from under the suite. One judge at a time, of the
suite's own project."""

import io
import json

import pytest

from evals import actions
from evals.actions import RunSpec
from evals.models import EvalResult, EvalSuite
from jobs import lifecycle
from jobs.actions import create_teacher_endpoint, delete_teacher_endpoint
from jobs.models import Job, TeacherEndpoint
from tests.proxies import Proxy
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.models import FoundationModel

RUBRIC = "A good answer names the settings page."
QUERIES = [
    f"How do I {v} my account?"
    for v in ("reset", "close", "rename", "export", "share", "lock", "move", "tag")
]


@pytest.fixture
def world(alice, alice_project, lively_dir, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    rows = "\n".join(json.dumps({"messages": [{"role": "user", "content": q}]}) for q in QUERIES)
    data = import_dataset(
        alice_project, alice, "faq", io.BytesIO(rows.encode()), filename="faq.jsonl", eval_percent=25
    )
    return alice_project, alice, base, data


def endpoint(project, user, url="http://127.0.0.1:9", name="big judge"):
    return create_teacher_endpoint(project, user, name=name, base_url=url + "/v1", model="tiny")


@pytest.mark.django_db
def test_one_judge_of_the_suites_own_project(world, bob, bob_project):
    project, alice, base, data = world
    mine = endpoint(project, alice)
    with pytest.raises(ActionError, match="Pick one judge"):
        actions.create_suite(
            project, alice, "s", data, judge_base=base, judge_endpoint=mine, judge_rubric=RUBRIC
        )
    with pytest.raises(ActionError, match="needs a rubric"):
        actions.create_suite(project, alice, "s", data, judge_endpoint=mine)
    with pytest.raises(ActionError, match="belongs to another project"):
        actions.create_suite(
            project, alice, "s", data, judge_endpoint=endpoint(bob_project, bob), judge_rubric=RUBRIC
        )
    suite = actions.create_suite(project, alice, "s", data, judge_endpoint=mine, judge_rubric=RUBRIC)
    assert suite.has_judge and suite.judge_label == "endpoint big judge (tiny)"
    assert not EvalSuite.objects.filter(judge_endpoint__project=bob_project).exists()


@pytest.mark.django_db
def test_the_judging_endpoint_cannot_be_deleted_from_under_its_suite(world, alice_client):
    project, alice, base, data = world
    judge = endpoint(project, alice)
    actions.create_suite(project, alice, "held out", data, judge_endpoint=judge, judge_rubric=RUBRIC)
    with pytest.raises(ActionError, match="“held out” judge with endpoint big judge"):
        delete_teacher_endpoint(judge)
    assert TeacherEndpoint.objects.filter(pk=judge.pk).exists()
    EvalSuite.objects.filter(project=project).update(judge_endpoint=None)
    delete_teacher_endpoint(judge)
    assert not TeacherEndpoint.objects.filter(pk=judge.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_every_answer_is_judged_by_the_live_endpoint_with_the_rubric_and_the_verdict_format(
    world, lively_dir, one_torch_thread
):
    from engines.engine_server import EngineServer

    project, alice, base, data = world
    with EngineServer({"tiny": lively_dir}, dtype="float32", threads=1, batch_window_ms=5) as server:
        proxy = Proxy(server.url)
        try:
            suite = actions.create_suite(
                project,
                alice,
                "held out",
                data,
                judge_endpoint=endpoint(project, alice, proxy.url),
                judge_rubric=RUBRIC,
            )
            [run] = actions.start_runs(project, alice, suite, [RunSpec(base)], {"max_new_tokens": 6})
            lifecycle.execute(run.job_id, "test")
        finally:
            proxy.close()
    job = Job.objects.get(pk=run.job_id)
    assert job.status == Job.SUCCEEDED, job.error
    results = list(EvalResult.objects.filter(run=run))
    assert len(results) == suite.examples.count() == 2
    # The base answered in process; only the judge went to the endpoint: one request per answer.
    assert len(proxy.log) == len(results) and all(s.outcome == 200 for s in proxy.log)
    for sent in proxy.log:
        assert sent.body["model"] == "tiny"
        assert RUBRIC in sent.body["messages"][0]["content"]
        assert sent.body["response_format"]["type"] == "json_schema"
    outputs = {r.output for r in results}
    assert all(any(o in s.body["messages"][-1]["content"] for s in proxy.log) for o in outputs)
    assert all(r.judge_reasoning for r in results)  # a verdict, or why none parsed, with the judge's text
    assert "judge: endpoint big judge (tiny) scored 1 run(s)" in job.log


@pytest.mark.django_db
def test_the_suite_form_offers_and_accepts_only_the_projects_endpoints(world, alice_client, bob, bob_project):
    from django.urls import reverse

    project, alice, base, data = world
    mine, theirs = endpoint(project, alice), endpoint(bob_project, bob, name="bob's judge")
    url = reverse("suite_create", args=[project.slug])
    form = {"name": "held out", "dataset_version": data.pk, "judge_rubric": RUBRIC}
    refused = alice_client.post(url, {**form, "judge_endpoint": theirs.pk})
    assert refused.status_code == 400 and "Select a valid choice" in refused.content.decode()
    assert "bob&#x27;s judge" not in refused.content.decode() and "big judge" in refused.content.decode()
    assert not EvalSuite.objects.exists()
    made = alice_client.post(url, {**form, "judge_endpoint": mine.pk})
    assert made.status_code == 302
    suite = EvalSuite.objects.get(project=project)
    assert suite.judge_endpoint == mine
    assert (
        "judged by endpoint big judge (tiny)" in alice_client.get(suite.get_absolute_url()).content.decode()
    )
