"""A variant that an absorb just made gets its four-arm comparison at once."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.dispatch import receiver

from jobs.models import Job, job_finished

log = logging.getLogger(__name__)


@receiver(job_finished)
def compare_new_variant(sender: Any, job: Job, status: str, **_kw: Any) -> None:
    """Start the four arms, with what the absorb form chose (the job's
    params["eval"]: auto, max_new_tokens, max_examples) over the settings."""
    if status != Job.SUCCEEDED or job.kind != "finetune" or job.variant_id is None:
        return
    chosen = job.params.get("eval") or {}
    if not chosen.get("auto", settings.AUTO_EVAL):
        if "auto" in chosen:
            job.append_log(
                "eval: the four-arm comparison was turned off for this absorb; start it from Evals"
            )
        return
    from evals.actions import start_comparison, suite_for_variant

    try:
        variant = job.variant
        assert variant is not None
        suite = suite_for_variant(variant, job.created_by, max_examples=chosen.get("max_examples"))
        if suite is None:
            job.append_log(
                "eval: the data has no held-out (eval) split, so no four-arm comparison was started"
            )
            return
        generation = {"max_new_tokens": chosen["max_new_tokens"]} if chosen.get("max_new_tokens") else None
        comparison = start_comparison(
            job.project, job.created_by, suite, variant, absorb_job=job, generation=generation
        )
        job.append_log(f"eval: four-arm comparison queued on {suite} (job #{comparison.job_id})")
    except Exception as exc:  # the fine-tune succeeded; a failed follow-up must not undo it
        log.exception("could not start the four-arm comparison of %s", job)
        job.append_log(f"eval: could not start the four-arm comparison: {exc}")
