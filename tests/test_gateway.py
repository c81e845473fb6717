"""The /v1 gateway, called with the real `openai` package against a live
server, forwarding to a real hf engine (in this process, on a free port)
holding a tiny model and a LoRA adapter."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import httpx
import openai
import pytest

from serving.actions import create_api_key, promote, revoke_api_key
from serving.models import Alias, RequestLog
from tests.conftest import build_random_lora, database_url
from tests.processes import REPO, stop, wait_for
from workbench.models import FoundationModel, Prompt, PromptVersion, Variant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROMPT = "You are Ada, the support bot of Acme. Answer in one sentence and end with 'Cheers, Ada'."
QUESTION = [{"role": "user", "content": "Where is my parcel?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def adapter_dir(lively_dir, tmp_path_factory):
    """A tiny LoRA adapter with random B matrices, so it really changes the answers."""
    return build_random_lora(lively_dir, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture(scope="module")
def tokenizer(lively_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lively_dir))


@pytest.fixture(scope="module")
def engine(lively_dir, one_torch_thread):
    """The hf engine server, started with no model: the gateway loads the base and adapters it needs."""
    from engines.engine_server import EngineServer

    server = EngineServer(host="127.0.0.1", port=0, threads=1, dtype="float32")
    server.start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world(alice, alice_project, bob, bob_project, lively_dir, adapter_dir):
    base = FoundationModel.objects.create(name="tiny-lively", path=str(lively_dir))
    prompt = Prompt.objects.create(project=alice_project, name="support")
    version = PromptVersion.objects.create(prompt=prompt, number=1, text=PROMPT, sha256="x")
    plain = Variant.objects.create(project=alice_project, name="base", base_model=base)
    student = Variant.objects.create(
        project=alice_project,
        name="student",
        base_model=base,
        adapter_path=str(adapter_dir),
        prompt_version=version,
    )
    prompted = Variant.objects.create(
        project=alice_project,
        name="base + prompt",
        base_model=base,
        prompt_version=version,
        prepend_prompt=True,
    )
    aliases = {}
    for name, variant, logs in (
        ("production", student, True),
        ("staging", prompted, False),
        ("plain", plain, False),
    ):
        aliases[name], _ = Alias.objects.update_or_create(
            project=alice_project, name=name, defaults={"variant": variant, "log_requests": logs}
        )
    bob_variant = Variant.objects.create(project=bob_project, name="bob's", base_model=base)
    Alias.objects.update_or_create(project=bob_project, name="production", defaults={"variant": bob_variant})
    key, raw = create_api_key(alice, alice_project, "tests")
    return SimpleNamespace(
        base=base,
        plain=plain,
        student=student,
        prompted=prompted,
        aliases=aliases,
        key=key,
        raw=raw,
        bob_variant=bob_variant,
        slug=alice_project.slug,
        bob_slug=bob_project.slug,
    )


@pytest.fixture
def served(settings, engine):
    settings.ENGINE_URL = engine.url
    return engine


def sdk(live_server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=120)


def without_id(message: str) -> str:
    return re.sub(r" \(request id req_\w+\)$", "", message)


def count(tokenizer, messages, system_prompt=None) -> int:
    from engines.inference import encode

    return len(encode(tokenizer, messages, system_prompt))


def test_it_lists_the_models_of_the_keys_project_only(live_server, world):
    ids = {m.id for m in sdk(live_server, world.raw).models.list()}
    assert {
        f"{world.slug}/production",
        f"{world.slug}/staging",
        f"{world.slug}/variant-{world.student.pk}",
    } <= ids
    assert not any(i.startswith(f"{world.bob_slug}/") for i in ids)


def test_streamed_and_whole_answers_agree_with_usage_counted(live_server, world, served, tokenizer):
    client = sdk(live_server, world.raw)
    model = f"{world.slug}/production"
    whole = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY)
    assert whole.model == model
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    # the absorbed variant is served without the prompt, exactly as trained
    assert whole.usage.prompt_tokens == count(tokenizer, QUESTION)
    assert 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(c.model == model for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # without include_usage no usage chunk is relayed (the gateway still logs it)
    plain = list(client.chat.completions.create(model=model, messages=QUESTION, stream=True, **GREEDY))
    assert all(c.choices for c in plain)
    with httpx.stream(
        "POST",
        f"{live_server.url}/v1/chat/completions",
        timeout=60,
        json={"model": model, "messages": QUESTION, "stream": True, **GREEDY},
        headers={"Authorization": f"Bearer {world.raw}"},
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert (raw.headers["cache-control"], raw.headers["x-accel-buffering"]) == ("no-cache", "no")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)

    # the adapter is really used: the base answers otherwise
    base = client.chat.completions.create(model=f"variant-{world.plain.pk}", messages=QUESTION, **GREEDY)
    assert base.model == f"variant-{world.plain.pk}"
    assert base.choices[0].message.content != text


def test_the_prompt_is_prepended_for_a_prompted_variant_only(live_server, world, served, tokenizer):
    client = sdk(live_server, world.raw)
    staging = client.chat.completions.create(model=f"{world.slug}/staging", messages=QUESTION, **GREEDY)
    assert staging.usage.prompt_tokens == count(tokenizer, QUESTION, PROMPT)
    # a client's own system message comes after the variant's prompt
    own = [{"role": "system", "content": "Be brief."}, *QUESTION]
    both = client.chat.completions.create(model=f"{world.slug}/staging", messages=own, **GREEDY)
    assert both.usage.prompt_tokens == count(tokenizer, QUESTION, f"{PROMPT}\n\nBe brief.")
    absorbed = client.chat.completions.create(
        model=f"{world.slug}/variant-{world.student.pk}", messages=own, **GREEDY
    )
    assert absorbed.usage.prompt_tokens == count(tokenizer, QUESTION, "Be brief.")
    assert count(tokenizer, QUESTION, PROMPT) != count(tokenizer, QUESTION)  # so the checks above can fail


def test_a_variant_answers_with_its_guard_rails_unless_the_request_sets_them(live_server, world, served):
    client = sdk(live_server, world.raw)
    model = f"{world.slug}/plain"
    full = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY).choices[0].message.content
    cut = full[len(full) // 2 :][:3]
    assert cut.strip() and full.index(cut) > 0
    world.plain.generation = {"stop": [cut], "no_repeat_ngram_size": 0}
    world.plain.save(update_fields=["generation"])
    stopped = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY).choices[0]
    assert stopped.message.content == full[: full.index(cut)] and stopped.finish_reason == "stop"
    own = client.chat.completions.create(model=model, messages=QUESTION, stop=["\x00never"], **GREEDY)
    assert own.choices[0].message.content == full


def test_n_answers_in_one_request(live_server, world, served):
    r = sdk(live_server, world.raw).chat.completions.create(
        model=f"{world.slug}/plain", messages=QUESTION, n=2, temperature=1.0, seed=7, max_tokens=8
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content is not None for c in r.choices)
    assert r.usage.completion_tokens >= 2


def test_keys_models_and_bodies_are_checked(live_server, world, alice, settings):
    settings.ENGINE_URL = f"http://127.0.0.1:{free_port()}"
    good = sdk(live_server, world.raw)
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk(live_server, "wb-not-a-key").chat.completions.create(
            model=f"{world.slug}/production", messages=QUESTION
        )
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"

    with pytest.raises(openai.NotFoundError) as unknown:
        good.chat.completions.create(model=f"{world.slug}/nope", messages=QUESTION)
    with pytest.raises(openai.NotFoundError) as foreign:
        good.chat.completions.create(model=f"{world.bob_slug}/production", messages=QUESTION)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model=f"variant-{world.bob_variant.pk}", messages=QUESTION)
    assert unknown.value.body["code"] == foreign.value.body["code"] == "model_not_found"
    # the same words for "none" and "not yours": a key cannot probe other projects (only the request ids differ)
    for exc in (foreign, unknown):
        assert exc.value.body["message"].endswith(
            f"(request id {exc.value.response.headers['x-request-id']})"
        )
    assert without_id(foreign.value.body["message"]).replace(
        f"{world.bob_slug}/production", "M"
    ) == without_id(unknown.value.body["message"]).replace(f"{world.slug}/nope", "M")

    with pytest.raises(openai.BadRequestError) as malformed:
        good.post("/chat/completions", cast_to=object, content=b'{"model": "x", "messages": [')
    assert (
        malformed.value.body["type"] == "invalid_request_error"
        and "not valid JSON" in malformed.value.message
    )
    # Each bad field's 400 is checked in the fast suite (tests/test_protocol.py), without a live server.
    # an unknown field is refused in OpenAI's words, naming it (issue 22: never silently dropped)
    with pytest.raises(openai.BadRequestError) as unknown_field:
        good.chat.completions.create(
            model=f"{world.slug}/production", messages=QUESTION, extra_body={"logit_bias_extra": 1}
        )
    assert unknown_field.value.body["param"] == "logit_bias_extra"
    assert (
        without_id(unknown_field.value.body["message"])
        == "Unrecognized request argument supplied: logit_bias_extra"
    )

    revoke_api_key(alice, world.key)
    with pytest.raises(openai.AuthenticationError):
        good.models.list()


def test_engine_down_is_a_503(live_server, world, settings):
    settings.ENGINE_URL = f"http://127.0.0.1:{free_port()}"
    client = sdk(live_server, world.raw)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=f"{world.slug}/production", messages=QUESTION)
    assert exc.value.status_code == 503 and exc.value.body["type"] == "engine_unavailable"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=f"{world.slug}/production", messages=QUESTION, stream=True)
    # the logging alias keeps the failure too
    assert list(RequestLog.objects.values_list("status", flat=True)) == [503, 503]


def test_requests_are_logged_only_for_aliases_that_log(live_server, world, served):
    client = sdk(live_server, world.raw)
    whole = client.chat.completions.create(model=f"{world.slug}/production", messages=QUESTION, **GREEDY)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=f"{world.slug}/production", messages=QUESTION, stream=True, **GREEDY
        )
        if c.choices
    )
    client.chat.completions.create(model=f"{world.slug}/staging", messages=QUESTION, **GREEDY)
    client.chat.completions.create(model=f"variant-{world.student.pk}", messages=QUESTION, **GREEDY)
    logs = list(RequestLog.objects.order_by("pk"))
    assert [(e.alias.name, e.variant, e.status, e.api_key) for e in logs] == [
        ("production", world.student, 200, world.key)
    ] * 2
    assert logs[0].request["messages"] == QUESTION  # as the client sent it
    assert logs[0].response["choices"][0]["message"]["content"] == whole.choices[0].message.content
    assert logs[1].response["choices"][0]["message"]["content"] == streamed
    assert logs[0].prompt_tokens == logs[1].prompt_tokens == whole.usage.prompt_tokens
    assert logs[1].completion_tokens == whole.usage.completion_tokens and logs[1].latency_ms > 0
    world.key.refresh_from_db()
    assert world.key.last_used_at is not None


def test_adapter_loaded_on_promote_and_served_without_a_restart(
    live_server, world, served, alice, lively_dir, adapter_dir
):
    second = Variant.objects.create(
        project=world.student.project, name="student 2", base_model=world.base, adapter_path=str(adapter_dir)
    )
    canary = Alias.objects.create(project=world.student.project, name="canary", variant=world.plain)

    def engine_models() -> set[str]:
        return {m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]}

    assert f"variant-{second.pk}" not in engine_models()
    promote(alice, canary, second, force=True, reason="test")
    assert f"variant-{second.pk}" in engine_models()  # loaded by the alias move, before any request
    r = sdk(live_server, world.raw).chat.completions.create(
        model=f"{world.slug}/canary", messages=QUESTION, **GREEDY
    )
    assert r.choices[0].message.content
    # unloaded behind the gateway's back (another web process, a restarted engine): loaded again, retried
    assert httpx.post(
        f"{served.url}/v1/unload_lora_adapter", json={"lora_name": f"variant-{second.pk}"}
    ).is_success
    again = sdk(live_server, world.raw).chat.completions.create(
        model=f"{world.slug}/canary", messages=QUESTION, **GREEDY
    )
    assert again.choices[0].message.content == r.choices[0].message.content

    # moved away again: no alias needs the adapter, so the engine lets it go
    promote(alice, canary, world.plain, force=True, reason="back")
    assert f"variant-{second.pk}" not in engine_models()
    # a request naming it still works: the gateway loads it again
    r = sdk(live_server, world.raw).chat.completions.create(
        model=f"variant-{second.pk}", messages=QUESTION, **GREEDY
    )
    assert r.choices[0].message.content


def test_an_alias_served_as_merged_weights_answers_as_its_adapter(
    live_server, world, served, alice, bob, client, settings
):
    def engine_models() -> dict[str, dict]:
        return {m["id"]: m for m in httpx.get(f"{served.url}/v1/models").json()["data"]}

    model = f"{world.slug}/production"
    asked = [QUESTION, [{"role": "user", "content": "Can I get a refund?"}]]
    as_adapter = [
        sdk(live_server, world.raw).chat.completions.create(model=model, messages=q, **GREEDY) for q in asked
    ]
    merged_name = f"merged-variant-{world.student.pk}"
    assert merged_name not in engine_models()

    client.force_login(alice)
    url = f"/p/{world.slug}/serving/aliases/production/deployment"
    assert client.post(url, {"serve_merged": "on"}).status_code == 302
    card = engine_models()[merged_name]  # loaded on the switch, before any request
    assert card["parent"] is None and card["merged"] == world.student.adapter_path
    page = client.get(f"/p/{world.slug}/serving/aliases/production/").content.decode()
    assert "serves student as merged weights" in page
    # The engine panel names the merged model for its project, and only counts it for another.
    panel = client.get(f"/p/{world.slug}/overview/engine").content.decode()
    assert "(merged weights)" in panel and "student" in panel and merged_name not in panel
    client.force_login(bob)
    other = client.get(f"/p/{world.bob_slug}/overview/engine").content.decode()
    assert "(merged weights)" not in other and "merged model" in other and merged_name not in other
    client.force_login(alice)

    as_merged = [
        sdk(live_server, world.raw).chat.completions.create(model=model, messages=q, **GREEDY) for q in asked
    ]
    assert [r.choices[0].message.content for r in as_merged] == [
        r.choices[0].message.content for r in as_adapter
    ]
    assert as_merged[0].usage == as_adapter[0].usage
    assert as_merged[0].system_fingerprint != as_adapter[0].system_fingerprint  # another deployment
    # streamed too
    pieces = sdk(live_server, world.raw).chat.completions.create(
        model=model, messages=QUESTION, stream=True, **GREEDY
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        == as_adapter[0].choices[0].message.content
    )

    # Back to the adapter: no alias serves the merged model, so the engine lets it go.
    assert client.post(url, {}).status_code == 302
    assert merged_name not in engine_models()
    assert (
        sdk(live_server, world.raw)
        .chat.completions.create(model=model, messages=QUESTION, **GREEDY)
        .choices[0]
        .message.content
        == as_adapter[0].choices[0].message.content
    )
    # vLLM loads its models when it starts: the switch is refused there, with the way out.
    settings.INFERENCE_BACKEND = "vllm"
    refused = client.post(url, {"serve_merged": "on"})
    assert refused.status_code == 400 and "Export the merged model" in refused.content.decode()
    assert not Alias.objects.get(pk=world.aliases["production"].pk).serve_merged


def test_a_promotion_with_the_engine_down_still_moves_the_alias(world, alice, settings):
    settings.ENGINE_URL = f"http://127.0.0.1:{free_port()}"
    alias = world.aliases["plain"]
    promote(alice, alias, world.student, force=True, reason="engine is down")
    alias.refresh_from_db()
    assert alias.variant == world.student


def test_serve_engine_runs_the_hf_engine_with_the_default_model(tmp_path, lively_dir):
    FoundationModel.objects.create(name="tiny-default", path=str(lively_dir), is_default=True)
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "ENGINE_URL": f"http://127.0.0.1:{port}"}
    log = tmp_path / "engine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "serve_engine"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def served() -> set[str]:
        try:
            return {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]}
        except httpx.HTTPError:
            return set()

    try:
        wait_for(lambda: "tiny-default" in served(), 90, "the engine with the default model", proc, log)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-2000:]


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("INFERENCE_BACKEND", "vlm", "is not a backend"),
        ("ENGINE_THREADS", "0", "must be at least 1"),
        ("ENGINE_URL", "127.0.0.1:8001", "is not an http(s) URL"),
        ("GATEWAY_MAX_TOKENS", "lots", "is not a whole number"),
    ],
)
def test_a_bad_serving_setting_stops_the_start(tmp_path, name, value, message):
    r = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WORKBENCH_DATA_DIR": str(tmp_path), name: value},
    )
    assert r.returncode != 0 and message in r.stderr


def test_a_student_that_reads_passages_gets_them_through_chat_and_text_completions_refuse_it(
    live_server, world, served, tokenizer
):
    """student_passages: /v1 adds the absorbed prompt's passages most relevant to the question,
    as the student was trained; the legacy text endpoint cannot, so it refuses."""
    PromptVersion.objects.filter(pk=world.student.prompt_version_id).update(
        text=PROMPT + "\n\n## Parcels\n\nA parcel is delivered within 3 working days of the order."
    )
    Variant.objects.filter(pk=world.student.pk).update(hyperparameters={"student_passages": 1})
    student = Variant.objects.get(pk=world.student.pk)
    seen = student.student_view(QUESTION)
    assert seen[-1]["content"].endswith(
        "(Information for your answer: A parcel is delivered within 3 working days of the order.)"
    )
    client = sdk(live_server, world.raw)
    answer = client.chat.completions.create(model=f"{world.slug}/production", messages=QUESTION, **GREEDY)
    assert answer.usage.prompt_tokens == count(tokenizer, seen) > count(tokenizer, QUESTION)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=f"{world.slug}/production", prompt="Where is my parcel?", **GREEDY)
    assert refused.value.code == "unsupported_model"
    assert "applies its prompt's passages to each question" in refused.value.message
