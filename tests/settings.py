"""Settings for the test suite: the production module, with a data directory
of its own per test session, so tests never touch the data of a local
`make run` nor of another test session. Set in the environment, so worker
and web processes the tests start inherit it."""

import os
from pathlib import Path

os.environ.setdefault(
    "WORKBENCH_DATA_DIR",
    str(Path(__file__).resolve().parent.parent / "var" / "test" / f"session-{os.getpid()}"),
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Production settings refuse to start without a key; processes the tests start inherit this one.
os.environ.setdefault("SECRET_KEY", "test-only-key-" + "x" * 40)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from workbench.settings import *  # noqa: F403

# The suite fine-tunes datasets of a few rows; tests/test_absorb_form.py sets the floor it tests.
MIN_TRAIN_ROWS = 1
