"""The training engine: a LoRA adapter learns to answer WITHOUT the system
prompt what the base model answered WITH it (prompt absorption).

Plain Python: no Django, no Celery. Importing this module is cheap (torch,
transformers, peft and trl are imported inside `train`), so the web process
can validate a `TrainConfig` without loading torch.

Layout under `output_dir`:
  checkpoints/run.json          fingerprint of (model, config, examples)
  checkpoints/checkpoint-N/     HF Trainer checkpoints (adapter, optimizer,
                                scheduler, RNG, trainer_state.json)
  adapter/                      the final adapter (adapter_model.safetensors
                                + adapter_config.json), renamed into place

Contract of `train`:
  - returns a `TrainResult`; a cooperative cancel (`should_stop()` true) stops
    within one optimizer step and returns `cancelled=True` with no adapter
    saved (checkpoints stay, so the run can be resumed);
  - raises `ConfigError` (bad config), `ExampleError` (bad examples),
    `TrainingOOM` (out of memory, with what to change) or `TrainingError`
    (anything else the user can fix, e.g. a checkpoint from another run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.chat import prompt_completion
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    import torch

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULERS = ("cosine", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"
# Written last by Trainer._save_checkpoint, so its presence (and parsing)
# means the checkpoint is complete; a process killed mid-save leaves a
# directory without it.
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Fields that do not change the optimisation, so a resumed run may differ in them.
_NON_MATH_FIELDS = frozenset({"save_steps", "save_total_limit", "logging_steps", "device", "bf16",
                              "gradient_checkpointing"})

Example = Mapping[str, Any]


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
    learning_rate: float = 3e-4
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

        def integer(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                errors[name] = f"must be an integer, got {v!r}"
            elif v < minimum:
                errors[name] = f"must be >= {minimum}, got {v}"

        def number(name: str, low: float, high: float | None = None, low_open: bool = False,
                   high_open: bool = True) -> None:
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
        if self.device not in DEVICES:
            errors["device"] = f"must be one of {', '.join(DEVICES)}, got {self.device!r}"
        if not (self.bf16 == "auto" or isinstance(self.bf16, bool)):
            errors["bf16"] = f"must be \"auto\", true or false, got {self.bf16!r}"
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


# ---------------------------------------------------------------- examples


def validate_examples(examples: Sequence[Example], need_system_prompt: bool = False) -> None:
    if not examples:
        raise ExampleError("No training examples.")
    for i, ex in enumerate(examples):
        where = f"example {i}"
        if not isinstance(ex, Mapping):
            raise ExampleError(f"{where}: must be an object, got {type(ex).__name__}")
        msgs = ex.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ExampleError(f"{where}: 'messages' must be a non-empty list of turns")
        for j, m in enumerate(msgs):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ExampleError(f"{where}: messages[{j}] must have string 'role' and 'content'")
        if not isinstance(ex.get("answer"), str) or not ex["answer"].strip():
            raise ExampleError(f"{where}: 'answer' must be a non-empty string")
        sp = ex.get("system_prompt")
        if sp is not None and not isinstance(sp, str):
            raise ExampleError(f"{where}: 'system_prompt' must be a string or null")
        if need_system_prompt and not sp:
            raise ExampleError(f"{where}: 'system_prompt' is required when kl_weight > 0 (the teacher's prompt)")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def _split_ids(tokenizer: Any, prompts: list[str], fulls: list[str]) -> list[tuple[list[int], int]]:
    """(full ids, index of the first completion token). The chat template
    already holds the special tokens, so none are added here."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    # Tokens can merge across the prompt/answer boundary; the completion then
    # starts where the two tokenizations diverge.
    return [(list(f), _common_prefix(p, f)) for p, f in zip(p_ids, f_ids, strict=True)]


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, teacher: bool = False
) -> tuple[list[dict[str, list[int]]], int]:
    """Student features rendered WITHOUT a system prompt: `input_ids` and
    `labels` (-100 on prompt tokens; answer + end-of-turn trained), truncated
    to max_length (keep start). With teacher=True, also the teacher rendering
    (WITH ex["system_prompt"]) and masks marking the answer tokens the two
    renderings share (`kl_mask`, `teacher_kl_mask`, same count per example).
    Returns (features, number of examples skipped because the prompt alone
    fills max_length)."""
    student = [prompt_completion(tokenizer, ex["messages"], ex["answer"], system_prompt=None) for ex in examples]
    s_split = _split_ids(tokenizer, [p for p, _ in student], [p + c for p, c in student])
    t_split: list[tuple[list[int], int]] = []
    if teacher:
        rendered = [prompt_completion(tokenizer, ex["messages"], ex["answer"], system_prompt=ex["system_prompt"])
                    for ex in examples]
        t_split = _split_ids(tokenizer, [p for p, _ in rendered], [p + c for p, c in rendered])
    features: list[dict[str, list[int]]] = []
    skipped = 0
    for i, (ids, start) in enumerate(s_split):
        if start >= max_length or start >= len(ids):
            skipped += 1
            continue
        ids = ids[:max_length]
        feat = {"input_ids": ids, "labels": [-100] * start + ids[start:]}
        if teacher:
            t_ids, t_start = t_split[i]
            s_comp, t_comp = s_split[i][0][start:], t_ids[t_start:]
            # Align from the end: the answer tokens are the same in both
            # renderings except, rarely, a merge at the boundary.
            k = _common_suffix(s_comp, t_comp)
            a_s, a_t = start + len(s_comp) - k, t_start + len(t_comp) - k
            n = max(0, min(k, len(ids) - a_s))
            t_ids = t_ids[:a_t + n]
            feat["kl_mask"] = [0] * a_s + [1] * n + [0] * (len(ids) - a_s - n)
            feat["teacher_input_ids"] = t_ids
            feat["teacher_kl_mask"] = [0] * a_t + [1] * n
        features.append(feat)
    return features, skipped


