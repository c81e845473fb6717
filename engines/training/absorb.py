"""`train`: one absorption run end to end (check, resume, load, fit, save)."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.progress import ProgressFn, StopFn
from engines.training.checkpoints import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    checkpoint_step,
    fingerprint,
    prepare_checkpoints,
    read_epoch_log,
    save_adapter_atomic,
)
from engines.training.config import (
    ConfigError,
    ExampleError,
    TrainConfig,
    TrainingError,
    TrainingOOM,
    TrainResult,
    lora_config,
    sft_config,
)
from engines.training.data import Example, tokenize_examples, tokenizers_match, validate_examples
from engines.training.device import is_oom, oom_message, resolve_bf16, resolve_device


def train(
    model_dir: Path | str,
    examples: Sequence[Example],
    output_dir: Path | str,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    resume: bool = True,
    teacher_dir: Path | str | None = None,
    init_adapter: Path | str | None = None,
    *,
    eval_examples: Sequence[Example] | None = None,
    epoch_adapters: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on (messages -> answer) rendered without a system
    prompt; loss on the answer tokens (and end-of-turn) only. See the package
    docstring for the exceptions and cancellation, `checkpoints` for the
    layout. With KL on, `teacher_dir` names another model as the teacher; it
    must share the student's tokenizer (token-level KL compares the same
    vocabulary). With `init_adapter` (a saved adapter directory) training
    continues from that adapter's weights instead of a fresh LoRA; its own
    config (rank, alpha, modules) then holds.

    At each epoch's end (the last one cut short by max_steps included) an
    entry goes to `epoch_log` and epochs/epochs.json: with `eval_examples`
    (held out, the format of `examples`, no part of the run's fingerprint)
    their loss per answer token, reported as the "valid_loss" metric too;
    with `epoch_adapters`, every epoch's adapter but the last one's (which is
    the final adapter) under epochs/epoch-N."""
    t_start = time.monotonic()
    config = config or TrainConfig()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    distill = config.kl_weight > 0
    validate_examples(examples, need_system_prompt=distill)
    if eval_examples:
        try:
            validate_examples(eval_examples)
        except ExampleError as exc:
            raise ExampleError(f"eval_examples: {exc}") from None
    if not (model_dir / "config.json").is_file():
        raise TrainingError(f"{model_dir} is not a model directory (no config.json).")
    device = resolve_device(config.device)
    use_bf16 = resolve_bf16(config.bf16, device)

    output_dir.mkdir(parents=True, exist_ok=True)
    init = Path(init_adapter) if init_adapter is not None else None
    run_id = fingerprint(model_dir, config, examples)
    if init is not None:
        weights = init / "adapter_model.safetensors"
        if not weights.is_file():
            raise TrainingError(f"{init} is not a saved adapter (no adapter_model.safetensors).")
        # Checkpoints continued from other starting weights are another run.
        run_id = hashlib.sha256((run_id + _digest(weights)).encode()).hexdigest()
    ckpt_dir = output_dir / CHECKPOINTS_DIR
    resume_from = prepare_checkpoints(ckpt_dir, run_id, resume)
    resumed_step = checkpoint_step(resume_from) if resume_from else None
    epoch_log = read_epoch_log(output_dir, resume_from)  # the epoch callback appends to it

    def result(
        steps: int,
        max_steps: int,
        epochs: float,
        tokens: int,
        tps: float,
        loss: float | None,
        adapter: Path | None,
        cancelled: bool,
        skipped: int,
    ) -> TrainResult:
        return TrainResult(
            adapter_dir=adapter,
            final_loss=loss,
            steps=steps,
            max_steps=max_steps,
            epochs=epochs,
            train_tokens=tokens,
            tokens_per_second=tps,
            duration_seconds=time.monotonic() - t_start,
            resumed_from_step=resumed_step,
            cancelled=cancelled,
            skipped_examples=skipped,
            device=device,
            precision=("bf16 mixed" if device == "cuda" else "bf16 autocast") if use_bf16 else "fp32",
            epoch_log=list(epoch_log),
        )

    if should_stop is not None and should_stop():
        return result(resumed_step or 0, 0, 0.0, 0, 0.0, None, None, True, 0)

    teacher = Path(teacher_dir) if distill and teacher_dir is not None else None
    if teacher is not None and teacher.resolve() == model_dir.resolve():
        teacher = None  # the student's own base, with the adapter switched off
    if teacher is not None and not tokenizers_match(model_dir, teacher):
        raise ConfigError(
            {
                "kl_weight": f"KL needs a teacher that shares the student's tokenizer; {teacher} does "
                f"not (train on its answers with kl_weight 0 instead)"
            }
        )

    oom: str | None = None
    try:
        trainer, callback, skipped = _fit(
            model_dir,
            examples,
            config,
            output_dir,
            device,
            use_bf16,
            distill,
            progress,
            should_stop,
            resume_from,
            teacher,
            init,
            list(eval_examples or ()),
            epoch_adapters,
            epoch_log,
        )
    except BaseException as exc:
        if not is_oom(exc):
            raise
        oom = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if oom is not None:
        # Raised outside the except block: the traceback (and with it the
        # failed trainer, model and batch) is gone, so the memory comes back.
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)
        raise TrainingOOM(f"{oom_message(config, device)} (error: {oom})")

    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    tps = (tokens - callback.start_tokens) / callback.loop_seconds if callback.loop_seconds > 0 else 0.0
    epochs = float(state.epoch or 0.0)
    if callback.cancelled:
        return result(
            state.global_step, state.max_steps, epochs, tokens, tps, callback.last_loss, None, True, skipped
        )
    adapter_dir = output_dir / ADAPTER_DIR
    save_adapter_atomic(trainer.model, adapter_dir)
    # The adapter is the result; checkpoints only served to get here.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result(
        state.global_step,
        state.max_steps,
        epochs,
        tokens,
        tps,
        callback.last_loss,
        adapter_dir,
        False,
        skipped,
    )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load(model_dir: Path, device: str, dtype: Any) -> Any:
    """The one loader (safetensors only, no remote code), its refusal turned
    into a TrainingError."""
    from engines.inference import ModelLoadError, load_model

    try:
        return load_model(model_dir, device=device, dtype=dtype)
    except ModelLoadError as exc:
        raise TrainingError(f"cannot train on {model_dir}: {exc}") from exc


