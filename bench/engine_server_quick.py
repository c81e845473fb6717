"""Quick throughput check of the hf engine server (engines/engine_server.py):
requests/s for 16 concurrent clients vs the same 16 requests one by one,
greedy, max_tokens 64, through the real `openai` client over HTTP.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_server_quick.py [--dtype bfloat16 float32] [--threads 1]

Uses the default model (provisioned into .cache/models on first use).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "How do I reset my password?", "What is the capital of France?", "Give me three tips for better sleep.",
    "Explain photosynthesis simply.", "Write a haiku about rain.", "What is 17 times 23?",
    "How do vaccines work?", "Suggest a name for a cat.", "What is the boiling point of water?",
    "Why is the sky blue?", "How do I make pancakes?", "What is a prime number?",
    "Tell me a fun fact about octopuses.", "How far is the Moon?", "What does HTTP stand for?",
    "Recommend a good book for a long flight.",
]


def run(dtype: str, threads: int, max_tokens: int, window_ms: float) -> dict[str, float]:
    import openai

    from engines.engine_server import EngineServer
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default

    model_dir = provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)
    with EngineServer({"default": model_dir}, dtype=dtype, threads=threads, batch_window_ms=window_ms) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(question: str) -> int:
            answer = client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": question}],
                temperature=0, max_tokens=max_tokens)
            return answer.usage.completion_tokens

        ask("Warm up.")
        began = time.perf_counter()
        seq_tokens = sum(ask(q) for q in QUESTIONS)
        sequential = time.perf_counter() - began

        calls = server.engine.generate_calls
        began = time.perf_counter()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            conc_tokens = sum(pool.map(ask, QUESTIONS))
        concurrent = time.perf_counter() - began
        used = server.engine.generate_calls - calls
    n = len(QUESTIONS)
    return {"seq_rps": n / sequential, "conc_rps": n / concurrent, "ratio": sequential / concurrent,
            "seq_tps": seq_tokens / sequential, "conc_tps": conc_tokens / concurrent, "calls": used,
            "seq_s": sequential, "conc_s": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    args = parser.parse_args()
    print(f"16 requests, greedy, max_tokens {args.max_tokens}, {args.threads} torch thread(s), "
          f"batch window {args.batch_window_ms:g} ms; "
          f"load average {os.getloadavg()[0]:.2f}")
    for dtype in args.dtype:
        r = run(dtype, args.threads, args.max_tokens, args.batch_window_ms)
        print(f"{dtype:9s} sequential {r['seq_rps']:.2f} req/s ({r['seq_tps']:.1f} tok/s, {r['seq_s']:.1f} s) | "
              f"16 concurrent {r['conc_rps']:.2f} req/s ({r['conc_tps']:.1f} tok/s, {r['conc_s']:.1f} s, "
              f"{r['calls']:.0f} generate calls) | ratio {r['ratio']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