# ---------------------------------------------------------------- checkpoints


def fingerprint(model_dir: Path, config: TrainConfig, examples: Sequence[Example]) -> str:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NON_MATH_FIELDS}
    blob = json.dumps({"model": str(Path(model_dir).resolve()), "config": cfg, "examples": list(examples)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint dir, else None."""
    m = _CHECKPOINT_RE.match(path.name)
    if not m or not path.is_dir():
        return None
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    step = int(m.group(1))
    if state.get("global_step") != step or not any(path.glob("adapter_model.*")):
        return None
    return step


def last_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint. transformers finds the newest by
    number; one without its trainer state (a process killed mid-save) is
    removed so it cannot shadow the one before it."""
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints_dir.is_dir():
        return None
    while (found := get_last_checkpoint(str(checkpoints_dir))) is not None:
        if _checkpoint_step(Path(found)) is not None:
            return Path(found)
        shutil.rmtree(found, ignore_errors=True)
    return None


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _prepare_checkpoints(ckpt_dir: Path, run_id: str, resume: bool) -> Path | None:
    """Returns the checkpoint to resume from, after checking it belongs to this run."""
    run_file = ckpt_dir / RUN_FILE
    if resume and ckpt_dir.is_dir():
        try:
            stored = json.loads(run_file.read_text()).get("fingerprint")
        except (OSError, ValueError):
            stored = None
        last = last_checkpoint(ckpt_dir)
        if last is not None and stored != run_id:
            raise TrainingError(
                f"{ckpt_dir} holds checkpoints of a different run (the model, config or examples changed). "
                "Train with resume=False to start over, or use a fresh output directory."
            )
        if last is not None:
            return last
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    _write_json_atomic(run_file, {"fingerprint": run_id})
    return None


def _save_adapter_atomic(model: Any, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    old: Path | None = None
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if dest.exists():
            old = dest.parent / f".{dest.name}-old-{os.getpid()}-{time.time_ns()}"
            dest.rename(old)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- device


def resolve_device(requested: str) -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device is 'cuda' but no CUDA GPU is available; use device 'auto' or 'cpu'.")
    if requested == "mps" and not has_mps:
        raise TrainingError("device is 'mps' but Apple MPS is not available; use device 'auto' or 'cpu'.")
    return requested


def cpu_has_native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_bf16(bf16: str | bool, device: str) -> bool:
    import torch

    if device == "cuda":
        supported = bool(torch.cuda.is_bf16_supported())
        if bf16 is True and not supported:
            raise TrainingError("bf16 is true but this GPU has no bf16 support; set bf16 to false or 'auto'.")
        return supported and bf16 is not False
    if bf16 is not True:
        return False
    # Emulated bf16 is slower than fp32, so only use it where the CPU has it.
    return device == "mps" or cpu_has_native_bf16()


def _is_oom(exc: BaseException) -> bool:
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, Exception) and should_reduce_batch_size(exc))


def _oom_message(config: TrainConfig, device: str) -> str:
    tips = [f"lower batch_size (now {config.batch_size}; e.g. {max(1, config.batch_size // 2)}, and raise "
            f"grad_accum from {config.grad_accum} to {config.grad_accum * 2} to keep the effective batch)",
            f"lower max_length (now {config.max_length})"]
    if not config.gradient_checkpointing:
        tips.append("enable gradient_checkpointing (now off)")
    if config.kl_weight > 0:
        tips.append(f"set kl_weight to 0 (now {config.kl_weight}; the teacher pass reads the long prompt)")
    return f"Out of memory on {device} while training. To fit: " + "; ".join(tips) + "."


# ---------------------------------------------------------------- trainer pieces


@cache
def _classes() -> tuple[type, type, type]:
    """Trainer subclasses, built on first use so importing this module stays cheap."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    from transformers import TrainerCallback
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class ProgressCallback(TrainerCallback):
        def __init__(self, progress: ProgressFn | None, should_stop: StopFn | None):
            self.progress = progress
            self.should_stop = should_stop
            self.cancelled = False
            self.last_loss: float | None = None
            self.t0 = time.monotonic()
            self.loop_seconds = 0.0
            self.start_step = 0
            self.start_tokens = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After a resume, state already holds the checkpoint's step and token count.
            self.t0 = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.loop_seconds = time.monotonic() - self.t0
            if state.global_step >= state.max_steps:
                # The final adapter is saved by train(); a full checkpoint here is wasted I/O.
                control.should_save = False
            if self.should_stop is not None and self.should_stop():
                self.cancelled = True
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary
            self.last_loss = float(logs["loss"])
            if self.progress is None:
                return
            done = state.global_step - self.start_step
            tokens = state.num_input_tokens_seen - self.start_tokens
            elapsed = time.monotonic() - self.t0
            metrics: dict[str, Any] = {
                "loss": self.last_loss,
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "epoch": state.epoch,
                "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
                "train_tokens": state.num_input_tokens_seen,
            }
            for key in ("ce_loss", "kl_loss", "mean_token_accuracy"):
                if key in logs:
                    metrics[key] = logs[key]
            point = {"step": state.global_step, "loss": self.last_loss, "lr": logs.get("learning_rate")}
            self.progress(Progress.since(self.t0, state.global_step, state.max_steps, "steps", rate_done=done,
                                         metrics=metrics, point=point))

    class DistillCollator:
        """Pads the student batch as TRL does, plus the teacher rendering."""

        def __init__(self, pad_token_id: int):
            self.pad_token_id = pad_token_id
            self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = self.base([{"input_ids": f["input_ids"], "labels": f["labels"]}
                                             for f in features])

            def padded(key: str, value: int) -> torch.Tensor:
                return pad_sequence([torch.tensor(f[key]) for f in features], batch_first=True,
                                    padding_value=value)

            out["kl_mask"] = padded("kl_mask", 0)
            out["teacher_input_ids"] = padded("teacher_input_ids", self.pad_token_id)
            out["teacher_attention_mask"] = pad_sequence(
                [torch.ones(len(f["teacher_input_ids"]), dtype=torch.long) for f in features],
                batch_first=True, padding_value=0)
            out["teacher_kl_mask"] = padded("teacher_kl_mask", 0)
            return out

    class AbsorbTrainer(SFTTrainer):
        """SFTTrainer plus an optional token-level KL(teacher || student) term.
        The teacher is the same base model with the adapter disabled, reading
        the answer after the teacher's system prompt."""

        def __init__(self, *args: Any, kl_weight: float = 0.0, kl_temperature: float = 1.0,
                     teacher_model: Any = None, **kwargs: Any):
            self.kl_weight = kl_weight
            self.kl_temperature = kl_temperature
            # Another model as the teacher (same tokenizer); None: the student's base, adapter off.
            self.teacher_model = teacher_model
            super().__init__(*args, **kwargs)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if self.kl_weight <= 0 or "teacher_input_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, ce, kl = self.distill_loss(model, inputs, num_items_in_batch)
            self._metrics["train"]["ce_loss"].append(ce)
            self._metrics["train"]["kl_loss"].append(kl)
            return (loss, None) if return_outputs else loss

        def distill_loss(self, model: Any, inputs: dict[str, Any],
                         num_items_in_batch: Any = None) -> tuple[torch.Tensor, float, float]:
            peft_model = self.accelerator.unwrap_model(model)
            base = peft_model.get_base_model()
            # LoRA layers sit inside the backbone, so calling it directly trains
            # the adapter; logits are then taken only at answer positions
            # instead of (batch x length x vocab).
            backbone, lm_head = base.base_model, base.get_output_embeddings()
            labels = inputs["labels"]
            sel = labels[:, 1:] != -100
            # Accelerate's autocast wraps model.forward only; the backbone is called directly.
            with self.accelerator.autocast():
                hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  use_cache=False).last_hidden_state
                logits = lm_head(hidden[:, :-1][sel]).float()
                teacher = self.teacher_model
                t_backbone, t_head = ((teacher.base_model, teacher.get_output_embeddings()) if teacher is not None
                                      else (backbone, lm_head))
                off = peft_model.disable_adapter() if teacher is None else contextlib.nullcontext()
                with torch.no_grad(), off:
                    t_hidden = t_backbone(input_ids=inputs["teacher_input_ids"],
                                          attention_mask=inputs["teacher_attention_mask"],
                                          use_cache=False).last_hidden_state
                    t_logits = t_head(t_hidden[:, :-1][inputs["teacher_kl_mask"][:, 1:].bool()]).float()
            kl_rows = inputs["kl_mask"][:, 1:][sel].bool()
            if int(kl_rows.sum()) != t_logits.shape[0]:
                raise RuntimeError("student and teacher answer tokens are misaligned")
            denom = num_items_in_batch if num_items_in_batch is not None else sel.sum().clamp(min=1)
            ce = F.cross_entropy(logits, labels[:, 1:][sel], reduction="sum") / denom
            temp = self.kl_temperature
            s_logp = F.log_softmax(logits[kl_rows] / temp, dim=-1)
            t_logp = F.log_softmax(t_logits / temp, dim=-1)
            # T^2 keeps the gradient scale independent of the temperature (Hinton et al.).
            kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * temp * temp / denom
            loss = ce + self.kl_weight * kl
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss, float(ce.detach()), float(kl.detach())

    return ProgressCallback, DistillCollator, AbsorbTrainer


