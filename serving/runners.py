"""The `merge` job kind: a variant's adapter merged into its base and zipped
once, into the data directory, for the merged-model download
(serving.exports). Registered from ServingConfig.ready."""

from __future__ import annotations

import time

from engines.progress import Progress
from jobs.registry import JobCancelled, JobError, JobRunner, RunnableJob, register
from serving.actions import MERGE
from serving.exports import ExportError, build_merged_zip, cached_merged_zip
from workbench.models import Variant


@register
class MergeRunner(JobRunner):
    kind = MERGE
    label = "Merged model"
    user_errors = (ExportError,)

    @classmethod
    def check_inputs(cls, job: RunnableJob) -> str | None:
        if not isinstance(job.params.get("variant"), int):
            return "a merge job needs the variant to merge (params.variant), and this one has none"
        return None

    def run(self) -> None:
        started = time.monotonic()
        variant = (
            Variant.objects.select_related(
                "base_model", "project", "prompt_version__prompt", "dataset_version__dataset"
            )
            .filter(pk=self.job.params["variant"], project_id=self.job.project_id)
            .first()
        )
        if variant is None:
            raise JobError(f"variant {self.job.params['variant']} no longer exists in this project")
        if cached_merged_zip(variant) is not None:
            self.log("the merged model was already prepared")
            return
        if self.should_stop():
            raise JobCancelled()
        self.progress(Progress.since(started, 0, 1, "merges", metrics={"stage": "merging and zipping"}))
        path = build_merged_zip(variant)
        size = path.stat().st_size
        self.progress(Progress.since(started, 1, 1, "merges", metrics={"bytes": size}))
        self.log(f"merged model of {variant.name} ready: {size / 1e6:.1f} MB")
