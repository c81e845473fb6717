"""Settings for the test suite: the production module, with a data directory
of its own per test session, so tests never touch the data of a local
`make run` nor of another test session. Set in the environment, so worker
and web processes the tests start inherit it."""

import os
import sys
from pathlib import Path

SESSION_DIR = Path(__file__).resolve().parent.parent / "var" / "test" / f"session-{os.getpid()}"
os.environ.setdefault("WORKBENCH_DATA_DIR", str(SESSION_DIR))
if os.environ.get("PYTEST_XDIST_WORKER") and "pytest" in sys.modules:
    # A pytest-xdist process inherits the session directory of the process that started it, which
    # each process removes when it finishes: each takes its own (what it starts inherits that one).
    if Path(os.environ["WORKBENCH_DATA_DIR"]).parent == SESSION_DIR.parent:
        os.environ["WORKBENCH_DATA_DIR"] = str(SESSION_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Production settings refuse to start without a key; processes the tests start inherit this one.
os.environ.setdefault("SECRET_KEY", "test-only-key-" + "x" * 40)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from workbench import settings as _base  # noqa: E402
from workbench.settings import *  # noqa: E402, F403

# The suite fine-tunes datasets of a few rows; tests/test_absorb_form.py sets the floor it tests.
MIN_TRAIN_ROWS = 1

# pytest-xdist (`make test` runs two processes): each its own Redis database for the broker, so the
# Celery worker one process starts never takes a task the other queued for a job in its own test
# database. gw0 keeps the given database, gwN takes the Nth after it. Only in the pytest process:
# what it starts inherits the URL or is given one on purpose.
XDIST_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
if XDIST_INDEX and "pytest" in sys.modules and _base.CELERY_BROKER_URL.startswith("redis"):
    from urllib.parse import urlsplit

    _broker = urlsplit(_base.CELERY_BROKER_URL)
    _db = int(_broker.path.strip("/") or 0) + XDIST_INDEX
    if _db >= 14:  # 14 and 15: tests/conftest.py's Redis tests
        raise RuntimeError(f"too many test processes for the Redis databases after {_base.CELERY_BROKER_URL}")
    CELERY_BROKER_URL = _broker._replace(path=f"/{_db}").geturl()
    os.environ["CELERY_BROKER_URL"] = CELERY_BROKER_URL  # Celery reads it before the settings
