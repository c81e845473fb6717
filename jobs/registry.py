"""Kinds of long work. Each kind is a JobRunner subclass registered under its
name (like netbox's JobRunner); the lifecycle (jobs.lifecycle) claims the
row, finds the runner by the job's kind and wraps `run` in start/terminate.
A new kind needs only its runner: apps register theirs from their
AppConfig.ready (evals registers eval runs), tests from a module named in
the JOB_RUNNER_MODULES setting."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol

from django.conf import settings

from engines.progress import Progress


class RunnableJob(Protocol):
    """What a runner needs of its job row (jobs.models.Job is one). The
    registry sits below the models: it names this, never the Job class."""

    pk: Any
    kind: str
    params: dict[str, Any]  # the kind's options

    def succeed(self, **changes: Any) -> bool: ...

    def cancel_is_requested(self) -> bool: ...

    def append_log(self, line: str, only_if: str | None = None) -> None: ...


class ProgressSink(Protocol):
    """Where a runner's progress goes (jobs.lifecycle.ProgressWriter is one)."""

    def __call__(self, progress: Progress) -> None: ...

    def flush(self) -> None: ...


class JobError(Exception):
    """A user-facing failure: the message is shown as the job's error, without a traceback."""


class JobCancelled(Exception):
    """Raised by a runner that saw the cancel flag; the job ends cancelled."""


class JobRunner:
    kind: ClassVar[str]
    label: ClassVar[str]
    # Job fields this kind needs set before it runs.
    requires: ClassVar[tuple[str, ...]] = ()
    # Errors whose message is enough for the user (no traceback in the log).
    user_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    # Runners read their kind's fields (job.dataset_version, job.params, ...): a Job row in practice.
    job: Any

    def __init__(self, job: RunnableJob, report: ProgressSink) -> None:
        self.job = job
        self._report = report

    def run(self) -> None:
        """Do the work. Return normally to succeed (or call job.succeed with
        the outputs inside the transaction that stores them); raise
        JobCancelled, JobError or one of `user_errors` to end otherwise."""
        raise NotImplementedError

    # helpers for subclasses
    def progress(self, progress: Progress, now: bool = False) -> None:
        """Report progress; the writer stores it at its own pace, or `now` (a new stage starts)."""
        self._report(progress)
        if now:
            self._report.flush()

    def succeed(self, **changes: Any) -> bool:
        """End the job with its outputs (call it inside the transaction that
        stores them). The latest progress is stored first: after the move a
        running-only progress write would be refused."""
        self._report.flush()
        return self.job.succeed(**changes)

    def should_stop(self) -> bool:
        return self.job.cancel_is_requested()

    def log(self, line: str) -> None:
        self.job.append_log(line)

    @classmethod
    def check_inputs(cls, job: RunnableJob) -> str | None:
        """Why this job cannot run, or None."""
        missing = [
            name for name in cls.requires if getattr(job, f"{name}_id", getattr(job, name, None)) is None
        ]
        if missing:
            return f"a {cls.label.lower()} job needs {', '.join(missing)}, and this one has none"
        return None


_REGISTRY: dict[str, type[JobRunner]] = {}


def register(cls: type[JobRunner]) -> type[JobRunner]:
    """Class decorator: register a runner under its kind."""
    existing = _REGISTRY.get(cls.kind)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise RuntimeError(
            f"job kind {cls.kind!r} is registered twice ({existing.__module__}, {cls.__module__})"
        )
    _REGISTRY[cls.kind] = cls
    return cls


def runner_for(kind: str) -> type[JobRunner] | None:
    return _REGISTRY.get(kind)


def kinds() -> list[str]:
    return sorted(_REGISTRY)


def label_of(kind: str) -> str:
    runner = _REGISTRY.get(kind)
    return runner.label if runner else kind


def load_runner_modules() -> None:
    """Import the modules that register runners (settings.JOB_RUNNER_MODULES)."""
    for name in settings.JOB_RUNNER_MODULES:
        importlib.import_module(name)
