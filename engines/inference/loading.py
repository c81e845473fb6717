"""Loading a model for inference: the device, and the ONE weight loader
(safetensors only, never remote code) that inference, training and exports
all call, with the stop tokens derived from the tokenizer and template."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.chat import render

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A user-facing error: the message says what was wrong and where."""


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft PeftModel around one
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: tuple[int, ...]

    @property
    def has_adapter(self) -> bool:
        """Whether an unmerged peft adapter is attached (a merged one is part
        of the weights and cannot be switched off)."""
        peft = sys.modules.get("peft")  # no PeftModel can exist unless peft was imported
        return peft is not None and isinstance(self.model, peft.PeftModel)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside the block the base model answers alone (the eval arms floor
        and teacher), through peft's `disable_adapter`; a no-op without an adapter."""
        if not self.has_adapter:
            yield
            return
        with self.model.disable_adapter():
            yield


def pick_device(prefer: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device to run on and its dtype: CUDA with bf16 (fp16 where bf16 is
    unsupported), else MPS, else CPU in float32. `prefer` ("cuda", "cuda:1",
    "mps", "cpu") forces a device and fails if it is unavailable."""
    import torch

    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {prefer!r} was asked for but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {prefer!r} was asked for but MPS is not available")
        if device.type not in ("cuda", "mps", "cpu"):
            raise ModelLoadError(f"unsupported device {prefer!r}: use cuda, mps or cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # float32 on MPS: bf16 support there depends on the OS version.
    return device, torch.float32


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant
    message (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), if any."""
    from jinja2 import TemplateError

    marker = "WORKBENCH-END-OF-TURN-PROBE"
    try:
        text = render(
            tokenizer,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            add_generation_prompt=False,
        )
    except (TemplateError, ValueError) as exc:
        # No chat template (ValueError) or one that refuses this conversation
        # (raise_exception): no end-of-turn token to derive, the EOS still stops.
        log.warning("no end-of-turn token derived from the chat template: %s: %s", type(exc).__name__, exc)
        return None
    if marker not in text:
        return None
    tail = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    if not tail:
        return None
    first = int(tail[0])
    added = tokenizer.added_tokens_decoder.get(first)
    if first in tokenizer.all_special_ids or (added is not None and added.special):
        return first
    return None


def _stop_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id, _end_of_turn_id(tokenizer)]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for token_id in candidates:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ModelLoadError(
            "the tokenizer has no end-of-sequence token and the chat template no end-of-turn token"
        )
    return tuple(ids)


def load_model(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = False,
) -> LoadedModel:
    """Load a safetensors causal LM and its tokenizer, optionally with a peft
    adapter (merged into the weights when `merge`). Never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{model_dir} is not a model directory (config.json and *.safetensors weights)")
    picked_device, picked_dtype = pick_device(None if device is None else str(device))
    dtype = dtype or picked_dtype

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(picked_device)
    stop_ids = _stop_token_ids(tokenizer, model)
    # Only GenerationSettings decide how we sample: drop the checkpoint's own
    # sampling defaults (top_k, repetition_penalty...) so every model behaves alike.
    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id,
        eos_token_id=list(stop_ids),
        pad_token_id=model.generation_config.pad_token_id,
    )

    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ModelLoadError(
                f"{adapter_dir} has no adapter_model.safetensors (only safetensors adapters load)"
            )
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    model.eval()

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=picked_device, dtype=dtype, stop_token_ids=stop_ids
    )
