from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engines import inference
from engines.chat import prompt_completion, render
from engines.inference import (
    GenerationCancelled,
    GenerationSettings,
    ModelLoadError,
    SettingsError,
    count_tokens,
    generate,
    generation,
    load_model,
)
from engines.protocol import OpenAIError

# One torch thread: see the one_torch_thread fixture.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "\n".join(
    [
        "You are the support assistant of Lumen Cloud Backup.",
        *(
            f"Rule {i}: answer in at most {i + 2} sentences and mention plan number {i}."
            for i in range(1, 16)
        ),
        "Plans: Solo 100 GB, Family 2 TB, Team 10 TB. Refunds within 14 days.",
    ]
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "How do I restore a file that I deleted from my laptop last week?"}],
    [{"role": "system", "content": "replaced by the shared prompt"}, {"role": "user", "content": "Refund?"}],
    [
        {"role": "user", "content": "Which plan should I pick?"},
        {"role": "assistant", "content": "How much data do you have?"},
        {"role": "user", "content": "About 1.5 TB, spread over four computers and two phones."},
    ],
    [{"role": "user", "content": "What does error E104 mean and how can I fix it without losing data?"}],
    [{"role": "user", "content": "Is my data encrypted?"}],
    [{"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def lively(lively_dir: Path) -> inference.LoadedModel:
    return load_model(lively_dir)


def texts(completions: list[inference.Completion]) -> list[tuple[str, int, str]]:
    return [(c.text, c.completion_tokens, c.finish_reason) for c in completions]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_it_gives_the_same_greedy_tokens_with_and_without_prefix_reuse(lively, monkeypatch, batch_size):
    prefix_lengths = []
    encode_prefix = generation._encode_prefix

    def recording(loaded, prefix):
        prefix_lengths.append(len(prefix))
        return encode_prefix(loaded, prefix)

    monkeypatch.setattr(generation, "_encode_prefix", recording)
    settings = GenerationSettings(max_new_tokens=8)
    plain = generate(
        lively, CONVERSATIONS, SYSTEM, replace(settings, batch_size=batch_size), reuse_prefix=False
    )
    assert prefix_lengths == []
    reused = generate(
        lively, CONVERSATIONS, SYSTEM, replace(settings, batch_size=batch_size), reuse_prefix=True
    )
    assert len(prefix_lengths) == 1 and prefix_lengths[0] > 200

    assert texts(reused) == texts(plain)
    assert len({c.text for c in plain}) == len(CONVERSATIONS)  # the outputs really depend on the input


def test_it_returns_results_in_input_order(lively):
    settings = GenerationSettings(max_new_tokens=6)
    batched = generate(lively, CONVERSATIONS, SYSTEM, replace(settings, batch_size=3))
    one_by_one = [generate(lively, [conv], SYSTEM, settings)[0] for conv in CONVERSATIONS]
    assert texts(batched) == texts(one_by_one)
    assert [c.prompt_tokens for c in batched] == [
        count_tokens(lively.tokenizer, c, SYSTEM) for c in CONVERSATIONS
    ]


def test_it_counts_the_tokens_of_the_rendered_prompt(lively):
    tok = lively.tokenizer
    messages = CONVERSATIONS[3]
    # The ids are the rendered prompt, nothing added: they decode back to it.
    assert tok.decode(inference.encode(tok, messages, SYSTEM)) == render(tok, messages, SYSTEM)
    [answer] = generate(lively, [messages], SYSTEM, GenerationSettings(max_new_tokens=1))
    assert count_tokens(tok, messages, SYSTEM) == answer.prompt_tokens
    # The template's default system message still costs tokens.
    assert 20 < count_tokens(tok, messages, None) < count_tokens(tok, messages, SYSTEM)


def test_it_honours_max_new_tokens(lively):
    completions = generate(lively, CONVERSATIONS, SYSTEM, GenerationSettings(max_new_tokens=5))
    assert {(c.completion_tokens, c.finish_reason) for c in completions} == {(5, "length")}
    assert all(c.text and c.seconds > 0 for c in completions)


def test_it_validates_generation_settings_by_field():
    assert GenerationSettings.from_dict({"max_new_tokens": 64.0, "seed": None}).max_new_tokens == 64
    with pytest.raises(SettingsError) as err:
        GenerationSettings.from_dict(
            {"max_new_tokens": 0, "batch_size": "8", "temperature": -1, "top_p": 0, "beams": 2}
        )
    assert set(err.value.errors) == {"beams"}
    with pytest.raises(SettingsError) as err:
        GenerationSettings.from_dict({"max_new_tokens": 0, "batch_size": "8", "temperature": -1, "top_p": 0})
    assert set(err.value.errors) == {"max_new_tokens", "batch_size", "temperature", "top_p"}
    assert "between 1 and 4096" in err.value.errors["max_new_tokens"]


def test_it_reports_progress_and_stops_between_batches(lively):
    calls: list[tuple[int, int]] = []
    generate(
        lively,
        CONVERSATIONS,
        SYSTEM,
        GenerationSettings(max_new_tokens=2, batch_size=3),
        progress=lambda p: calls.append((p.done, p.total)),
    )
    assert calls == [(3, 7), (6, 7), (7, 7)]

    calls.clear()
    with pytest.raises(GenerationCancelled) as cancelled:
        generate(
            lively,
            CONVERSATIONS,
            SYSTEM,
            GenerationSettings(max_new_tokens=2, batch_size=3),
            progress=lambda p: calls.append((p.done, p.total)),
            should_stop=lambda: bool(calls),
        )
    assert calls == [(3, 7)]
    assert (cancelled.value.done, cancelled.value.total) == (3, 7)


def test_it_samples_reproducibly_with_a_seed(lively):
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    first = generate(lively, CONVERSATIONS[:3], SYSTEM, settings)
    assert texts(generate(lively, CONVERSATIONS[:3], SYSTEM, settings)) == texts(first)


def test_it_stops_on_end_of_turn_and_loads_an_adapter(lively_dir, lively, tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = lively.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in lively.stop_token_ids

    # Teach a LoRA adapter to answer "Arrr!" and end its turn.
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    )
    rows = []
    for conv in CONVERSATIONS:
        prompt, completion = prompt_completion(tok, conv, "Arrr!")
        rows.append(tok(prompt + completion, add_special_tokens=False)["input_ids"])
    n = len(tok(completion, add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(12):
        # Left-padded, so every row's completion is its last n tokens.
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=n + 1).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, -n:].reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    settings = GenerationSettings(max_new_tokens=10)
    expected_tokens = len(tok("Arrr!", add_special_tokens=False)["input_ids"]) + 1
    for merge in (False, True):
        pirate = load_model(lively_dir, adapter_dir=tmp_path / "adapter", merge=merge)
        completions = generate(pirate, CONVERSATIONS[:4], None, replace(settings, batch_size=2))
        assert texts(completions) == [("Arrr!", expected_tokens, "stop")] * 4
    # The eval arm "adapter with prompt" reuses the prefix through the unmerged PeftModel.
    pirate = load_model(lively_dir, adapter_dir=tmp_path / "adapter")
    reused = generate(pirate, CONVERSATIONS, SYSTEM, replace(settings, batch_size=4))
    assert texts(reused) == texts(
        generate(pirate, CONVERSATIONS, SYSTEM, replace(settings, batch_size=4), reuse_prefix=False)
    )
    assert "Arrr!" not in {c.text for c in generate(lively, CONVERSATIONS[:4], None, settings)}


def test_it_refuses_weights_that_are_not_safetensors(tmp_path, lively_dir):
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors"):
        load_model(lively_dir, adapter_dir=adapter)


@pytest.mark.slow
def test_it_follows_the_pirate_prompt_on_smollm2(smollm2_dir):
    loaded = load_model(smollm2_dir)
    completions = generate(
        loaded,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        "You are a pirate. Always start with 'Arrr!'",
        GenerationSettings(max_new_tokens=8),
    )
    assert "Arr" in completions[0].text


def test_the_no_repeat_ngram_ban_covers_the_completion_only():
    import torch

    def pick(ids: list[int], best: int) -> int:
        sampler = inference.RowSampler([GenerationSettings(no_repeat_ngram_size=3)], 4, stop_ids=[])
        scores = torch.zeros(1, 12)
        scores[0, best] = 5.0
        return int(sampler(torch.tensor([ids]), scores).argmax())

    # prompt 1 2 9 5 | completion 1 2 3 1 2: "1 2 3" was written, so 3 may not follow "1 2" again;
    # "1 2 9" is in the prompt only, so 9 may.
    assert pick([1, 2, 9, 5, 1, 2, 3, 1, 2], best=3) != 3
    assert pick([1, 2, 9, 5, 1, 2, 3, 1, 2], best=9) == 9
    assert pick([1, 2, 9, 5, 1, 2], best=3) == 3


def test_no_completion_repeats_an_ngram_with_the_ban(tiny_model_dir):
    import torch

    looping = load_model(tiny_model_dir)  # default-initialised: it repeats one token forever
    ids = torch.tensor([looping.tokenizer.encode("Tell me about the item.")])

    def completion(n: int) -> list[int]:
        s = GenerationSettings(max_new_tokens=40, no_repeat_ngram_size=n)
        out = looping.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=inference.generation_config(looping, s),
            logits_processor=inference.row_sampler(looping, [s], ids.shape[1], [None])[0],
        )
        return out[0, ids.shape[1] :].tolist()

    def repeats(tokens: list[int]) -> int:
        pairs = list(zip(tokens, tokens[1:], strict=False))
        return len(pairs) - len(set(pairs))

    assert repeats(completion(0)) > 30
    assert repeats(completion(2)) == 0


def test_a_generated_nul_becomes_a_replacement_character(lively):
    """PostgreSQL stores no NUL in text or JSON: a teacher answer holding one
    would fail the whole job there."""
    ids = lively.tokenizer.encode("a\x00b", add_special_tokens=False)
    assert "\x00" in lively.tokenizer.decode(ids)
    assert inference.decode_text(lively.tokenizer, ids) == "a\ufffdb"


def test_settings_and_the_gateway_share_one_table_of_bounds():
    """Teacher and eval jobs used to accept temperature 5, which /v1 refused."""
    for bad in ({"temperature": 5}, {"repetition_penalty": 11}, {"seed": 2**70}):
        with pytest.raises(SettingsError) as err:
            GenerationSettings.from_dict(bad)
        assert set(err.value.errors) == set(bad)
        with pytest.raises(OpenAIError) as refused:
            GenerationSettings.from_openai(bad)
        assert refused.value.status == 400 and refused.value.param == next(iter(bad))
    assert GenerationSettings.from_dict({"temperature": 2, "seed": 2**63 - 1}).temperature == 2


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x" * 1001]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"no_repeat_ngram_size": 65}, "no_repeat_ngram_size"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_from_openai_names_the_openai_parameter(body, param):
    with pytest.raises(OpenAIError) as err:
        GenerationSettings.from_openai(body)
    assert err.value.status == 400 and err.value.param == param and err.value.message.startswith(param)
    assert err.value.body()["error"]["param"] == param


def test_from_openai_takes_openai_defaults_then_the_given_defaults():
    plain = GenerationSettings.from_openai({"messages": [], "model": "m", "n": 2, "logit_bias": {}})
    assert (plain.max_new_tokens, plain.temperature, plain.top_p, plain.stop) == (256, 1.0, 1.0, ())
    railed = GenerationSettings.from_openai(
        {"max_completion_tokens": 9, "stop": "END"}, defaults={"repetition_penalty": 1.3, "stop": ["x"]}
    )
    assert (railed.max_new_tokens, railed.repetition_penalty, railed.stop) == (9, 1.3, ("END",))
    assert GenerationSettings.from_openai(railed.to_openai()) == railed
    assert railed.to_openai(["max_completion_tokens", "stop"]) == {"max_tokens": 9, "stop": ["END"]}


def test_left_pad_lines_rows_up_on_the_right_after_a_shared_prefix():
    ids, mask = inference.left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = inference.left_pad([[5, 6], [7]], pad_id=0, prefix=[1, 2])
    assert ids.tolist() == [[1, 2, 5, 6], [1, 2, 0, 7]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_a_template_that_refuses_the_probe_is_logged_and_other_errors_raise(caplog):
    from jinja2 import TemplateError

    from engines.inference import loading

    class Refusing:
        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("Conversation roles must alternate")

    with caplog.at_level("WARNING", logger="engines.inference.loading"):
        assert loading._end_of_turn_id(Refusing()) is None
    assert "roles must alternate" in caplog.text

    class Broken:
        def apply_chat_template(self, *args, **kwargs):
            raise KeyError("a bug, not a template without assistant turns")

    with pytest.raises(KeyError):
        loading._end_of_turn_id(Broken())