def tokenizers_match(a: Path | str, b: Path | str) -> bool:
    """Whether two models' tokenizers map every token to the same id (what a
    token-level KL between them needs)."""
    from transformers import AutoTokenizer

    ta, tb = (AutoTokenizer.from_pretrained(str(d), trust_remote_code=False) for d in (a, b))
    return bool(ta.get_vocab() == tb.get_vocab())


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")


def sft_config(config: TrainConfig, output_dir: Path, device: str, bf16: bool, distill: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
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


# ---------------------------------------------------------------- train


def train(
    model_dir: Path | str,
    examples: Sequence[Example],
    output_dir: Path | str,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    resume: bool = True,
    teacher_dir: Path | str | None = None,
) -> TrainResult:
    """Train a LoRA adapter on (messages -> answer) rendered without a system
    prompt; loss on the answer tokens (and end-of-turn) only. See the module
    docstring for the layout, the exceptions and cancellation. With KL on,
    `teacher_dir` names another model as the teacher; it must share the
    student's tokenizer (token-level KL compares the same vocabulary)."""
    t_start = time.monotonic()
    config = config or TrainConfig()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    distill = config.kl_weight > 0
    validate_examples(examples, need_system_prompt=distill)
    if not (model_dir / "config.json").is_file():
        raise TrainingError(f"{model_dir} is not a model directory (no config.json).")
    device = resolve_device(config.device)
    use_bf16 = resolve_bf16(config.bf16, device)

    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = output_dir / CHECKPOINTS_DIR
    resume_from = _prepare_checkpoints(ckpt_dir, fingerprint(model_dir, config, examples), resume)
    resumed_step = _checkpoint_step(resume_from) if resume_from else None

    def result(steps: int, max_steps: int, epochs: float, tokens: int, tps: float, loss: float | None,
               adapter: Path | None, cancelled: bool, skipped: int) -> TrainResult:
        return TrainResult(adapter_dir=adapter, final_loss=loss, steps=steps, max_steps=max_steps, epochs=epochs,
                           train_tokens=tokens, tokens_per_second=tps,
                           duration_seconds=time.monotonic() - t_start, resumed_from_step=resumed_step,
                           cancelled=cancelled, skipped_examples=skipped, device=device,
                           precision=("bf16 mixed" if device == "cuda" else "bf16 autocast") if use_bf16 else "fp32")

    if should_stop is not None and should_stop():
        return result(resumed_step or 0, 0, 0.0, 0, 0.0, None, None, True, 0)

    teacher = Path(teacher_dir) if distill and teacher_dir is not None else None
    if teacher is not None and teacher.resolve() == model_dir.resolve():
        teacher = None  # the student's own base, with the adapter switched off
    if teacher is not None and not tokenizers_match(model_dir, teacher):
        raise ConfigError({"kl_weight": f"KL needs a teacher that shares the student's tokenizer; {teacher} does "
                                        f"not (train on its answers with kl_weight 0 instead)"})

    oom: str | None = None
    try:
        trainer, callback, skipped = _fit(model_dir, examples, config, ckpt_dir, device, use_bf16, distill,
                                          progress, should_stop, resume_from, teacher)
    except BaseException as exc:
        if not _is_oom(exc):
            raise
        oom = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if oom is not None:
        # Raised outside the except block: the traceback (and with it the
        # failed trainer, model and batch) is gone, so the memory comes back.
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)
        raise TrainingOOM(f"{_oom_message(config, device)} (error: {oom})")

    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    tps = (tokens - callback.start_tokens) / callback.loop_seconds if callback.loop_seconds > 0 else 0.0
    epochs = float(state.epoch or 0.0)
    if callback.cancelled:
        return result(state.global_step, state.max_steps, epochs, tokens, tps, callback.last_loss, None, True,
                      skipped)
    adapter_dir = output_dir / ADAPTER_DIR
    _save_adapter_atomic(trainer.model, adapter_dir)
    # The adapter is the result; checkpoints only served to get here.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result(state.global_step, state.max_steps, epochs, tokens, tps, callback.last_loss, adapter_dir, False,
                  skipped)


