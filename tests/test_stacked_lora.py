"""The engine's own LoRA layers (engines/serving_engine/lora.py) against peft:
the same logits for one adapter, for a batch mixing adapters and bare-base
rows, and the plain base once every adapter is gone; adapters peft would load
in a way the engine cannot serve are refused before anything changes."""

import json
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engines.protocol import OpenAIError
from engines.serving_engine import ServingEngine, parse_chat_request
from engines.serving_engine.lora import AdapterError, AdapterSet, LoRALinear, read_adapter
from tests.conftest import build_random_lora


def lora(base_dir: Path, out: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    settings.update(config)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(lively_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    return {
        "a": build_random_lora(lively_dir, root / "a", 1),
        # Another rank, other modules, rsLoRA and a per-module alpha: the stack pads and scales each.
        "b": lora(
            lively_dir,
            root / "b",
            2,
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "o_proj", "down_proj"],
        ),
        "c": lora(
            lively_dir, root / "c", 3, target_modules=["v_proj", "up_proj"], alpha_pattern={"up_proj": 32}
        ),
    }


def base_model(lively_dir):
    return AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32).eval()


def batch(tokenizer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in tokenizer_ids)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in tokenizer_ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in tokenizer_ids])
    return {"input_ids": ids, "attention_mask": mask}


ROWS = [[5, 17, 42, 9, 3], [8, 8, 120, 7], [1, 2, 3, 4, 5, 6], [33, 99]]


def peft_logits(lively_dir, adapters, name):
    model = base_model(lively_dir)
    if name is None:
        with torch.inference_mode():
            return model(**batch(ROWS)).logits
    peft_model = PeftModel.from_pretrained(model, str(adapters[name]), adapter_name=name).eval()
    with torch.inference_mode():
        return peft_model(**batch(ROWS)).logits


def test_rows_get_their_own_adapter_as_peft_computes_it(lively_dir, adapters):
    want = {name: peft_logits(lively_dir, adapters, name) for name in [None, "a", "b", "c"]}
    model = base_model(lively_dir)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    lora_set = AdapterSet(model)
    for name, folder in adapters.items():
        lora_set.add(name, read_adapter(model, folder))
    assert any(isinstance(m, LoRALinear) for m in model.modules())

    with torch.inference_mode():
        assert torch.equal(model(**batch(ROWS)).logits, want[None])  # not routed: the bare base
        for name in ["a", "b", "c"]:
            with lora_set.route([name] * len(ROWS)):
                got = model(**batch(ROWS)).logits
            assert torch.allclose(got, want[name], atol=1e-5), name
        assert not torch.allclose(want["a"], want[None], atol=1e-3)

        mix = ["a", None, "b", "c"]
        with lora_set.route(mix):
            got = model(**batch(ROWS)).logits
            again = model(**batch(ROWS)).logits  # the gathered weights are kept for the call
        for row, name in enumerate(mix):
            assert torch.allclose(got[row], want[name][row], atol=1e-5), (row, name)
        assert torch.equal(got, again)

    for name in adapters:
        lora_set.unload(name)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        assert torch.equal(model(**batch(ROWS)).logits, want[None])


