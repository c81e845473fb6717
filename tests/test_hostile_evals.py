"""Issue 18 item 2 in the eval runner: a rule whose pattern runs past its time limit
fails its check, the run completes, and the job log says why."""

import io
import json
import time

import pytest

from engines.rules import validate_rules
from evals import actions
from evals.models import EvalResult, EvalRun
from evals.runner import EvalRunner
from jobs.models import Job
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

SLOW = {"name": "slow", "kind": "regex", "pattern": "^(a|aa)+$"}


@pytest.mark.django_db
def test_a_pattern_past_its_time_limit_fails_the_check_and_the_log_says_why(alice, alice_project):
    base = FoundationModel.objects.create(name="m", path="/m")
    prompt = save_prompt(alice_project, alice, "p", "Answer briefly.", [SLOW]).version
    rows = "\n".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        )
        for i in range(8)
    )
    data = import_dataset(
        alice_project, alice, "d", io.BytesIO(rows.encode()), filename="d.jsonl", eval_percent=50
    )
    suite = actions.create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    job = Job.objects.create(project=alice_project, kind="eval", base_model=base)
    run = EvalRun.objects.create(project=alice_project, suite=suite, base_model=base, job=job, arm="floor")
    hostile = "a" * 40 + "!"  # catastrophic backtracking for the pattern above
    EvalResult.objects.bulk_create(
        [EvalResult(run=run, example=e, output=hostile) for e in suite.examples.all()]
    )
    started = time.monotonic()
    EvalRunner(job, lambda progress: None)._score(run, list(suite.examples.all()), validate_rules([SLOW]))
    assert time.monotonic() - started < 2 * suite.examples.count()  # each check stops at its limit
    assert all(not r.checks["rule:slow"] for r in run.results.all())
    job.refresh_from_db()
    assert f"rule 'slow' failed on {suite.examples.count()} answer(s) without a verdict" in job.log
    assert "took longer than" in job.log