def _fit(model_dir: Path, examples: Sequence[Example], config: TrainConfig, ckpt_dir: Path, device: str,
         use_bf16: bool, distill: bool, progress: ProgressFn | None, should_stop: StopFn | None,
         resume_from: Path | None, teacher_dir: Path | None = None) -> tuple[Any, Any, int]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    features, skipped = tokenize_examples(tokenizer, examples, config.max_length, teacher=distill)
    if not features:
        raise ExampleError(f"Every example's prompt is longer than max_length ({config.max_length} tokens); "
                           "raise max_length.")
    dtype = torch.bfloat16 if use_bf16 and device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    teacher_model: Any = None
    if teacher_dir is not None:
        teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype)
        teacher_model.to(device)
        teacher_model.eval()
        teacher_model.requires_grad_(False)
    ProgressCallback, DistillCollator, AbsorbTrainer = _classes()
    callback = ProgressCallback(progress, should_stop)
    trainer = AbsorbTrainer(
        model=model,
        args=sft_config(config, ckpt_dir, device, use_bf16, distill),
        train_dataset=Dataset.from_list(features),
        processing_class=tokenizer,
        data_collator=DistillCollator(tokenizer.pad_token_id) if distill else None,
        peft_config=lora_config(config),
        callbacks=[callback],
        kl_weight=config.kl_weight,
        kl_temperature=config.kl_temperature,
        teacher_model=teacher_model,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, callback, skipped
