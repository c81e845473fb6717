"""Training overhead: the workbench engine (`engines.training.train`) against a
plain PEFT + TRL script, same model, data, hyperparameters and steps, run
side by side in one process in ABBA order after a warm-up of each.

    .venv/bin/python bench/train_overhead.py --steps 8 --rounds 2

Throughput is measured the same way for both: non-pad tokens between the
first and the last logged step, over the wall time between them (the first
step, with its one-off warm-up, is left out). Both see the same batches (same
seed, same length-grouped sampler), so a second figure pairs them step by
step: the median over steps of (engine tok/s) / (plain tok/s) for the same
batch, which shrugs off a noisy neighbour better than the totals.
Target: engine/plain >= 0.97.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engines.chat import prompt_completion  # noqa: E402
from engines.progress import Progress  # noqa: E402
from engines.training import TrainConfig, resolve_bf16, resolve_device, train  # noqa: E402

MODEL_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
TOPICS = [
    "billing",
    "password reset",
    "shipping delays",
    "refund policy",
    "API rate limits",
    "invoice export",
    "two-factor login",
    "team seats",
    "data retention",
    "webhook retries",
]
WORDS = (
    "the account settings page shows each plan with its limits and the renewal date so you can check what "
    "applies to you before changing anything and support can confirm the details by email within a day "
    "while the dashboard keeps a log of every change made by an administrator"
).split()


def synthetic_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Support-style queries (~20-50 words) and answers (~80-220 words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        query = f"Hi, question about {topic}: " + " ".join(rng.choices(WORDS, k=rng.randint(15, 45))) + "?"
        answer = (
            f"Thanks for asking about {topic}. "
            + ". ".join(
                " ".join(rng.choices(WORDS, k=rng.randint(10, 20))).capitalize()
                for _ in range(rng.randint(6, 12))
            )
            + ". Let me know if anything else comes up."
        )
        out.append(
            {
                "messages": [{"role": "user", "content": f"[{i}] {query}"}],
                "answer": answer,
                "system_prompt": None,
            }
        )
    return out


def steady_tokens_per_second(marks: list[tuple[float, int]]) -> float:
    (t1, n1), (tn, nn) = marks[0], marks[-1]
    return (nn - n1) / (tn - t1)


def step_rates(marks: list[tuple[float, int]]) -> list[float]:
    """tokens/s of each step after the first."""
    return [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in zip(marks, marks[1:], strict=False)]


def paired_ratio(engine: list[dict[str, Any]], plain: list[dict[str, Any]]) -> float:
    per_step_e = [statistics.median(vals) for vals in zip(*(r["steps"] for r in engine), strict=True)]
    per_step_p = [statistics.median(vals) for vals in zip(*(r["steps"] for r in plain), strict=True)]
    return statistics.median(e / p for e, p in zip(per_step_e, per_step_p, strict=True))


def run_engine(examples: list[dict[str, Any]], config: TrainConfig, work: Path) -> dict[str, Any]:
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    def progress(p: Progress) -> None:
        marks.append((time.monotonic(), int(p.metrics["train_tokens"] or 0)))
        losses.append(float(p.metrics["loss"] or 0.0))

    t0 = time.monotonic()
    train(MODEL_DIR, examples, work / "engine", config, progress=progress, resume=False)
    return {
        "tps": steady_tokens_per_second(marks),
        "steps": step_rates(marks),
        "wall": time.monotonic() - t0,
        "loss": losses,
    }


def run_plain(
    examples: list[dict[str, Any]], config: TrainConfig, work: Path, device: str, bf16: bool
) -> dict[str, Any]:
    # ---- the plain script: what one would write by hand with PEFT + TRL ----
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    class Marks(TrainerCallback):  # measurement only, same points as the engine's progress
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                marks.append((time.monotonic(), state.num_input_tokens_seen))
                losses.append(logs["loss"])

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    rows = []
    for ex in examples:
        prompt, completion = prompt_completion(tok, ex["messages"], ex["answer"])
        rows.append({"prompt": prompt, "completion": completion})
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(work / "plain"),
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="no",
        activation_checkpointing=config.gradient_checkpointing,
        bf16=bf16,
        use_cpu=device == "cpu",
        max_length=config.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[Marks()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.model.save_pretrained(str(work / "plain" / "adapter"))
    # ------------------------------------------------------------------------
    return {
        "tps": steady_tokens_per_second(marks),
        "steps": step_rates(marks),
        "wall": time.monotonic() - t0,
        "loss": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each round runs engine+plain twice")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU with native bf16, or CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    opts = ap.parse_args()
    if opts.threads:
        __import__("torch").set_num_threads(opts.threads)

    if not MODEL_DIR.is_dir():
        from engines.provisioning import provision_default

        provision_default(MODEL_DIR, log=print)
    examples = synthetic_examples(opts.examples)
    config = TrainConfig(
        max_steps=opts.steps, batch_size=opts.batch_size, bf16=opts.bf16 or "auto", save_steps=10_000
    )
    device = resolve_device(config.device)
    bf16 = resolve_bf16(config.bf16, device)
    print(
        f"device={device} bf16={bf16} steps={opts.steps} batch={opts.batch_size} examples={len(examples)} "
        f"threads={__import__('torch').get_num_threads()}",
        flush=True,
    )

    results: dict[str, list[dict[str, Any]]] = {"engine": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="wb-bench-train-") as tmp:
        work = Path(tmp)
        warm = TrainConfig(**{**config.to_dict(), "max_steps": 2})
        run_engine(examples, warm, work)
        run_plain(examples, warm, work, device, bf16)
        order = ["engine", "plain", "plain", "engine"] * opts.rounds
        for name in order:
            r = (
                run_engine(examples, config, work)
                if name == "engine"
                else run_plain(examples, config, work, device, bf16)
            )
            results[name].append(r)
            print(
                f"{name:6s} {r['tps']:7.1f} tok/s  wall {r['wall']:6.1f} s  loss {r['loss'][0]:.3f} -> "
                f"{r['loss'][-1]:.3f}  per step: {' '.join(f'{x:.0f}' for x in r['steps'])}",
                flush=True,
            )

    eng = statistics.median(r["tps"] for r in results["engine"])
    pla = statistics.median(r["tps"] for r in results["plain"])
    print(
        f"median tokens/s  engine {eng:.1f}  plain {pla:.1f}  ratio engine/plain {eng / pla:.3f} "
        f"(target >= 0.97)"
    )
    print(f"paired by step   ratio engine/plain {paired_ratio(results['engine'], results['plain']):.3f}")
    ew = statistics.median(r["wall"] for r in results["engine"])
    pw = statistics.median(r["wall"] for r in results["plain"])
    print(f"median wall s    engine {ew:.1f}  plain {pw:.1f}  (load + prepare + {opts.steps} steps + save)")


if __name__ == "__main__":
    main()
