"""What a decode step costs with LoRA adapters loaded: peft (the engine's
path before issue 21) vs the engine's own stacked layers
(engines/serving_engine/lora.py), side by side in one run, in process, on
the default model (bf16 where the CPU has it, 1 torch thread unless told).

A batch of 16 lumen held-out queries (no prompt) generates N forced new
tokens (greedy, EOS ignored) through `model.generate`, as the engine calls it:

- the bare base (no adapter loaded anywhere);
- bare-base rows with 20 adapters loaded (peft: `disable_adapter`; stacked:
  the rows are not routed);
- every row through one adapter (peft: `set_adapter`; stacked: one adapter);
- 16 rows through 16 different adapters (peft: `adapter_names`; stacked:
  gathered weights and two bmm a module).

Each arm runs `--repeats` times, the arms interleaved; the best time counts.
Targets (issue 21): base rows with 20 adapters loaded >= 0.9x the bare base;
16 different adapters >= 0.85x one adapter.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_step.py [--tokens 24] [--repeats 3] [--threads 1]

The adapters are random, shaped like the workbench's fine-tunes (r 16, alpha
32, the 7 projections; bench/serving.py builds them)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROWS = 16
TARGETS = {"base": 0.9, "mixed": 0.85}


def serving_bench() -> Any:
    # bench/serving.py is a script beside this one (and `serving` is the Django app's name).
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "bench" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=24, help="new tokens a row (default 24)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    args = parser.parse_args()

    import warnings

    import torch
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from engines.inference import GenerationSettings, encode, generation_config, left_pad, load_model
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default
    from engines.serving_engine import resolve_dtype
    from engines.serving_engine.lora import AdapterSet, read_adapter

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    bench = serving_bench()
    dtype = resolve_dtype(args.dtype)
    model_dir = provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    folders = bench.build_adapters(model_dir, work, args.adapters)
    names = [f"a{i:02d}" for i in range(len(folders))]

    bare = load_model(str(model_dir), dtype=dtype)
    peft_loaded = load_model(str(model_dir), dtype=dtype)
    peft_model = PeftModel.from_pretrained(peft_loaded.model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.eval()
    stacked_loaded = load_model(str(model_dir), dtype=dtype)
    stacked = AdapterSet(stacked_loaded.model)
    for name, folder in zip(names, folders, strict=True):
        stacked.add(name, read_adapter(stacked_loaded.model, folder))

    tokenizer = bare.tokenizer
    queries = bench.queries("heldout.jsonl")[:ROWS]
    ids, mask = left_pad(
        [encode(tokenizer, [{"role": "user", "content": q}], None) for q in queries],
        int(tokenizer.pad_token_id),
    )
    config = generation_config(bare, GenerationSettings(max_new_tokens=args.tokens, ignore_eos=True))
    one = [names[0]] * ROWS
    mixed = [names[i % len(names)] for i in range(ROWS)]

    def peft_scope(rows: list[str] | None) -> tuple[Any, dict[str, Any]]:
        if rows is None:
            return peft_model.disable_adapter(), {}
        if len(set(rows)) == 1:
            peft_model.set_adapter(rows[0])
            return contextlib.nullcontext(), {}
        return contextlib.nullcontext(), {"adapter_names": rows}

    arms: dict[str, Any] = {
        "bare base, nothing loaded": lambda: (bare.model, contextlib.nullcontext(), {}),
        f"peft: base rows, {len(names)} loaded": lambda: (peft_model, *peft_scope(None)),
        f"stacked: base rows, {len(names)} loaded": lambda: (
            stacked_loaded.model,
            contextlib.nullcontext(),
            {},
        ),
        "peft: one adapter": lambda: (peft_model, *peft_scope(one)),
        "stacked: one adapter": lambda: (stacked_loaded.model, stacked.route(one), {}),
        f"peft: {ROWS} different adapters": lambda: (peft_model, *peft_scope(mixed)),
        f"stacked: {ROWS} different adapters": lambda: (stacked_loaded.model, stacked.route(mixed), {}),
    }
    best: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    print(
        f"bench/lora_step.py | {os.cpu_count()} cores ({bench.cpu_model()}), load {bench.load_avg()} | "
        f"{dtype}, {args.threads} thread(s) | batch {ROWS} x {args.tokens} forced tokens, "
        f"{len(names)} adapters (r 16, 7 projections)",
        flush=True,
    )
    for repeat in range(args.repeats):
        for arm, make in arms.items():
            model, scope, kwargs = make()
            began = time.perf_counter()
            with torch.inference_mode(), scope:
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kwargs)
            seconds = time.perf_counter() - began
            best[arm] = min(best.get(arm, seconds), seconds)
            outputs[arm] = out[:, ids.shape[1] :]
            print(f"  round {repeat + 1} {arm:36s} {seconds:6.2f} s | load {bench.load_avg()}", flush=True)

    tokens = ROWS * args.tokens
    print("\n| arm | best s | tok/s | ms a step |\n|---|--:|--:|--:|")
    for arm, seconds in best.items():
        print(f"| {arm} | {seconds:.2f} | {tokens / seconds:.1f} | {seconds / args.tokens * 1000:.0f} |")

    def rate(arm: str) -> float:
        return tokens / best[arm]

    bare_rate = rate("bare base, nothing loaded")
    print("\n| ratio | peft | stacked | target |\n|---|--:|--:|--:|")
    for label, kind, num, den in [
        (f"base rows with {len(names)} loaded / bare base", "base", "base rows", None),
        (f"{ROWS} different adapters / one adapter", "mixed", f"{ROWS} different adapters", "one adapter"),
    ]:
        cells = []
        for impl in ("peft", "stacked"):
            n = rate(next(a for a in best if a.startswith(f"{impl}: {num}")))
            d = bare_rate if den is None else rate(f"{impl}: {den}")
            cells.append(f"{n / d:.2f}")
        print(f"| {label} | {cells[0]} | {cells[1]} | >= {TARGETS[kind]} |")
    print(
        f"| one adapter: stacked / peft (tok/s) | | {rate('stacked: one adapter') / rate('peft: one adapter'):.2f} | |"
    )
    same = {
        arm: int((outputs[arm] == outputs[arm.replace("stacked", "peft")]).all(dim=1).sum())
        for arm in best
        if arm.startswith("stacked")
    }
    print(
        "\nrows whose greedy tokens equal peft's: "
        + ", ".join(f"{a[9:]} {n}/{ROWS}" for a, n in same.items())
    )


if __name__ == "__main__":
    main()
