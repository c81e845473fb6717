"""Issue 22, the gateway's side: every /v1 request field is honoured,
ignored (and logged) or refused with an OpenAI-shaped 400 naming it, by the
one table of serving.params; the envelope (request id in the request log,
system_fingerprint, max_model_len, JSON 404s, CORS, [DONE] after an error);
and the legacy POST /v1/completions. Through Django's test client against
the real hf engine on the tiny model."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.protocol import OpenAIError
from serving import params
from serving.actions import create_api_key
from serving.gateway import check_completion_params, check_params
from serving.models import Alias, RequestLog
from workbench.models import FoundationModel, Prompt, PromptVersion, Variant

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "Where is my parcel?"}]
GREEDY = {"temperature": 0, "max_tokens": 6}
REQUEST_ID = re.compile(r"\(request id (req_[0-9a-f]{32})\)$")


@pytest.fixture(scope="module")
def engine(lively_dir, one_torch_thread):
    """The real hf engine, holding the tiny base under the name the world registers."""
    from engines.engine_server import EngineServer

    server = EngineServer({"tiny-lively": str(lively_dir)}, threads=1, dtype="float32")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def served(settings, engine):
    settings.ENGINE_URL = engine.url
    return engine


@pytest.fixture
def down(settings):
    """No engine: a body that passes the gateway's checks gets a 503, one it refuses a 400."""
    settings.ENGINE_URL = f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def fresh_counters():
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def world(alice, alice_project, lively_dir):
    base = FoundationModel.objects.create(name="tiny-lively", path=str(lively_dir))
    prompt = Prompt.objects.create(project=alice_project, name="support")
    version = PromptVersion.objects.create(prompt=prompt, number=1, text="You are Ada.", sha256="x")
    plain = Variant.objects.create(project=alice_project, name="base", base_model=base)
    prompted = Variant.objects.create(
        project=alice_project, name="prompted", base_model=base, prompt_version=version, prepend_prompt=True
    )
    Alias.objects.update_or_create(
        project=alice_project, name="production", defaults={"variant": plain, "log_requests": True}
    )
    Alias.objects.update_or_create(
        project=alice_project, name="staging", defaults={"variant": prompted, "log_requests": True}
    )
    _key, raw = create_api_key(alice, alice_project, "tests")
    return SimpleNamespace(
        raw=raw,
        plain=plain,
        prompted=prompted,
        model=f"{alice_project.slug}/production",
        prompted_model=f"{alice_project.slug}/staging",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(client, world, body: dict, path: str = "/v1/chat/completions", **headers):
    return client.post(
        path,
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {world.raw}", **headers},
    )


def chat(client, world, **fields):
    return post(client, world, {"model": world.model, "messages": QUESTION, **GREEDY, **fields})


def events(response) -> list[str]:
    """The SSE `data:` payloads of a streamed answer, read to its end."""
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    text = b"".join(response.streaming_content).decode()
    return [line[len("data: ") :] for line in text.split("\n\n") if line]


def assert_openai_error(response, status: int, param: str | None) -> dict:
    """An OpenAI-shaped JSON error naming `param`, its message ending with the request id."""
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    match = REQUEST_ID.search(body["error"]["message"])
    assert match and match.group(1) == response["x-request-id"], body
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error" or status != 400, body
    return body["error"]


# --- refused: a 400 naming the field, before the engine is asked --------------------

TOOL = {"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"tools": [TOOL]}, "tools", "does not call tools"),
        ({"tool_choice": "required"}, "tool_choice", "does not call tools"),
        ({"functions": [TOOL["function"]]}, "functions", "does not call tools"),
        ({"function_call": "auto"}, "function_call", "does not call tools"),
        ({"guided_json": {"type": "object"}}, "guided_json", "response_format"),
        ({"guided_choice": ["a", "b"]}, "guided_choice", "json_schema"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs", "response_format"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "text only"),
        ({"modalities": ["text", "audio"]}, "modalities", "text only"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "does not reason"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
        ({"echo": True}, "echo", "Unrecognized request argument supplied: echo"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
        ({"logprobs": 2}, "logprobs", "true or false"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ({"continue_final_message": True}, "continue_final_message", "final assistant message"),
        ({"frequency_penalty": 3}, "frequency_penalty", "between -2 and 2"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
            "Unrecognized",
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
            "messages[0].role",
            "does not call tools",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
            "messages[0].name",
            "only role and content",
        ),
        (
            {"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
            "messages[1].tool_calls",
            "does not call tools",
        ),
    ],
)
def test_it_refuses_what_it_would_drop_naming_the_field(client, world, down, fields, param, words):
    error = assert_openai_error(chat(client, world, **fields), 400, param)
    assert words in error["message"], error
    assert not RequestLog.objects.exists()  # refused before any model or engine is asked


def test_no_repeat_ngram_size_is_refused_on_vllm_only(client, world, down, settings):
    settings.INFERENCE_BACKEND = "vllm"
    error = assert_openai_error(chat(client, world, no_repeat_ngram_size=3), 400, "no_repeat_ngram_size")
    assert "vLLM" in error["message"] and error["code"] == "unsupported_parameter"
    assert chat(client, world).status_code == 503  # the same body without it passes to the (absent) engine
    settings.INFERENCE_BACKEND = "hf"
    assert chat(client, world, no_repeat_ngram_size=3).status_code == 503
    assert params.CHAT_FIELDS["no_repeat_ngram_size"].status("vllm") == params.REFUSED


def test_null_fields_and_null_message_keys_are_fields_not_sent(client, world, down):
    """SDKs serialise unset fields as null (and an assistant message they got back with
    tool_calls: []): nothing is asked, so nothing is refused."""
    messages = [
        *QUESTION,
        {"role": "assistant", "content": "Here.", "tool_calls": [], "refusal": None, "name": None},
        {"role": "user", "content": "Thanks"},
    ]
    response = chat(client, world, tools=None, tool_choice=None, logprobs=None, messages=messages)
    assert response.status_code == 503, response.content


def test_every_field_the_openai_sdk_can_send_is_in_the_table():
    """So none of them is refused as unknown by oversight: each has a decided status."""
    from openai.types import completion_create_params as text
    from openai.types.chat import completion_create_params as chat_params

    assert set(chat_params.CompletionCreateParamsBase.__annotations__) <= set(params.CHAT_FIELDS)
    assert set(text.CompletionCreateParamsBase.__annotations__) <= set(params.COMPLETION_FIELDS)
    for field in (*params.CHAT, *params.COMPLETIONS):
        assert {field.hf, field.vllm} <= {params.HONOURED, params.IGNORED, params.REFUSED}, field
        assert field.note and (field.refusal or params.REFUSED not in (field.hf, field.vllm)), field


def test_the_readme_shows_the_table():
    assert params.markdown_table() in (REPO / "README.md").read_text(encoding="utf-8")


# --- honoured: forwarded to the engine ---------------------------------------------


def test_honoured_fields_are_forwarded_to_the_engine(settings):
    base = {"model": "p/production", "messages": QUESTION}
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    sent = {
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": schema,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"42": 100},
        "top_k": 5,
        "min_p": 0.1,
        "min_tokens": 2,
        "ignore_eos": True,
        "seed": 7,
        "max_completion_tokens": 9,
        "max_tokens": 20,
    }
    out = check_params({**base, **sent})
    assert out["max_tokens"] == 9  # max_completion_tokens wins
    assert {k: out[k] for k in sent if k not in ("max_completion_tokens", "max_tokens")} == {
        **{k: v for k, v in sent.items() if k not in ("max_completion_tokens", "max_tokens")},
        "frequency_penalty": 0.5,
        "logit_bias": {"42": 100.0},
    }
    prefill = check_params(
        {
            **base,
            "messages": [*QUESTION, {"role": "assistant", "content": "Your parcel"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
    )
    assert (prefill["continue_final_message"], prefill["add_generation_prompt"]) == (True, False)
    # ignored fields are not forwarded; what is not sent is not either (the variant's rails fill it)
    plain = check_params({**base, "user": "u1", "store": True, "metadata": {"a": "b"}})
    assert set(plain) == {"messages", "max_tokens", "stream"}
    # the n x max_tokens rule counts every prompt of a legacy completion
    settings.V1_MAX_N_TIMES_TOKENS = 100
    with pytest.raises(OpenAIError) as too_many:
        check_completion_params({"model": "m", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 20})
    assert "prompts x n x max_tokens asks for 120 tokens" in str(too_many.value)


def test_a_prefilled_answer_continues_the_final_message(client, world, served):
    opened = [*QUESTION, {"role": "assistant", "content": "Your parcel is"}]
    plain = chat(client, world)
    continued = chat(client, world, messages=opened, continue_final_message=True, add_generation_prompt=False)
    assert plain.status_code == continued.status_code == 200, continued.content
    # the opening is part of the prompt the engine read, not a turn it answered after
    assert continued.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]


# --- ignored: accepted, logged --------------------------------------------------------


def test_ignored_fields_are_accepted_and_logged_with_the_request_id(client, world, served, caplog):
    ignored = {
        "user": "end-user-1",
        "metadata": {"team": "a"},
        "store": True,
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "safety_identifier": "s1",
        "prompt_cache_key": "k",
    }
    with caplog.at_level(logging.WARNING, logger="serving"):
        response = chat(client, world, **ignored)
        streamed = chat(client, world, stream=True, stream_options={"include_obfuscation": False})
        assert events(streamed)[-1] == "[DONE]"
    assert response.status_code == 200, response.content
    [line] = [r.getMessage() for r in caplog.records if response["x-request-id"] in r.getMessage()]
    assert "ignored" in line and all(name in line for name in ignored), line
    [line] = [r.getMessage() for r in caplog.records if streamed["x-request-id"] in r.getMessage()]
    assert "stream_options.include_obfuscation" in line


# --- the envelope ------------------------------------------------------------------------


def test_the_request_id_is_kept_in_the_request_log(client, world, served):
    whole = chat(client, world)
    streamed = chat(client, world, stream=True)
    events(streamed)
    logged = {e.request_id: e for e in RequestLog.objects.all()}
    assert set(logged) == {whole["x-request-id"], streamed["x-request-id"]}
    assert logged[whole["x-request-id"]].response["choices"] == whole.json()["choices"]
    assert RequestLog.objects.get(request_id=streamed["x-request-id"]).status == 200


def test_completions_and_chunks_carry_a_stable_system_fingerprint(client, world, served):
    first, again = chat(client, world).json(), chat(client, world).json()
    assert first["system_fingerprint"].startswith("fp_")
    assert first["system_fingerprint"] == again["system_fingerprint"]
    chunks = [json.loads(e) for e in events(chat(client, world, stream=True))[:-1]]
    assert chunks and {c["system_fingerprint"] for c in chunks} == {first["system_fingerprint"]}
    other = post(client, world, {"model": world.prompted_model, "messages": QUESTION, **GREEDY}).json()
    assert other["system_fingerprint"] != first["system_fingerprint"]  # another variant


def test_the_engines_cached_tokens_are_relayed(client, world, served):
    """The hf engine keeps no prefix cache between requests: it reports 0, and the client reads it."""
    whole = chat(client, world).json()
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    got = events(chat(client, world, stream=True, stream_options={"include_usage": True}))
    assert json.loads(got[-2])["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_model_cards_carry_max_model_len(client, world, lively_dir):
    auth = {"Authorization": f"Bearer {world.raw}"}
    cards = client.get("/v1/models", headers=auth).json()["data"]
    expected = json.loads((lively_dir / "config.json").read_text())["max_position_embeddings"]
    assert expected == 8192 and cards and {c["max_model_len"] for c in cards} == {expected}
    one = client.get(f"/v1/models/{world.model}", headers=auth).json()
    assert one["id"] == world.model and one["max_model_len"] == expected


@pytest.mark.parametrize(
    "method,path",
    [
        ("post", "/v1/chat/completions/"),
        ("post", "/v1/completions/"),
        ("post", "/v1/embeddings"),
        ("post", "/v1/responses"),
        ("get", "/v1"),
        ("get", "/v1/"),
    ],
)
def test_unknown_paths_are_a_json_404_naming_the_routes(client, world, method, path):
    response = getattr(client, method)(path, headers={"Authorization": f"Bearer {world.raw}"})
    error = assert_openai_error(response, 404, None)
    assert error["code"] == "unknown_url"
    assert "POST /v1/chat/completions" in error["message"] and "POST /v1/completions" in error["message"]


def test_cors_is_off_by_default_and_on_for_listed_origins_only(client, world, settings):
    auth = {"Authorization": f"Bearer {world.raw}"}
    app, other = "https://app.example.com", "https://evil.example.net"
    off = client.get("/v1/models", headers={**auth, "Origin": app})
    assert off.status_code == 200 and "Access-Control-Allow-Origin" not in off
    assert client.options("/v1/chat/completions", headers={"Origin": app}).status_code == 405

    settings.V1_CORS_ORIGINS = [app, "http://localhost:5173"]
    on = client.get("/v1/models", headers={**auth, "Origin": app})
    assert on.status_code == 200 and on["Access-Control-Allow-Origin"] == app
    assert "x-request-id" in on["Access-Control-Expose-Headers"] and "Origin" in on["Vary"]
    # the preflight carries no key: answered 204 before any is asked for
    preflight = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 204 and preflight.content == b""
    assert preflight["Access-Control-Allow-Origin"] == app
    allowed = {h.strip().lower() for h in preflight["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    assert {"GET", "POST"} <= {m.strip() for m in preflight["Access-Control-Allow-Methods"].split(",")}
    # an error is readable by the listed origin too
    refused = client.get("/v1/models", headers={"Origin": app})
    assert refused.status_code == 401 and refused["Access-Control-Allow-Origin"] == app
    # an origin not listed gets no CORS headers, and no preflight
    foreign = client.get("/v1/models", headers={**auth, "Origin": other})
    assert foreign.status_code == 200 and "Access-Control-Allow-Origin" not in foreign
    no = client.options("/v1/chat/completions", headers={"Origin": other})
    assert no.status_code == 405 and "Access-Control-Allow-Origin" not in no


# --- [DONE] after an in-stream error -------------------------------------------------------


def test_a_stream_that_fails_inside_the_engine_still_ends_with_done(client, world, served, monkeypatch):
    """The real engine gives up on an answer it cannot finish in time (its
    model held here): it reports the error inside the open stream."""
    import engines.engine_server

    monkeypatch.setattr(engines.engine_server, "ANSWER_TIMEOUT_S", 0.5)
    with served.engine._model_lock:
        response = chat(client, world, stream=True)
        got = events(response)
    assert got[-1] == "[DONE]"
    error = json.loads(got[-2])["error"]
    assert error["message"].endswith(f"(request id {response['x-request-id']})")
    assert RequestLog.objects.get(request_id=response["x-request-id"]).status == 502


class _HangsUp(BaseHTTPRequestHandler):
    """An engine that starts an answer and dies: one chunk, then the connection closes, no [DONE]."""

    protocol_version = "HTTP/1.1"

    def _json(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"object": "list", "data": [{"id": "tiny-lively", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny-lively"}
        chunk["choices"] = [{"index": 0, "delta": {"content": "Your par"}, "finish_reason": None}]
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_a_stream_the_engine_hangs_up_on_ends_with_an_error_and_done(client, world, settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HangsUp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings.ENGINE_URL = f"http://127.0.0.1:{server.server_address[1]}"
        response = chat(client, world, stream=True)
        got = events(response)
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads(got[0])["choices"][0]["delta"]["content"] == "Your par"
    assert "error" in json.loads(got[-2]) and got[-1] == "[DONE]"
    logged = RequestLog.objects.get(request_id=response["x-request-id"])
    assert logged.status == 502 and "error" in logged.response


# --- POST /v1/completions --------------------------------------------------------------------


def test_legacy_completions_end_to_end(client, world, served):
    body = {"model": world.model, "prompt": "The parcel is", **GREEDY}
    whole = post(client, world, body, "/v1/completions")
    assert whole.status_code == 200, whole.content
    data = whole.json()
    assert (data["object"], data["model"]) == ("text_completion", world.model)
    assert data["system_fingerprint"].startswith("fp_")
    [choice] = data["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    assert 0 < data["usage"]["completion_tokens"] <= GREEDY["max_tokens"]

    streamed = post(
        client, world, {**body, "stream": True, "stream_options": {"include_usage": True}}, "/v1/completions"
    )
    got = events(streamed)
    assert got[-1] == "[DONE]"
    chunks = [json.loads(e) for e in got[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and {c["model"] for c in chunks} == {
        world.model
    }
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == data["usage"]["completion_tokens"]

    # two prompts x n=2: four choices, prompt by prompt, and a prompt's rows agree when greedy
    many = post(client, world, {**body, "prompt": ["The parcel is", "Hello"], "n": 2}, "/v1/completions")
    assert many.status_code == 200, many.content
    texts = {c["index"]: c["text"] for c in many.json()["choices"]}
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]

    logged = RequestLog.objects.get(request_id=whole["x-request-id"])
    assert (
        logged.request["prompt"] == "The parcel is"
        and logged.response["choices"][0]["text"] == choice["text"]
    )
    logged = RequestLog.objects.get(request_id=streamed["x-request-id"])
    assert logged.response["object"] == "text_completion"
    assert logged.response["choices"][0]["text"] == choice["text"]
    assert logged.completion_tokens == data["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
        ({"prompt": [[1, 2]]}, "prompt", "token-id prompts"),
        ({"prompt": ""}, "prompt", "a non-empty string"),
        ({"prompt": None}, "prompt", "a non-empty string"),
        ({"suffix": "end"}, "suffix", "suffix"),
        ({"best_of": 3}, "best_of", "equal to n"),
        ({"logprobs": 6}, "logprobs", "between 0 and 5"),
        ({"logprobs": True}, "logprobs", "between 0 and 5"),
        ({"echo": "yes"}, "echo", "true or false"),
        ({"messages": QUESTION}, "messages", "Unrecognized request argument supplied: messages"),
        ({"tools": [TOOL]}, "tools", "Unrecognized"),
    ],
)
def test_legacy_completions_refuse_what_they_cannot_honour(client, world, down, fields, param, words):
    body = {"model": world.model, "prompt": "The parcel is", **GREEDY, **fields}
    error = assert_openai_error(post(client, world, body, "/v1/completions"), 400, param)
    assert words in error["message"], error
    # best_of equal to n is n itself: accepted (the engine is down: 503)
    ok = {**body, "best_of": 2, "n": 2} if param == "best_of" else None
    if ok:
        assert post(client, world, ok, "/v1/completions").status_code == 503


def test_legacy_completions_refuse_a_prompted_variant(client, world, down):
    body = {"model": world.prompted_model, "prompt": "The parcel is", **GREEDY}
    error = assert_openai_error(post(client, world, body, "/v1/completions"), 400, "model")
    assert "only /v1/chat/completions can carry" in error["message"]
    assert post(client, world, {**body, "model": world.model}, "/v1/completions").status_code == 503


def test_a_text_part_with_more_than_type_and_text_is_refused_naming_the_key():
    from serving.params import check_messages

    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(OpenAIError) as err:
        check_messages([{"role": "user", "content": [part]}])
    assert err.value.param == "messages[0].content[0].cache_control"
    check_messages([{"role": "user", "content": [{"type": "text", "text": "hi", "x": None}]}])
