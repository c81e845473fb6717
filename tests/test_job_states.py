"""The job lifecycle: compare-and-set moves, terminal states stay, dependents
are cancelled from the terminal transitions, runners found by kind, progress
throttled and curve points appended."""

import io
import json
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from engines.progress import Progress
from jobs.lifecycle import ProgressWriter, execute, reap
from jobs.models import Job, JobPoint
from jobs.registry import kinds, runner_for
from tests.job_kinds import Sleepy
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(alice, alice_project):
    base = FoundationModel.objects.create(name="m", path="/m")
    prompt = save_prompt(alice_project, alice, "p", "Be brief.").version
    data = import_dataset(alice_project, alice, "d", io.BytesIO(b"hi\nho\n"), filename="d.txt")
    return Job.objects.create(
        project=alice_project, kind="finetune", base_model=base, prompt_version=prompt, dataset_version=data
    )


def test_a_job_is_claimed_once(job):
    assert job.claim("w1")
    assert job.status == Job.RUNNING and job.attempts == 1 and job.worker == "w1"
    assert not Job.objects.get(pk=job.pk).claim("w2")  # a duplicate delivery
    assert Job.objects.get(pk=job.pk).worker == "w1"


def test_terminal_states_never_change_and_refused_moves_write_no_log(job):
    job.claim("w1")
    assert job.succeed()
    log = Job.objects.get(pk=job.pk).log
    assert not job.fail("late error") and not job.mark_cancelled("late cancel") and not job.claim("w2")
    assert not job.request_cancel()
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED and job.error == "" and not job.cancel_requested
    assert job.log == log and "late" not in job.log and "cancel" not in job.log


def test_cancelling_a_queued_job_ends_it_and_a_running_one_is_flagged(job):
    assert job.request_cancel()
    assert job.status == Job.CANCELLED and not job.claim("w1")
    assert job.log.count("cancelled before it started") == 1


def test_a_running_job_gets_a_cancel_flag(job):
    job.claim("w1")
    assert job.request_cancel()
    assert job.status == Job.RUNNING and job.cancel_is_requested()
    assert "cancel requested" in job.log


def test_a_job_that_ends_without_success_cancels_its_queued_dependents(job):
    second = Job.objects.create(project=job.project, kind="finetune", depends_on=job)
    third = Job.objects.create(project=job.project, kind="finetune", depends_on=second)
    job.claim("w1")
    assert job.fail("boom")
    assert Job.objects.get(pk=second.pk).status == Job.CANCELLED
    assert Job.objects.get(pk=third.pk).status == Job.CANCELLED  # down the whole chain
    assert f"cancelled: {job} failed" in Job.objects.get(pk=second.pk).log


def test_a_succeeded_job_hands_over_its_dependents(job):
    waiting = Job.objects.create(project=job.project, kind="finetune", depends_on=job)
    job.claim("w1")
    assert job.ready_dependents() == []
    job.succeed()
    assert [d.pk for d in job.ready_dependents()] == [waiting.pk]
    assert Job.objects.get(pk=waiting.pk).status == Job.QUEUED


def test_the_reaper_requeues_a_stale_job_and_gives_up_after_max_attempts(job):
    job.claim("w1")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=120))
    assert reap(60) == [(job.pk, Job.QUEUED)]
    job.refresh_from_db()
    assert job.status == Job.QUEUED
    assert "stopped responding (attempt 1 of 3)" in job.log
    for attempt in (2, 3):
        assert job.claim(f"w{attempt}") and job.attempts == attempt
        Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=120))
        moved = reap(60)
        job.refresh_from_db()
    assert moved == [(job.pk, Job.FAILED)] and job.status == Job.FAILED
    assert "giving up after 3 attempts" in job.error


def test_the_reaper_leaves_live_jobs_alone(job):
    job.claim("w1")
    assert reap(60) == []
    assert Job.objects.get(pk=job.pk).status == Job.RUNNING


# --- runners by kind ------------------------------------------------------------


def test_an_unknown_kind_fails_with_a_clear_error(job):
    Job.objects.filter(pk=job.pk).update(kind="translate")
    assert execute(job.pk, "w1") == []
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert "no runner is registered for job kind 'translate'" in job.error
    assert "finetune" in job.error and "teacher" in job.error


def test_a_runner_missing_its_inputs_fails_before_it_starts(job):
    Job.objects.filter(pk=job.pk).update(dataset_version=None)
    execute(job.pk, "w1")
    job.refresh_from_db()
    assert job.status == Job.FAILED and "needs dataset_version" in job.error


def test_a_registered_kind_runs_through_the_lifecycle(alice_project):
    assert runner_for("test-sleepy") is Sleepy and "test-sleepy" in kinds()
    first = Job.objects.create(project=alice_project, kind="test-sleepy")
    then = Job.objects.create(project=alice_project, kind="test-sleepy", depends_on=first)
    assert execute(first.pk, "w1") == [then.pk]
    first.refresh_from_db()
    assert first.status == Job.SUCCEEDED and str(first) == f"Sleepy test #{first.pk}"
    assert first.progress["done"] == 5 and first.progress["unit"] == "naps" and first.percent == 100
    assert [p["step"] for p in JobPoint.after(first)] == [1, 2, 3, 4, 5]


