"""Start and supervise a real vLLM OpenAI server (the `vllm` backend).

vLLM lives in its own venv (`make vllm-venv`: the CPU build pins
transformers<5.20, the app needs 5.24), so it always runs as a separate
process started with that venv's python. Its `vllm` console command is broken
in the CPU package, hence `python -m vllm.entrypoints.openai.api_server`.
Plain Python: no Django.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-vllm"


class VLLMError(Exception):
    """vLLM could not be started or did not become ready; the message carries its log tail."""


def api_key_from_env() -> str | None:
    """VLLM_API_KEY: vLLM's own variable (like its --api-key); a vLLM started
    here inherits it and then refuses /v1 requests without it as a Bearer token."""
    return os.environ.get("VLLM_API_KEY") or None


def vllm_python(venv: str | Path | None = None) -> Path:
    """The python of the vLLM venv (env VLLM_VENV, else .venv-vllm in the repo)."""
    return Path(venv or os.environ.get("VLLM_VENV") or DEFAULT_VENV) / "bin" / "python"


MAX_BATCHED_TOKENS = 8192  # tokens one engine step may take: a few whole prompts of the teacher's prefill


def vllm_command(
    python: str | Path,
    model_dir: str | Path,
    served_name: str,
    port: int,
    max_loras: int = 8,
    max_lora_rank: int = 16,
    max_model_len: int = 2048,
    dtype: str = "bfloat16",
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
    lora_modules: Mapping[str, str | Path] | None = None,
) -> list[str]:
    """The command line of a vLLM OpenAI server for one base model with LoRA
    enabled (adapters come at start via `lora_modules` or at runtime through
    /v1/load_lora_adapter)."""
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        # Absolute: the server runs in its log's directory, and vLLM takes a path it cannot find for a hub id.
        "--model",
        str(Path(model_dir).resolve()),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        # Shared system prompts are the workbench's whole use case.
        "--enable-prefix-caching",
        # Whole prompts only: on the CPU build a seeded request whose prefill is split
        # over steps kills the engine ("CPU Generator does not use offset", vLLM 0.32),
        # and a best-of-N teacher sends seeded requests behind long prompts.
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        str(max(max_model_len, MAX_BATCHED_TOKENS)),
    ]
    if lora_modules:
        cmd += ["--lora-modules", *(f"{name}={Path(path).resolve()}" for name, path in lora_modules.items())]
    return [*cmd, *extra]


def vllm_env(kv_cache_gib: int = 2, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM needs: its KV cache size (CPU build), runtime
    adapter loading, and no network. VLLM_API_KEY, when set, passes through."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    # The CPU build binds its engine's OpenMP threads itself (`auto`: one core
    # per engine, the rest for the API process); an inherited thread count
    # from the app (set for torch in the same box) would fight that binding.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    # The app's venv must not leak into vLLM's interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def start_vllm(
    python: str | Path,
    model_dir: str | Path,
    served_name: str,
    port: int,
    log_path: str | Path,
    kv_cache_gib: int = 2,
    max_loras: int = 8,
    max_lora_rank: int = 16,
    max_model_len: int = 2048,
    dtype: str = "bfloat16",
    extra: Sequence[str] = (),
    lora_modules: Mapping[str, str | Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the server in its own process group (so `stop_vllm` ends its
    engine child too), output to `log_path`. Returns at once: call `wait_ready`."""
    python = Path(python)
    if not python.exists():
        raise VLLMError(f"{python} does not exist: build the vLLM venv with `make vllm-venv`")
    cmd = vllm_command(
        python,
        model_dir,
        served_name,
        port,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_model_len=max_model_len,
        dtype=dtype,
        extra=extra,
        lora_modules=lora_modules,
    )
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**vllm_env(kv_cache_gib), **(env or {})},
            cwd=str(log_path.parent),
            start_new_session=True,
        )


def log_tail(log_path: str | Path | None, chars: int = 4000) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    return Path(log_path).read_text(errors="replace")[-chars:]


