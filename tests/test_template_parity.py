"""Template parity: what the student is trained on is byte-for-byte what
inference (teacher, evals, serving) feeds it for "no system prompt"."""

import pytest
from transformers import AutoTokenizer

from engines.chat import render
from engines.inference import encode
from engines.training import tokenize_examples

CONVERSATIONS = [
    [{"role": "user", "content": "How do I reset my password?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Where is my parcel #4411?"},
    ],
    [
        {"role": "system", "content": "a system message in the data is replaced, never trained on"},
        {"role": "user", "content": "Ünïcödé and emoji 🚀, tabs\tand\nnewlines"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_training_and_inference_render_no_prompt_identically(tokenizer, messages):
    features, skipped = tokenize_examples(tokenizer, [{"messages": messages, "answer": "Arrr! Done."}], 4096)
    assert skipped == 0
    ids, labels = features[0]["input_ids"], features[0]["labels"]
    prompt_len = labels.index(next(x for x in labels if x != -100))
    served = encode(tokenizer, messages, None)
    assert ids[:prompt_len] == served
    text = tokenizer.decode(served)
    assert text == render(tokenizer, messages, None)
    assert "a system message in the data" not in text
    # SmolLM2's template injects its default system message when none is given:
    # training sees it too, exactly as a client that sends no system message.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tokenizer.decode(ids[prompt_len:]) == "Arrr! Done.<|im_end|>\n"


def test_the_teacher_rendering_differs_only_by_the_system_prompt(tokenizer):
    msgs = CONVERSATIONS[0]
    with_prompt = tokenizer.decode(encode(tokenizer, msgs, "You are a pirate."))
    assert with_prompt == render(tokenizer, msgs, "You are a pirate.")
    assert with_prompt.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n")
