"""Start the whole workbench on one machine: migrate, provision the default
model, ensure a demo user, then run the web server and a Celery worker as two
child processes until Ctrl-C."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from workbench.actions.projects import create_project
from workbench.models import Project

DEMO_USER = "demo"


def ensure_demo_user(data_dir: Path) -> tuple[str, str]:
    """Create the demo user once; its password is kept (mode 0600) in the data dir."""
    creds = data_dir / "demo-credentials.txt"
    User = get_user_model()
    if creds.is_file() and User.objects.filter(username=DEMO_USER).exists():
        return DEMO_USER, creds.read_text().strip()
    password = secrets.token_urlsafe(9)
    user, _ = User.objects.get_or_create(username=DEMO_USER, defaults={"is_staff": True, "is_superuser": True})
    user.set_password(password)
    user.save()
    creds.parent.mkdir(parents=True, exist_ok=True)
    creds.write_text(password + "\n")
    creds.chmod(0o600)
    if not Project.objects.for_user(user).exists():
        # Project names are unique: a "Demo" left by an earlier demo user is not taken over.
        name = next(n for n in ("Demo", *(f"Demo {i}" for i in range(2, 1000)))
                    if not Project.objects.filter(name__iexact=n).exists())
        create_project(user, name, "A first project to try the path: prompt, data, absorb, eval.")
    return DEMO_USER, password


class Command(BaseCommand):
    help = "Run the web UI and a Celery worker (embedded SQLite broker by default). Ctrl-C stops both."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--skip-provision", action="store_true", help="Don't provision the default model")
        parser.add_argument("--web-workers", type=int, default=2)

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
        web = [str(bin_dir / "gunicorn"), "workbench.wsgi:application", "--bind", f"{opts['host']}:{opts['port']}",
               "--workers", str(opts["web_workers"]), "--threads", "4", "--access-logfile", "-",
               "--graceful-timeout", "5"]
        # One task per child process: model memory is returned to the system after each job.
        worker = [str(bin_dir / "celery"), "-A", "workbench", "worker", "-Q", "gpu,default",
                  "--concurrency", "1", "--max-tasks-per-child", "1", "--loglevel", "INFO",
                  "-n", f"worker-{os.getpid()}@%h"]
        procs: list[subprocess.Popen[bytes]] = []
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
            procs.append(subprocess.Popen(worker, env=env, start_new_session=True))
            self.stdout.write(self.style.SUCCESS(
                f"\nWorkbench is running at {url}\n  log in as: {username} / {password}\n"
                f"  data directory: {settings.DATA_DIR}\n  broker: {settings.CELERY_BROKER_URL.split('://')[0]}\n"
                "Press Ctrl-C to stop the web server and the worker.\n"
            ))
            while not stopping:
                for p in procs:
                    if p.poll() is not None:
                        self.stderr.write(f"{p.args[0]} exited with {p.returncode}; stopping.")
                        stopping = True
                time.sleep(0.2)
        finally:
            code = self._shutdown(procs)
        if code:
            sys.exit(code)

    def _shutdown(self, procs: list[subprocess.Popen[bytes]]) -> int:
        self.stdout.write("Stopping web server and worker...")
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
