"""The TRL pieces: the trainer with its optional KL term, the collator that
pads the teacher rendering, the callback that reports progress and honours
a cancel, and the one that closes each epoch (validation loss, adapter,
log). Importing this module imports torch, transformers and trl, so
`engines.training` imports it only when a run starts."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import TrainerCallback
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from engines.progress import Progress, ProgressFn, StopFn
from engines.training.checkpoints import ADAPTER_DIR, epoch_adapter_dir, save_adapter_atomic, write_epoch_log
from engines.training.data import answer_positions, distill_terms, teacher_positions


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
        self.metrics: dict[str, Any] = {}
        self.valid_loss: float | None = None

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

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return  # the end-of-training summary
        self.last_loss = float(logs["loss"])
        tokens = state.num_input_tokens_seen - self.start_tokens
        elapsed = time.monotonic() - self.t0
        self.metrics = {
            "loss": self.last_loss,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "epoch": state.epoch,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "train_tokens": state.num_input_tokens_seen,
        }
        for key in ("ce_loss", "kl_loss", "mean_token_accuracy"):
            if key in logs:
                self.metrics[key] = logs[key]
        self.report(
            state, {"step": state.global_step, "loss": self.last_loss, "lr": logs.get("learning_rate")}
        )

    def report_valid_loss(self, state: Any, loss: float) -> None:
        self.valid_loss = loss
        self.report(state, {"step": state.global_step, "valid_loss": loss})

    def report(self, state: Any, point: dict[str, Any]) -> None:
        if self.progress is None:
            return
        metrics = dict(self.metrics)
        if self.valid_loss is not None:
            metrics["valid_loss"] = self.valid_loss  # the latest, until the next epoch's
        self.progress(
            Progress.since(
                self.t0,
                state.global_step,
                state.max_steps,
                "steps",
                rate_done=state.global_step - self.start_step,
                metrics=metrics,
                point=point,
            )
        )


class EpochCallback(TrainerCallback):
    """At each finished epoch's end: the loss on `eval_features`, the
    epoch's adapter (with `save_adapters`, all but the last epoch) and its
    entry in `log`, rewritten whole to epochs/epochs.json."""

    def __init__(
        self,
        trainer: AbsorbTrainer,
        steps: ProgressCallback,
        output_dir: Path,
        log: list[dict[str, Any]],
        eval_features: list[dict[str, list[int]]],
        save_adapters: bool,
    ):
        self.trainer = trainer
        self.steps = steps
        self.output_dir = output_dir
        self.log = log
        self.eval_features = eval_features
        self.save_adapters = save_adapters
        self.save_after_epoch = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A run resumed from a checkpoint at an epoch's end never passes that
        # end again, so the checkpoint waits until the epoch's entry is written.
        if control.should_save and float(state.epoch).is_integer():
            control.should_save, self.save_after_epoch = False, True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The deferred checkpoint: Trainer saves it after the epoch-end callbacks.
        control.should_save, self.save_after_epoch = control.should_save or self.save_after_epoch, False
        last = state.global_step >= state.max_steps
        if self.steps.cancelled and (last or not float(state.epoch).is_integer()):
            return  # unfinished, or the last, whose adapter a cancelled run never saves
        epoch = math.ceil(state.epoch)
        valid = (
            self.trainer.answer_loss(self.eval_features, args.per_device_eval_batch_size)
            if self.eval_features
            else None
        )
        adapter: Path | None = self.output_dir / ADAPTER_DIR if last else None
        if self.save_adapters and not last:
            adapter = epoch_adapter_dir(self.output_dir, epoch)
            adapter.parent.mkdir(parents=True, exist_ok=True)
            save_adapter_atomic(self.trainer.model, adapter)
        self.log.append(
            {
                "epoch": epoch,
                "step": state.global_step,
                "train_loss": self.steps.last_loss,
                "valid_loss": valid,
                "adapter_dir": str(adapter) if adapter is not None else None,
            }
        )
        write_epoch_log(self.output_dir, self.log)
        if valid is not None:
            self.steps.report_valid_loss(state, valid)


class DistillCollator:
    """Pads the student batch as TRL does, plus the teacher rendering."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = self.base(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        )

        def padded(key: str, value: int) -> torch.Tensor:
            return pad_sequence(
                [torch.tensor(f[key]) for f in features], batch_first=True, padding_value=value
            )

        out["kl_mask"] = padded("kl_mask", 0)
        out["teacher_input_ids"] = padded("teacher_input_ids", self.pad_token_id)
        out["teacher_attention_mask"] = pad_sequence(
            [torch.ones(len(f["teacher_input_ids"]), dtype=torch.long) for f in features],
            batch_first=True,
            padding_value=0,
        )
        out["teacher_kl_mask"] = padded("teacher_kl_mask", 0)
        return out


