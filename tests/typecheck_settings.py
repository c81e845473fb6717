"""Settings the mypy Django plugin imports: the test settings with one fixed
data directory, so a type check leaves no per-run directory behind."""

import os
from pathlib import Path

os.environ.setdefault("WORKBENCH_DATA_DIR", str(Path(__file__).resolve().parent.parent / "var" / "typecheck"))

from tests.settings import *  # noqa: F403
