"""Django for a bench: a throwaway data directory (SQLite, the embedded broker), offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def django_in(data_dir: Path | None, prefix: str) -> Path:
    """Set Django up on `data_dir` (a new temporary one when None), migrated; returns the directory."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(
        WORKBENCH_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DJANGO_SETTINGS_MODULE="workbench.settings",
        WORKBENCH_LOCAL_SECRET_KEY="true",
    )
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("CELERY_BROKER_URL", None)
    import django

    django.setup()
    from django.core.management import call_command

    print(f"data directory: {data_dir}", flush=True)
    call_command("migrate", verbosity=0)  # a kept data directory too: its tables follow the code
    return data_dir
