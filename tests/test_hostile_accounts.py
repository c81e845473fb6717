"""Issue 18 item 10: no public secret key, no weak passwords, no unthrottled logins."""

import os
import stat
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import SetPasswordForm
from django.urls import reverse

from tests.processes import REPO


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "WORKBENCH_LOCAL_SECRET_KEY")
    }
    base["DJANGO_SETTINGS_MODULE"] = "workbench.settings"
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off(tmp_path):
    r = manage("check", env={"WORKBENCH_DATA_DIR": str(tmp_path), "DEBUG": "false"})
    assert r.returncode != 0
    assert "SECRET_KEY is not set" in r.stderr and "make run" in r.stderr
    # the published placeholder of .env.example is no key either
    r = manage(
        "check", env={"WORKBENCH_DATA_DIR": str(tmp_path), "SECRET_KEY": "change-me-to-a-long-random-string"}
    )
    assert r.returncode != 0 and "placeholder" in r.stderr
    assert not (tmp_path / "secret_key").exists()


def test_the_local_start_generates_a_key_once_and_keeps_it_private(tmp_path):
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    env = {"WORKBENCH_DATA_DIR": str(tmp_path), "WORKBENCH_LOCAL_SECRET_KEY": "true"}
    first = manage("shell", "-c", code, env=env)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = first.stdout.strip().splitlines()[-1]
    assert len(key) >= 50 and key == key_file.read_text().strip()
    # later processes (the worker, the headless commands) read the same key without the flag
    again = manage("shell", "-c", code, env={"WORKBENCH_DATA_DIR": str(tmp_path)})
    assert again.stdout.strip().splitlines()[-1] == key


def test_manage_py_run_is_what_sets_the_local_key_flag():
    # The README's `make run` is `manage.py run`: the flag must come from manage.py itself.
    source = (REPO / "manage.py").read_text()
    assert '"run"' in source and "WORKBENCH_LOCAL_SECRET_KEY" in source


@pytest.mark.django_db
@pytest.mark.parametrize("weak", ["password", "12345678", "alice-lovelace"])
def test_it_refuses_weak_passwords(weak):
    user = get_user_model().objects.create_user("alice-lovelace", email="alice@example.com")
    form = SetPasswordForm(user, {"new_password1": weak, "new_password2": weak})
    assert not form.is_valid()
    strong = "correct horse battery staple 42"
    assert SetPasswordForm(user, {"new_password1": strong, "new_password2": strong}).is_valid()


@pytest.mark.django_db
def test_logins_are_locked_out_after_repeated_failures(client, settings):
    User = get_user_model()
    User.objects.create_user("alice", password="a-long-good-passphrase")
    User.objects.create_user("bob", password="another-good-passphrase")
    url = reverse("login")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        r = client.post(url, {"username": "alice", "password": "guess"})
        assert r.status_code == 200 and b"match" in r.content
    r = client.post(url, {"username": "alice", "password": "guess"})
    assert r.status_code == 429 and b"Too many failed logins" in r.content
    # now even the right password is refused for alice from this address...
    r = client.post(url, {"username": "alice", "password": "a-long-good-passphrase"})
    assert r.status_code == 429
    assert "_auth_user_id" not in client.session
    # ...while bob can still log in
    r = client.post(url, {"username": "bob", "password": "another-good-passphrase"})
    assert r.status_code == 302 and client.session["_auth_user_id"]


@pytest.mark.django_db
def test_a_successful_login_resets_the_failure_count(client, settings):
    get_user_model().objects.create_user("alice", password="a-long-good-passphrase")
    url = reverse("login")
    for _ in range(3):
        for _ in range(settings.AXES_FAILURE_LIMIT - 1):
            client.post(url, {"username": "alice", "password": "guess"})
        r = client.post(url, {"username": "alice", "password": "a-long-good-passphrase"})
        assert r.status_code == 302
        client.logout()
