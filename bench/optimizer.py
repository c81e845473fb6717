"""The optimizer's pick against the defaults at the same budget, on a
shipped scenario, through the spec path (`manage.py apply`'s own plan, apply
and search), with the jobs run in this process (no worker, no server).

1. The scenario's spec as shipped (the defaults) is applied once: teacher,
   fine-tune, four arms. Its time is what the defaults cost.
2. The same spec with objectives and a search of --budget-minutes in all is
   applied in the same project. Its trial 1 is the defaults' settings, so it
   reuses their steps; the search is charged their time, so both sides spend
   the same budget at most. Later trials are the sampler's.

Prints, for the defaults and for the search's best trial: the objectives'
measures, what is short, and the time spent; then every trial.

    OMP_NUM_THREADS=1 .venv/bin/python bench/optimizer.py lumen --train-limit 32 --heldout-limit 16 \\
        --budget-minutes 60

Everything lands in a throwaway data directory (SQLite), printed at the start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._setup import django_in  # noqa: E402

OBJECTIVES = {"min_all_rules": 0.85, "min_fact_recall": 0.5}  # issue 20's targets a pipeline can read


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario")
    parser.add_argument("--train-limit", type=int, default=None, help="the first N train queries")
    parser.add_argument("--heldout-limit", type=int, default=None, help="the first N held-out queries")
    parser.add_argument("--budget-minutes", type=float, required=True, help="what both sides may spend")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--objectives", type=json.loads, default=OBJECTIVES, help="as JSON")
    parser.add_argument("--space", type=json.loads, default=None, help="as JSON; default: the schema's")
    parser.add_argument("--no-general-skills", action="store_true", help="skip the general-skills task")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    data_dir = django_in(args.data_dir, f"optimizer-{args.scenario}-")
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from jobs import lifecycle
    from jobs.models import Job
    from serving.pipeline import PlanError, apply_plan, make_plan
    from serving.pipeline.search import Optimizer, measure, shortfall
    from workbench.pipeline import load_spec

    call_command("provision_model", verbosity=0)
    user = get_user_model().objects.get_or_create(username="bench")[0]
    folder = write_specs(args, data_dir / "spec")

    def follow(job: Job) -> None:
        job.refresh_from_db()
        if job.status == Job.QUEUED:
            t = time.monotonic()
            lifecycle.execute(job.pk, "bench")
            print(f"  {job.kind} job #{job.pk}: {time.monotonic() - t:.0f} s", flush=True)
            job.refresh_from_db()
        if job.status != Job.SUCCEEDED:
            raise PlanError(f"{job} {job.status}: {job.error}")

    def say(line: str) -> None:
        print(f"  {line}", flush=True)

    print("defaults:", flush=True)
    began = time.monotonic()
    outcome = apply_plan(make_plan(load_spec(folder / "defaults.yaml")), user, say, follow)
    defaults_seconds = time.monotonic() - began
    assert outcome.comparison is not None
    defaults = measure(outcome.comparison)
    short, unmet = shortfall(args.objectives, defaults)

    print("search:", flush=True)
    spec = load_spec(folder / "search.yaml")
    t0 = time.monotonic()
    optimizer = Optimizer(
        spec,
        lambda plan: apply_plan(plan, user, say, follow),
        say,
        # Trial 1 reuses the defaults' steps: charge their time, so both sides spend the same budget.
        ended=lambda _outcome: defaults_seconds + time.monotonic() - t0,
    )
    search = optimizer.search()
    best = search.best
    print("\n" + search.text())
    print(f"\n{args.scenario}: budget {args.budget_minutes:g} min; objectives {args.objectives}")
    names = list(args.objectives)
    print(f"{'':<24}" + "".join(f"{n:>18}" for n in names) + f"{'shortfall':>12}{'minutes':>10}")

    def row(label: str, metrics: dict, gap: float, seconds: float) -> None:
        cells = "".join(f"{metrics[n]:>18.3f}" if metrics.get(n) is not None else f"{'-':>18}" for n in names)
        print(f"{label:<24}{cells}{gap:>12.3f}{seconds / 60:>10.1f}")

    row("defaults (one run)", defaults, short, defaults_seconds)
    if best is not None:
        spent = sum(t.seconds for t in search.trials)  # trial 1: the defaults' time
        row(f"search: trial {best.number}", best.metrics, best.shortfall, spent)
        print(f"search's pick: {best.settings}")
        print(
            f"defaults short: {'; '.join(unmet) or 'nothing'}; pick short: {'; '.join(best.unmet) or 'nothing'}"
        )
    print(f"stopped: {search.stopped}")


def write_specs(args: argparse.Namespace, folder: Path) -> Path:
    """The scenario's spec and files (cut to the limits), without its promotion; and the same with
    the objectives and the search."""
    source = REPO / "scenarios" / args.scenario
    folder.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((source / "spec.yaml").read_text())
    for key in ("file", "rules", "facts"):
        name = spec["prompt"].get(key)
        if name:
            shutil.copy(source / name, folder / name)
    for key, limit in (("train", args.train_limit), ("heldout", args.heldout_limit)):
        rows = (source / spec["data"][key]).read_text().splitlines()
        (folder / spec["data"][key]).write_text("\n".join(rows[:limit] if limit else rows) + "\n")
    spec.pop("promote", None)
    if args.no_general_skills:
        spec.setdefault("eval", {})["lm_eval_tasks"] = []
    (folder / "defaults.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    search: dict = {"budget_minutes": args.budget_minutes, "max_trials": args.max_trials}
    if args.space:
        search["space"] = args.space
    spec.update(objectives=args.objectives, search=search)
    (folder / "search.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


if __name__ == "__main__":
    main()
