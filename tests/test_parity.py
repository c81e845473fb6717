"""Template parity across the stack: the token ids a variant is trained on are
the ids every engine feeds it.

Here: the training renderer (engines.chat.prompt_completion, tokenized the way
engines.training does) against `engines.inference.encode` and the hf engine
server's /tokenize. The same conversations against vLLM's /tokenize, and the
greedy agreement of the two backends, are in tests/test_vllm_backend.py (they
share its vLLM server); this file runs whether or not vLLM is available.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engines.chat import prompt_completion
from engines.inference import encode
from engines.remote import conversation_messages
from engines.training import split_ids

pytestmark = pytest.mark.slow

LONG_SYSTEM = (
    "You are the support assistant of Acme Rail. Always answer in two sentences, start with 'Hello', "
    "never mention competitors, and sign off with '-- Acme'. "
) * 3

# (messages, system prompt): with and without a system prompt, multi-turn, unicode, odd whitespace.
CONVERSATIONS: list[tuple[list[dict[str, str]], str | None]] = [
    ([{"role": "user", "content": "What is the capital of France?"}], None),
    ([{"role": "user", "content": "What is the capital of France?"}], "You are a terse geography tutor."),
    ([{"role": "user", "content": "My train was late. Can I get a refund?"}], LONG_SYSTEM),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about trains."},
        ],
        None,
    ),
    (
        [
            {"role": "user", "content": "Translate 'good morning' to German."},
            {"role": "assistant", "content": "Guten Morgen."},
            {"role": "user", "content": "And to Japanese?"},
        ],
        "Answer with the translation only.",
    ),
    ([{"role": "user", "content": "Grüße aus Zürich! 你好，世界 👋🏽 — naïve café, ½ price?"}], None),
    (
        [{"role": "user", "content": "  leading and trailing spaces  \n\nand a blank line\n"}],
        "Système: réponds en français.",
    ),
    ([{"role": "user", "content": "Write a haiku about the sea."}], ""),
]

# Prompts whose greedy answers the backends are compared on.
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence what a CPU does.",
    "Write a haiku about autumn.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
    "Describe the colour of the sky on a clear day.",
    "What is the boiling point of water in Celsius?",
    "List two benefits of regular exercise.",
    "Say hello in Spanish.",
    "What does HTTP stand for?",
]


def training_prompt_ids(
    tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None
) -> list[int]:
    """The prompt part of a training example's ids, made exactly as
    engines.training makes them: render prompt and prompt+answer with the
    template, tokenize both without special tokens, the prompt ends where they diverge."""
    prompt, completion = prompt_completion(tokenizer, messages, "Sure, here it is.", system_prompt)
    [(full_ids, start)] = split_ids(tokenizer, [prompt], [prompt + completion])
    return full_ids[:start]


def common_prefix_share(a: list[int], b: list[int]) -> float:
    """Share of the longer sequence the two agree on from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)


def tokenize_remote(
    url: str, model: str, messages: list[dict[str, str]], system_prompt: str | None
) -> list[int]:
    response = httpx.post(
        url.rstrip("/") + "/tokenize",
        timeout=60,
        json={
            "model": model,
            "messages": conversation_messages(messages, system_prompt),
            "add_generation_prompt": True,
        },
    )
    assert response.status_code == 200, response.text
    return list(response.json()["tokens"])


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_training_renderer_and_inference_encode_give_the_same_ids(smol_tokenizer):
    for messages, system_prompt in CONVERSATIONS:
        trained = training_prompt_ids(smol_tokenizer, messages, system_prompt)
        assert trained == encode(smol_tokenizer, messages, system_prompt), (messages, system_prompt)
        cue = smol_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        assert trained[-len(cue) :] == cue


def test_the_hf_engine_tokenizes_exactly_as_training(smollm2_dir, smol_tokenizer, one_torch_thread):
    engine_server = pytest.importorskip("engines.engine_server")
    server = engine_server.EngineServer(models={"smol": str(smollm2_dir)}, port=0, threads=1)
    server.start()
    try:
        for messages, system_prompt in CONVERSATIONS:
            trained = training_prompt_ids(smol_tokenizer, messages, system_prompt)
            assert tokenize_remote(server.url, "smol", messages, system_prompt) == trained, (
                messages,
                system_prompt,
            )
    finally:
        server.stop()
