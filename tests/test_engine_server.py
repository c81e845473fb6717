"""The hf engine server (engines/engine_server.py): the OpenAI-compatible
protocol over the in-process engine, spoken to by the real `openai` client."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from engines.engine_server import EngineServer
from engines.inference import GenerationSettings, SettingsError, encode, generate
from engines.protocol import OpenAIError
from engines.serving_engine import parse_chat_request
from tests.conftest import build_random_lora

REPO = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "hello there"}]
PROMPTS = [
    "hello there",
    "what is the capital of France?",
    "tell me a joke",
    "x",
    "Write a haiku about rain.",
]


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A tiny LoRA whose random lora_B makes it change the model's answers."""
    return build_random_lora(base_dir, out, seed)


@pytest.fixture(scope="module")
def adapters(lively_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(lively_dir, root / name, seed) for seed, name in enumerate(["a1", "a2"], 1)}


@pytest.fixture(scope="module")
def server(lively_dir, one_torch_thread):
    # fp32 so that a row's greedy tokens do not depend on what shares its batch.
    with EngineServer({"tiny": lively_dir}, dtype="float32", threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, model="tiny", messages=HELLO, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def streamed(client, **kwargs):
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in ask(client, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, usage


def test_it_streams_the_same_greedy_text_and_counts_the_rendered_prompt(server, client):
    messages = [{"role": "system", "content": "You are terse."}, *HELLO]
    answer = ask(client, messages=messages)
    texts, finish, usage = streamed(client, messages=messages)
    assert answer.choices[0].message.content
    assert texts == {0: answer.choices[0].message.content}
    assert finish == {0: answer.choices[0].finish_reason}
    tokenizer = server.engine.loaded("tiny").tokenizer
    prompt_ids = encode(tokenizer, HELLO, "You are terse.")
    assert answer.usage.prompt_tokens == usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == usage.completion_tokens
    assert answer.usage.total_tokens == len(prompt_ids) + answer.usage.completion_tokens


def test_it_cuts_at_max_tokens_with_finish_reason_length(client):
    answer = ask(client, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5


def test_it_returns_n_choices_and_sums_their_tokens(client):
    answer = ask(client, n=2, temperature=1.0, seed=1, max_tokens=6)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens == ask(client, max_tokens=1).usage.prompt_tokens
    texts, finish, usage = streamed(client, n=2, temperature=1.0, seed=1, max_tokens=6)
    assert set(texts) == {0, 1} and finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12


def test_it_cuts_the_text_at_a_stop_string(client):
    full = ask(client, max_tokens=16).choices[0].message.content
    stop = full[6:9]
    expected = full[: full.find(stop)]
    answer = ask(client, max_tokens=16, stop=[stop, "never-said"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 16
    texts, finish, _ = streamed(client, max_tokens=16, stop=stop)
    assert texts == {0: expected} and finish == {0: "stop"}


def test_it_tokenizes_exactly_as_training_renders(server):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "héllo 👋"}]
    reply = httpx.post(
        server.url + "/tokenize", json={"model": "tiny", "messages": messages, "add_generation_prompt": True}
    ).json()
    expected = encode(server.engine.loaded("tiny").tokenizer, messages[1:], "Be kind.")
    assert reply["tokens"] == expected and reply["count"] == len(expected)
    assert reply["max_model_len"] == 8192


def test_it_joins_content_parts_as_uploads_do(server, client):
    """Was a training/serving skew: the engine joined text parts with "" where uploads join them with "\n"."""
    parts = [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]
    joined = [{"role": "user", "content": "Part one.\nPart two."}]
    expected = encode(server.engine.loaded("tiny").tokenizer, joined, None)
    reply = httpx.post(
        server.url + "/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": parts}]}
    )
    assert reply.json()["tokens"] == expected
    assert parse_chat_request(
        {"model": "tiny", "messages": [{"role": "user", "content": parts}]}
    ).messages == tuple(joined)
    assert ask(client, messages=[{"role": "user", "content": parts}]).usage.prompt_tokens == len(expected)
    # "developer" is OpenAI's newer name for the system role.
    developer = parse_chat_request(
        {"model": "tiny", "messages": [{"role": "developer", "content": "Be kind."}, *HELLO]}
    )
    assert developer.system_prompt == "Be kind."


def test_a_bug_is_a_logged_500_with_a_short_message_not_a_400(server, monkeypatch, caplog):
    def broken():
        raise KeyError("secret internals")

    monkeypatch.setattr(server.engine, "list_models", broken)
    with caplog.at_level("ERROR", logger="engines.engine_server"):
        answer = httpx.get(server.url + "/v1/models")
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


