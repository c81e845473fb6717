"""A kind of job that exists only in the tests: it proves a new kind needs
only its runner. Worker processes load it through the
WORKBENCH_EXTRA_JOB_RUNNERS setting."""

from __future__ import annotations

import time

from engines.progress import Progress
from jobs.registry import JobRunner, register


@register
class Sleepy(JobRunner):
    kind = "test-sleepy"
    label = "Sleepy test"

    def run(self) -> None:
        if self.job.params.get("bug"):
            raise KeyError("a real bug")
        naps = int(self.job.params.get("naps", 5))
        for step in range(1, naps + 1):
            time.sleep(float(self.job.params.get("nap_seconds", 0)))
            self.progress(
                Progress(done=step, total=naps, unit="naps", point={"step": step, "loss": 1 / step})
            )
        self.log(f"slept {naps} naps in {self.job.project.slug}")
        if self.job.params.get("succeed_itself"):  # as runners that store outputs do
            self.succeed()
