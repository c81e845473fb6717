"""Run the inference engine the /v1 gateway talks to, in the foreground.

backend hf: `python -m engines.engine_server` with the default base model
(adapters and other bases are loaded at run time by the gateway).
backend vllm without VLLM_URL: a vLLM OpenAI server from its own venv
(engines.vllm_server; `make vllm-venv` builds it)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workbench.backend import remote, team_vllm
from workbench.models import FoundationModel


def engine_command(host: str, port: int, threads: int, model: FoundationModel | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "engines.engine_server",
        "--host",
        host,
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    if model is not None:
        cmd += ["--model", f"{model.name}={model.path}"]
    return cmd


def engine_env(threads: int) -> dict[str, str]:
    # OpenMP/MKL pools sized like torch's, so the engine never takes more cores than it was given.
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class Command(BaseCommand):
    help = "Run the inference engine of the /v1 gateway (INFERENCE_BACKEND) in the foreground."

    def add_arguments(self, parser: CommandParser) -> None:
        url = urlsplit(settings.ENGINE_URL)
        parser.add_argument("--host", default=url.hostname or "127.0.0.1")
        parser.add_argument("--port", type=int, default=url.port or 8001)
        parser.add_argument(
            "--threads",
            type=int,
            default=settings.ENGINE_THREADS,
            help="Torch threads of the hf engine (ENGINE_THREADS)",
        )
        parser.add_argument(
            "--teacher",
            action="store_true",
            help="A vLLM for teacher jobs beside the hf engine (what `run` starts when .venv-vllm is installed)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        model = FoundationModel.objects.filter(is_default=True).first() or FoundationModel.objects.first()
        if opts["teacher"]:
            self._serve_vllm(model, opts["port"], "teacher-vllm.log")
            return
        if remote():
            if team_vllm():
                raise CommandError(
                    f"VLLM_URL is set ({settings.VLLM_URL}): the gateway uses that vLLM, "
                    "so there is no engine to start here."
                )
            self._serve_vllm(model, opts["port"])
            return
        if opts["threads"] < 1:
            raise CommandError("--threads must be at least 1.")
        cmd = engine_command(opts["host"], opts["port"], opts["threads"], model)
        self.stdout.write(
            f"hf engine on http://{opts['host']}:{opts['port']} "
            f"({model.name if model else 'no base model yet'}, {opts['threads']} thread(s))"
        )
        self.stdout.flush()
        # Replaced by the engine: signals reach it directly and its exit code is this command's.
        os.execve(cmd[0], cmd, engine_env(opts["threads"]))

    def _serve_vllm(self, model: FoundationModel | None, port: int, log_name: str = "vllm.log") -> None:
        from engines import vllm_server

        if model is None:
            raise CommandError("No base model is registered: run `python manage.py provision_model` first.")
        log_path = settings.DATA_DIR / "logs" / log_name
        try:
            proc = vllm_server.start_vllm(vllm_server.vllm_python(), model.path, model.name, port, log_path)
        except vllm_server.VLLMError as exc:
            raise CommandError(str(exc)) from exc
        stop = lambda *_a: vllm_server.stop_vllm(proc)  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"vLLM starting on port {port} with {model.name} (log: {log_path})")
        try:
            seconds = vllm_server.wait_ready(f"http://127.0.0.1:{port}", proc, timeout=300, log_path=log_path)
            self.stdout.write(f"vLLM ready after {seconds:.0f} s")
            code = proc.wait()
        except vllm_server.VLLMError as exc:
            vllm_server.stop_vllm(proc)
            raise CommandError(str(exc)) from exc
        finally:
            vllm_server.stop_vllm(proc)
        if code:
            sys.exit(code)
