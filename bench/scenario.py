"""A whole absorb on a scenario (scenarios/NAME: prompt.md, rules.json,
train.jsonl, heldout.jsonl) with the default model, through the workbench's
own actions and job runners, in this process (no worker, no server): curated
teacher data -> LoRA fine-tune -> four arms on the held-out queries. Prints
the per-rule table for floor, teacher, data and student, and wall times.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scenario.py lumen [--best-of 4] [--epochs 3] [--no-curation]

Everything lands in a throwaway data directory (SQLite), printed at the start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._setup import django_in  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario")
    parser.add_argument("--best-of", type=int, default=None, help="default: the workbench default")
    parser.add_argument("--no-curation", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="N",
        help="refine_samples: a rejection-sampling round, N per query",
    )
    parser.add_argument(
        "--curation",
        type=json.loads,
        default=None,
        help='curation settings over the defaults, as JSON: \'{"rounds": 1, "passages": 0}\'',
    )
    parser.add_argument(
        "--train",
        type=json.loads,
        default=None,
        help='training settings over the defaults, as JSON: \'{"student_passages": 2, "learning_rate": 1e-3}\'',
    )
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher's data report")
    parser.add_argument("--no-general-skills", action="store_true", help="skip the general-skills task")
    parser.add_argument(
        "--judge", action="store_true", help="grade every arm's answers with the base model as judge"
    )
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train queries")
    parser.add_argument(
        "--synthesize",
        type=int,
        default=None,
        metavar="N",
        help="the absorb's synthesis job first adds up to N queries written from the prompt to the train "
        "queries (default: the absorb's own, 120; 0: none)",
    )
    parser.add_argument(
        "--synthesis",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="with --synthesize: the synthesis settings, e.g. '{\"fact_turns\": 3}'",
    )
    parser.add_argument("--heldout-limit", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--from-teacher",
        action="store_true",
        help="reuse the finished teacher job of --data-dir and train again from its answers",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="with --from-teacher: evaluate the data directory's latest finished fine-tune again "
        "(a run stopped in its four arms) instead of training another",
    )
    parser.add_argument(
        "--skills-only",
        action="store_true",
        help="with --from-teacher: after the fine-tune, only general skills, floor against student "
        "(the forgetting a training setting causes, without the four arms on the held-out queries)",
    )
    args = parser.parse_args()

    data_dir = django_in(args.data_dir, f"scenario-{args.scenario}-")
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from engines.curation import CurationSettings
    from evals.actions import create_suite, start_comparison
    from jobs import lifecycle
    from jobs.actions import start_absorb
    from jobs.models import Job
    from workbench.actions.datasets import import_dataset
    from workbench.actions.projects import create_project
    from workbench.actions.prompts import save_prompt
    from workbench.models import FoundationModel

    if args.from_teacher:
        return resume(args, data_dir)
    call_command("provision_model", verbosity=0)
    folder = REPO / "scenarios" / args.scenario
    user = get_user_model().objects.create(username="bench")
    project = create_project(user, f"scenario {args.scenario}", "")
    rules = json.loads((folder / "rules.json").read_text())
    facts = json.loads((folder / "facts.json").read_text()) if (folder / "facts.json").is_file() else []
    prompt = save_prompt(
        project, user, args.scenario, (folder / "prompt.md").read_text(), rules, facts_data=facts
    ).version

    def lines(name: str, limit: int | None) -> bytes:
        rows = (folder / name).read_text().splitlines()
        return "\n".join(rows[:limit] if limit else rows).encode() + b"\n"

    train = import_dataset(
        project,
        user,
        "train",
        __import__("io").BytesIO(lines("train.jsonl", args.train_limit)),
        filename="train.jsonl",
        eval_percent=0,
    )
    heldout = import_dataset(
        project,
        user,
        "heldout",
        __import__("io").BytesIO(lines("heldout.jsonl", args.heldout_limit)),
        filename="heldout.jsonl",
        eval_percent=100,
    )
    base = FoundationModel.objects.get(is_default=True)
    curation: dict | bool = False if args.no_curation else CurationSettings().to_dict()
    if args.best_of and curation:
        curation["best_of"] = args.best_of
    if args.curation and curation:
        curation.update(args.curation)
    training = train_config(args)
    times: dict[str, float] = {}
    began = time.monotonic()
    synthesis = {"count": args.synthesize, **(args.synthesis or {})} if args.synthesize else args.synthesize
    teacher, finetune = start_absorb(
        project,
        user,
        prompt,
        train,
        base,
        {},
        training,
        curation=curation,
        synthesis=True if synthesis is None else synthesis,
    )

    def run(job: Job, name: str) -> Job:
        t = time.monotonic()
        lifecycle.execute(job.pk, "bench")
        job.refresh_from_db()
        times[name] = time.monotonic() - t
        print(f"{name}: {job.status} in {times[name]:.0f} s", flush=True)
        if job.status != Job.SUCCEEDED:
            print(job.error, job.log[-3000:], sep="\n")
            sys.exit(1)
        return job

    if teacher.depends_on is not None:
        made = run(teacher.depends_on, "synthesis")
        teacher.refresh_from_db()
        train = teacher.dataset_version
        print(f"synthesis: {train.row_count - made.dataset_version.row_count} queries added", flush=True)
    teacher = run(teacher, "teacher")
    if args.teacher_only:
        finetune.status = Job.CANCELLED
        finetune.save(update_fields=["status"])
        return report_data(args, teacher, prompt, rules, curation, times)
    assert finetune is not None
    finetune = run(finetune, "fine-tune")
    suite = create_suite(
        project, user, "held out", heldout, prompt_version=prompt, lm_eval_tasks=tasks(args), **judge(args)
    )
    comparison = start_comparison(project, user, suite, finetune.variant)
    assert comparison.job is not None
    run(comparison.job, "four arms")
    times["total"] = time.monotonic() - began
    report(args, comparison, teacher, train, heldout, prompt, rules, curation, times)


def resume(args: argparse.Namespace, data_dir: Path) -> None:
    """Train and evaluate again on the answers of the scenario's finished teacher job."""
    from evals.actions import create_suite, start_comparison
    from jobs import lifecycle
    from jobs.actions import start_finetune
    from jobs.models import Job
    from workbench.models import Dataset

    teacher = Job.objects.filter(kind="teacher", status=Job.SUCCEEDED).latest("pk")
    Job.objects.filter(kind__in=("finetune", "eval")).exclude(status__in=Job.TERMINAL).update(
        status=Job.CANCELLED
    )
    project, user, prompt = teacher.project, teacher.created_by, teacher.prompt_version
    heldout = Dataset.objects.get(project=project, name="heldout").latest
    training = train_config(args)
    times: dict[str, float] = {"teacher": float(teacher.output_dataset.meta.get("seconds", 0))}
    began = time.monotonic()
    if args.eval_only:
        finetune = Job.objects.filter(kind="finetune", status=Job.SUCCEEDED).latest("pk")
        assert finetune.started_at and finetune.finished_at
        times["fine-tune"] = (finetune.finished_at - finetune.started_at).total_seconds()
    else:
        finetune = start_finetune(project, user, prompt, teacher.output_dataset, teacher.base_model, training)
        t = time.monotonic()
        lifecycle.execute(finetune.pk, "bench")
        finetune.refresh_from_db()
        times["fine-tune"] = time.monotonic() - t
    print(f"fine-tune: {finetune.status} in {times['fine-tune']:.0f} s", flush=True)
    if finetune.status != Job.SUCCEEDED:
        print(finetune.error, finetune.log[-3000:], sep="\n")
        sys.exit(1)
    if args.skills_only:
        return general_skills_drop(finetune, times)
    suite = create_suite(
        project,
        user,
        f"held out {finetune.pk}",
        heldout,
        prompt_version=prompt,
        lm_eval_tasks=tasks(args),
        **judge(args),
    )
    comparison = start_comparison(project, user, suite, finetune.variant)
    t = time.monotonic()
    lifecycle.execute(comparison.job.pk, "bench")
    times["four arms"] = time.monotonic() - t
    print(f"four arms in {times['four arms']:.0f} s", flush=True)
    times["total"] = time.monotonic() - began + times["teacher"]
    rules = json.loads((REPO / "scenarios" / args.scenario / "rules.json").read_text())
    report(
        args,
        comparison,
        teacher,
        teacher.dataset_version,
        heldout,
        prompt,
        rules,
        teacher.params.get("curation"),
        times,
    )


