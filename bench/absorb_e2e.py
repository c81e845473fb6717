"""Teacher + fine-tune wall time through the product path: a real Celery
worker (embedded broker), the `absorb` command, SmolLM2-135M-Instruct, a
~1,000-token system prompt and N user queries.

    .venv/bin/python bench/absorb_e2e.py [--queries 300] [--max-new-tokens 128]
        [--epochs 2] [--batch-size 8] [--bf16 true|false|auto]

Runs in a throwaway data directory; the converted model is taken from
.cache/models (provisioned on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--teacher-batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bf16", default="true", choices=["true", "false", "auto"])
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="wb-bench-"))
    os.environ.update(
        WORKBENCH_DATA_DIR=str(data),
        DJANGO_SETTINGS_MODULE="workbench.settings",
        WORKBENCH_MODELS_DIR=str(REPO / ".cache" / "models"),
        HF_HUB_OFFLINE="1",
        WORKBENCH_LOCAL_SECRET_KEY="true",
    )
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("CELERY_BROKER_URL", None)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from teacher_throughput import queries, system_prompt

    from jobs.models import Job
    from workbench.actions.projects import create_project

    call_command("migrate", verbosity=0)
    call_command("provision_model", verbosity=0)
    user = get_user_model().objects.create_user("bench")
    project = create_project(user, "Bench")
    (data / "prompt.md").write_text(system_prompt())
    (data / "queries.txt").write_text("\n".join(queries(args.queries)) + "\n")
    call_command("import_prompt", str(data / "prompt.md"), "--project", project.slug, "--name", "support")
    call_command(
        "import_dataset",
        str(data / "queries.txt"),
        "--project",
        project.slug,
        "--name",
        "q",
        "--eval-percent",
        "0",
    )
    (data / "train.json").write_text(
        json.dumps(
            {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "bf16": {"true": True, "false": False}.get(args.bf16, "auto"),
            }
        )
    )
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "workbench",
            "worker",
            "-Q",
            "gpu,default",
            "-c",
            "1",
            "--max-tasks-per-child",
            "1",
            "-l",
            "WARNING",
        ],
        cwd=REPO,
        env=os.environ.copy(),
    )
    try:
        started = time.monotonic()
        call_command(
            "absorb",
            "--project",
            project.slug,
            "--prompt",
            "support",
            "--dataset",
            "q",
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--teacher-batch",
            str(args.teacher_batch),
            "--train-config",
            str(data / "train.json"),
            "--wait",
        )
        total = time.monotonic() - started
    finally:
        worker.terminate()
        worker.wait(30)
    teacher, finetune = Job.objects.order_by("pk")
    for job in (teacher, finetune):
        assert job.status == Job.SUCCEEDED, job.log
    t_sec = (teacher.finished_at - teacher.started_at).total_seconds()
    f_sec = (finetune.finished_at - finetune.started_at).total_seconds()
    v = finetune.variant
    flagged = teacher.output_dataset.rows.exclude(flags=[]).count()
    print(
        f"\nqueries {args.queries}, prompt {len(system_prompt())} chars, max_new_tokens {args.max_new_tokens}, "
        f"teacher batch {teacher.params['generation']['batch_size']}"
    )
    print(f"teacher:   {t_sec:7.1f} s  ({args.queries / t_sec:.2f} queries/s, {flagged} rows flagged)")
    print(
        f"fine-tune: {f_sec:7.1f} s  ({v.metrics['steps']} steps, {v.metrics['tokens_per_second']:.0f} tokens/s, "
        f"final loss {v.final_loss:.3f}, epochs {args.epochs}, batch {args.batch_size}, bf16 {args.bf16})"
    )
    print(
        f"together:  {t_sec + f_sec:7.1f} s  = {(t_sec + f_sec) / 60:.1f} min  (wall incl. queueing {total:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
