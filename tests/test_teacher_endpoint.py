"""Bring your own teacher: an OpenAI-compatible endpoint teaches an absorb.
Against a LIVE hf engine server (a separate process, SIGKILLed mid-job in one
test), behind a small proxy in the test that counts every request body and
answers 429 or 503 on demand: retries, the response cache, token and cost
accounting, the missing key variable, and the endpoint pages."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

import engines.remote
from engines.generator import CachingGenerator, RemoteGenerator
from engines.inference import GenerationSettings
from engines.remote import (
    RemoteGenerationError,
    RetryPolicy,
    TransportStats,
    generate_remote,
    retry_after_seconds,
)
from engines.response_cache import ResponseCache
from jobs import actions, lifecycle
from jobs.models import Job, TeacherEndpoint, normalize_base_url
from tests.proxies import Proxy
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

REPO = Path(__file__).resolve().parent.parent
QUERIES = [
    f"Question {i}: how do I {v} my account?"
    for i, v in enumerate(["open", "close", "move", "lock", "share", "name"])
]
GEN = {"max_new_tokens": 6, "batch_size": 4}
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2, max_total_wait=2.0)


# --- the live server and the proxy in front of it -------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """The hf engine server as its own process, so it can be killed for real."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Engine":
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "engines.engine_server",
            "--port",
            str(port),
            "--model",
            f"tiny={self.model_dir}",
        ]
        self.proc = subprocess.Popen(
            [*cmd, "--dtype", "float32", "--threads", "1", "--batch-window-ms", "5"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == f"engine ready on http://127.0.0.1:{port}"
        self.url = f"http://127.0.0.1:{port}"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def engine(lively_dir):
    running = Engine(lively_dir).start()
    yield running
    running.kill()


@pytest.fixture
def proxy(engine, monkeypatch):
    monkeypatch.setattr(engines.remote, "DEFAULT_RETRY", FAST_RETRY)
    p = Proxy(engine.url)
    yield p
    p.close()


@pytest.fixture
def world(alice, alice_project, lively_dir, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    base = FoundationModel.objects.create(name="lively", path=str(lively_dir), is_default=True)
    prompt = save_prompt(alice_project, alice, "support", "You are the support desk. Answer briefly.").version
    data = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(QUERIES).encode()),
        filename="q.txt",
        eval_percent=0,
    )
    return alice_project, alice, base, prompt, data


def add_endpoint(project, user, url, **fields):
    return actions.create_teacher_endpoint(
        project, user, name=fields.pop("name", "local"), base_url=url + "/v1", model="tiny", **fields
    )


def run_teacher(world, endpoint, **kwargs):
    project, alice, base, prompt, data = world
    teacher, _ = actions.start_absorb(
        project, alice, prompt, data, base, GEN, review_first=True, teacher_endpoint=endpoint, **kwargs
    )
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    return teacher


# --- the transport, on the live server ------------------------------------------


def test_retry_after_is_read_as_seconds_or_an_http_date():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_a_4xx_other_than_429_fails_at_once_with_the_servers_message(proxy):
    proxy.fail_next = [(400, {})]
    stats = TransportStats()
    with pytest.raises(RemoteGenerationError, match="answered 400 .*proxy says 400"):
        generate_remote(
            proxy.url,
            "tiny",
            [[{"role": "user", "content": "hi"}]],
            None,
            GenerationSettings(**GEN),
            stats=stats,
        )
    assert proxy.sent() == 1 and stats.retries == 0


@pytest.mark.django_db
def test_repeated_sampled_requests_get_new_answers_and_a_new_generator_finds_them_cached(proxy, tmp_path):
    """A best-of-N round that repeats the first asks for fresh samples; a rerun
    makes the same requests in the same order and pays for none of them."""
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=7, batch_size=4)
    convs = [[{"role": "user", "content": q}] for q in QUERIES[:2]]

    def teacher() -> CachingGenerator:
        return CachingGenerator(
            RemoteGenerator(proxy.url, "tiny"), ResponseCache(tmp_path / "c.sqlite3"), "t"
        )

    first = teacher()
    round1 = first.generate_samples(convs, "Be brief.", settings, 2)
    round2 = first.generate_samples(convs, "Be brief.", settings, 2)
    # One request per conversation and round, asking for both samples with n=2.
    assert proxy.sent() == 4 and first.stats.hits == 0
    bodies = Counter(s.digest for s in proxy.log)
    assert len(bodies) == 4  # distinct seeds: no two requests alike
    assert all(len({c.text for c in row}) == 2 for row in round1 + round2)
    rerun = teacher()
    assert rerun.generate_samples(convs, "Be brief.", settings, 2) == round1
    assert rerun.generate_samples(convs, "Be brief.", settings, 2) == round2
    assert proxy.sent() == 4 and rerun.stats.hits == 8 and rerun.stats.asked == 0


