"""What best-of-N costs: teacher generation of the same queries with 1 and
with N samples each (the samples share the encoded prompt and the batches),
WITH a scenario's prompt and its opening prefilled, on the default model,
side by side in one process. Prints seconds and the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/best_of.py [--scenario lumen] [--queries 32] [--n 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="lumen")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from engines.curation import CurationSettings, opening, pick_best
    from engines.inference import GenerationSettings, generate_samples, load_model
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default
    from engines.rules import validate_rules

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    queries = [json.loads(line)["messages"] for line in (folder / "train.jsonl").read_text().splitlines()]
    queries = queries[: args.queries]
    loaded = load_model(provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME))
    cur = CurationSettings()
    limit = (
        min(r.params["n"] for r in rules if r.kind == "max_words")
        if any(r.kind == "max_words" for r in rules)
        else 96
    )
    gen = GenerationSettings(
        max_new_tokens=math.ceil(limit * 1.6) + 16, temperature=cur.temperature, top_p=cur.top_p, seed=0
    )
    text = opening(rules)
    generate_samples(loaded, queries[:2], prompt, gen, 1, opening=text)  # warm-up
    times = {}
    passed = {}
    for n in (1, args.n, 1, args.n):
        began = time.perf_counter()
        groups = generate_samples(loaded, queries, prompt, gen, n, opening=text)
        times.setdefault(n, []).append(time.perf_counter() - began)
        picks = [pick_best([c.text for c in g], rules) for g in groups]
        passed[n] = sum(p[1][p[0]] for p in picks) / (len(picks) * len(rules))
    t1, tn = min(times[1]), min(times[args.n])
    print(
        f"{args.scenario}: {len(queries)} queries WITH the prompt ({len(loaded.tokenizer(prompt)['input_ids'])} "
        f"tokens), max {gen.max_new_tokens} new tokens, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"best of 1: {t1:.1f} s (runs {', '.join(f'{t:.1f}' for t in times[1])}); "
        f"rules passed by the pick {passed[1]:.2f}"
    )
    print(
        f"best of {args.n}: {tn:.1f} s (runs {', '.join(f'{t:.1f}' for t in times[args.n])}); "
        f"rules passed by the pick {passed[args.n]:.2f}"
    )
    print(f"time ratio best-of-{args.n} / best-of-1: {tn / t1:.2f}x")


if __name__ == "__main__":
    main()
