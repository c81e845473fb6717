"""Serving figures of issue 11 on the default model and the default backend
(the `hf` engine server, engines/engine_server.py, run in this process), all
through the real `openai` client over HTTP, each comparison measured side by
side in one run:

1. 16 concurrent clients vs the same 16 requests one by one: requests/s and
   the ratio (target >= 6x); lumen held-out queries without the prompt,
   greedy, max_tokens 64.
2. The student (no prompt) as a LoRA adapter and merged into a copy of the
   base (POST /v1/load_model with lora_path), vs the base with the
   ~1,100-token lumen prompt and the bare base, single requests one by one,
   arms interleaved, at natural length and at an equal forced length: mean
   latency, time to first token (streaming), completion tokens, the time a
   token after the first; latency merged / base + prompt (target <= 0.5) and
   a token of the merged student / of the bare base (target <= 1.05).
3. 20 adapters over one base vs one adapter: completion tokens/s of 16
   concurrent clients x 2 requests, all to one adapter vs round-robin over 20
   (loaded with POST /v1/load_lora_adapter), ABBA order; ratio (target >= 0.85).
4. A load run: 16 clients x 100 requests (max_tokens 16, base and adapters
   mixed, every 4th streamed): errors (target 0), requests/s, p50/p95 latency.
5. Teacher generation of N lumen train queries WITH the prompt (greedy, 64 new
   tokens) on each backend: in-process `engines.inference.generate` (batch 16,
   prefix reuse, the teacher job's own path) vs `engines.remote.generate_remote`
   against a vLLM server (engines/vllm_server.py, .venv-vllm), started for
   this part only.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py                 # all parts, --teacher 300
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py --skip 5        # parts 1-4 (26 min on 2 shared cores, 19 of them the load run)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py --skip 1,2,3,4 --teacher 64

Without --adapter, the student is a random LoRA adapter shaped like the
workbench's fine-tunes (TrainConfig: r=16, alpha=32, the 7 projections) with
lora_B drawn small (std 0.01) so that it answers differently from the base.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCENARIO = REPO / "scenarios" / "lumen"
BASE = "default"
STUDENT = "student"
MERGED = "student-merged"
NATURAL, EQUAL = 256, 64  # part 2's max_tokens: natural length, and the forced equal length
CLIENTS = 16
TARGETS = {"concurrency": 6.0, "latency": 0.5, "adapters": 0.85, "merged": 1.05, "errors": 0}


# --- small helpers ------------------------------------------------------------------


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def queries(name: str) -> list[str]:
    rows = [json.loads(line) for line in (SCENARIO / name).read_text().splitlines() if line.strip()]
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Summary:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, what: str, value: str, target: str = "-", verdict: str = "-") -> None:
        self.rows.append((what, value, target, verdict))

    def check(self, what: str, value: float, target: float, higher: bool, fmt: str = "{:.2f}") -> None:
        ok = value >= target if higher else value <= target
        self.add(
            what,
            fmt.format(value),
            (">= " if higher else "<= ") + fmt.format(target),
            "PASS" if ok else "BELOW",
        )


def say(text: str = "") -> None:
    print(text, flush=True)


# --- adapters -------------------------------------------------------------------------


def build_adapters(model_dir: Path, dest: Path, count: int, first_seed: int = 1) -> list[Path]:
    """`count` random LoRA adapters shaped like the workbench's fine-tunes
    (engines.training.TrainConfig defaults), lora_A as peft initialises it and
    lora_B ~ N(0, 0.01), each from its own seed."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from engines.training import TrainConfig, lora_config

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(TrainConfig()))
    folders = []
    for i in range(count):
        gen = torch.Generator().manual_seed(first_seed + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    bound = 1.0 / param.shape[1] ** 0.5  # peft's kaiming_uniform(a=sqrt(5)) bound
                    param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)
                elif ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        folder = dest / f"adapter-{first_seed + i:02d}"
        peft_model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def load_adapter(url: str, name: str, path: Path) -> float:
    import httpx

    began = time.perf_counter()
    response = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120
    )
    if response.status_code != 200:
        raise SystemExit(f"loading adapter {name} from {path} failed: {response.status_code} {response.text}")
    return time.perf_counter() - began


