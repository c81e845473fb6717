"""The fine-tune's loss path: cross-entropy from logits at answer positions
only (AbsorbTrainer, the default) against SFTTrainer's own compute_loss,
which takes (batch x length x vocab) logits and their softmax for its entropy
and accuracy metrics. Same model, data, settings and steps; each run in its
own process (so its peak RSS is its own), in ABBA order.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_loss.py --steps 6 --rounds 1 --bf16

Prints tokens/s after the first step, peak RSS and the losses per arm, and
the ratios answer-only / full.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(arm: str, steps: int, batch_size: int, bf16: bool, examples: int) -> None:
    from bench.train_overhead import run_engine, synthetic_examples
    from engines.training import TrainConfig
    from engines.training.trainer import AbsorbTrainer

    AbsorbTrainer.answer_only_logits = arm == "answer-only"
    config = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        bf16=True if bf16 else "auto",  # "auto": the product default (fp32 on a CPU)
        general_mix=0.0,
        fact_repeat=1,
        save_steps=10_000,
    )
    with tempfile.TemporaryDirectory() as work:
        out = run_engine(synthetic_examples(examples), config, Path(work))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps({"tps": out["tps"], "loss": out["loss"], "peak_gib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        return child(opts.child, opts.steps, opts.batch_size, opts.bf16, opts.examples)
    results: dict[str, list[dict]] = {"answer-only": [], "full": []}
    order = ["answer-only", "full", "full", "answer-only"] * opts.rounds
    for arm in order:
        args = [sys.executable, __file__, "--child", arm, "--steps", str(opts.steps)]
        args += ["--batch-size", str(opts.batch_size), "--examples", str(opts.examples)]
        args += ["--bf16"] if opts.bf16 else []
        done = subprocess.run(args, capture_output=True, text=True, env=os.environ, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results[arm].append(result)
        print(f"{arm:>12}: {result['tps']:.0f} tok/s, peak {result['peak_gib']:.2f} GiB", flush=True)
    print(
        f"\nbatch {opts.batch_size}, {opts.steps} steps, bf16 {opts.bf16}, threads {os.environ.get('OMP_NUM_THREADS')}"
    )
    summary = {}
    for arm, runs in results.items():
        summary[arm] = {
            "tps": statistics.median(r["tps"] for r in runs),
            "peak": max(r["peak_gib"] for r in runs),
            "loss": [round(x, 4) for x in runs[0]["loss"]],
        }
        s = summary[arm]
        print(f"{arm:>12}: {s['tps']:.0f} tok/s, peak RSS {s['peak']:.2f} GiB, losses {s['loss']}")
    a, f = summary["answer-only"], summary["full"]
    print(f"answer-only / full: tokens/s {a['tps'] / f['tps']:.2f}x, peak RSS {a['peak'] / f['peak']:.2f}x")


if __name__ == "__main__":
    main()