def test_a_runner_that_ends_its_job_itself_keeps_its_last_progress(alice_project, settings):
    settings.JOB_PROGRESS_SECONDS = 3600  # only the first report is written on the way
    job = Job.objects.create(project=alice_project, kind="test-sleepy", params={"succeed_itself": True})
    execute(job.pk, "w1")
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED and job.progress["done"] == 5
    assert [p["step"] for p in JobPoint.after(job)] == [1, 2, 3, 4, 5]


def test_a_bug_in_a_runner_keeps_its_traceback_in_the_worker_log_not_on_the_page(alice_project, caplog):
    job = Job.objects.create(project=alice_project, kind="test-sleepy", params={"bug": True})
    with caplog.at_level("ERROR", logger="jobs.lifecycle"):
        execute(job.pk, "w1")
    job.refresh_from_db()
    assert job.status == Job.FAILED and job.error.startswith("internal error (KeyError), incident ")
    incident = job.error.split("incident ")[1].split(":")[0]
    # members see the incident id, never the traceback, the message or a server path
    assert "Traceback" not in job.log and "a real bug" not in job.log + job.error and incident in job.log
    assert "/" not in job.error
    (record,) = [r for r in caplog.records if incident in r.getMessage()]
    assert record.exc_info and "a real bug" in str(record.exc_info[1])


# --- progress that scales -------------------------------------------------------------


def test_progress_is_written_at_most_every_few_seconds_and_points_are_appended(alice_project):
    job = Job.objects.create(project=alice_project, kind="test-sleepy")
    job.claim("w1")
    writer = ProgressWriter(job, every=3600)
    for step in range(1, 101):
        writer(Progress(done=step, total=100, unit="steps", point={"step": step, "loss": 1.0}))
    # The first report is written at once; the next 99 wait for the interval.
    job.refresh_from_db()
    assert job.progress["done"] == 1 and JobPoint.objects.filter(job=job).count() == 1
    writer.flush()
    job.refresh_from_db()
    assert job.progress["done"] == 100
    assert list(JobPoint.objects.filter(job=job).values_list("seq", flat=True)) == list(range(1, 101))


def test_the_50th_poll_of_a_1000_step_job_transfers_only_new_points(alice_project, alice_client):
    job = Job.objects.create(project=alice_project, kind="test-sleepy")
    job.claim("w1")
    url = reverse("job_detail", args=[alice_project.slug, job.pk])
    htmx = {"HX-Request": "true", "HX-Target": "job-live"}
    after, sizes = 0, []
    for poll in range(1, 51):
        step0 = (poll - 1) * 20
        JobPoint.append(job, [{"step": step0 + i, "loss": 2.0 - (step0 + i) / 1000} for i in range(1, 21)])
        response = alice_client.get(url, {"after": after}, headers=htmx)
        body = response.content.decode()
        points = json.loads(body.split('class="new-points">')[1].split("</script>")[0])
        assert [p["seq"] for p in points] == list(range(after + 1, after + 21))
        after = points[-1]["seq"]
        assert f"?after={after}" in body  # the next poll asks from here
        sizes.append(len(response.content))
    assert JobPoint.objects.filter(job=job).count() == 1000
    assert sizes[-1] < sizes[0] * 1.2  # the 50th poll is no bigger than the first
    full = alice_client.get(url)
    assert (
        len(json.loads(full.content.decode().split('class="new-points">')[1].split("</script>")[0])) == 1000
    )
    status = alice_client.get(reverse("job_status", args=[alice_project.slug, job.pk]), {"after": 990}).json()
    assert [p["seq"] for p in status["points"]] == list(range(991, 1001))


def test_a_prompt_longer_than_the_context_is_refused_before_anything_trains(
    alice, alice_project, tiny_model_dir
):
    from engines.training import TrainConfig
    from jobs.actions import start_absorb
    from workbench.actions import ActionError

    base = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    long = save_prompt(alice_project, alice, "long", "Follow the policy. " * 3000).version
    data = import_dataset(alice_project, alice, "d", io.BytesIO(b"hi\nho\n"), filename="d.txt")
    with pytest.raises(ActionError, match="the model reads at most 8,192 tokens"):
        start_absorb(alice_project, alice, long, data, base, training=TrainConfig())
    assert not Job.objects.exists()


def test_wait_follows_a_job_to_its_end_or_its_deadline(job):
    seen = []
    assert not job.wait(timeout=0.05, poll=0.01, on_poll=lambda j: seen.append(j.status))
    assert set(seen) == {Job.QUEUED} and len(seen) >= 2

    def finish_on_the_third_poll(polled: Job) -> None:
        seen.append(polled.status)
        if len(seen) == 3:
            Job.objects.filter(pk=polled.pk).update(status=Job.SUCCEEDED)

    seen.clear()
    assert job.wait(poll=0.01, on_poll=finish_on_the_third_poll)
    assert job.status == Job.SUCCEEDED and seen == [Job.QUEUED, Job.QUEUED, Job.QUEUED, Job.SUCCEEDED]
