import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from engines.progress import Progress
from engines.training import (
    ConfigError,
    ExampleError,
    TrainConfig,
    TrainingError,
    TrainingOOM,
    last_checkpoint,
    tokenize_examples,
    train,
)

TEACHER_PROMPT = "You are Mathbot. Answer with one short sentence that ends with a number."


def make_examples(n: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            "answer": "Sure. " + f"The sum is {2 * i}. " * (1 + i % 3),
            "system_prompt": TEACHER_PROMPT,
        }
        for i in range(n)
    ]


def fast_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "batch_size": 2,
        "max_steps": 3,
        "max_length": 96,
        "save_steps": 100,
        "warmup_ratio": 0.0,
        "seed": 0,
    }
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_it_trains_reports_progress_and_saves_a_loadable_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    seen: list[Progress] = []
    result = train(tiny_model_dir, make_examples(), tmp_path / "run", fast_config(), progress=seen.append)

    assert [p.done for p in seen] == [1, 2, 3] and [p.point["step"] for p in seen] == [1, 2, 3]
    for p in seen:
        assert p.total == 3 and p.unit == "steps" and 0 < p.metrics["epoch"] <= 1
        assert math.isfinite(p.metrics["loss"]) and p.metrics["learning_rate"] is not None
        assert p.point["loss"] == p.metrics["loss"]
        assert p.metrics["tokens_per_second"] > 0 and p.elapsed > 0 and p.eta_seconds >= 0
    assert seen[-1].eta_seconds == 0 and seen[-1].metrics["train_tokens"] == result.train_tokens

    assert not result.cancelled and result.steps == 3 and result.max_steps == 3
    assert (result.device, result.precision) == ("cpu", "fp32")  # what ran, not "auto"
    assert result.adapter_dir == tmp_path / "run" / "adapter"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert result.train_tokens > 0 and result.tokens_per_second > 0 and result.resumed_from_step is None
    # Checkpoints are removed once the adapter is in place.
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Trained: LoRA B starts at zero and must have moved.
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[-1] == base.config.vocab_size


def test_the_answer_only_loss_is_sft_trainers_loss(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default loss takes logits at answer positions only; the same batches and seed give the
    same losses, step by step, and the same adapter as SFTTrainer's full-logits compute_loss."""
    from safetensors.torch import load_file

    from engines.training.trainer import AbsorbTrainer

    runs = {}
    for answer_only in (True, False):
        monkeypatch.setattr(AbsorbTrainer, "answer_only_logits", answer_only)
        seen: list[Progress] = []
        config = fast_config(grad_accum=2, general_mix=0.0)
        result = train(
            tiny_model_dir, make_examples(), tmp_path / str(answer_only), config, progress=seen.append
        )
        weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
        runs[answer_only] = ([p.metrics["loss"] for p in seen], weights)
    (ours, ours_w), (theirs, theirs_w) = runs[True], runs[False]
    assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-4)
    for key, value in theirs_w.items():
        assert (ours_w[key] - value).abs().max() < 1e-4, key


def test_it_trains_on_answer_tokens_only(tokenizer: Any) -> None:
    examples = make_examples(3)
    features, skipped = tokenize_examples(tokenizer, examples, max_length=512)

    assert skipped == 0
    for ex, feat in zip(examples, features, strict=True):
        ids, labels = feat["input_ids"], feat["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first])
        assert labels[first:] == ids[first:]
        # The answer and the template's end-of-turn are trained; nothing else.
        assert tokenizer.decode(ids[first:]) == ex["answer"] + "<|im_end|>\n"
        prompt = tokenizer.decode(ids[:first])
        assert prompt.endswith("<|im_start|>assistant\n")
        # The student never sees the teacher's prompt.
        assert TEACHER_PROMPT not in prompt


def test_it_truncates_and_skips_examples_that_do_not_fit(tokenizer: Any) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 300}], "answer": "ok", "system_prompt": None}
    features, skipped = tokenize_examples(tokenizer, [long, *make_examples(1)], max_length=64)

    assert skipped == 1 and len(features) == 1
    assert len(features[0]["input_ids"]) <= 64


def test_it_stops_within_one_step_and_saves_no_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    stop = []

    def progress(info: Progress) -> None:
        if info.done == 1:
            stop.append(True)  # the user clicks cancel while step 2 runs

    result = train(
        tiny_model_dir,
        make_examples(),
        tmp_path / "run",
        fast_config(max_steps=8),
        progress=progress,
        should_stop=lambda: bool(stop),
    )

    assert result.cancelled and result.steps == 2 and result.adapter_dir is None
    assert not (tmp_path / "run" / "adapter").exists()