# --- the teacher job ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_429_storm_is_ridden_out_and_counted_and_a_rerun_asks_nothing(world, proxy, monkeypatch):
    monkeypatch.setattr(
        engines.remote, "DEFAULT_RETRY", RetryPolicy(max_attempts=8, base_delay=0.05, max_total_wait=30)
    )
    monkeypatch.setenv("WB_TEST_TEACHER_KEY", "sk-test-123")
    project, alice, *_ = world
    endpoint = add_endpoint(
        project,
        alice,
        proxy.url,
        api_key_env="WB_TEST_TEACHER_KEY",
        max_concurrency=2,
        price_input_per_million=2,
        price_output_per_million=10,
    )
    proxy.fail_next = [(429, {"Retry-After": "1"})] * 3 + [(503, {})] * 2
    teacher = run_teacher(world, endpoint)
    assert teacher.status == Job.SUCCEEDED, teacher.error
    usage = teacher.params["teacher_usage"]
    assert usage["retries"] == 5 and usage["requests"] == len(QUERIES) + 5
    assert usage["retry_wait_seconds"] >= 3  # every 429 waited at least its Retry-After
    assert usage["asked"] == len(QUERIES) and usage["cache_hits"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["cost"] == pytest.approx(
        (usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 10) / 1e6
    )
    assert usage["teacher"]["name"] == "local" and usage["teacher"]["base_url"] == proxy.url
    assert set(proxy.headers) == {"Bearer sk-test-123"}
    assert "sk-test-123" not in json.dumps(teacher.params) + teacher.log
    assert "5 retries" in teacher.log
    version = teacher.output_dataset
    assert version.row_count == len(QUERIES) and version.meta["teacher_model"] == "tiny"
    assert version.meta["teacher_usage"]["retries"] == 5

    page = alice_page(world, teacher)
    assert 'id="teacher-usage"' in page and "5 retries" in page

    sent = proxy.sent()
    again = run_teacher(world, endpoint)
    assert again.status == Job.SUCCEEDED, again.error
    assert proxy.sent() == sent  # not one request: every answer came from the cache
    assert again.params["teacher_usage"]["cache_hits"] == len(QUERIES)
    assert again.params["teacher_usage"]["asked"] == 0 and again.params["teacher_usage"]["cost"] == 0
    answers = [r.messages[-1]["content"] for r in again.output_dataset.rows.order_by("index")]
    assert answers == [r.messages[-1]["content"] for r in version.rows.order_by("index")]


def alice_page(world, job) -> str:
    from django.test import Client

    client = Client()
    client.force_login(world[1])
    return client.get(reverse("job_detail", args=[world[0].slug, job.pk])).content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_killed_server_fails_the_job_and_the_retry_resumes_without_asking_twice(
    world, proxy, engine, lively_dir
):
    project, alice, base, prompt, data = world
    endpoint = add_endpoint(project, alice, proxy.url, max_concurrency=1)
    proxy.kill_after, proxy.on_kill = 3, engine.kill
    teacher, finetune = actions.start_absorb(
        project, alice, prompt, data, base, GEN, {"max_steps": 1}, teacher_endpoint=endpoint
    )
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    assert teacher.status == Job.FAILED
    assert f"the engine at {proxy.url}/v1/chat/completions could not be reached" in teacher.error
    assert "gave up after" in teacher.error
    assert teacher.params["teacher_usage"]["asked"] == 3  # a failed job still shows what it used
    finetune.refresh_from_db()
    assert finetune.status == Job.CANCELLED

    engine.start()  # the server comes back (on a new port, behind the same proxy)
    proxy.upstream = engine.url
    retry = actions.retry_job(teacher, alice)
    assert retry.depends_on is None and retry.teacher_endpoint == endpoint
    assert Job.objects.filter(depends_on=retry, kind="finetune").count() == 1
    lifecycle.execute(retry.pk, "test")
    retry.refresh_from_db()
    assert retry.status == Job.SUCCEEDED, retry.error
    usage = retry.params["teacher_usage"]
    assert usage["cache_hits"] == 3 and usage["asked"] == len(QUERIES) - 3
    assert retry.output_dataset.row_count == len(QUERIES)
    # No body was sent again once its answer had arrived.
    answered_at = {}
    for i, sent in enumerate(proxy.log):
        assert sent.digest not in answered_at, (
            f"request {i} repeats one answered at {answered_at.get(sent.digest)}"
        )
        if sent.outcome == 200:
            answered_at[sent.digest] = i
    assert len(answered_at) == len(QUERIES)


@pytest.mark.django_db(transaction=True)
def test_a_missing_key_variable_fails_the_job_naming_it_and_nothing_is_sent(world, proxy, monkeypatch):
    monkeypatch.delenv("WB_TEST_NO_SUCH_KEY", raising=False)
    project, alice, *_ = world
    endpoint = add_endpoint(project, alice, proxy.url, api_key_env="WB_TEST_NO_SUCH_KEY")
    teacher = run_teacher(world, endpoint)
    assert teacher.status == Job.FAILED
    assert "WB_TEST_NO_SUCH_KEY" in teacher.error and "not set" in teacher.error
    assert proxy.sent() == 0


@pytest.mark.django_db(transaction=True)
def test_a_deleted_endpoint_fails_its_queued_job_and_a_running_one_blocks_the_delete(world, proxy):
    project, alice, base, prompt, data = world
    endpoint = add_endpoint(project, alice, proxy.url)
    teacher, _ = actions.start_absorb(
        project, alice, prompt, data, base, GEN, review_first=True, teacher_endpoint=endpoint
    )
    with pytest.raises(ActionError, match="cancel it or let it finish"):
        actions.delete_teacher_endpoint(endpoint)
    Job.objects.filter(pk=teacher.pk).update(status=Job.FAILED)
    actions.delete_teacher_endpoint(endpoint)
    Job.objects.filter(pk=teacher.pk).update(status=Job.QUEUED)
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    assert teacher.status == Job.FAILED and "'local'" in teacher.error and "deleted" in teacher.error


# --- the pages --------------------------------------------------------------------


def post_endpoint(client, project, **fields):
    data = {
        "name": "big",
        "base_url": "http://vllm:8000/v1",
        "model": "Qwen/Qwen2.5-72B-Instruct",
        "api_key_env": "",
        "max_concurrency": 8,
        **fields,
    }
    return client.post(reverse("teacher_endpoints", args=[project.slug]), data)


@pytest.mark.django_db
def test_endpoints_are_added_listed_and_deleted_within_their_project_only(
    alice_client, alice_project, bob, bob_project
):
    reply = post_endpoint(
        alice_client, alice_project, api_key_env="TEACHER_KEY", price_input_per_million="0.5"
    )
    assert reply.status_code == 302
    endpoint = TeacherEndpoint.objects.get(project=alice_project)
    assert endpoint.base_url == "http://vllm:8000" and endpoint.api_key_env == "TEACHER_KEY"
    page = alice_client.get(reverse("teacher_endpoints", args=[alice_project.slug])).content.decode()
    assert "Qwen/Qwen2.5-72B-Instruct" in page and "TEACHER_KEY" in page
    assert post_endpoint(alice_client, alice_project).status_code == 400  # the name is taken

    bobs = actions.create_teacher_endpoint(bob_project, bob, name="bobs", base_url="http://b:1", model="m")
    assert alice_client.get(reverse("teacher_endpoints", args=[bob_project.slug])).status_code == 404
    assert post_endpoint(alice_client, bob_project).status_code == 404
    assert (
        alice_client.post(reverse("teacher_endpoint_delete", args=[bob_project.slug, bobs.pk])).status_code
        == 404
    )
    assert (
        alice_client.post(reverse("teacher_endpoint_delete", args=[alice_project.slug, bobs.pk])).status_code
        == 404
    )
    assert TeacherEndpoint.objects.filter(pk=bobs.pk).exists()
    assert "bobs" not in page

    from jobs.forms import AbsorbForm

    assert list(AbsorbForm(alice_project).fields["teacher_endpoint"].queryset) == [endpoint]

    reply = alice_client.post(reverse("teacher_endpoint_delete", args=[alice_project.slug, endpoint.pk]))
    assert reply.status_code == 302 and not TeacherEndpoint.objects.filter(pk=endpoint.pk).exists()


@pytest.mark.django_db
def test_another_projects_endpoint_is_refused_by_the_form_and_the_action(world, bob, bob_project):
    project, alice, base, prompt, data = world
    bobs = actions.create_teacher_endpoint(bob_project, bob, name="bobs", base_url="http://b:1", model="m")
    with pytest.raises(ActionError, match="must belong to this project"):
        actions.start_absorb(project, alice, prompt, data, base, GEN, teacher_endpoint=bobs)
    mine = actions.create_teacher_endpoint(project, alice, name="mine", base_url="http://a:1", model="m")
    with pytest.raises(ActionError, match="KL distillation"):
        actions.start_absorb(
            project, alice, prompt, data, base, GEN, {"kl_weight": 0.5}, teacher_endpoint=mine
        )
    assert not Job.objects.exists()

    from django.test import Client

    client = Client()
    client.force_login(alice)
    form = {
        "prompt_version": prompt.pk,
        "dataset_version": data.pk,
        "base_model": base.pk,
        "mode": "absorb",
        "teacher_endpoint": bobs.pk,
    }
    reply = client.post(reverse("absorb_start", args=[project.slug]), form)
    assert reply.status_code == 400 and not Job.objects.exists()


BAD_URLS = [
    "ftp://files.example.com/v1",
    "javascript:alert(1)",
    "http://user:secret@vllm:8000/v1",
    "not a url",
    "http://",
    "http://vllm:99999/v1",
    "http://vllm:8000/v1?key=abc",
    "vllm:8000",
]


@pytest.mark.django_db
@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused_with_a_400(alice_client, alice_project, url):
    reply = post_endpoint(alice_client, alice_project, base_url=url)
    assert reply.status_code == 400
    assert not TeacherEndpoint.objects.exists()
    with pytest.raises(ValidationError):
        normalize_base_url(url)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fields",
    [
        {"api_key_env": "1BAD-NAME"},
        {"max_concurrency": 0},
        {"max_concurrency": 65},
        {"model": ""},
        {"price_output_per_million": "-1"},
    ],
)
def test_bad_fields_are_refused_with_a_400(alice_client, alice_project, fields):
    assert post_endpoint(alice_client, alice_project, **fields).status_code == 400
    assert not TeacherEndpoint.objects.exists()


def test_good_urls_are_kept_as_the_server_root():
    assert normalize_base_url("https://api.example.com/v1/") == "https://api.example.com"
    assert normalize_base_url("http://localhost:8000") == "http://localhost:8000"
    assert normalize_base_url("http://10.0.0.5:8001/proxy/v1") == "http://10.0.0.5:8001/proxy"
