"""One owner for the OpenAI chat shape (engines.protocol): the roles, the
join of content parts and the system-prompt rule are the same for an upload,
a /v1 request, the hf engine and capture, down to the token ids."""

from __future__ import annotations

import io
import json

import pytest

from engines import formats, protocol
from engines.inference import encode
from engines.protocol import OpenAIError, apply_system_prompt, content_text, parse_messages, system_prompt_of

# One multi-part conversation, as a newer OpenAI SDK sends it.
PARTS = [
    {
        "role": "developer",
        "content": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Answer in French."},
        ],
    },
    {
        "role": "user",
        "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}],
    },
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "Et ensuite ?"},
]
EXPECTED = [
    {"role": "system", "content": "You are terse.\nAnswer in French."},
    {"role": "user", "content": "Part one.\nPart two."},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "Et ensuite ?"},
]


def test_text_parts_join_with_the_separator_vllm_uses():
    assert protocol.TEXT_PART_SEPARATOR == "\n"
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "m") == "a\nb"
    assert content_text("plain", "m") == "plain" and content_text([], "m") == ""
    assert parse_messages(PARTS) == EXPECTED


@pytest.mark.parametrize(
    "messages, param",
    [
        ("hi", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
        ),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": 3}]}],
            "messages[1].content",
        ),
    ],
)
def test_a_message_that_cannot_be_read_is_a_400_naming_where(messages, param):
    with pytest.raises(OpenAIError) as err:
        parse_messages(messages)
    assert err.value.status == 400 and err.value.param == param and err.value.message.startswith(param)
    assert err.value.body() == {
        "error": {"message": err.value.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_the_one_system_prompt_rule():
    messages = [
        {"role": "system", "content": "A"},
        {"role": "user", "content": "q"},
        {"role": "system", "content": "B"},
    ]
    assert system_prompt_of(messages) == "A\n\nB" and system_prompt_of(messages[1:2]) is None
    assert apply_system_prompt(messages, "P") == [
        {"role": "system", "content": "P"},
        {"role": "user", "content": "q"},
    ]
    assert apply_system_prompt(messages, None) == [{"role": "user", "content": "q"}]
    assert apply_system_prompt(messages, "") == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "q"},
    ]


def upload_messages(messages: list[dict]) -> list[dict[str, str]]:
    """The conversation read as an uploaded chat JSONL line."""
    line = json.dumps({"messages": messages}) + "\n"
    reader = formats.DatasetReader(
        io.BytesIO(line.encode()), "chat", limits=formats.Limits(), filename="parts.jsonl"
    )
    rows = list(reader)
    assert not reader.error_count, [e.reason for e in reader.errors]
    [row] = rows
    return [dict(m) for m in row.messages]


def gateway_messages(messages: list[dict]) -> list[dict[str, str]]:
    """The conversation as /v1 hands it to the engine."""
    from serving.gateway import check_params

    return check_params({"model": "p/production", "messages": messages})["messages"]


def engine_messages(messages: list[dict]) -> list[dict[str, str]]:
    """The conversation as the hf engine reads a request."""
    from engines.serving_engine import parse_chat_request

    return [dict(m) for m in parse_chat_request({"model": "m", "messages": messages}).messages]


def test_upload_v1_and_the_engine_read_one_conversation_alike(smollm2_dir):
    """The skew this guards against: uploads joined parts with "\\n", /v1 and
    the engine with "", so a message trained as "Part one.\\nPart two." and
    was served as "Part one.Part two."."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    read = {"upload": upload_messages(PARTS), "v1": gateway_messages(PARTS), "engine": engine_messages(PARTS)}
    assert all(messages == EXPECTED for messages in read.values()), read
    ids = {where: encode(tokenizer, m[:-1], system_prompt_of(m)) for where, m in read.items()}
    assert (
        ids["upload"]
        == ids["v1"]
        == ids["engine"]
        == encode(tokenizer, EXPECTED[:-1], "You are terse.\nAnswer in French.")
    )


def test_v1_bounds_come_from_generation_settings_and_caps_from_the_gateway(settings):
    from serving.gateway import check_params

    settings.GATEWAY_MAX_TOKENS = 100
    base = {"model": "p/production", "messages": [{"role": "user", "content": "hi"}]}
    for bad, param in (
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 17}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"stream": "yes"}, "stream"),
    ):
        with pytest.raises(OpenAIError) as err:
            check_params({**base, **bad})
        assert (err.value.status, err.value.param) == (400, param), bad
    # Only what the client gave goes to the engine (a variant's guard rails fill the rest).
    assert check_params({**base, "temperature": 0, "repetition_penalty": 1, "stop": "END"}) == {
        "messages": base["messages"],
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "stop": ["END"],
        "max_tokens": 100,
        "stream": False,
    }
    assert check_params({**base, "max_completion_tokens": 7, "n": 2})["max_tokens"] == 7


@pytest.fixture
def keyed(alice, alice_project, tiny_model_dir):
    from serving.actions import create_api_key
    from serving.models import Alias
    from workbench.models import FoundationModel, Variant

    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    variant = Variant.objects.create(project=alice_project, name="base", base_model=base)
    alias, _ = Alias.objects.update_or_create(
        project=alice_project, name="production", defaults={"variant": variant, "log_requests": True}
    )
    _key, raw = create_api_key(alice, alice_project, "tests")
    return raw, f"{alice_project.slug}/production", alias


@pytest.mark.django_db
def test_v1_refuses_bad_bodies_in_openai_shape_without_an_engine(client, keyed):
    """The gateway's checks, through Django's test client: no live server, no engine."""
    raw, model, _alias = keyed
    for bad, param in (
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": "hi"}, "messages"),
        ({"model": ""}, "model"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **bad}
        response = client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            content_type="application/json",
            headers={"Authorization": f"Bearer {raw}"},
        )
        assert response.status_code == 400, bad
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", bad
        assert error["message"].endswith(f"(request id {response['x-request-id']})")
    wrong = client.get("/v1/chat/completions", headers={"Authorization": f"Bearer {raw}"})
    assert (
        wrong.status_code == 405
        and wrong["Allow"] == "POST"
        and wrong.json()["error"]["code"] == "method_not_allowed"
    )


@pytest.mark.django_db
def test_capture_takes_what_the_gateway_took(alice, alice_project, keyed):
    """The gateway accepted role developer and text parts; capture refused them ("unknown role")."""
    from serving.capture import capture
    from serving.models import RequestLog

    _raw, model, alias = keyed
    entry = RequestLog.objects.create(
        project=alice_project,
        alias=alias,
        model=model,
        request={"model": model, "messages": PARTS[:2]},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "Voilà."}}]},
        status=200,
        latency_ms=1.0,
    )
    version = capture(alice_project, alice, [entry.pk], name="captured")
    [row] = version.rows.values_list("messages", flat=True)
    assert row == [*EXPECTED[:2], {"role": "assistant", "content": "Voilà."}]


def test_the_gateway_sends_vllm_api_key_as_a_bearer_token(settings):
    """VLLM_API_KEY was read by jobs only: the gateway's engine client sent no
    key, so a vLLM started with one refused every /v1 request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serving import engine_client

    seen: list[str | None] = []

    class Engine(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"object": "list", "data": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings.INFERENCE_BACKEND, settings.VLLM_URL = "vllm", f"http://127.0.0.1:{server.server_port}"
        settings.VLLM_API_KEY = "sk-vllm"
        assert engine_client.client().models() == []
        settings.VLLM_API_KEY = ""
        engine_client.client().models()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer sk-vllm", None]