def general_skills_drop(finetune, times: dict[str, float]) -> None:
    """General skills (lm-eval, scored by search) of the base and of the
    fine-tune, and the paired difference, as the four arms report it."""
    import tempfile

    from engines import evaluation as ev

    variant = finetune.variant
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        name = ev.general_skills_task(Path(tmp))
        for arm, adapter in (("floor", None), ("student", variant.adapter_path)):
            t = time.monotonic()
            result = ev.run_lm_eval(variant.base_model.path, [name], task_dir=Path(tmp), adapter_dir=adapter)
            times[arm] = time.monotonic() - t
            scores[arm] = result.tasks[name].correct

    def line(label: str, e) -> None:
        print(f"{label:24} {e.value:.3f} [{e.low:.3f}, {e.high:.3f}] n={e.n}")

    for arm, values in scores.items():
        line(f"general skills {arm}", ev.mean_ci(values))
    line("student - floor", ev.paired_difference(scores["student"], scores["floor"]))
    print(f"wall times (s): { {k: round(v) for k, v in times.items()} }")


def train_config(args: argparse.Namespace) -> dict:
    training: dict = {"epochs": args.epochs} if args.epochs else {}
    training.update(args.train or {})
    if args.refine is not None:
        training["refine_samples"] = args.refine
    return training


