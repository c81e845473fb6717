"""What best-of-N costs: teacher generation of the same queries with 1 and
with N samples each, WITH a scenario's prompt and its opening prefilled, on
the default model, side by side in one process. Prints seconds and the ratio.

In-process (the default): the N samples share the encoded prompt and the
batches (`engines.inference.generate_samples`).

--remote adds, in the same run, the two engine servers through
`engines.generator.RemoteGenerator`, each two ways: N samples in ONE request
per query (OpenAI's `n`, what RemoteGenerator does now) vs one request per
sample (the old path, with as many requests in flight as the n path has
rows, so only the sharing differs):
  - the hf engine server (engines/engine_server.py, in this process, fp32);
  - a vLLM server (engines/vllm_server.py from .venv-vllm, bf16, prefix
    caching on), started for this part only (--no-vllm skips it).
Target: best-of-N / best-of-1 <= 2x on vLLM.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/best_of.py [--scenario lumen] [--queries 32] [--n 4] [--threads 2]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/best_of.py --remote --queries 16 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_NAME = "default"
TIMEOUT = 3600.0


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Case:
    """One timed way of answering: `run()` returns the groups of samples."""

    label: str
    samples: int
    run: Callable[[], list[list[Any]]]
    stats: Any = None  # the TransportStats the case's requests count in, when remote
    times: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    groups: list[list[Any]] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)


def timed(cases: Sequence[Case], repeats: int, where: str) -> None:
    """Every case once a round, `repeats` rounds (1, N, N', 1, N, N'...): the box is shared, so
    the minimum of interleaved runs is what each costs. Each run is printed as it ends."""
    for round_ in range(repeats):
        for case in cases:
            before = (case.stats.requests, case.stats.retries) if case.stats else (0, 0)
            began = time.perf_counter()
            case.groups = case.run()
            case.times.append(time.perf_counter() - began)
            line = f"    [{where}] {case.label}, run {round_ + 1}: {case.times[-1]:.1f} s"
            if case.stats:
                case.sent.append(case.stats.requests - before[0])
                case.retried.append(case.stats.retries - before[1])
                line += f", {case.sent[-1]} requests, {case.retried[-1]} retries"
            print(f"{line} | load {load_avg()}", flush=True)


def passed_share(groups: list[list[Any]], rules: Any) -> float:
    from engines.curation import pick_best

    picks = [pick_best([c.text for c in g], rules) for g in groups]
    return sum(p[1][p[0]] for p in picks) / (len(picks) * len(rules))


def describe(case: Case, rules: Any) -> str:
    runs = ", ".join(f"{t:.1f}" for t in case.times)
    requests = f"; {case.sent[-1]} requests, {sum(case.retried)} retries in all" if case.sent else ""
    return (
        f"  {case.label}: {case.best:.1f} s (runs {runs}){requests}; "
        f"rules passed by the pick {passed_share(case.groups, rules):.2f}"
    )


def same_samples(a: list[list[Any]], b: list[list[Any]]) -> str:
    pairs = [(x.text, y.text) for ga, gb in zip(a, b, strict=True) for x, y in zip(ga, gb, strict=True)]
    return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"


def remote_cases(
    url: str, model: str, queries: list[Any], prompt: str, gen: Any, n: int, text: str | None
) -> list[Case]:
    """Best-of-1, best-of-N with n per request, best-of-N with a request per sample."""
    from engines.generator import RemoteGenerator, sample_seed
    from engines.remote import TransportStats, generate_remote

    stats = TransportStats()
    # A deep queue on the hf engine (64 rows, 16 a batch, no prefix cache) takes longer than the
    # default 600 s a request; a timed-out request would be sent again and counted twice.
    teacher = RemoteGenerator(url, model, stats=stats, timeout=TIMEOUT)

    def per_sample() -> list[list[Any]]:
        # The old RemoteGenerator.generate_samples: N requests, sample s seeded seed + s.
        flat = generate_remote(
            url,
            model,
            [q for q in queries for _ in range(n)],
            prompt,
            gen,
            concurrency=gen.batch_size * n,
            opening=text,
            seeds=[sample_seed(gen, s) for _ in queries for s in range(n)],
            stats=stats,
            timeout=TIMEOUT,
        )
        return [flat[i : i + n] for i in range(0, len(flat), n)]

    return [
        Case("best of 1", 1, lambda: teacher.generate_samples(queries, prompt, gen, 1, opening=text), stats),
        Case(
            f"best of {n}, n={n} in one request per query",
            n,
            lambda: teacher.generate_samples(queries, prompt, gen, n, opening=text),
            stats,
        ),
        Case(f"best of {n}, one request per sample ({gen.batch_size * n} in flight)", n, per_sample, stats),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="lumen")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of each case (the minimum counts)"
    )
    parser.add_argument(
        "--remote", action="store_true", help="also the hf engine server and vLLM, n vs per sample"
    )
    parser.add_argument("--no-vllm", action="store_true", help="with --remote: leave vLLM out")
    parser.add_argument("--no-hf", action="store_true", help="with --remote: leave the hf engine server out")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from engines.curation import CurationSettings, opening
    from engines.inference import GenerationSettings, load_model
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default
    from engines.rules import validate_rules

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    queries = [json.loads(line)["messages"] for line in (folder / "train.jsonl").read_text().splitlines()]
    queries = queries[: args.queries]
    model_dir = provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)
    loaded = load_model(model_dir)
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
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    print(
        f"{args.scenario}: {len(queries)} queries WITH the prompt ({prompt_tokens} tokens), opening prefilled, "
        f"max {gen.max_new_tokens} new tokens, temperature {gen.temperature}, top-p {gen.top_p}, "
        f"threads {torch.get_num_threads()}, load average {load_avg()}",
        flush=True,
    )

    rows = [local_arm(loaded, queries, prompt, gen, args.n, text, rules, args.repeats)]
    if not args.remote:
        return
    del loaded  # the engine servers load their own copies
    gc.collect()

    from engines.engine_server import EngineServer

    threads = args.threads or torch.get_num_threads()
    if args.no_hf:
        print("\n(b) hf engine server skipped (--no-hf)")
    else:
        with EngineServer({MODEL_NAME: model_dir}, dtype="float32", threads=threads) as server:
            cases = remote_cases(server.url, MODEL_NAME, queries, prompt, gen, args.n, text)
            cases[0].run()  # warm-up (one request per query)
            timed(cases, args.repeats, "hf engine")
            max_batch = server.engine.max_batch
        print(
            f"\n(b) hf engine server through RemoteGenerator (fp32, {threads} torch thread(s), "
            f"max batch {max_batch} rows, no prefix cache; {gen.batch_size} queries in flight)"
        )
        rows.append(report(cases, rules, "hf engine server (fp32)", args.n))

    if args.no_vllm:
        print("\n(c) vLLM skipped (--no-vllm)")
    else:
        vllm = vllm_arm(model_dir, queries, prompt, gen, args.n, text, rules, args.repeats)
        if vllm is not None:
            rows.append(vllm)

    print(f"\nbest-of-{args.n} / best-of-1, {len(queries)} queries, seconds (min of {args.repeats}):")
    print(
        f"  {'backend':<28} {'best of 1':>10} {f'best of {args.n}':>10} {'ratio':>7}   per-sample requests: s, ratio"
    )
    for name, one, many, old in rows:
        tail = f"   {old:.1f} s, {old / one:.2f}x" if old is not None else "   -"
        print(f"  {name:<28} {one:>10.1f} {many:>10.1f} {many / one:>6.2f}x{tail}")
    vllm_rows = [r for r in rows if r[0].startswith("vLLM")]
    if vllm_rows:
        ratio = vllm_rows[0][2] / vllm_rows[0][1]
        print(
            f"  target best-of-{args.n} / best-of-1 <= 2x on vLLM: {ratio:.2f}x {'PASS' if ratio <= 2 else 'FAIL'}"
        )
        # Teacher throughput: the same best-of-1 queries, vLLM vs in-process (rows[0]).
        speedup = rows[0][1] / vllm_rows[0][1]
        print(
            f"  target teacher queries/s vLLM / in-process >= 2.5x: {speedup:.2f}x "
            f"{'PASS' if speedup >= 2.5 else 'FAIL'}; best-of-{args.n}: {rows[0][2] / vllm_rows[0][2]:.2f}x"
        )
    print(f"load average {load_avg()}")


def local_arm(
    loaded: Any, queries: list[Any], prompt: str, gen: Any, n: int, text: str | None, rules: Any, repeats: int
) -> tuple[str, float, float, float | None]:
    from engines.inference import generate_samples

    generate_samples(loaded, queries[:2], prompt, gen, 1, opening=text)  # warm-up
    cases = [
        Case("best of 1", 1, lambda: generate_samples(loaded, queries, prompt, gen, 1, opening=text)),
        Case(f"best of {n}", n, lambda: generate_samples(loaded, queries, prompt, gen, n, opening=text)),
    ]
    timed(cases, repeats, "in-process")
    dtype = str(loaded.dtype).removeprefix("torch.")
    print(
        f"\n(a) in-process generate_samples ({dtype}, batch {gen.batch_size} x N up to 64 rows, prefix reuse)"
    )
    for case in cases:
        print(describe(case, rules))
    one, many = cases
    print(
        f"  time ratio best-of-{n} / best-of-1: {many.best / one.best:.2f}x | load {load_avg()}", flush=True
    )
    return f"in-process ({dtype})", one.best, many.best, None


def report(cases: list[Case], rules: Any, name: str, n: int) -> tuple[str, float, float, float | None]:
    one, many, old = cases
    for case in cases:
        print(describe(case, rules))
    print(
        f"  time ratio best-of-{n} / best-of-1: n per request {many.best / one.best:.2f}x, "
        f"a request per sample {old.best / one.best:.2f}x; per sample / n {old.best / many.best:.2f}x; "
        f"identical samples n vs per sample {same_samples(many.groups, old.groups)} | load {load_avg()}",
        flush=True,
    )
    return name, one.best, many.best, old.best


def vllm_arm(
    model_dir: Path,
    queries: list[Any],
    prompt: str,
    gen: Any,
    n: int,
    text: str | None,
    rules: Any,
    repeats: int,
) -> tuple[str, float, float, float | None] | None:
    from engines.vllm_server import start_vllm, stop_vllm, vllm_python, wait_ready

    python = vllm_python()
    if not python.exists():
        print(f"\n(c) vLLM skipped: {python} is missing (build it with `make vllm-venv`)")
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench-best-of-vllm-")) / "vllm.log"
    began = time.perf_counter()
    proc = start_vllm(
        python, model_dir, MODEL_NAME, port, log, dtype="bfloat16", extra=["--enable-prefix-caching"]
    )
    try:
        ready = wait_ready(url, proc, timeout=300, log_path=log)
        cases = remote_cases(url, MODEL_NAME, queries, prompt, gen, n, text)
        cases[
            0
        ].run()  # warm-up; it also puts the prompt's blocks in the prefix cache, as a job's first requests do
        print(
            f"\n(c) vLLM through RemoteGenerator (bf16, prefix caching, whole-prompt prefills, OpenMP cores "
            f"{os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}; ready in {ready:.0f} s; log {log})",
            flush=True,
        )
        timed(cases, repeats, "vLLM")
    finally:
        stop_vllm(proc)
    row = report(cases, rules, "vLLM (bf16, prefix cache)", n)
    print(f"  ({time.perf_counter() - began:.0f} s with start-up)")
    return row


if __name__ == "__main__":
    main()
