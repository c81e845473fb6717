"""The training engine: a LoRA adapter learns to answer WITHOUT the system
prompt what the base model answered WITH it (prompt absorption).

Plain Python: no Django, no Celery. Importing this package is cheap (torch,
transformers, peft and trl load when a run starts), so the web process can
validate a `TrainConfig` without loading torch.

Layout, as TRL's: `config` (TrainConfig, its errors, the peft/TRL configs),
`data` (validation, the general-instruction mix against forgetting, the
repeated fact rows,
tokenization and the KL loss terms that read its masks),
`checkpoints` (resume, fingerprint, epoch log, atomic adapter save),
`device`, `trainer` (AbsorbTrainer, DistillCollator, ProgressCallback,
EpochCallback; imported lazily), `absorb` (`train`) and `refine` (which of
the student's own samples a rejection-sampling round trains on). Outside code imports from
here only.

Contract of `train`:
  - returns a `TrainResult`; a cooperative cancel (`should_stop()` true) stops
    within one optimizer step and returns `cancelled=True` with no adapter
    saved (checkpoints stay, so the run can be resumed);
  - with `init_adapter`, continues a saved adapter instead of a fresh LoRA;
  - logs every finished epoch (`TrainResult.epoch_log`, epochs/epochs.json):
    with `eval_examples` their loss, with `epoch_adapters` each epoch's adapter;
  - loads weights only through `engines.inference.load_model` (safetensors,
    no remote code);
  - raises `ConfigError` (bad config), `ExampleError` (bad examples),
    `TrainingOOM` (out of memory, with what to change) or `TrainingError`
    (anything else the user can fix, e.g. a checkpoint from another run or
    a model without safetensors weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engines.training.absorb import train
from engines.training.checkpoints import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    EPOCH_LOG,
    EPOCHS_DIR,
    fingerprint,
    last_checkpoint,
)
from engines.training.config import (
    DEFAULT_TARGET_MODULES,
    DEVICES,
    LR_SCHEDULERS,
    ConfigError,
    ExampleError,
    TrainConfig,
    TrainingError,
    TrainingOOM,
    TrainResult,
    lora_config,
    sft_config,
)
from engines.training.data import (
    Example,
    general_examples,
    general_instructions,
    general_mix_queries,
    repeat_fact_rows,
    split_ids,
    tokenize_examples,
    tokenizers_match,
    validate_examples,
)
from engines.training.device import resolve_bf16, resolve_device
from engines.training.refine import Choice, RefineReport, choose_answer, refine_examples

if TYPE_CHECKING:
    from engines.training.trainer import AbsorbTrainer, DistillCollator, EpochCallback, ProgressCallback

_LAZY = {"AbsorbTrainer", "DistillCollator", "EpochCallback", "ProgressCallback"}


def __getattr__(name: str) -> Any:
    # The trainer classes need torch and trl: import them on first use only.
    if name in _LAZY:
        from engines.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS_DIR",
    "DEFAULT_TARGET_MODULES",
    "DEVICES",
    "EPOCHS_DIR",
    "EPOCH_LOG",
    "LR_SCHEDULERS",
    "AbsorbTrainer",
    "Choice",
    "ConfigError",
    "DistillCollator",
    "EpochCallback",
    "Example",
    "ExampleError",
    "ProgressCallback",
    "RefineReport",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingOOM",
    "choose_answer",
    "fingerprint",
    "general_examples",
    "general_instructions",
    "general_mix_queries",
    "last_checkpoint",
    "lora_config",
    "refine_examples",
    "repeat_fact_rows",
    "resolve_bf16",
    "resolve_device",
    "sft_config",
    "split_ids",
    "tokenize_examples",
    "tokenizers_match",
    "train",
    "validate_examples",
]