def wait_ready(
    url: str,
    proc: subprocess.Popen[bytes] | None,
    timeout: float = 180,
    log_path: str | Path | None = None,
    api_key: str | None = None,
) -> float:
    """Poll GET {url}/v1/models until it answers 200; returns the seconds
    waited. Raises VLLMError (with the log tail) when the process exits or
    the timeout passes. `api_key` defaults to the environment's VLLM_API_KEY,
    which a vLLM started from this environment requires on /v1."""
    began = time.monotonic()
    deadline = began + timeout
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/models",
        headers=_headers(api_key if api_key is not None else api_key_from_env()),
    )
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise VLLMError(
                f"vLLM exited with code {proc.returncode} before it was ready at {url}\n{log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    json.load(resp)
                    return time.monotonic() - began
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise VLLMError(f"vLLM at {url} was not ready after {timeout:.0f} s\n{log_tail(log_path)}")


def stop_vllm(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    """SIGTERM the server's process group (API process and engine core), then
    SIGKILL what is left after `timeout`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # The engine child may outlive the API process; the group goes with it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)
    return proc.returncode


def load_adapter(
    url: str, name: str, path: str | Path, timeout: float = 60, api_key: str | None = None
) -> None:
    """Make adapter `name` (a PEFT directory) servable, idempotently: a name
    already listed by /v1/models is left alone (vLLM refuses a second load)."""
    if name in served_models(url, api_key=api_key):
        return
    _post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, timeout, api_key)


def unload_adapter(url: str, name: str, timeout: float = 30, api_key: str | None = None) -> None:
    _post(url, "/v1/unload_lora_adapter", {"lora_name": name}, timeout, api_key)


def served_models(url: str, timeout: float = 10, api_key: str | None = None) -> list[str]:
    req = urllib.request.Request(url.rstrip("/") + "/v1/models", headers=_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return [m["id"] for m in json.load(resp)["data"]]
    except (urllib.error.URLError, OSError) as exc:
        raise VLLMError(f"could not list the models of the engine at {url}: {exc}") from exc


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _post(url: str, path: str, body: dict[str, str], timeout: float, api_key: str | None) -> str:
    req = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST", headers=_headers(api_key)
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:1000]
        raise VLLMError(f"{path} at {url} answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise VLLMError(f"{path} at {url} failed: {exc}") from exc


def supervise(
    python: str | Path,
    model_dir: str | Path,
    served_name: str,
    port: int,
    log_path: str | Path,
    ready_timeout: float = 300,
    max_restarts: int = 5,
    **options: Any,
) -> int:
    """Run vLLM in the foreground and restart it when it dies (at most
    `max_restarts` times in a row without a ready start); SIGTERM/SIGINT stop
    it cleanly. For `manage.py run` with INFERENCE_BACKEND=vllm and no VLLM_URL."""
    url = f"http://127.0.0.1:{port}"
    stopping = False
    proc: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: Any) -> None:
        # Only signal here: the main loop is inside proc.wait() and does the waiting.
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failures = 0
    while not stopping:
        began = time.monotonic()
        proc = start_vllm(python, model_dir, served_name, port, log_path, **options)
        try:
            waited = wait_ready(url, proc, ready_timeout, log_path)
            print(f"vLLM serving {served_name} at {url} (ready in {waited:.0f} s)", flush=True)
            failures = 0
        except VLLMError as exc:
            if stopping:
                stop_vllm(proc)
                break
            failures += 1
            print(str(exc), file=sys.stderr, flush=True)
            stop_vllm(proc)
            if failures > max_restarts:
                return 1
            time.sleep(min(30, 2**failures))
            continue
        code = proc.wait()
        if stopping:
            stop_vllm(proc)  # the engine child, if it outlived the API process
            break
        print(
            f"vLLM exited with code {code} after {time.monotonic() - began:.0f} s; restarting\n"
            f"{log_tail(log_path, 1500)}",
            file=sys.stderr,
            flush=True,
        )
        stop_vllm(proc)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Start and supervise a vLLM OpenAI server (the vllm backend)."
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME=DIR", help="served name and base model directory"
    )
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--venv", default=None, help="the vLLM venv (default: $VLLM_VENV or .venv-vllm)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--log", default=None, help="log file (default: vllm-PORT.log in the temp directory)")
    args = parser.parse_args(argv)
    name, sep, model_dir = args.model.partition("=")
    if not sep or not name or not model_dir:
        parser.error(f"--model must be NAME=DIR, got {args.model!r}")
    log = args.log or str(Path(tempfile.gettempdir()) / f"vllm-{args.port}.log")
    return supervise(
        vllm_python(args.venv),
        model_dir,
        name,
        args.port,
        log,
        dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
    )


if __name__ == "__main__":
    sys.exit(main())