def test_it_loads_serves_mixes_and_unloads_adapters(server, client, adapters):
    for name, path in adapters.items():
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert r.status_code == 200, r.text
    # Loading the same adapter again is a no-op.
    again = httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(adapters["a1"])}
    )
    assert again.status_code == 200
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a1", "a2"}
    assert cards["a1"].parent == "tiny" and cards["a1"].root == str(adapters["a1"])
    assert cards["tiny"].parent is None

    models = ["tiny", "a1", "a2"]
    alone = {
        (m, p): ask(client, m, [{"role": "user", "content": p}]).choices[0].message.content
        for m in models
        for p in PROMPTS
    }
    assert any(alone[("a1", p)] != alone[("tiny", p)] for p in PROMPTS)
    assert any(alone[("a2", p)] != alone[("a1", p)] for p in PROMPTS)

    # One generate call for a batch that mixes both adapters and the bare base.
    engine = server.engine
    calls = engine.generate_calls
    pairs = [(m, p) for p in PROMPTS for m in models]
    tickets = engine.submit_many(
        [
            parse_chat_request(
                {"model": m, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 12}
            )
            for m, p in pairs
        ]
    )
    mixed = {pair: t.result(60).choices[0].text for pair, t in zip(pairs, tickets, strict=True)}
    assert engine.generate_calls == calls + 1
    assert mixed == alone

    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
    assert (
        ask(client, "a2", [{"role": "user", "content": PROMPTS[0]}]).choices[0].message.content
        == alone[("a2", PROMPTS[0])]
    )
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        ask(client, "a1")
    # With every adapter gone the base answers as before.
    assert (
        ask(client, "tiny", [{"role": "user", "content": PROMPTS[1]}]).choices[0].message.content
        == alone[("tiny", PROMPTS[1])]
    )
    gone = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert gone.status_code == 404


def test_it_refuses_adapters_that_are_missing_or_not_safetensors(server, tmp_path, adapters):
    missing = httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nope")}
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_path"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["a1"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    refused = httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(pickled)}
    )
    assert refused.status_code == 400 and "safetensors" in refused.json()["error"]["message"]
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "adapter_config.json").write_text((adapters["a1"] / "adapter_config.json").read_text())
    (garbled / "adapter_model.safetensors").write_bytes(b"not safetensors")
    unreadable = httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(garbled)}
    )
    assert unreadable.status_code == 400 and "could not read" in unreadable.json()["error"]["message"]
    no_name = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_path": str(adapters["a1"])})
    assert no_name.status_code == 400 and no_name.json()["error"]["param"] == "lora_name"
    assert "x" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


@pytest.mark.parametrize(
    "params, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stop": [""]}, "stop"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"seed": 2**70, "temperature": 1}, "seed"),  # was a 500: torch's seed overflowed inside generate
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
    ],
)
def test_it_answers_400_naming_the_bad_parameter(client, params, param):
    kwargs = {"messages": HELLO, **params}
    extra = {k: kwargs.pop(k) for k in ("repetition_penalty", "no_repeat_ngram_size") if k in kwargs} or None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", extra_body=extra, **kwargs)
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_it_answers_400_to_a_body_that_is_not_json_and_ignores_unknown_fields(server):
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 2, "whatever": {"x": 1}},
    )
    assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"


def test_it_answers_404_for_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_it_batches_concurrent_requests_into_fewer_generate_calls(server, client):
    calls = server.engine.generate_calls
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(
                lambda i: ask(client, messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=16),
                range(16),
            )
        )
    assert all(a.choices[0].message.content for a in answers)
    used = server.engine.generate_calls - calls
    assert 1 <= used < 16, used


def test_it_answers_429_when_the_queue_is_full_and_503_when_stopping(lively_dir, one_torch_thread):
    with EngineServer({"tiny": lively_dir}, dtype="float32", max_queue=1, max_batch=1) as small:
        flood = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0)
        start = threading.Barrier(12)

        def call(_: int) -> int:
            start.wait()
            try:
                ask(flood, max_tokens=40)
                return 200
            except openai.RateLimitError as exc:
                assert exc.body["type"] == "rate_limit_error" and exc.body["message"]
                return 429

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(call, range(12)))
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        small.engine.stop()
        with pytest.raises(openai.InternalServerError) as caught:
            ask(flood)
        assert caught.value.status_code == 503