JUDGE_RUBRIC = (
    "Helpful and grounded: the answer addresses what the user asked, states correct and specific "
    "information (prices, times, steps) rather than vague filler, and invents nothing."
)


def judge(args: argparse.Namespace) -> dict:
    from workbench.models import FoundationModel

    if not args.judge:
        return {}
    return {"judge_base": FoundationModel.objects.get(is_default=True), "judge_rubric": JUDGE_RUBRIC}


def tasks(args: argparse.Namespace) -> list[str]:
    return [] if args.no_general_skills else ["general_skills"]


ARMS = ("floor", "teacher", "student", "student+prompt")


def print_quality(quality: dict) -> None:
    """The teacher data's pass rates after each curation stage, and each stage's cost."""
    print("data quality steps:")
    for step in quality.get("steps", []):
        cost = f" [{step['samples']} samples, {step['seconds']:.0f} s]" if "samples" in step else ""
        print(
            f"  {step['step']:<32} all rules {step['all_rules']:.2f}  "
            + "  ".join(f"{k} {v:.2f}" for k, v in step["rules"].items())
            + cost
        )
    if quality.get("facts"):
        print(
            f"  facts stated in the data: {quality['facts']['stated']:.2f} of {quality['facts']['rows']} rows"
        )


def report_data(args, teacher, prompt, rules, curation, times) -> None:
    quality = teacher.output_dataset.meta.get("quality") or {}
    print(f"\n{args.scenario}: {len(rules)} rules, prompt {prompt.token_counts}; curation {curation}")
    print_quality(quality)
    print("teacher usage:", json.dumps(teacher.params.get("teacher_usage"))[:400])
    print("wall times (s):", {k: round(v) for k, v in times.items()})


def report(args, comparison, teacher, train, heldout, prompt, rules, curation, times) -> None:
    comparison.refresh_from_db()

    quality = teacher.output_dataset.meta.get("quality") or {}
    data = (quality.get("steps") or [{}])[-1]
    runs = {r.arm: r for r in comparison.runs.all()}
    names = [r["name"] for r in rules]
    print(
        f"\n{args.scenario}: {len(names)} rules, prompt {prompt.token_counts}, {train.row_count} train queries, "
        f"{heldout.row_count} held out; curation {curation}"
    )
    print_quality(quality)
    header = f"{'rule':<16}" + "".join(
        f"{c:>16}" for c in ("floor", "teacher", "data", "student", "student+prompt")
    )
    print(header)

    def value(arm: str, metric: str) -> str:
        m = (runs[arm].summary.get("metrics") or {}).get(metric) if arm in runs else None
        return f"{m['value']:.2f}" if m else "-"

    def with_ci(arm: str, metric: str) -> str:
        m = (runs[arm].summary.get("metrics") or {}).get(metric) if arm in runs else None
        if not m:
            return "-"
        low, high = m.get("low"), m.get("high")
        ci = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        return f"{m['value']:.2f}{ci} n={m.get('n')}"

    for name in ["all_rules", *names]:
        metric = name if name == "all_rules" else f"rule:{name}"
        d = data.get("all_rules") if name == "all_rules" else (data.get("rules") or {}).get(name)
        print(
            f"{name:<16}"
            + "".join(f"{value(a, metric):>16}" for a in ("floor", "teacher"))
            + f"{'-' if d is None else f'{d:.2f}':>16}"
            + "".join(f"{value(a, metric):>16}" for a in ("student", "student+prompt"))
        )
    for metric in ("all_rules", "fact_recall", "judge", "lm_eval:general_skills"):
        print(f"{metric:<24}" + "".join(f"{a}: {with_ci(a, metric):<28}" for a in ARMS))
    for arm, r in runs.items():
        lat = r.summary.get("latency") or {}
        print(
            f"  {arm:<15} prompt tokens {r.summary.get('prompt_tokens', 0):.0f}, completion tokens "
            f"{r.summary.get('completion_tokens', 0):.0f}, latency {json.dumps(lat)[:120]}"
        )
    print("headline:", json.dumps({k: v for k, v in comparison.headline.items() if k != "lm_eval"})[:600])
    print("wall times (s):", {k: round(v) for k, v in times.items()})


if __name__ == "__main__":
    main()
