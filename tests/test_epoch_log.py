import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from engines.progress import Progress
from engines.training import ExampleError, TrainConfig, last_checkpoint, tokenize_examples, train

PROMPT = "You are Mathbot. Answer with one short sentence that ends with a number."


def make_examples(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "answer": f"The sum is {2 * i}.",
            "system_prompt": PROMPT,
        }
        for i in range(start, start + n)
    ]


def held_out() -> list[dict[str, Any]]:
    return make_examples(3, start=50)


def fast_config(**overrides: Any) -> TrainConfig:
    # 4 examples in batches of 2: an epoch is 2 steps.
    values: dict[str, Any] = {
        "batch_size": 2,
        "epochs": 3,
        "max_length": 64,
        "save_steps": 100,
        "warmup_ratio": 0.0,
        "seed": 0,
    }
    values.update(overrides)
    return TrainConfig(**values)


def answer_loss_by_hand(base_dir: Path, adapter: str | None, features: list[dict[str, list[int]]]) -> float:
    """One example at a time, no padding: cross-entropy per answer token."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for f in features:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(f["labels"][1:])
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_each_epoch_logs_its_validation_loss_and_keeps_its_adapter(
    tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    seen: list[Progress] = []
    result = train(
        tiny_model_dir,
        make_examples(4),
        out,
        fast_config(),
        progress=seen.append,
        eval_examples=held_out(),
        epoch_adapters=True,
    )

    log = result.epoch_log
    assert [e["epoch"] for e in log] == [1, 2, 3] and [e["step"] for e in log] == [2, 4, 6]
    for e in log:
        assert math.isfinite(e["valid_loss"]) and math.isfinite(e["train_loss"])
        assert e["valid_loss"] != e["train_loss"]
    assert log[-1]["train_loss"] == result.final_loss
    adapters = [out / "epochs" / "epoch-1", out / "epochs" / "epoch-2", out / "adapter"]
    assert [e["adapter_dir"] for e in log] == [str(a) for a in adapters] and result.adapter_dir == adapters[2]
    weights = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    for a, b in combinations(weights, 2):
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapters[0])
    )
    assert model.peft_config["default"].r == 16
    # The validation passes and saves change nothing in training (train mode restored, no RNG drawn).
    plain = train(tiny_model_dir, make_examples(4), tmp_path / "plain", fast_config())
    plain_weights = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(plain_weights[k], weights[2][k]) for k in plain_weights)
    # On disk as returned, and JSON all the way.
    assert json.loads((out / "epochs" / "epochs.json").read_text()) == log
    assert json.loads(json.dumps(result.to_dict()))["epoch_log"] == log

    # Each validation loss goes out as a curve point and a metric, which later steps keep.
    valid = [p for p in seen if p.point is not None and "valid_loss" in p.point]
    assert [(p.point["step"], p.point["valid_loss"]) for p in valid] == [  # type: ignore[index]
        (e["step"], e["valid_loss"]) for e in log
    ]
    assert [p.metrics["valid_loss"] for p in valid] == [e["valid_loss"] for e in log]
    step3 = next(p for p in seen if p.point is not None and p.point.get("loss") and p.done == 3)
    assert step3.metrics["valid_loss"] == log[0]["valid_loss"]


def test_without_eval_examples_or_epoch_adapters_and_a_new_run_drops_the_old_log(
    tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    out = tmp_path / "run"
    old = train(
        tiny_model_dir,
        make_examples(4),
        out,
        fast_config(epochs=2, learning_rate=1e-3),
        eval_examples=held_out(),
        epoch_adapters=True,
    )
    assert len(old.epoch_log) == 2 and (out / "epochs" / "epoch-1" / "adapter_model.safetensors").is_file()

    seen: list[Progress] = []
    # Another run in the same directory, which max_steps ends one step into its second epoch.
    result = train(tiny_model_dir, make_examples(4), out, fast_config(max_steps=3), progress=seen.append)

    log = result.epoch_log
    assert [(e["epoch"], e["step"]) for e in log] == [(1, 2), (2, 3)]
    assert [e["valid_loss"] for e in log] == [None, None]
    assert [e["adapter_dir"] for e in log] == [None, str(out / "adapter")]
    assert log[-1]["train_loss"] == result.final_loss and log[0]["train_loss"] == seen[1].metrics["loss"]
    assert not list((out / "epochs").glob("epoch-*"))
    assert json.loads((out / "epochs" / "epochs.json").read_text()) == log
    assert [p.done for p in seen] == [1, 2, 3] and all("valid_loss" not in p.metrics for p in seen)


def test_the_validation_loss_is_the_answer_loss_of_that_epochs_adapter(
    lively_dir: Path, tmp_path: Path, tokenizer: Any, one_torch_thread: None
) -> None:
    held = held_out()
    result = train(
        lively_dir,
        make_examples(4),
        tmp_path / "run",
        fast_config(epochs=2, learning_rate=5e-3),
        eval_examples=held,
        epoch_adapters=True,
    )

    features, skipped = tokenize_examples(tokenizer, held, max_length=64)
    assert skipped == 0
    by_hand = [answer_loss_by_hand(lively_dir, e["adapter_dir"], features) for e in result.epoch_log]
    assert [e["valid_loss"] for e in result.epoch_log] == pytest.approx(by_hand, rel=1e-4)
    # The check can tell the adapters apart: each epoch moved the held-out loss by far more than the tolerance.
    base = answer_loss_by_hand(lively_dir, None, features)
    assert abs(by_hand[0] - base) > 1e-2 and abs(by_hand[1] - by_hand[0]) > 1e-2
    assert all(e["valid_loss"] != e["train_loss"] for e in result.epoch_log)


def test_a_resumed_run_keeps_the_epochs_it_finished(
    tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    out = tmp_path / "run"
    config = fast_config(save_steps=2)
    done: list[float] = []

    # Cancelled while step 3 (epoch 2's first) runs, after epoch 1 ended at step 2.
    killed = train(
        tiny_model_dir,
        make_examples(4),
        out,
        config,
        progress=lambda p: done.append(p.done),
        should_stop=lambda: 2 in done,
        eval_examples=held_out(),
        epoch_adapters=True,
    )
    assert killed.cancelled and killed.steps == 3
    # No entry for the unfinished epoch 2.
    assert [e["epoch"] for e in killed.epoch_log] == [1]
    assert json.loads((out / "epochs" / "epochs.json").read_text()) == killed.epoch_log
    assert last_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-2"

    result = train(
        tiny_model_dir, make_examples(4), out, config, eval_examples=held_out(), epoch_adapters=True
    )

    assert result.resumed_from_step == 2 and not result.cancelled and result.steps == 6
    log = result.epoch_log
    assert [e["epoch"] for e in log] == [1, 2, 3] and [e["step"] for e in log] == [2, 4, 6]
    assert log[0] == killed.epoch_log[0]
    assert all(math.isfinite(e["valid_loss"]) for e in log)
    for e in log:
        assert (Path(e["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert json.loads((out / "epochs" / "epochs.json").read_text()) == log


def test_it_measures_validation_loss_with_the_kl_term_on(
    tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    # Validation is answer cross-entropy only, so held-out rows need no teacher prompt.
    held = [{**e, "system_prompt": None} for e in held_out()]
    seen: list[Progress] = []
    result = train(
        tiny_model_dir,
        make_examples(4),
        tmp_path / "run",
        fast_config(epochs=1, kl_weight=0.5),
        progress=seen.append,
        eval_examples=held,
    )

    (entry,) = result.epoch_log
    assert entry["step"] == 2 and math.isfinite(entry["valid_loss"])
    assert all(math.isfinite(p.metrics["kl_loss"]) for p in seen if "loss" in (p.point or {}))


def test_it_rejects_bad_eval_examples(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = held_out()
    bad[1]["answer"] = " "
    with pytest.raises(ExampleError, match="eval_examples: example 1: 'answer'"):
        train(tiny_model_dir, make_examples(4), tmp_path / "run", fast_config(), eval_examples=bad)
    assert not (tmp_path / "run").exists()
