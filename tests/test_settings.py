import os
import secrets
import subprocess
import sys

import yaml

from tests.processes import REPO


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_it_passes_check_deploy_with_production_values(tmp_path):
    env = {
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "workbench.example.com",
        "SECURE_SSL_REDIRECT": "true",
        "SECURE_COOKIES": "true",
        "SECURE_HSTS_SECONDS": "31536000",
        "WORKBENCH_DATA_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    r = run_manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # and the development defaults are what make it fail, so the test can fail
    r = run_manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env={"WORKBENCH_DATA_DIR": str(tmp_path), "DEBUG": "true", "SECRET_KEY": ""},
    )
    assert r.returncode != 0


def test_it_reads_database_and_broker_urls_from_the_environment(tmp_path):
    code = (
        "from django.conf import settings as s; d=s.DATABASES['default'];"
        "print(d['ENGINE'], d['NAME'], d['HOST'], s.CELERY_BROKER_URL, s.CELERY_BROKER_TRANSPORT_OPTIONS)"
    )
    r = run_manage(
        "shell",
        "-c",
        code,
        env={
            "WORKBENCH_DATA_DIR": str(tmp_path),
            "DATABASE_URL": "postgres://u:p@db:5432/wb",
            "CELERY_BROKER_URL": "redis://redis:6379/0",
            "CELERY_TASK_TIME_LIMIT": "100",
        },
    )
    assert r.returncode == 0, r.stderr
    assert "django.db.backends.postgresql wb db redis://redis:6379/0 {'visibility_timeout': 3700}" in r.stdout


def test_a_boolean_setting_with_a_typo_raises_instead_of_meaning_false(tmp_path):
    env = {"WORKBENCH_DATA_DIR": str(tmp_path), "SECURE_SSL_REDIRECT": "ture"}
    r = run_manage("check", env=env)
    assert r.returncode != 0
    assert "SECURE_SSL_REDIRECT='ture' is not a boolean" in r.stderr
    for value, expected in (("Yes", "True"), ("off", "False"), ("", "False"), ("1", "True")):
        r = run_manage(
            "shell",
            "-c",
            "from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT)",
            env={**env, "SECURE_SSL_REDIRECT": value},
        )
        assert r.stdout.strip().splitlines()[-1] == expected, (value, r.stderr)


def test_the_embedded_defaults_need_no_server(tmp_path):
    code = (
        "from django.conf import settings as s; print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["WORKBENCH_DATA_DIR"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"django.db.backends.sqlite3 sqla+sqlite:///{tmp_path}/broker.sqlite3" in r.stdout, r.stderr


def test_the_compose_file_refers_to_things_that_exist():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "worker-gpu", "worker"} <= set(services)
    settings_src = (REPO / "workbench" / "settings.py").read_text()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (
                REPO / svc["build"].get("context", ".") / svc["build"].get("dockerfile", "Dockerfile")
            ).is_file()
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source in compose.get("volumes", {}) or (REPO / source).exists(), (
                f"{name}: volume {source}"
            )
        env_file = svc.get("env_file")
        for f in [env_file] if isinstance(env_file, str) else env_file or []:
            assert (REPO / f).is_file() or (REPO / f"{f}.example").is_file(), f"{name}: env file {f}"
        for key in svc.get("environment", {}):
            # The app's own services read their variables in settings.py; an engine's image (vLLM) reads its own.
            if "build" in svc:
                assert f'"{key}"' in settings_src or key.startswith(("HF_", "PYTHON")), (
                    f"{name}: {key} is not read"
                )
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        command = (
            " ".join(svc.get("command", []))
            if isinstance(svc.get("command"), list)
            else svc.get("command", "")
        )
        if "celery" in command:
            assert "-A workbench" in command
        if "gunicorn" in command:
            assert "workbench.wsgi:application" in command
    # /v1 on the default backend needs the engine process; the app's services find it by name.
    assert "serve_engine" in " ".join(services["engine"]["command"])
    assert services["web"]["environment"]["ENGINE_URL"].endswith("//engine:8001}")
    gpu = services["worker-gpu"]
    assert "-Q gpu" in " ".join(gpu["command"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for line in (REPO / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key = line.split("=", 1)[0]
            assert f'"{key}"' in settings_src or key.startswith("POSTGRES_"), f".env.example: {key} unused"