def test_it_resumes_from_the_last_complete_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    examples = make_examples()
    config = fast_config(max_steps=4, save_steps=2)
    first: list[int] = []

    # Cancelled while step 3 runs, after the checkpoint of step 2.
    killed = train(
        tiny_model_dir,
        examples,
        out,
        config,
        progress=lambda p: first.append(p.done),
        should_stop=lambda: 2 in first,
    )
    assert killed.cancelled and killed.steps == 3
    ckpts = out / "checkpoints"
    assert last_checkpoint(ckpts) == ckpts / "checkpoint-2"

    # A process killed while saving step 4 leaves a checkpoint without its trainer state.
    shutil.copytree(ckpts / "checkpoint-2", ckpts / "checkpoint-4")
    (ckpts / "checkpoint-4" / "trainer_state.json").unlink()

    # Checkpoints of another run (different settings) are not mixed in.
    with pytest.raises(TrainingError, match="different run"):
        train(tiny_model_dir, examples, out, fast_config(max_steps=4, save_steps=2, learning_rate=1e-4))

    second: list[int] = []
    result = train(tiny_model_dir, examples, out, config, progress=lambda p: second.append(p.done))

    assert result.resumed_from_step == 2 and not result.cancelled
    assert second == [3, 4] and result.steps == 4
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_it_distills_with_a_kl_term(tiny_model_dir: Path, tmp_path: Path, tokenizer: Any) -> None:
    examples = make_examples(8)
    features, _ = tokenize_examples(tokenizer, examples, max_length=512, teacher=True)
    for feat in features:
        student = [t for t, m in zip(feat["input_ids"], feat["kl_mask"], strict=True) if m]
        teacher = [t for t, m in zip(feat["teacher_input_ids"], feat["teacher_kl_mask"], strict=True) if m]
        assert student and student == teacher
        assert TEACHER_PROMPT in tokenizer.decode(feat["teacher_input_ids"])

    seen: list[Progress] = []
    result = train(
        tiny_model_dir,
        examples,
        tmp_path / "run",
        fast_config(max_steps=2, kl_weight=0.5, max_length=512),
        progress=seen.append,
    )

    assert result.adapter_dir is not None and len(seen) == 2
    for p in seen:
        m = p.metrics
        assert math.isfinite(m["kl_loss"]) and m["kl_loss"] > 0
        assert m["loss"] == pytest.approx(m["ce_loss"] + 0.5 * m["kl_loss"], rel=1e-4)


def test_it_turns_out_of_memory_into_advice(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    def oom(_info: Progress) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(
        TrainingOOM, match=r"lower batch_size \(now 2.*max_length \(now 96\).*gradient_checkpointing"
    ):
        train(tiny_model_dir, make_examples(), tmp_path / "run", fast_config(max_steps=2), progress=oom)


def test_it_validates_the_config() -> None:
    cfg = TrainConfig.from_dict({"rank": 8, "lr_scheduler": "linear", "epochs": 2.0})
    assert cfg.rank == 8 and cfg.epochs == 2
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg

    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(
            {
                "rank": 0,
                "learning_rate": "fast",
                "lr_scheduler": "step",
                "bf16": "yes",
                "target_modules": [],
                "dropout": 1.0,
            }
        )
    assert set(exc.value.errors) == {
        "rank",
        "learning_rate",
        "lr_scheduler",
        "bf16",
        "target_modules",
        "dropout",
    }
    assert "rank: must be >= 1, got 0" in str(exc.value)
    assert "lr_scheduler: must be one of cosine, linear" in str(exc.value)

    with pytest.raises(ConfigError, match="batchsize: unknown setting"):
        TrainConfig.from_dict({"batchsize": 4})


def test_it_rejects_bad_examples(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = make_examples(3)
    bad[1]["answer"] = "  "
    with pytest.raises(ExampleError, match="example 1: 'answer'"):
        train(tiny_model_dir, bad, tmp_path / "run", fast_config())

    no_prompt = make_examples(2)
    no_prompt[0]["system_prompt"] = None
    with pytest.raises(ExampleError, match="example 0: 'system_prompt' is required"):
        train(tiny_model_dir, no_prompt, tmp_path / "run", fast_config(kl_weight=1.0))


class _Booby:
    """Unpickling this creates a directory: proof that a pickle was loaded."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return os.mkdir, (str(self.sentinel),)


def pickled_only(model_dir: Path, out: Path, sentinel: Path) -> Path:
    """The model directory with its safetensors weights swapped for a pickle."""
    import pickle

    shutil.copytree(model_dir, out)
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(_Booby(sentinel)))
    return out


def test_it_refuses_pickled_weights_without_loading_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "unpickled"
    pickled = pickled_only(tiny_model_dir, tmp_path / "pickled", sentinel)

    with pytest.raises(TrainingError, match=r"cannot train on .*pickled.*safetensors"):
        train(pickled, make_examples(), tmp_path / "run", fast_config())
    # The teacher goes through the same loader.
    with pytest.raises(TrainingError, match=r"cannot train on .*pickled.*safetensors"):
        train(
            tiny_model_dir,
            make_examples(),
            tmp_path / "run-kl",
            fast_config(kl_weight=0.5),
            teacher_dir=pickled,
        )

    assert not sentinel.exists()
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run-kl" / "adapter").exists()
