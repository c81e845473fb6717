"""A spec applied from the browser (SpecRun). No worker waits for a run's
jobs: `advance` applies the spec once more, with a follow that stops at the
first step still running (the run then waits on that job) instead of
blocking. Every finished step is reused by its fingerprint, so each advance
goes one step further; a job of the run ending sends the next advance
(serving.receivers), and "check again" on the page sends one by hand. A
search spec goes the same way: each advance replays the finished trials from
their reused steps and goes on with the next (serving.pipeline.search)."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User
from django.db.models import Q
from django.utils import timezone

from jobs.models import Job
from serving.models import SpecRun
from serving.pipeline.plan import Plan, PlanError, make_plan
from serving.pipeline.run import Outcome, apply_plan
from serving.pipeline.search import check, note, optimize
from workbench.models import Project
from workbench.pipeline import Spec, SpecError, parse_spec

log = logging.getLogger(__name__)
MAX_CHARS = 200_000  # a spec holds settings and refs; the prompt and the data are versions
STALE = datetime.timedelta(minutes=10)  # an advance that held the run this long died with its worker


class _Waiting(Exception):
    def __init__(self, job: Job) -> None:
        self.job = job


def _follow(job: Job) -> None:
    job.refresh_from_db()
    if not job.is_terminal:
        raise _Waiting(job)
    if job.status != Job.SUCCEEDED:
        raise PlanError(f"{job} {job.status}: {job.error or 'see its log'}")


def read(project: Project, text: str) -> tuple[Spec, Plan]:
    """The spec as pasted and its plan on this project (SpecError, PlanError)."""
    if len(text) > MAX_CHARS:
        raise SpecError(
            [f"spec: longer than {MAX_CHARS:,} characters; a spec names versions, not their text"]
        )
    if not text.strip():
        raise SpecError(["spec: empty: paste a spec, or start from an absorb's exported spec"])
    spec = parse_spec(text, "spec", None)
    plan = make_plan(spec, project)
    if "search" in spec.data:
        check(spec, plan)
    return spec, plan


def shown(spec: Spec, plan: Plan) -> dict[str, Any]:
    """The plan as the page shows it: its steps, and what a search does after them."""
    searching = note(spec)
    return plan.to_dict() | ({"search": searching} if searching else {})


def start(project: Project, user: User, text: str) -> SpecRun:
    """Plan the spec (raising what is wrong with it) and take its first steps with that plan."""
    spec, plan = read(project, text)
    run = SpecRun.objects.create(project=project, text=text, plan=shown(spec, plan), created_by=user)
    advance(run.pk, None if "search" in spec.data else plan)
    run.refresh_from_db()
    return run


def problems_of(exc: SpecError | PlanError) -> list[str]:
    return exc.problems if isinstance(exc, SpecError) else [str(exc)]


def _claim(run_id: int) -> bool:
    now = timezone.now()
    free = Q(advancing_since__isnull=True) | Q(advancing_since__lt=now - STALE)
    if SpecRun.objects.filter(Q(pk=run_id, status=SpecRun.RUNNING) & free).update(
        advancing_since=now, again=False
    ):
        return True
    SpecRun.objects.filter(pk=run_id, status=SpecRun.RUNNING).update(again=True)
    return False


def advance(run_id: int, plan: Plan | None = None) -> None:
    """Apply the run's spec once more, as far as it goes without waiting
    (with `plan`, the one just made, for the first pass). One advance at a
    time: one that finds the run taken asks the holder to go again, and the
    holder lets go only when nobody asked."""
    if not _claim(run_id):
        return
    while True:
        run = SpecRun.objects.select_related("project", "created_by").get(pk=run_id)
        if run.status == SpecRun.RUNNING:
            _step(run, plan)
        plan = None
        if SpecRun.objects.filter(pk=run_id, again=False).update(advancing_since=None):
            return
        SpecRun.objects.filter(pk=run_id).update(again=False)


def _ended(run: SpecRun) -> Callable[[Outcome], float]:
    """The seconds of a search's budget spent when a trial ended: from the run's start to its
    comparison's end (a trial reused from before the run cost it nothing)."""

    def ended(outcome: Outcome) -> float:
        job = outcome.comparison.job if outcome.comparison is not None else None
        end = job.finished_at if job is not None and job.finished_at else timezone.now()
        return max(0.0, (end - run.created_at).total_seconds())

    return ended


def _step(run: SpecRun, plan: Plan | None = None) -> None:
    said: list[str] = []
    changes: dict[str, Any] = {"updated_at": timezone.now()}
    try:
        spec = None
        if plan is None:
            spec, plan = read(run.project, run.text)
        said += [
            f"{s.name}: job #{s.job}, found by its fingerprint"
            for s in plan.steps
            if s.action == "reuse" and s.job
        ]
        searched: dict[str, Any] = {}
        if spec is not None and "search" in spec.data:
            search = optimize(spec, run.created_by, said.append, _follow, run.project, _ended(run))
            said += search.text().splitlines()
            searched = {"search": search.to_dict()}
            if search.outcome is None:
                raise PlanError(f"no trial made a variant ({search.stopped})")
            outcome = search.outcome
        else:
            outcome = apply_plan(plan, run.created_by, said.append, _follow)
        if outcome.message:
            said.append(f"promote: {outcome.message}")
        refused = outcome.promoted is False
        changes.update(
            status=SpecRun.REFUSED if refused else SpecRun.DONE,
            waiting_on=None,
            outcome=json.loads(json.dumps(outcome.to_dict() | searched, default=str)),
            message=outcome.message or "done",
        )
    except _Waiting as waiting:
        changes.update(waiting_on=waiting.job, message=f"waiting for {waiting.job}")
    except (SpecError, PlanError) as exc:
        changes.update(status=SpecRun.FAILED, waiting_on=None, message="\n".join(problems_of(exc)))
    except Exception as exc:  # a bug: the run ends, said, instead of holding its claim
        log.exception("spec run %s", run.pk)
        changes.update(status=SpecRun.FAILED, waiting_on=None, message=f"internal error: {exc!r}")
    known = {line.split("] ", 1)[-1] for line in run.log.splitlines()}
    lines = [line for line in said if line not in known]  # each advance says the reused steps again
    if lines:
        stamp = timezone.now().strftime("%Y-%m-%d %H:%M:%S")
        changes["log"] = run.log + "".join(f"[{stamp}] {line}\n" for line in lines)
    SpecRun.objects.filter(pk=run.pk).update(**changes)
