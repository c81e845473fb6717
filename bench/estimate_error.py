"""How far the plan's time estimates (serving/pipeline/estimate.py) were from
what a scenario run really took: for each finished fine-tune of a data
directory (one `bench/scenario.py` left), its teacher, the fine-tune and its
four-arm eval, each step's estimate at the default rate (what a fresh
workbench plans with) and at the rate the directory's other finished jobs
measured (what a workbench that has run before plans with; the job itself is
left out of its own measurement), against the job's own wall time.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/estimate_error.py --data-dir /tmp/scenario-fernhill-XXXX
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class _Undo(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, action="append", required=True, help="repeatable")
    args = parser.parse_args()
    print(f"{'run':<20} {'step':<10} {'default rate':>20} {'measured rate':>20} {'actual':>8}")
    for folder in args.data_dir:
        report(folder)


def report(folder: Path) -> None:
    os.environ.update(
        WORKBENCH_DATA_DIR=str(folder),
        HF_HUB_OFFLINE="1",
        DJANGO_SETTINGS_MODULE="workbench.settings",
        WORKBENCH_LOCAL_SECRET_KEY="true",
    )
    os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()
    from django.db import transaction

    from engines.facts import validate_facts
    from engines.training import TrainConfig
    from evals.models import ArmComparison
    from jobs.models import Job
    from serving.pipeline import estimate

    def wall(job: Job) -> float:
        assert job.started_at and job.finished_at
        return (job.finished_at - job.started_at).total_seconds()

    def without(job: Job, make):  # the estimate as if this job had not finished
        out = []
        try:
            with transaction.atomic():
                Job.objects.filter(pk=job.pk).update(status=Job.FAILED)
                out.append(make())
                raise _Undo
        except _Undo:
            pass
        return out[0]

    for finetune in Job.objects.filter(kind="finetune", status=Job.SUCCEEDED).order_by("pk"):
        steps = []
        teacher = finetune.depends_on
        if teacher is not None and teacher.status == Job.SUCCEEDED:
            queries = teacher.dataset_version.rows.filter(split="train").count()
            steps.append(
                (
                    "teacher",
                    teacher,
                    lambda t=teacher, q=queries: estimate.teacher(
                        q, t.base_model, t.teacher_endpoint, t.params.get("curation")
                    ),
                )
            )
        data = finetune.dataset_version
        train = TrainConfig.from_dict(finetune.params.get("train") or {}).to_dict()
        head = [r.messages for r in data.rows.filter(split="train").order_by("index")[:200]]
        version = finetune.prompt_version
        facts = validate_facts(version.facts) if version else []
        text, rules = (version.text, version.rules or []) if version else ("", [])
        count = data.rows.filter(split="train").count()
        steps.append(
            (
                "fine-tune",
                finetune,
                partial(
                    estimate.training, finetune.base_model, train, count, head, True, 0, facts, text, rules
                ),
            )
        )
        for c in ArmComparison.objects.filter(variant=finetune.variant, job__status=Job.SUCCEEDED):
            n = c.suite.examples.count()
            steps.append(
                (
                    "four arms",
                    c.job,
                    lambda c=c, n=n: estimate.evaluation(
                        c.job.base_model, n, c.suite.lm_eval_tasks, c.suite.has_judge
                    ),
                )
            )
        for name, job, make in steps:
            guess = without(job, make)
            actual = wall(job)
            default = guess.seconds_at_defaults
            measured = f"{guess.seconds:.0f} s ({guess.seconds / actual:.2f}x)" if guess.measured else "-"
            print(
                f"{folder.name[:20]:<20} {name:<10} {f'{default:.0f} s ({default / actual:.2f}x)':>20} "
                f"{measured:>20} {actual:7.0f} s   [{guess.counts}]"
            )


if __name__ == "__main__":
    main()
