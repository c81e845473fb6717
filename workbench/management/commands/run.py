"""Start the whole workbench on one machine: migrate, provision the default
model, ensure a demo user, then run the web server, a Celery worker and the
inference engine of the /v1 gateway as child processes until Ctrl-C."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from workbench.actions.projects import create_project
from workbench.backend import team_vllm
from workbench.models import Project

DEMO_USER = "demo"


def ensure_demo_user(data_dir: Path) -> tuple[str, str]:
    """Create the demo user once; its password is kept (mode 0600) in the data dir."""
    creds = data_dir / "demo-credentials.txt"
    User = get_user_model()
    if creds.is_file() and User.objects.filter(username=DEMO_USER).exists():
        return DEMO_USER, creds.read_text().strip()
    password = secrets.token_urlsafe(9)
    user, _ = User.objects.get_or_create(
        username=DEMO_USER, defaults={"is_staff": True, "is_superuser": True}
    )
    user.set_password(password)
    user.save()
    creds.parent.mkdir(parents=True, exist_ok=True)
    creds.write_text(password + "\n")
    creds.chmod(0o600)
    if not Project.objects.for_user(user).exists():
        # Project names are unique: a "Demo" left by an earlier demo user is not taken over.
        name = next(
            n
            for n in ("Demo", *(f"Demo {i}" for i in range(2, 1000)))
            if not Project.objects.filter(name__iexact=n).exists()
        )
        create_project(user, name, "A first project to try the path: prompt, data, absorb, eval.")
    return DEMO_USER, password


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


class Command(BaseCommand):
    help = (
        "Run the web UI, a Celery worker (embedded SQLite broker by default) and the inference engine "
        "of /v1. Ctrl-C stops them all."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--skip-provision", action="store_true", help="Don't provision the default model")
        parser.add_argument("--web-workers", type=int, default=2)
        parser.add_argument(
            "--no-engine",
            action="store_true",
            help="Don't start the inference engine (/v1 then answers 503 until one runs)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database ready.")
        if not opts["skip_provision"]:
            call_command("provision_model", stdout=self.stdout)
        username, password = ensure_demo_user(settings.DATA_DIR)
        url = f"http://{opts['host']}:{opts['port']}/"
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "workbench.settings"}
        bin_dir = Path(sys.executable).parent
        # A /v1 request holds its thread while the engine generates (a stream for its whole length):
        # threads, not cores, bound how many requests reach the engine together to be batched.
        web = [
            str(bin_dir / "gunicorn"),
            "workbench.wsgi:application",
            "--bind",
            f"{opts['host']}:{opts['port']}",
            "--workers",
            str(opts["web_workers"]),
            "--threads",
            "16",
            "--access-logfile",
            "-",
            "--graceful-timeout",
            "5",
        ]
        # One task per child process: model memory is returned to the system after each job.
        worker = [
            str(bin_dir / "celery"),
            "-A",
            "workbench",
            "worker",
            "-Q",
            "gpu,default",
            "--concurrency",
            "1",
            "--max-tasks-per-child",
            "1",
            "--loglevel",
            "INFO",
            "-n",
            f"worker-{os.getpid()}@%h",
        ]
        engine = self._engine_command(opts["no_engine"])
        teacher = self._teacher_vllm_command()
        # The engine's torch threads and the worker's together stay within the machine's cores:
        # oversubscribed CPU threads wait at barriers and throughput collapses.
        worker_env = {**env}
        if engine and "OMP_NUM_THREADS" not in os.environ:
            worker_env["OMP_NUM_THREADS"] = str(max(1, usable_cores() - settings.ENGINE_THREADS))
        teacher_env: dict[str, str] = {}
        if teacher is not None:
            worker_env["TEACHER_VLLM_URL"] = f"http://127.0.0.1:{teacher[1]}"
            # A teacher job waits on it and computes nothing itself: the vLLM engine gets every core.
            teacher_env = {
                **env,
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
                    "VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, usable_cores() - 1)}"
                ),
            }
        procs: list[subprocess.Popen[bytes]] = []
        engine_proc: subprocess.Popen[bytes] | None = None
        teacher_proc: subprocess.Popen[bytes] | None = None
        stopping = False

        def stop(*_a: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            # Children get their own process group, so a terminal Ctrl-C reaches
            # only this supervisor, which stops them in order.
            procs.append(subprocess.Popen(web, env=env, start_new_session=True))
            procs.append(subprocess.Popen(worker, env=worker_env, start_new_session=True))
            engine_proc = subprocess.Popen(engine, env=env, start_new_session=True) if engine else None
            if teacher is not None:
                teacher_proc = subprocess.Popen(teacher[0], env=teacher_env, start_new_session=True)
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nWorkbench is running at {url}\n  log in as: {username} / {password}\n"
                    f"  data directory: {settings.DATA_DIR}\n  broker: {settings.CELERY_BROKER_URL.split('://')[0]}\n"
                    f"  OpenAI-compatible API: {url}v1 (model PROJECT_SLUG/ALIAS, a project API key)\n"
                    f"  inference engine: {self._engine_description(engine)}\n"
                    f"  teacher generation: {self._teacher_description(teacher)}\n"
                    "Press Ctrl-C to stop the web server, the worker and the engine.\n"
                )
            )
            self.started(url, username, opts, stop)
            while not stopping:
                for p in procs:
                    if p.poll() is not None:
                        program = cast(list[str], p.args)[0]  # started from lists of str above
                        self.stderr.write(f"{program} exited with {p.returncode}; stopping.")
                        stopping = True
                if engine_proc is not None and engine_proc.poll() is not None:
                    # The UI and the worker stay up: only /v1 needs the engine, and it answers 503 meanwhile.
                    self.stderr.write(
                        f"The inference engine exited with {engine_proc.returncode} (see above); "
                        "/v1 answers 503 until it runs again (`python manage.py serve_engine`)."
                    )
                    engine_proc = None
                if teacher_proc is not None and teacher_proc.poll() is not None:
                    self.stderr.write(
                        f"The teacher's vLLM exited with {teacher_proc.returncode} (see "
                        f"{settings.DATA_DIR / 'logs' / 'teacher-vllm.log'}); teacher jobs answer in process."
                    )
                    teacher_proc = None
                time.sleep(0.2)
        finally:
            code = self._shutdown(procs + [p for p in (engine_proc, teacher_proc) if p is not None])
        if code:
            sys.exit(code)

    def started(self, url: str, username: str, opts: dict[str, Any], stop: Any) -> None:
        """Called once the processes run; a command built on this one (the
        demo) drives them from here and calls `stop()` to end the run."""

    def _engine_command(self, skip: bool) -> list[str] | None:
        """`manage.py serve_engine` (the hf engine, or a vLLM the workbench starts); none
        when skipped or when the team's vLLM is given by VLLM_URL."""
        if skip or (team_vllm()):
            return None
        return [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "serve_engine"]

    def _teacher_vllm_command(self) -> tuple[list[str], int] | None:
        """A vLLM for teacher jobs beside the hf engine, when .venv-vllm is
        installed and TEACHER_BACKEND is auto: (command, port)."""
        from engines.vllm_server import vllm_python

        if settings.INFERENCE_BACKEND != "hf" or settings.TEACHER_BACKEND != "auto":
            return None
        if not Path(vllm_python()).exists():
            return None
        port = (urlsplit(settings.ENGINE_URL).port or 8001) + 1
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        return [sys.executable, manage, "serve_engine", "--teacher", "--port", str(port)], port

    def _teacher_description(self, teacher: tuple[list[str], int] | None) -> str:
        if settings.INFERENCE_BACKEND != "hf":
            return "on the inference engine (vllm)"
        if teacher is not None:
            return (
                f"vLLM at http://127.0.0.1:{teacher[1]} (from .venv-vllm; teacher jobs answer in process "
                "until it is up)"
            )
        if settings.TEACHER_BACKEND == "hf":
            return "in process (TEACHER_BACKEND=hf)"
        return "in process (`make vllm-venv` installs vLLM, which teacher jobs then use: 2.6x faster here)"

    def _engine_description(self, engine: list[str] | None) -> str:
        if engine:
            threads = f", {settings.ENGINE_THREADS} thread(s)" if settings.INFERENCE_BACKEND == "hf" else ""
            return f"{settings.INFERENCE_BACKEND} at {settings.ENGINE_URL}{threads}"
        if team_vllm():
            return f"vllm at {settings.VLLM_URL} (run by the team)"
        return f"not started (--no-engine); the gateway expects it at {settings.ENGINE_URL}"

    def _shutdown(self, procs: list[subprocess.Popen[bytes]]) -> int:
        self.stdout.write("Stopping web server, worker and engine...")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # celery: warm shutdown; gunicorn: graceful stop
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.stdout.write("Stopped.")
        return 0