class AbsorbTrainer(SFTTrainer):
    """SFTTrainer plus an optional token-level KL(teacher || student) term.
    The teacher is the same base model with the adapter disabled, reading
    the answer after the teacher's system prompt."""

    def __init__(
        self,
        *args: Any,
        kl_weight: float = 0.0,
        kl_temperature: float = 1.0,
        teacher_model: Any = None,
        **kwargs: Any,
    ):
        self.kl_weight = kl_weight
        self.kl_temperature = kl_temperature
        # Another model as the teacher (same tokenizer); None: the student's base, adapter off.
        self.teacher_model = teacher_model
        super().__init__(*args, **kwargs)

    # The cross-entropy from logits at answer positions only: SFTTrainer's takes (batch x length x
    # vocab) logits and, for its entropy and accuracy metrics, their softmax. Same losses, 1.39x the
    # tokens/s, 0.85x the peak RSS (bench/train_loss.py).
    answer_only_logits = True

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.kl_weight > 0 and "teacher_input_ids" in inputs:
            loss, ce, kl = self.distill_loss(model, inputs, num_items_in_batch)
            self._metrics["train"]["ce_loss"].append(ce)
            self._metrics["train"]["kl_loss"].append(kl)
        elif self.answer_only_logits:
            with self.accelerator.autocast():
                logits, labels = self.student_logits(model, inputs)
            loss = F.cross_entropy(logits, labels, reduction="sum") / self.denominator(
                labels, num_items_in_batch
            )
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == labels).float().mean() if labels.numel() else None
            if accuracy is not None and model.training:
                self._metrics["train"]["mean_token_accuracy"].append(float(accuracy))
        else:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def student_logits(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's fp32 logits at answer positions, and the tokens they predict. LoRA layers
        sit inside the backbone, so calling it directly trains the adapter. Accelerate's autocast
        wraps model.forward only: the caller enters it."""
        base = self.accelerator.unwrap_model(model).get_base_model()
        backbone, lm_head = base.base_model, base.get_output_embeddings()
        labels = inputs["labels"]
        sel = answer_positions(labels)
        hidden = backbone(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).last_hidden_state
        return lm_head(hidden[:, :-1][sel]).float(), labels[:, 1:][sel]

    def denominator(self, targets: torch.Tensor, num_items_in_batch: Any) -> Any:
        """What a summed loss is divided by, as SFTTrainer does: the answer tokens of the whole
        accumulated batch when the Trainer counted them, else this batch's."""
        if num_items_in_batch is None:
            return max(int(targets.numel()), 1)
        if self.args.average_tokens_across_devices:
            return num_items_in_batch / self.accelerator.num_processes
        return num_items_in_batch

    def distill_loss(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> tuple[torch.Tensor, float, float]:
        peft_model = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        with self.accelerator.autocast():
            logits, _ = self.student_logits(model, inputs)
            teacher = self.teacher_model
            base = peft_model.get_base_model()
            t_backbone, t_head = (
                (teacher.base_model, teacher.get_output_embeddings())
                if teacher is not None
                else (base.base_model, base.get_output_embeddings())
            )
            off = peft_model.disable_adapter() if teacher is None else contextlib.nullcontext()
            with torch.no_grad(), off:
                t_hidden = t_backbone(
                    input_ids=inputs["teacher_input_ids"],
                    attention_mask=inputs["teacher_attention_mask"],
                    use_cache=False,
                ).last_hidden_state
                t_logits = t_head(t_hidden[:, :-1][teacher_positions(inputs["teacher_kl_mask"])]).float()
        denom = self.denominator(labels[:, 1:][answer_positions(labels)], num_items_in_batch)
        ce, kl = distill_terms(logits, t_logits, labels, inputs["kl_mask"], self.kl_temperature, denom)
        loss = ce + self.kl_weight * kl
        return loss, float(ce.detach()), float(kl.detach())

    def answer_loss(self, features: list[dict[str, list[int]]], batch_size: int) -> float:
        """Cross-entropy per answer token over tokenize_examples' student
        `features` (the KL term, when on, is not in it), in eval mode."""
        model: Any = self.model
        tokenizer: Any = self.processing_class
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        was_training, total, count = model.training, 0.0, 0
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for i in range(0, len(features), batch_size):
                    batch = {
                        k: v.to(self.args.device) for k, v in collate(features[i : i + batch_size]).items()
                    }
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                    ).logits
                    labels, sel = batch["labels"], answer_positions(batch["labels"])
                    ce = F.cross_entropy(logits[:, :-1][sel].float(), labels[:, 1:][sel], reduction="sum")
                    total, count = total + float(ce), count + int(sel.sum())
        finally:
            model.train(was_training)
        return total / max(count, 1)
