"""The run's directory: which checkpoint to resume from (and whether it
belongs to this run), the per-epoch log, and the atomic save of adapters.

Layout under `output_dir`:
  checkpoints/run.json          fingerprint of (model, config, examples)
  checkpoints/checkpoint-N/     HF Trainer checkpoints (adapter, optimizer,
                                scheduler, RNG, trainer_state.json)
  adapter/                      the final adapter (adapter_model.safetensors
                                + adapter_config.json), renamed into place
  epochs/epochs.json            one entry per finished epoch (TrainResult.epoch_log)
  epochs/epoch-N/               epoch N's adapter (epoch_adapters; not the last epoch)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.training.config import TrainConfig, TrainingError
from engines.training.data import Example

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"
EPOCHS_DIR = "epochs"
EPOCH_LOG = "epochs.json"
# Written last by Trainer._save_checkpoint, so its presence (and parsing)
# means the checkpoint is complete; a process killed mid-save leaves a
# directory without it.
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Fields that do not change the optimisation, so a resumed run may differ in them.
_NON_MATH_FIELDS = frozenset(
    {"save_steps", "save_total_limit", "logging_steps", "device", "bf16", "gradient_checkpointing"}
)


def fingerprint(model_dir: Path, config: TrainConfig, examples: Sequence[Example]) -> str:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NON_MATH_FIELDS}
    blob = json.dumps(
        {"model": str(Path(model_dir).resolve()), "config": cfg, "examples": list(examples)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_step(path: Path) -> int | None:
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
        if checkpoint_step(Path(found)) is not None:
            return Path(found)
        shutil.rmtree(found, ignore_errors=True)
    return None


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def prepare_checkpoints(ckpt_dir: Path, run_id: str, resume: bool) -> Path | None:
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


def read_epoch_log(output_dir: Path, resume_from: Path | None) -> list[dict[str, Any]]:
    """The epochs a resumed run already finished, up to its checkpoint. A
    fresh run (prepare_checkpoints returned None) starts with none: the
    entries and epoch adapters of the run before it go with its checkpoints."""
    epochs_dir = output_dir / EPOCHS_DIR
    if resume_from is None:
        shutil.rmtree(epochs_dir, ignore_errors=True)
        return []
    try:
        entries = json.loads((epochs_dir / EPOCH_LOG).read_text())
    except (OSError, ValueError):
        return []
    step = checkpoint_step(resume_from) or 0
    # Epochs after the checkpoint are trained again and logged again.
    return [e for e in entries if e["step"] <= step]


def write_epoch_log(output_dir: Path, entries: list[dict[str, Any]]) -> None:
    (output_dir / EPOCHS_DIR).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(output_dir / EPOCHS_DIR / EPOCH_LOG, entries)


def epoch_adapter_dir(output_dir: Path, epoch: int) -> Path:
    return output_dir / EPOCHS_DIR / f"epoch-{epoch}"


def save_adapter_atomic(model: Any, dest: Path) -> None:
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