def save_variant(src: Path, dest: Path, config=None, weights=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors.update(weights or {})
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    return dest


def test_what_the_engine_cannot_serve_is_refused_and_changes_nothing(lively_dir, adapters, tmp_path):
    model = base_model(lively_dir)
    src = adapters["a"]
    key = next(iter(load_file(str(src / "adapter_model.safetensors"))))
    cases = {
        "modules_to_save": save_variant(src, tmp_path / "mts", {"modules_to_save": ["lm_head"]}),
        "bias": save_variant(src, tmp_path / "bias", {"bias": "all"}),
        "fan_in_fan_out": save_variant(src, tmp_path / "fifo", {"fan_in_fan_out": True}),
        "not a LoRA matrix": save_variant(
            src, tmp_path / "extra", weights={"base_model.model.lm_head.weight": torch.zeros(2, 2)}
        ),
        "not a Linear layer": save_variant(
            src,
            tmp_path / "emb",
            weights={
                "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 10),
                "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(10, 4),
            },
        ),
        "does not fit": save_variant(src, tmp_path / "shape", weights={key: torch.zeros(4, 3)}),
        "not a plain LoRA": save_variant(src, tmp_path / "ia3", {"peft_type": "IA3"}),
        "with DoRA": save_variant(src, tmp_path / "dora", {"use_dora": True}),
    }
    lora_set = AdapterSet(model)
    for why, folder in cases.items():
        with pytest.raises(AdapterError, match=why):
            lora_set.add("x", read_adapter(model, folder))
    assert len(lora_set) == 0 and not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.fixture
def engine(lively_dir, one_torch_thread):
    """The engine (fp32: a row's greedy tokens do not hang on its batch) holding the tiny base."""
    running = ServingEngine(dtype="float32", batch_window_ms=5, threads=1)
    running.load_base("tiny", lively_dir)
    running.start()
    yield running
    running.stop()


def greedy(engine, model: str, prompt: str, max_tokens: int = 8) -> str:
    request = parse_chat_request(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
    )
    return engine.submit(request).result(120).choices[0].text


def test_adapters_load_and_unload_while_requests_run(engine, adapters):
    engine.load_adapter("a", adapters["a"])

    def ask(model, prompt):
        return greedy(engine, model, prompt)

    prompts = ["hello there", "tell me a joke", "x", "what is 2+2?"]
    alone = {(m, p): ask(m, p) for m in ["tiny", "a"] for p in prompts}
    answers: list[tuple[str, str, str]] = []
    stop = threading.Event()

    def client(model):
        while not stop.is_set():
            for p in prompts:
                answers.append((model, p, ask(model, p)))

    threads = [threading.Thread(target=client, args=(m,)) for m in ["tiny", "a", "a"]]
    for t in threads:
        t.start()
    # b and c come and go under the running requests of the base and of a.
    for _ in range(3):
        engine.load_adapter("b", adapters["b"])
        engine.load_adapter("c", adapters["c"])
        assert ask("b", "x")
        engine.unload_adapter("b")
        engine.unload_adapter("c")
    stop.set()
    for t in threads:
        t.join(120)
    assert len(answers) >= 6
    assert all(text == alone[(m, p)] for m, p, text in answers)


def test_a_merged_deployment_answers_as_the_adapter_and_unloads(engine, lively_dir, adapters, tmp_path):
    engine.load_adapter("a", adapters["a"])
    assert engine.load_base("a-merged", lively_dir, merge=adapters["a"])
    assert not engine.load_base("a-merged", lively_dir, merge=adapters["a"])  # already there
    card = next(m for m in engine.list_models() if m["id"] == "a-merged")
    assert card["parent"] is None and card["merged"] == str(adapters["a"])

    def ask(model, prompt):
        return greedy(engine, model, prompt, 10)

    prompts = ["hello there", "tell me a joke", "x", "Write a haiku about rain."]
    adapter = [ask("a", p) for p in prompts]
    assert [ask("a-merged", p) for p in prompts] == adapter
    assert adapter != [ask("tiny", p) for p in prompts]

    # The weights themselves: W + scale * B @ A, so the logits match the routed adapter's.
    merged = engine.models.resolve("a-merged")[0].loaded.model
    base = engine.models.resolve("tiny")[0]
    with torch.inference_mode():
        want_ids = batch(ROWS)
        with base.lora.route(["a"] * len(ROWS)):
            want = base.loaded.model(**want_ids).logits
        assert torch.allclose(merged(**want_ids).logits, want, atol=1e-4)

    with pytest.raises(OpenAIError, match="unload them first"):
        engine.unload_base("tiny")
    engine.unload_base("a-merged")
    assert "a-merged" not in {m["id"] for m in engine.list_models()}
    with pytest.raises(OpenAIError, match="not loaded"):
        engine.unload_base("a-merged")
    # What is not an adapter is refused, and leaves no half-loaded name behind.
    not_adapter = tmp_path / "nope"
    not_adapter.mkdir()
    with pytest.raises(OpenAIError, match="is not a LoRA adapter"):
        engine.load_base("bad", lively_dir, merge=not_adapter)
    broken = save_variant(adapters["a"], tmp_path / "broken", {"fan_in_fan_out": True})
    with pytest.raises(OpenAIError, match="fan_in_fan_out"):
        engine.load_base("bad", lively_dir, merge=broken)
    assert "bad" not in {m["id"] for m in engine.list_models()}
    assert engine.load_base("bad", lively_dir, merge=adapters["a"])
