"""What a training run is asked to do: `TrainConfig` with its validation, the
result it reports, the errors a user can fix, and the translation of the
config into peft's and TRL's own configs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULERS = ("cosine", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_REFINE_SAMPLES = 8
MAX_REFINE_EPOCHS = 4
MAX_FACT_REPEAT = 8
MAX_STUDENT_PASSAGES = 8


class TrainingError(Exception):
    """A user-facing training error: the message says what to change."""


class ConfigError(TrainingError, ValueError):
    """Invalid TrainConfig. `errors` maps each bad field to what is wrong."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("Invalid training config: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


class ExampleError(TrainingError, ValueError):
    """Invalid training examples; the message names the example index and field."""


class TrainingOOM(TrainingError):
    """Out of memory; the message says which settings to lower."""


@dataclass
class TrainConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    # 1e-3 with the reading student (student_passages): lumen, harbor and fernhill were measured so.
    learning_rate: float = 1e-3
    # 4: on lumen, 3 left the student at 0.85 all-rules (acronyms kept their capitals).
    epochs: int = 4
    # Overrides epochs when set (benchmarks, smoke runs).
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    seed: int = 42
    # Off by default: ~5-20% slower (STACK-NOTES); the OOM message suggests it.
    gradient_checkpointing: bool = False
    # Batches of similar length waste less compute on padding, and the longest
    # batch comes first, so an OOM shows up at step 1, not hours in.
    group_by_length: bool = True
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 1
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    # Against forgetting: ceil(general_mix x training rows) general instructions, answered by the
    # base itself (no prompt, greedy), join the training rows (engines/data/general_instructions.jsonl).
    # 0 turns it off.
    general_mix: float = 0.1
    # Copies of each row whose answer states the facts its query asks (the prompt's facts checks) in
    # the training set: a fact seen once is a few tokens among many. bench/memorise.py, fernhill, 4
    # epochs: the student stated the fact on 0.00 of its train queries and 0.00 held out with 1,
    # 0.43 and 0.17 with 3 (1.5-2x the training time where a quarter to half the rows ask a fact).
    fact_repeat: int = 3
    # The student reads its prompt's k passages most relevant to the question (BM25, added after it),
    # in training, in the four arms and when served: a small model copies a fact far more reliably
    # than it recalls one (bench/memorise.py, fernhill held out: 0.37 vs 0.17), at ~28 prompt tokens
    # a passage. 2 (with 120 synthesised queries and learning rate 1e-3, real teacher data, held out:
    # all rules 0.88 / 0.97 / 0.90 on lumen / harbor / fernhill at ~0.09x the prompt tokens; fact
    # recall 0.24 / 0.13 / 0.55). 0 = the prompt is absorbed whole.
    student_passages: int = 2
    # A rejection-sampling round after training (engines.training.refine): the student (no prompt,
    # as served) samples this many answers per train query (temperature 0.7); a sample that passes
    # every rule (after repairs), states at least the facts the row's answer states and says at
    # least half as much beyond the rules' required texts replaces it, and the adapter trains
    # refine_epochs more epochs on that set at half the learning rate. 0 (default: measured on one
    # scenario only, bench lumen 64 queries: all-rules 0.88 -> 0.95) turns it off; at most 8.
    refine_samples: int = 0
    refine_epochs: int = 1
    device: str = "auto"
    # "auto": bf16 mixed precision on CUDA with bf16 support, fp32 elsewhere.
    # True on CPU: bf16 autocast where the CPU has native bf16 (avx512_bf16 /
    # AMX), ~1.5x faster; fp32 master weights, so the adapter stays fp32.
    bf16: str | bool = "auto"

    def __post_init__(self) -> None:
        errors = self.problems()
        if errors:
            raise ConfigError(errors)

    def problems(self) -> dict[str, str]:
        errors: dict[str, str] = {}

        def integer(name: str, minimum: int, maximum: int | None = None) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                errors[name] = f"must be an integer, got {v!r}"
            elif v < minimum:
                errors[name] = f"must be >= {minimum}, got {v}"
            elif maximum is not None and v > maximum:
                errors[name] = f"must be <= {maximum}, got {v}"

        def number(
            name: str, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True
        ) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                errors[name] = f"must be a number, got {v!r}"
                return
            if v < low or (low_open and v == low):
                errors[name] = f"must be {'>' if low_open else '>='} {low}, got {v}"
            elif high is not None and (v > high or (high_open and v == high)):
                errors[name] = f"must be {'<' if high_open else '<='} {high}, got {v}"

        integer("rank", 1)
        integer("alpha", 1)
        number("dropout", 0.0, 1.0)
        tm = self.target_modules
        if not isinstance(tm, list) or not tm or not all(isinstance(m, str) and m for m in tm):
            errors["target_modules"] = f"must be a non-empty list of module names, got {tm!r}"
        number("learning_rate", 0.0, 1.0, low_open=True)
        integer("epochs", 1)
        if self.max_steps is not None:
            integer("max_steps", 1)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        integer("max_length", 8)
        number("warmup_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        if self.lr_scheduler not in LR_SCHEDULERS:
            errors["lr_scheduler"] = f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}"
        integer("seed", 0)
        for name in ("gradient_checkpointing", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                errors[name] = f"must be true or false, got {getattr(self, name)!r}"
        integer("save_steps", 1)
        integer("save_total_limit", 1)
        integer("logging_steps", 1)
        number("kl_weight", 0.0)
        number("kl_temperature", 0.0, low_open=True)
        number("general_mix", 0.0, 1.0, high_open=False)
        integer("fact_repeat", 1, MAX_FACT_REPEAT)
        integer("student_passages", 0, MAX_STUDENT_PASSAGES)
        integer("refine_samples", 0, MAX_REFINE_SAMPLES)
        integer("refine_epochs", 1, MAX_REFINE_EPOCHS)
        if self.device not in DEVICES:
            errors["device"] = f"must be one of {', '.join(DEVICES)}, got {self.device!r}"
        if not (self.bf16 == "auto" or isinstance(self.bf16, bool)):
            errors["bf16"] = f'must be "auto", true or false, got {self.bf16!r}'
        return errors

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from JSON-like data; unknown keys and bad values raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError({"config": f"must be an object, got {type(data).__name__}"})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError({k: "unknown setting" for k in unknown})
        values = dict(data)
        if isinstance(values.get("target_modules"), tuple):
            values["target_modules"] = list(values["target_modules"])
        # Plain floats from JSON ("3.0") for integer fields are accepted when whole.
        for f in dataclasses.fields(cls):
            v = values.get(f.name)
            if f.type in ("int", "int | None") and isinstance(v, float) and v.is_integer():
                values[f.name] = int(v)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    adapter_dir: Path | None  # None when cancelled
    final_loss: float | None  # last logged training loss
    steps: int  # global optimizer step reached (counts steps before a resume)
    max_steps: int
    epochs: float
    train_tokens: int  # non-pad tokens over the whole run, resumes included
    tokens_per_second: float  # non-pad tokens / training-loop seconds, this call only
    duration_seconds: float  # wall time of this train() call (loading included)
    resumed_from_step: int | None
    cancelled: bool
    skipped_examples: int = 0  # prompts longer than max_length: nothing to learn
    device: str = ""  # where it ran: "cpu", "cuda", "mps"
    precision: str = ""  # "fp32", "bf16 autocast" (CPU) or "bf16 mixed" (CUDA)
    # One entry per finished epoch, resumes included: {"epoch", "step", "train_loss" (last logged),
    # "valid_loss" (None without eval_examples), "adapter_dir" (str, or None when not kept)}.
    epoch_log: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(config: TrainConfig, output_dir: Path, device: str, bf16: bool, distill: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        weight_decay=config.weight_decay,
        seed=config.seed,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        # The loss curve starts at step 1 whatever logging_steps is.
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        activation_checkpointing=config.gradient_checkpointing,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        max_length=config.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        # Features are tokenized, labelled and truncated by tokenize_examples.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=not distill,
        report_to="none",
        disable_tqdm=True,
    )
