"""`make demo`: start the workbench as `run` does (web, worker, engine), then
walk the whole path on a shipped scenario and print the summary. The demo
project stays, so the UI shows real results afterwards."""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any

from django.core.management.base import CommandParser
from django.db import close_old_connections

from serving.demo import DemoError, run_demo
from workbench.management.commands.run import Command as RunCommand
from workbench.management.commands.run import usable_cores


class Command(RunCommand):
    help = (
        "Run the workbench and the whole path on a demo scenario: curated teacher data, absorb, four-arm "
        "eval, promotion to staging behind the gate, one /v1 request. Prints a summary."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--scenario", default="lumen", help="A folder of scenarios/ (default: lumen)")
        parser.add_argument(
            "--best-of", type=int, help="Samples per query and round (default: absorb's default)"
        )
        parser.add_argument("--epochs", type=int, help="Fine-tune epochs (default: the workbench default)")
        parser.add_argument(
            "--keep-running",
            action="store_true",
            help="Keep the workbench running after the demo (Ctrl-C stops it)",
        )
        parser.add_argument("--timeout-minutes", type=float, default=60, help="Per stage")

    def handle(self, *args: Any, **opts: Any) -> None:
        self.exit_code = 0
        # The engine idles until the demo's last step: the worker may use every core meanwhile.
        os.environ.setdefault("OMP_NUM_THREADS", str(usable_cores()))
        super().handle(*args, **opts)
        if self.exit_code:
            raise SystemExit(self.exit_code)

    def started(self, url: str, username: str, opts: dict[str, Any], stop: Any) -> None:
        def drive() -> None:
            try:
                self._wait_for_web(url)
                result = run_demo(
                    opts["scenario"],
                    url,
                    username,
                    self._say,
                    best_of=opts["best_of"],
                    epochs=opts["epochs"],
                    timeout_minutes=opts["timeout_minutes"],
                )
                self.stdout.write("\n" + result.summary + "\n")
                if not result.passed:
                    self.stderr.write("The student did not reach the teacher's all-rules compliance.")
                    self.exit_code = 2
                self.stdout.write(
                    self.style.SUCCESS(
                        f"The demo project is at {url}p/{result.project.slug}/ (log in as {username})."
                    )
                )
            except DemoError as exc:
                self.stderr.write(f"Demo failed: {exc}")
                self.exit_code = 1
            except Exception:
                self.stderr.write("Demo failed:\n" + traceback.format_exc())
                self.exit_code = 1
            finally:
                close_old_connections()
                if not opts["keep_running"] or self.exit_code:
                    stop()

        threading.Thread(target=drive, name="demo", daemon=True).start()

    def _say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()

    @staticmethod
    def _wait_for_web(url: str, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "login/", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        raise DemoError(f"the web server at {url} did not answer within {timeout:.0f} s")
