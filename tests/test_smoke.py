"""The run command, for real: web server and worker processes, a login, a task
through the embedded broker, and a clean Ctrl-C."""

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.processes import REPO, wait_for

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_it_runs_web_and_worker_until_ctrl_c(tmp_path, smollm2_dir):
    port, engine_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        ENGINE_URL=f"http://127.0.0.1:{engine_port}",
        WORKBENCH_DATA_DIR=str(tmp_path / "data"),
        WORKBENCH_MODELS_DIR=str(smollm2_dir.parent),
        DJANGO_SETTINGS_MODULE="workbench.settings",
        WORKER_HEARTBEAT_SECONDS="1",
        # No vLLM venv here: teacher jobs answer in process, and the start says how to change that.
        VLLM_VENV=str(tmp_path / "no-vllm-venv"),
    )
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "run", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def get(path: str) -> tuple[int, str]:
        try:
            with opener.open(base + path, timeout=5) as r:
                return r.status, r.read().decode()
        except OSError:
            return 0, ""

    def post(path: str, data: dict) -> str:
        token = next(c.value for c in jar if c.name == "csrftoken")
        req = urllib.request.Request(
            base + path,
            urllib.parse.urlencode({**data, "csrfmiddlewaretoken": token}).encode(),
            headers={"Referer": base + path},
        )
        with opener.open(req, timeout=10) as r:
            return r.read().decode()

    try:
        wait_for(lambda: get("/login/")[0] == 200, 120, "login page", proc, log)
        password = re.search(r"log in as: demo / (\S+)", log.read_text()).group(1)
        page = post("/login/", {"username": "demo", "password": password})
        assert "Demo" in page  # the demo project, on the projects page
        assert "teacher generation: in process (`make vllm-venv` installs vLLM" in log.read_text()
        wait_for(lambda: "alive" in get("/models/")[1], 60, "worker heartbeat", proc, log)
        assert "SmolLM2-135M-Instruct" in get("/models/")[1]
        post("/models/ping", {"queue": "gpu"})
        wait_for(lambda: "answered by worker-" in get("/models/")[1], 60, "test task", proc, log)
        # The inference engine holds the default model, and the gateway asks for a key.
        engine = f"http://127.0.0.1:{engine_port}/v1/models"
        wait_for(
            lambda: (
                "SmolLM2-135M-Instruct"
                in (urllib.request.urlopen(engine, timeout=5).read().decode() if get_ok(engine) else "")
            ),
            120,
            "engine",
            proc,
            log,
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/v1/models", timeout=5)
        assert refused.value.code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    assert "Stopped." in log.read_text()
    assert get("/login/")[0] == 0  # the web server is gone
    ps = subprocess.run(["pgrep", "-f", f"worker-{proc.pid}@"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the worker outlived Ctrl-C"
    assert not get_ok(f"http://127.0.0.1:{engine_port}/health"), "the engine outlived Ctrl-C"


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False
