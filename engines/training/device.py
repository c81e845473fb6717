"""Where a run trains and in what precision, and what to change when it
runs out of memory there."""

from __future__ import annotations

from engines.training.config import TrainConfig, TrainingError


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


def is_oom(exc: BaseException) -> bool:
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, Exception) and should_reduce_batch_size(exc)
    )


def oom_message(config: TrainConfig, device: str) -> str:
    tips = [
        f"lower batch_size (now {config.batch_size}; e.g. {max(1, config.batch_size // 2)}, and raise "
        f"grad_accum from {config.grad_accum} to {config.grad_accum * 2} to keep the effective batch)",
        f"lower max_length (now {config.max_length})",
    ]
    if not config.gradient_checkpointing:
        tips.append("enable gradient_checkpointing (now off)")
    if config.kl_weight > 0:
        tips.append(f"set kl_weight to 0 (now {config.kl_weight}; the teacher pass reads the long prompt)")
    return f"Out of memory on {device} while training. To fit: " + "; ".join(tips) + "."