def _fit(
    model_dir: Path,
    examples: Sequence[Example],
    config: TrainConfig,
    output_dir: Path,
    device: str,
    use_bf16: bool,
    distill: bool,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
    resume_from: Path | None,
    teacher_dir: Path | None,
    init_adapter: Path | None,
    eval_examples: list[Example],
    epoch_adapters: bool,
    epoch_log: list[dict[str, Any]],
) -> tuple[Any, Any, int]:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    from engines.training.trainer import AbsorbTrainer, DistillCollator, EpochCallback, ProgressCallback

    dtype = torch.bfloat16 if use_bf16 and device == "cuda" else torch.float32
    loaded = _load(model_dir, device, dtype)
    tokenizer = loaded.tokenizer
    features, skipped = tokenize_examples(tokenizer, examples, config.max_length, teacher=distill)
    if not features:
        raise ExampleError(
            f"Every example's prompt is longer than max_length ({config.max_length} tokens); "
            "raise max_length."
        )
    eval_features = tokenize_examples(tokenizer, eval_examples, config.max_length)[0] if eval_examples else []
    teacher_model: Any = None
    if teacher_dir is not None:
        teacher_model = _load(teacher_dir, device, dtype).model
        teacher_model.requires_grad_(False)
    model, peft_config = loaded.model, lora_config(config)
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_config = None  # the adapter is already there: TRL refuses a second one
    callback = ProgressCallback(progress, should_stop)
    trainer = AbsorbTrainer(
        model=model,
        args=sft_config(config, output_dir / CHECKPOINTS_DIR, device, use_bf16, distill),
        train_dataset=Dataset.from_list(features),
        processing_class=tokenizer,
        data_collator=DistillCollator(tokenizer.pad_token_id) if distill else None,
        peft_config=peft_config,
        callbacks=[callback],
        kl_weight=config.kl_weight,
        kl_temperature=config.kl_temperature,
        teacher_model=teacher_model,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(
        EpochCallback(trainer, callback, output_dir, epoch_log, eval_features, epoch_adapters)
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, callback, skipped
