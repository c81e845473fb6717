"""Per-row sampling (issue 22, item 4): concurrent streams whose seeds and
sampling settings all differ vs the same number of streams sharing one
setting, through the hf engine server and the real `openai` client, side by
side in one run (ABAB), on the default model. Before per-row sampling the
engine batched only requests with equal (temperature, top_p, seed, ...), so
8 seeded streams ran one generate call each.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/mixed_sampling.py [--clients 8] [--rounds 3] [--threads 1]

Prints wall seconds per round for each kind, generate calls, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a LoRA adapter is in one paragraph.",
    "Write a haiku about autumn.",
    "How do I boil an egg?",
    "What is 17 times 23?",
    "Name three planets of the solar system.",
    "Why is the sky blue?",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import openai

    from engines.engine_server import EngineServer
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default

    model_dir = provision_default(REPO / "var" / "models" / DEFAULT_MODEL_NAME)
    kinds: dict[str, list[dict[str, Any]]] = {
        "one setting, unseeded": [{"temperature": 0.7} for _ in range(args.clients)],
        "own seed each": [{"temperature": 0.7, "seed": 100 + i} for i in range(args.clients)],
        "own seed and settings each": [
            {
                "temperature": 0.5 + 0.1 * i,
                "seed": 200 + i,
                "top_p": 0.8 + 0.02 * i,
                "frequency_penalty": 0.1 * i,
                "extra_body": {"top_k": 10 + i},
            }
            for i in range(args.clients)
        ],
    }
    with EngineServer({"m": model_dir}, threads=args.threads, max_batch=16) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=600)

        def stream(i: int, params: dict[str, Any]) -> int:
            chunks = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=args.max_tokens,
                stream=True,
                **params,
            )
            return sum(1 for _ in chunks)

        stream(0, {"temperature": 0})  # warm up
        seconds: dict[str, list[float]] = {k: [] for k in kinds}
        calls: dict[str, list[int]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, params in kinds.items():
                before = server.engine.generate_calls
                began = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(stream, range(args.clients), params))
                seconds[kind].append(time.perf_counter() - began)
                calls[kind].append(server.engine.generate_calls - before)
    base = statistics.median(seconds["one setting, unseeded"])
    print(f"{args.clients} concurrent streams, max_tokens {args.max_tokens}, {args.threads} torch thread(s)")
    for kind in kinds:
        med = statistics.median(seconds[kind])
        shown = ", ".join(f"{s:.1f}" for s in seconds[kind])
        print(f"  {kind:28s} median {med:5.1f} s ({shown}); generate calls {calls[kind]}; {med / base:.2f}x")


if __name__ == "__main__":
    main()