# --- requests -------------------------------------------------------------------------


@dataclass
class Answer:
    seconds: float
    completion_tokens: int
    ttft: float | None = None
    text: str = ""


def messages(query: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*head, {"role": "user", "content": query}]


def ask(
    client: Any,
    model: str,
    query: str,
    max_tokens: int,
    system_prompt: str | None = None,
    stream: bool = False,
    extra: dict[str, Any] | None = None,
) -> Answer:
    began = time.perf_counter()
    if not stream:
        out = client.chat.completions.create(
            model=model,
            messages=messages(query, system_prompt),
            temperature=0,
            max_tokens=max_tokens,
            extra_body=extra,
        )
        return Answer(
            time.perf_counter() - began,
            out.usage.completion_tokens,
            None,
            out.choices[0].message.content or "",
        )
    ttft = None
    tokens = 0
    pieces = []
    events = client.chat.completions.create(
        model=model,
        messages=messages(query, system_prompt),
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in events:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - began
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Answer(time.perf_counter() - began, tokens, ttft, "".join(pieces))


def concurrently(jobs: Sequence[Callable[[], Any]], workers: int = CLIENTS) -> tuple[list[Any], float]:
    began = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    return results, time.perf_counter() - began


class Counter:
    """generate calls and rows the engine ran between two points."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # None: vLLM, whose steps this bench does not see
        self.calls = engine.generate_calls if engine else 0
        self.rows = engine.rows_generated if engine else 0

    def since(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        return self.engine.generate_calls - self.calls, self.engine.rows_generated - self.rows


# --- the parts ------------------------------------------------------------------------


def part1(client: Any, engine: Any, heldout: list[str], summary: Summary) -> None:
    say(
        f"\n== 1. {CLIENTS} concurrent clients vs the same {CLIENTS} requests one by one "
        f"(held-out queries, no prompt, greedy, max_tokens 64, base) | load {load_avg()}"
    )
    qs = heldout[:CLIENTS]
    ask(client, BASE, "Warm up.", 8)
    count = Counter(engine)
    began = time.perf_counter()
    seq = [ask(client, BASE, q, 64) for q in qs]
    seq_s = time.perf_counter() - began
    seq_calls, _ = count.since()
    count = Counter(engine)
    conc, conc_s = concurrently([lambda q=q: ask(client, BASE, q, 64) for q in qs])
    calls, rows = count.since()
    seq_tok, conc_tok = sum(a.completion_tokens for a in seq), sum(a.completion_tokens for a in conc)
    same = sum(a.text == b.text for a, b in zip(seq, conc, strict=True))
    ratio = seq_s / conc_s
    say(
        f"sequential: {len(qs) / seq_s:.3f} req/s, {seq_tok / seq_s:.1f} tok/s, {seq_s:.1f} s, "
        f"{seq_calls} generate calls, mean latency {statistics.mean(a.seconds for a in seq):.2f} s"
    )
    say(
        f"concurrent: {len(qs) / conc_s:.3f} req/s, {conc_tok / conc_s:.1f} tok/s, {conc_s:.1f} s, "
        f"{calls} generate calls for {rows} rows, latency mean {statistics.mean(a.seconds for a in conc):.2f} s "
        f"max {max(a.seconds for a in conc):.2f} s"
    )
    say(
        f"completion tokens {seq_tok} vs {conc_tok}; identical greedy answers {same}/{len(qs)} "
        f"(bf16 rounding differs with the batch shape) | load {load_avg()}"
    )
    summary.add("1. sequential req/s", f"{len(qs) / seq_s:.3f}")
    summary.add(
        f"1. {CLIENTS} concurrent req/s",
        f"{len(qs) / conc_s:.3f}" + (f" ({calls} generate calls)" if engine else ""),
    )
    summary.check("1. concurrent / sequential req/s", ratio, TARGETS["concurrency"], True, "{:.1f}x")


def load_merged(url: str, name: str, model_dir: Path, adapter: Path) -> float:
    import httpx

    began = time.perf_counter()
    response = httpx.post(
        url + "/v1/load_model",
        json={"model": name, "path": str(model_dir), "lora_path": str(adapter)},
        timeout=300,
    )
    if response.status_code != 200:
        raise SystemExit(
            f"loading {adapter} merged into {model_dir} failed: {response.status_code} {response.text}"
        )
    return time.perf_counter() - began


def part2(client: Any, heldout: list[str], prompt: str, n: int, summary: Summary, merged_arm: bool) -> None:
    arms = [
        ("bare base, no prompt", BASE, None),
        ("student as an adapter", STUDENT, None),
        *([("student merged", MERGED, None)] if merged_arm else []),
        ("base + prompt", BASE, prompt),
    ]
    say(
        f"\n== 2. the student (no prompt; as an adapter and merged) vs the base with the lumen prompt, and the "
        f"bare base: {n} held-out queries one by one, arms interleaved, streamed, greedy; at natural length "
        f"(max_tokens {NATURAL}) and at equal length ({EQUAL} tokens, EOS ignored) | load {load_avg()}"
    )
    for _, model, system in arms:
        ask(client, model, "Warm up.", 8, system, stream=True)
    prompt_tokens = client.chat.completions.create(
        model=BASE, messages=messages(heldout[0], prompt), temperature=0, max_tokens=1
    ).usage.prompt_tokens

    def line(name: str, answers: list[Answer]) -> dict[str, float]:
        figures = {
            "latency": statistics.mean(a.seconds for a in answers),
            "ttft": statistics.mean(a.ttft or a.seconds for a in answers),
            "tokens": statistics.mean(a.completion_tokens for a in answers),
            # a decode step: the time after the first token over the tokens after it
            "step": statistics.mean(
                (a.seconds - (a.ttft or a.seconds)) / max(1, a.completion_tokens - 1) for a in answers
            ),
        }
        say(
            f"  {name:24s} latency {figures['latency']:.2f} s, TTFT {figures['ttft']:.3f} s, "
            f"{figures['tokens']:.1f} tokens, {figures['step'] * 1000:.0f} ms a token after the first"
        )
        return figures

    for length, max_tokens, extra in (
        ("natural", NATURAL, None),
        ("equal", EQUAL, {"ignore_eos": True}),
    ):
        got: dict[str, list[Answer]] = {name: [] for name, _, _ in arms}
        for q in heldout[:n]:
            for name, model, system in arms:
                got[name].append(ask(client, model, q, max_tokens, system, stream=True, extra=extra))
        say(f"{length} length | load {load_avg()}")
        fig = {name: line(name, answers) for name, answers in got.items()}
        bare, adapter, prompted = fig[arms[0][0]], fig[arms[1][0]], fig[arms[-1][0]]
        merged = fig.get("student merged", adapter)
        ratios = [
            ("latency", "adapter / base + prompt", adapter["latency"] / prompted["latency"]),
            ("step", "adapter / bare base", adapter["step"] / bare["step"]),
        ]
        if merged_arm:
            ratios += [
                ("latency", "merged / base + prompt", merged["latency"] / prompted["latency"]),
                ("step", "merged / bare base", merged["step"] / bare["step"]),
            ]
        say(
            f"  ({prompt_tokens} prompt tokens with the prompt) "
            + ", ".join(
                f"{'latency' if k == 'latency' else 'a token after the first'} {what} {v:.2f}"
                for k, what, v in ratios
            )
        )
        for name, f in fig.items():
            summary.add(
                f"2. {length} length: {name} latency / TTFT / tokens",
                f"{f['latency']:.2f} s / {f['ttft']:.3f} s / {f['tokens']:.1f}",
            )
        if merged_arm:
            summary.check(
                f"2. {length} length: latency student merged / base + prompt",
                merged["latency"] / prompted["latency"],
                TARGETS["latency"],
                False,
            )
        summary.check(
            f"2. {length} length: latency student adapter / base + prompt",
            adapter["latency"] / prompted["latency"],
            TARGETS["latency"],
            False,
        )
        if merged_arm:
            summary.check(
                f"2. {length} length: a token after the first, merged / bare base",
                merged["step"] / bare["step"],
                TARGETS["merged"],
                False,
            )
        summary.add(
            f"2. {length} length: a token after the first, adapter / bare base",
            f"{adapter['step'] / bare['step']:.2f}",
        )


def part3(
    client: Any, engine: Any, heldout: list[str], adapters: list[str], rounds: int, summary: Summary
) -> None:
    total = CLIENTS * 2
    qs = [heldout[i % len(heldout)] for i in range(total)]
    say(
        f"\n== 3. {len(adapters)} adapters over one base vs one adapter: {CLIENTS} clients x 2 requests, "
        f"greedy, max_tokens 64, order {'ABBA' if rounds > 1 else 'AB'} x {max(1, rounds // 2)} | load {load_avg()}"
    )

    def run(many: bool) -> tuple[float, float, int, int]:
        def client_job(c: int) -> list[Answer]:
            out = []
            for k in range(2):
                j = c * 2 + k
                out.append(ask(client, adapters[j % len(adapters)] if many else adapters[0], qs[j], 64))
            return out

        count = Counter(engine)
        results, seconds = concurrently([lambda c=c: client_job(c) for c in range(CLIENTS)])
        calls, _ = count.since()
        tokens = sum(a.completion_tokens for r in results for a in r)
        return tokens / seconds, total / seconds, calls, tokens

    ask(client, adapters[0], "Warm up.", 8)
    order = [False, True, True, False] * max(1, rounds // 2) if rounds > 1 else [False, True]
    one: list[float] = []
    many: list[float] = []
    for is_many in order:
        tps, rps, calls, tokens = run(is_many)
        (many if is_many else one).append(tps)
        say(
            f"{'round-robin over ' + str(len(adapters)) if is_many else 'one adapter':22s} {tps:.1f} tok/s, "
            f"{rps:.3f} req/s, {tokens} tokens, {calls} generate calls | load {load_avg()}"
        )
    one_tps, many_tps = statistics.mean(one), statistics.mean(many)
    say(
        f"mean: one adapter {one_tps:.1f} tok/s, {len(adapters)} adapters {many_tps:.1f} tok/s, "
        f"ratio {many_tps / one_tps:.2f}"
    )
    summary.add("3. one adapter tok/s", f"{one_tps:.1f}")
    summary.add(f"3. round-robin over {len(adapters)} adapters tok/s", f"{many_tps:.1f}")
    summary.check(
        f"3. {len(adapters)} adapters / one adapter throughput", many_tps / one_tps, TARGETS["adapters"], True
    )


def part4(
    client: Any, engine: Any, heldout: list[str], models: list[str], per_client: int, summary: Summary
) -> None:
    say(
        f"\n== 4. load run: {CLIENTS} clients x {per_client} requests, max_tokens 16, greedy, models cycled over "
        f"{len(models)} (base + adapters), every 4th request streamed | load {load_avg()}"
    )
    errors: list[str] = []
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def client_job(c: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            j = c * per_client + k
            try:
                answer = ask(
                    client, models[j % len(models)], heldout[j % len(heldout)], 16, stream=j % 4 == 3
                )
                if answer.completion_tokens <= 0:
                    raise ValueError("no completion tokens")
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(answer.seconds)
                tokens += answer.completion_tokens

    total = CLIENTS * per_client
    rates: dict[bool, float] = {}
    # The same run twice: the batcher taking what queued during a call at once (before), then
    # waiting a window for the clients the call just answered (engine.rejoin, the default).
    for rejoin in (False, True) if engine is not None else (True,):
        if engine is not None:
            engine.rejoin = rejoin
        errors.clear()
        latencies.clear()
        tokens = 0
        count = Counter(engine)
        _, seconds = concurrently([lambda c=c: client_job(c) for c in range(CLIENTS)])
        calls, rows = count.since()
        rates[rejoin] = total / seconds
        say(
            f"{'rejoin window' if rejoin else 'no rejoin    '}: {total} requests in {seconds:.1f} s: "
            f"{total / seconds:.2f} req/s, {tokens / seconds:.1f} tok/s, errors {len(errors)}, latency p50 "
            f"{percentile(latencies, 0.5):.2f} s p95 {percentile(latencies, 0.95):.2f} s max "
            f"{max(latencies, default=float('nan')):.2f} s, {calls} generate calls ({rows / max(1, calls):.1f} "
            f"rows each) | load {load_avg()}"
        )
        for e in sorted(set(errors))[:5]:
            say(f"  error: {e}")
    if False in rates:
        say(f"req/s with the rejoin window / without: {rates[True] / rates[False]:.2f}x")
    summary.check(f"4. load run errors ({total} requests)", len(errors), TARGETS["errors"], False, "{:.0f}")
    summary.add(
        "4. load run req/s, p50 / p95 latency",
        f"{total / seconds:.2f} req/s, {percentile(latencies, 0.5):.2f} / {percentile(latencies, 0.95):.2f} s",
    )


def part5(
    model_dir: Path,
    train: list[str],
    prompt: str,
    n: int,
    teacher_dtype: str,
    use_vllm: bool,
    summary: Summary,
) -> None:
    import torch

    from engines.inference import GenerationSettings, generate, load_model

    qs = [train[i % len(train)] for i in range(n)]
    convs = [[{"role": "user", "content": q}] for q in qs]
    settings = GenerationSettings(max_new_tokens=64, temperature=0, batch_size=16)
    say(
        f"\n== 5. teacher generation: {n} lumen train queries with the prompt, greedy, 64 new tokens | "
        f"load {load_avg()}"
    )
    torch.set_num_threads(1)
    dtype = None if teacher_dtype == "default" else getattr(torch, teacher_dtype)
    loaded = load_model(model_dir, dtype=dtype)
    generate(loaded, convs[:2], prompt, GenerationSettings(max_new_tokens=4, temperature=0))  # warm-up
    began = time.perf_counter()
    local = generate(loaded, convs, prompt, settings, reuse_prefix=True)
    local_s = time.perf_counter() - began
    local_tok = sum(c.completion_tokens for c in local)
    say(
        f"in-process generate ({loaded.dtype}, batch 16, prefix reuse, 1 torch thread): {n / local_s:.3f} q/s, "
        f"{local_tok / local_s:.1f} tok/s, {local_s:.1f} s | load {load_avg()}"
    )
    summary.add(
        f"5. teacher in-process generate q/s ({n} queries, {str(loaded.dtype).removeprefix('torch.')})",
        f"{n / local_s:.3f}",
    )
    del loaded

    if not use_vllm:
        say("vLLM arm skipped (--no-vllm)")
        summary.add("5. teacher vLLM q/s", "skipped (--no-vllm)")
        return
    from engines.remote import generate_remote
    from engines.vllm_server import start_vllm, stop_vllm, vllm_python, wait_ready

    python = vllm_python()
    if not python.exists():
        say(f"vLLM arm skipped: {python} is missing (build it with `make vllm-venv`)")
        summary.add("5. teacher vLLM q/s", "skipped (no .venv-vllm)")
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
    began = time.perf_counter()
    proc = start_vllm(python, model_dir, BASE, port, log, dtype="bfloat16")
    try:
        ready = wait_ready(url, proc, timeout=300, log_path=log)
        generate_remote(url, BASE, convs[:2], prompt, GenerationSettings(max_new_tokens=4, temperature=0))
        say(
            f"vLLM (bf16, prefix caching) ready in {ready:.0f} s ({time.perf_counter() - began:.0f} s with the "
            f"warm-up); log {log}"
        )
        began = time.perf_counter()
        remote = generate_remote(url, BASE, convs, prompt, settings, concurrency=CLIENTS)
        remote_s = time.perf_counter() - began
    finally:
        stop_vllm(proc)
    remote_tok = sum(c.completion_tokens for c in remote)
    same = sum(a.text == b.text for a, b in zip(local, remote, strict=True))
    say(
        f"vLLM generate_remote (16 concurrent): {n / remote_s:.3f} q/s, {remote_tok / remote_s:.1f} tok/s, "
        f"{remote_s:.1f} s | load {load_avg()}"
    )
    say(
        f"ratio vLLM / in-process {local_s / remote_s:.2f}x; identical answers {same}/{n} "
        f"(different dtypes and kernels)"
    )
    summary.add(f"5. teacher vLLM generate_remote q/s ({n} queries, bf16)", f"{n / remote_s:.3f}")
    summary.add("5. teacher vLLM / in-process", f"{local_s / remote_s:.2f}x")


# --- main -----------------------------------------------------------------------------


def parse_parts(text: str) -> set[int]:
    try:
        parts = {int(p) for p in text.replace(",", " ").split()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--skip takes part numbers 1-5 like 1,5, got {text!r}") from None
    if not parts <= {1, 2, 3, 4, 5}:
        raise argparse.ArgumentTypeError(f"--skip takes part numbers 1-5, got {text!r}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip", type=parse_parts, default=set(), help="parts to skip, e.g. 5 or 1,2")
    parser.add_argument("--teacher", type=int, default=300, help="queries for part 5 (default 300)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="the engine server's dtype (default auto: bf16 where the CPU has it)",
    )
    parser.add_argument(
        "--teacher-dtype",
        default="default",
        choices=["default", "bfloat16", "float32"],
        help="in-process teacher dtype (default: load_model's, as the teacher job: fp32 on CPU)",
    )
    parser.add_argument(
        "--adapter", type=Path, default=None, help="the student adapter (default: a random one)"
    )
    parser.add_argument("--adapters", type=int, default=20, help="adapters for part 3 (default 20)")
    parser.add_argument(
        "--part2-queries", type=int, default=12, help="held-out queries for part 2 (default 12)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="part 3: 2 = ABBA, 1 = AB")
    parser.add_argument("--load-requests", type=int, default=100, help="part 4: requests per client")
    parser.add_argument("--threads", type=int, default=1, help="engine torch threads (default 1)")
    parser.add_argument("--batch-window-ms", type=float, default=25.0)
    parser.add_argument("--no-vllm", action="store_true", help="part 5 without the vLLM arm")
    parser.add_argument(
        "--backend", default="hf", help="parts 1-4 on hf, vllm, or both one after the other: hf,vllm"
    )
    parser.add_argument(
        "--vllm-bind",
        default="",
        help="VLLM_CPU_OMP_THREADS_BIND for the vLLM engine (default: vLLM's auto, one core of two here)",
    )
    args = parser.parse_args()

    import warnings

    from transformers.utils import logging as hf_logging

    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    start_load = load_avg()
    summaries: dict[str, Summary] = {}
    model_dir = provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)
    prompt = (SCENARIO / "prompt.md").read_text()
    heldout, train = queries("heldout.jsonl"), queries("train.jsonl")
    say(
        f"bench/serving.py {datetime.datetime.now():%Y-%m-%d %H:%M} | {os.cpu_count()} cores ({cpu_model()}), "
        f"load average {start_load} | model {model_dir.name} | engine: hf, dtype {args.dtype}, "
        f"{args.threads} torch thread(s), batch window {args.batch_window_ms:g} ms, max batch 16"
    )

    if {1, 2, 3, 4} - args.skip:
        work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        began = time.perf_counter()
        student_dir = args.adapter or build_adapters(model_dir, work / "student", 1, first_seed=0)[0]
        extra = build_adapters(model_dir, work / "many", args.adapters) if {3, 4} - args.skip else []
        say(
            f"adapters: student {'given' if args.adapter else 'random'} {student_dir}, {len(extra)} random in "
            f"{time.perf_counter() - began:.1f} s"
        )
        for backend in args.backend.split(","):
            summary = summaries.setdefault(backend, Summary())
            with serving_backend(backend, model_dir, args, work) as (url, engine):
                parts_1_to_4(url, engine, model_dir, student_dir, extra, heldout, prompt, args, summary)
    if 5 not in args.skip:
        summary = summaries.setdefault("teacher", Summary())
        part5(model_dir, train, prompt, args.teacher, args.teacher_dtype, not args.no_vllm, summary)

    say(
        f"\n== summary {datetime.date.today()} | {os.cpu_count()} cores ({cpu_model()}) | load average at start "
        f"{start_load}, at end {load_avg()} | {time.perf_counter() - started:.0f} s in all\n"
    )
    print_summary(summaries)


def print_summary(summaries: dict[str, Summary]) -> None:
    """One table, a column of values (and verdicts) per backend, rows in the order first met."""
    names = list(summaries)
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    targets: dict[str, str] = {}
    for name, summary in summaries.items():
        for what, value, target, verdict in summary.rows:
            rows.setdefault(what, {})[name] = (value, verdict)
            targets[what] = target if target != "-" else targets.get(what, "-")
    say("| figure | " + " | ".join(names) + " | target |\n|---|" + "---|" * (len(names) + 1))
    for what, cells in rows.items():
        shown = []
        for name in names:
            value, verdict = cells.get(name, ("", "-"))
            shown.append(value + (f" ({verdict})" if verdict != "-" else ""))
        say(f"| {what} | " + " | ".join(shown) + f" | {targets[what]} |")


@contextlib.contextmanager
def serving_backend(backend: str, model_dir: Path, args: Any, work: Path) -> Iterator[tuple[str, Any]]:
    """The server of one backend with the base as BASE: (its URL, the in-process engine or None)."""
    if backend == "hf":
        from engines.engine_server import EngineServer
        from engines.serving_engine import resolve_dtype

        server = EngineServer(
            {BASE: model_dir},
            port=0,
            threads=args.threads,
            max_batch=16,
            batch_window_ms=args.batch_window_ms,
            max_queue=256,
            dtype=args.dtype,
        )
        with server:
            say(
                f"\n=== backend hf: engine server at {server.url}, dtype {resolve_dtype(args.dtype)}, "
                f"{args.threads} torch thread(s)"
            )
            yield server.url, server.engine
        return
    if backend != "vllm":
        raise SystemExit(f"unknown backend {backend!r}: hf or vllm")
    from engines.vllm_server import start_vllm, stop_vllm, vllm_python, wait_ready

    port = free_port()
    log = work / "vllm.log"
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind} if args.vllm_bind else None
    # 16 distinct adapters in a batch (part 3's round-robin), the rest swapped in from CPU memory.
    proc = start_vllm(vllm_python(), model_dir, BASE, port, log, max_loras=16, dtype="bfloat16", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(url, proc, timeout=600, log_path=log)
        say(
            f"\n=== backend vllm: vLLM-CPU at {url} (bf16, prefix caching, max_loras 16, engine cores "
            f"{args.vllm_bind or 'auto'}), ready in {ready:.0f} s, log {log}"
        )
        yield url, None
    finally:
        stop_vllm(proc)


def parts_1_to_4(
    url: str,
    engine: Any,
    model_dir: Path,
    student_dir: Path,
    extra: list[Path],
    heldout: list[str],
    prompt: str,
    args: Any,
    summary: Summary,
) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    if 1 not in args.skip:
        part1(client, engine, heldout, summary)
    seconds = load_adapter(url, STUDENT, student_dir)
    names = [f"a{i:02d}" for i in range(len(extra))]
    seconds += sum(load_adapter(url, name, path) for name, path in zip(names, extra, strict=True))
    say(f"\nloaded {1 + len(extra)} adapters through POST /v1/load_lora_adapter in {seconds:.1f} s")
    if 2 not in args.skip:
        merged = engine is not None  # vLLM loads its models when it starts
        if merged:
            seconds = load_merged(url, MERGED, model_dir, student_dir)
            say(f"loaded the student merged into a copy of the base (POST /v1/load_model) in {seconds:.1f} s")
        part2(client, heldout, prompt, args.part2_queries, summary, merged)
    if 3 not in args.skip:
        part3(client, engine, heldout, names, args.rounds, summary)
    if 4 not in args.skip:
        part4(client, engine, heldout, [BASE, STUDENT, *names], args.load_requests, summary)


if __name__ == "__main__":
    main()
