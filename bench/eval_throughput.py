"""Eval generation throughput on the real SmolLM2-135M-Instruct, behind the
~1,000-token support-bot prompt of teacher_throughput.py, greedy:

1. batched (batch 16, shared-prefix reuse) vs one request at a time
   (`engines.evaluation.single_request_latency`) for the same queries on the
   teacher arm: examples/s each and the ratio (target >= 4x);
2. the four eval arms (`generate_arms`) with ONE loaded base + adapter vs
   loading the model afresh for each arm; wall time, loads included, and the
   ratio, with the generation time of each arm; `--rounds` runs of each way
   in ABBA order. Fails if any arm's answers differ between the two ways.

The adapter is a random LoRA (r=16, alpha=32, the 7 projections, non-zero
weights so it changes the answers), written to a temporary folder.

    .venv/bin/python bench/eval_throughput.py [--queries 48] [--max-new-tokens 32]
        [--batch-size 16] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from teacher_throughput import MODEL_DIR, queries, system_prompt

from engines.evaluation import ARMS, arm, generate_arms, latency_summary, single_request_latency
from engines.inference import GenerationSettings, count_tokens, generate, load_model
from engines.progress import Progress
from engines.provisioning import provision_default


def make_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
        LoraConfig(
            r=16,
            lora_alpha=32,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="four-arm runs of each way, in ABBA order (a neighbour's load hits both alike)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core box more threads wait at barriers)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = provision_default(MODEL_DIR, log=print)
    prompt = system_prompt()
    convs = [[{"role": "user", "content": q}] for q in queries(args.queries)]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model_dir, Path(tmp) / "adapter")
        t = time.perf_counter()
        loaded = load_model(model_dir, adapter_dir=adapter)
        load_one = time.perf_counter() - t
        tokens = [count_tokens(loaded.tokenizer, c, prompt) for c in convs]
        print(
            f"load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; {len(convs)} queries, "
            f"prompts {min(tokens)}-{max(tokens)} tokens; max_new_tokens {args.max_new_tokens}; batch {args.batch_size}; fp32; "
            f"base + adapter loaded in {load_one:.1f}s",
            flush=True,
        )
        # The first batch is ~2x slower (allocator, thread pools): keep it out of the timings.
        generate_arms(loaded, convs[:4], prompt, GenerationSettings(max_new_tokens=4, batch_size=4))

        # 1. Batched vs one at a time, teacher arm.
        with arm(loaded, "teacher", prompt) as teacher_prompt:
            t = time.perf_counter()
            generate(loaded, convs, teacher_prompt, settings)
            batched = time.perf_counter() - t
        singles = single_request_latency(
            loaded, convs, prompt, settings, sample=len(convs), arm_name="teacher"
        )
        one_by_one = sum(singles)
        lat = latency_summary(singles)
        print(
            f"teacher arm: batched {batched:.1f}s {len(convs) / batched:.3f} ex/s | one at a time "
            f"{one_by_one:.1f}s {len(convs) / one_by_one:.3f} ex/s (latency mean {lat['mean']:.2f}s, "
            f"p50 {lat['p50']:.2f}s, p95 {lat['p95']:.2f}s) | ratio {one_by_one / batched:.2f}x",
            flush=True,
        )

        # 2. Four arms: one loaded base + adapter vs a fresh load per arm.
        del loaded
        walls: dict[str, list[float]] = {"one": [], "fresh": []}
        loads: dict[str, float] = {"one": 0.0, "fresh": 0.0}
        arm_secs: dict[str, dict[str, float]] = {
            "one": dict.fromkeys(ARMS, 0.0),
            "fresh": dict.fromkeys(ARMS, 0.0),
        }
        answers: dict[str, dict[str, list]] = {}
        order = [
            m for r in range(args.rounds) for m in (("one", "fresh") if r % 2 == 0 else ("fresh", "one"))
        ]
        for mode in order:
            t = time.perf_counter()
            if mode == "one":
                loaded = load_model(model_dir, adapter_dir=adapter)
                loads[mode] += time.perf_counter() - t
                marks: list[float] = []

                def mark(p: Progress, marks: list[float] = marks) -> None:
                    if p.done % len(convs) == 0:  # the end of an arm
                        marks.append(time.perf_counter())

                began = time.perf_counter()
                answers[mode] = generate_arms(loaded, convs, prompt, settings, progress=mark)
                for name, a, b in zip(ARMS, [began, *marks[:-1]], marks, strict=True):
                    arm_secs[mode][name] += b - a
                del loaded
            else:
                answers[mode] = {}
                for name in ARMS:
                    t_arm = time.perf_counter()
                    fresh = load_model(model_dir, adapter_dir=adapter if name.startswith("student") else None)
                    loads[mode] += time.perf_counter() - t_arm
                    t_arm = time.perf_counter()
                    answers[mode][name] = generate(
                        fresh, convs, prompt if name in ("teacher", "student+prompt") else None, settings
                    )
                    arm_secs[mode][name] += time.perf_counter() - t_arm
                    del fresh
            walls[mode].append(time.perf_counter() - t)
            print(f"  {mode:>5}: {walls[mode][-1]:.1f}s (load average {os.getloadavg()[0]:.1f})", flush=True)

    runs = len(walls["one"])
    one, fresh = sum(walls["one"]) / runs, sum(walls["fresh"]) / runs
    shared, per_arm = answers["one"], answers["fresh"]
    same = {
        name: sum(a.text == b.text for a, b in zip(shared[name], per_arm[name], strict=True)) for name in ARMS
    }
    print(
        f"four arms, mean of {runs}: one loaded model {one:.1f}s (loads {loads['one'] / runs:.1f}s) | "
        f"a load per arm {fresh:.1f}s (loads {loads['fresh'] / runs:.1f}s) | ratio {fresh / one:.2f}x"
    )
    for mode, label in (("one", "one loaded model"), ("fresh", "a load per arm")):
        print(
            f"  generation per arm, {label}: "
            + ", ".join(f"{n} {arm_secs[mode][n] / runs:.1f}s" for n in ARMS)
        )
    print("  identical answers: " + ", ".join(f"{n} {k}/{len(convs)}" for n, k in same.items()), flush=True)
    print("sample answers:", {name: shared[name][0].text[:60] for name in ARMS})
    if any(k != len(convs) for k in same.values()):
        print("FAIL: an arm answered differently with one loaded model than with its own")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
