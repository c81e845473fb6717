"""What the JSON depth guard (engines/jsonguard.py) costs the upload parser,
and what it saves on a hostile file, side by side in one run.

    .venv/bin/python bench/json_guard.py [--rows 10000]

Prints, for a pretty-printed Alpaca JSON array and a chat JSONL file of the
same rows (strings with escaped quotes and newlines, the guard's slow case):
the parser's rows/s with the guard and with it switched off (best of 3, CPU
time), the guard alone in MB/s, and the time and peak RSS growth of
refusing 200,000 nested brackets.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines import formats, jsonguard


def rows_per_second(data: bytes, fmt: str, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        reader = formats.DatasetReader(io.BytesIO(data), fmt, limits=formats.Limits())
        count = sum(1 for _ in reader)
        best = min(best, time.process_time() - started)
    assert count == n, (count, reader.errors[:3])
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    n = parser.parse_args().rows
    random.seed(0)
    words = ["alpha", "beta", '"quoted"', "line\nbreak", "gamma"]
    rows = [
        {
            "instruction": f"Question {i}: " + " ".join(random.choice(words) for _ in range(40)),
            "input": "",
            "output": "Answer " * 30,
        }
        for i in range(n)
    ]
    array = json.dumps(rows, indent=4).encode()
    jsonl = "\n".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
        )
        for r in rows
    ).encode()
    feed = jsonguard.DepthGuard._feed
    for name, data, fmt in (("JSON array", array, "alpaca"), ("JSONL", jsonl, "chat")):
        on = rows_per_second(data, fmt, n)
        jsonguard.DepthGuard._feed = lambda self, piece: None  # type: ignore[method-assign]
        off = rows_per_second(data, fmt, n)
        jsonguard.DepthGuard._feed = feed  # type: ignore[method-assign]
        print(f"{name:10} parser {on:9,.0f} rows/s with the guard, {off:9,.0f} without: {on / off:.2f}x")
    started = time.process_time()
    guard = jsonguard.DepthGuard()
    for i in range(0, len(array), 64 * 1024):
        guard.feed(array[i : i + 64 * 1024])
    print(f"guard alone: {len(array) / 1e6 / (time.process_time() - started):.0f} MB/s")
    bomb = b"[" * 200_000 + b"]" * 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    reader = formats.DatasetReader(io.BytesIO(bomb), "auto", limits=formats.Limits())
    list(reader)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(
        f"200,000 nested brackets: refused in {time.perf_counter() - started:.3f} s, peak RSS +{grown:.0f} MB: "
        f"{reader.errors[0]}"
    )


if __name__ == "__main__":
    main()
