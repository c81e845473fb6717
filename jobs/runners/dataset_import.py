"""Dataset import: parse a stored upload and insert its rows into a staging
version in short batches (workbench.actions.datasets.run_import), which
becomes visible only when every row is stored. The web request only stored
the file; a failed, cancelled or abandoned import leaves nothing (the
job_finished receiver in jobs.signals discards the staging rows)."""

from __future__ import annotations

from jobs.registry import JobCancelled, JobError, JobRunner, register
from workbench.actions.datasets import DatasetRejected, ImportCancelled, run_import
from workbench.models import DatasetVersion


@register
class DatasetImportRunner(JobRunner):
    kind = "dataset-import"
    label = "Dataset import"
    requires = ("output_dataset",)

    def run(self) -> None:
        version = DatasetVersion.all_objects.filter(
            pk=self.job.output_dataset_id, state=DatasetVersion.IMPORTING
        ).first()
        if version is None:
            raise JobError("the staging version of this import is gone (cancelled or discarded)")
        self.log(f"importing {version.source_filename or 'the upload'} into {version}")
        try:
            version = run_import(version, self.progress, self.should_stop)
        except ImportCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        except DatasetRejected as rejected:
            lines = [str(e) for e in rejected.errors]
            more = rejected.error_count - len(lines)
            if more > 0:
                lines.append(f"... and {more:,} more")
            for line in lines:
                self.log(line)
            raise JobError(
                f"{version.source_filename or 'the file'} was not stored: {rejected}"
                + (f" ({rejected.errors[0]})" if rejected.errors and not rejected.file_problem else "")
            ) from rejected
        self.log(f"stored {version}: {version.row_count:,} rows ({version.format})")
        self.succeed(output_dataset=version)