def test_the_command_serves_until_sigterm_and_finishes_what_it_accepted(lively_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engines.engine_server",
            "--port",
            str(port),
            "--model",
            f"tiny={lively_dir}",
            "--dtype",
            "float32",
            "--batch-window-ms",
            "5",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == f"engine ready on http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(ask, client, max_tokens=2000)
            time.sleep(0.5)  # in flight: 2,000 tokens take seconds
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(openai.InternalServerError) as refused:
                ask(client)
            assert refused.value.status_code == 503
            answer = pending.result(timeout=60)
        assert answer.usage.completion_tokens == 2000
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generation_settings_take_repetition_penalty_ngrams_and_stop_strings():
    settings = GenerationSettings.from_dict(
        {"stop": ["###", "\n\n"], "repetition_penalty": 1.2, "no_repeat_ngram_size": 3.0}
    )
    assert settings.stop == ("###", "\n\n") and settings.no_repeat_ngram_size == 3
    assert GenerationSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert GenerationSettings.from_dict({"stop": "END"}).stop == ("END",)
    with pytest.raises(SettingsError) as caught:
        GenerationSettings.from_dict(
            {"stop": ["ok", ""], "repetition_penalty": 0, "no_repeat_ngram_size": -1}
        )
    assert set(caught.value.errors) == {"stop", "repetition_penalty", "no_repeat_ngram_size"}
    with pytest.raises(SettingsError, match="at most 8"):
        GenerationSettings(stop=tuple(str(i) for i in range(9)))
    # The guard rails a variant keeps: only what differs from the defaults, as JSON.
    assert settings.guard_rails() == {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        "stop": ["###", "\n\n"],
    }
    assert GenerationSettings(temperature=0.7, max_new_tokens=9).guard_rails() == {}


def test_teacher_generation_and_the_server_answer_alike(server, client):
    """One generation config and one stop logic: engines.inference.generate
    (teacher, evals) gives the server's text for the same settings."""
    loaded = server.engine.loaded("tiny")
    full = ask(client, max_tokens=16).choices[0].message.content
    stop = full[4:7]
    for settings, extra in [
        (GenerationSettings(max_new_tokens=16, stop=(stop,)), {"stop": [stop]}),
        (
            GenerationSettings(max_new_tokens=16, repetition_penalty=0.05),
            {"extra_body": {"repetition_penalty": 0.05}},
        ),
    ]:
        [teacher] = generate(loaded, [HELLO], None, settings)
        served = ask(client, max_tokens=16, **extra)
        assert teacher.text == served.choices[0].message.content
        assert teacher.finish_reason == served.choices[0].finish_reason
        assert teacher.completion_tokens == served.usage.completion_tokens
    assert teacher.text != full  # the penalty (below 1: repeat!) changed the answer


def test_it_loads_base_models_on_request_and_asks_which_base_an_adapter_is_for(
    lively_dir, tiny_model_dir, adapters, one_torch_thread
):
    with EngineServer(dtype="float32") as bare:
        url = bare.url
        assert httpx.get(url + "/v1/models").json() == {"object": "list", "data": []}
        for name, path in [("lively", lively_dir), ("plain", tiny_model_dir)]:
            r = httpx.post(url + "/v1/load_model", json={"model": name, "path": str(path)}, timeout=60)
            assert r.status_code == 200 and r.json()["loaded"] is True
        again = httpx.post(url + "/v1/load_model", json={"model": "lively", "path": str(lively_dir)})
        assert again.status_code == 200 and again.json()["loaded"] is False
        clash = httpx.post(url + "/v1/load_model", json={"model": "lively", "path": str(tiny_model_dir)})
        assert clash.status_code == 400
        not_a_model = httpx.post(url + "/v1/load_model", json={"model": "x", "path": str(adapters["a1"])})
        assert (
            not_a_model.status_code == 400
            and "not a model directory" in not_a_model.json()["error"]["message"]
        )

        body = {"lora_name": "a1", "lora_path": str(adapters["a1"])}
        which = httpx.post(url + "/v1/load_lora_adapter", json=body)
        assert which.status_code == 400 and which.json()["error"]["param"] == "base_model_name"
        loaded = httpx.post(url + "/v1/load_lora_adapter", json={**body, "base_model_name": "lively"})
        assert loaded.status_code == 200
        cards = {m["id"]: m["parent"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert cards == {"lively": None, "plain": None, "a1": "lively"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert ask(client, "plain").choices[0].message.content is not None
        assert ask(client, "a1").choices[0].message.content


def test_streamed_pieces_add_up_to_the_answer_for_every_prompt(client):
    # Random tokens split multi-byte characters: pieces are cut from the cumulative decoding.
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        answer = ask(client, messages=messages, max_tokens=24).choices[0].message.content
        texts, _, _ = streamed(client, messages=messages, max_tokens=24)
        assert texts == {0: answer}


def test_it_refuses_a_deep_or_oversized_body_before_parsing_it(server, monkeypatch):
    import engines.engine_server as engine_server

    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(server.url + "/v1/chat/completions", content=deep)
    assert answer.status_code == 400 and "nested more than 32 levels" in answer.json()["error"]["message"]
    monkeypatch.setattr(engine_server, "MAX_BODY_BYTES", 100)
    big = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "pad": "x" * 200}
    )
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"


def test_it_serves_projects_round_robin_not_first_come(lively_dir, one_torch_thread):
    """A flood of project A queued first: B's one request goes in the next batch, not after A's queue."""
    with EngineServer({"tiny": lively_dir}, dtype="float32", max_batch=2) as fair:
        finished: list[str] = []
        lock = threading.Lock()

        def call(project: str) -> int:
            r = httpx.post(
                fair.url + "/v1/chat/completions",
                timeout=120,
                headers={"X-Project": project},
                json={"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 16},
            )
            with lock:
                finished.append(project)
            return r.status_code

        with ThreadPoolExecutor(14) as pool:
            with fair.engine._model_lock:  # the batcher waits with its first batch; the rest queue
                flood = [pool.submit(call, "A") for _ in range(12)]
                deadline = time.monotonic() + 30
                while fair.engine.queued_rows() < 10 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.5)
                # /health reports the queue depth (what operators and the serving page read)
                before = httpx.get(fair.url + "/health").json()["queued_rows"]
                assert before == fair.engine.queued_rows() >= 10
                small = pool.submit(call, "B")
                while fair.engine.queued_rows() < before + 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert httpx.get(fair.url + "/health").json() == {"status": "ok", "queued_rows": before + 1}
            assert [f.result() for f in flood] == [200] * 12 and small.result() == 200
    assert finished.index("B") <= 3, finished  # first come would serve it 13th


def test_no_project_may_fill_the_queue(lively_dir, one_torch_thread):
    with EngineServer({"tiny": lively_dir}, dtype="float32", max_batch=1, max_queue=8) as small:
        engine = small.engine
        assert engine.max_queue_per_project == 4

        def request(project):
            return parse_chat_request({"model": "tiny", "messages": HELLO, "max_tokens": 2}, project)

        with engine._model_lock:
            tickets = [engine.submit(request("A"))]
            deadline = time.monotonic() + 30
            while engine.queued_rows() and time.monotonic() < deadline:  # the batcher holds it at the lock
                time.sleep(0.02)
            tickets += engine.submit_many([request("A") for _ in range(4)])
            with pytest.raises(OpenAIError) as caught:
                engine.submit(request("A"))
            assert caught.value.status == 429 and caught.value.code == "project_queue_full"
            tickets += [engine.submit(request("B")), engine.submit(request(None))]
        assert all(t.result(timeout=60).choices for t in tickets)


def test_clients_one_call_answered_come_back_to_the_same_next_call(lively_dir, one_torch_thread):
    """Four clients in a loop, two with short streamed answers and two with
    long ones: the short ones return while the call still runs. Waiting for the others after
    the call keeps whole batches; taking what queued at once split them into
    halves in turn (the load run's 8.4 rows a call at max batch 16)."""
    with EngineServer(
        {"tiny": lively_dir}, dtype="float32", threads=1, max_batch=4, batch_window_ms=200
    ) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        engine = running.engine

        def rows_per_call(rejoin: bool) -> float:
            engine.rejoin = rejoin
            calls, rows = engine.generate_calls, engine.rows_generated
            start = threading.Barrier(4)

            def loop(c: int) -> None:
                start.wait()
                for _ in range(6):
                    if c % 2:  # streamed: its answer is out the moment its row ends
                        list(ask(client, max_tokens=2, stream=True))
                    else:
                        ask(client, max_tokens=96, extra_body={"ignore_eos": True})

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(loop, range(4)))
            return (engine.rows_generated - rows) / (engine.generate_calls - calls)

        apart, together = rows_per_call(False), rows_per_call(True)
    print(f"\nrows per call: {apart:.2f} taking what queued, {together:.2f} waiting for the callers")
    assert together >= 3.0 and together > apart


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/load_model", {"model": "m", "path": "/nowhere", "lora_path": 7}, "lora_path"),
        ("/v1/load_model", {"model": "m", "path": "/nowhere", "lora_path": ""}, "lora_path"),
        ("/v1/unload_model", {"model": ["tiny"]}, "model"),
        ("/v1/unload_model", [1, 2], "model"),
    ],
)
def test_the_merged_model_routes_answer_400_to_bad_bodies(server, path, body, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]} >= {"tiny"}


def test_unloading_an_unknown_model_is_a_404_and_a_base_with_adapters_a_400(server, adapters):
    assert httpx.post(server.url + "/v1/unload_model", json={"model": "nope"}).status_code == 404
    r = httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "held", "lora_path": str(adapters["a1"])}
    )
    assert r.status_code == 200
    try:
        refused = httpx.post(server.url + "/v1/unload_model", json={"model": "tiny"})
        assert refused.status_code == 400 and "unload them first" in refused.json()["error"]["message"]
    finally:
        httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "held"})
