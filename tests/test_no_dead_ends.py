"""No dead ends: every job says what it takes and links what it made, the
variant page shows its evals, job references in logs are links, and the
destructive buttons ask first."""

import io
import re

import pytest
from django.template import Context, Template
from django.urls import reverse

from evals.actions import create_suite
from evals.models import ArmComparison, EvalRun
from jobs.models import Job
from serving.models import Alias, AliasMove
from workbench.actions.datasets import derive_version, import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

pytestmark = pytest.mark.django_db

RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"}]


@pytest.fixture
def world(alice, alice_project, tmp_path):
    """A project with a teacher, a fine-tune, its variant, a four-arm eval job and a merge."""
    project = alice_project
    prompt = save_prompt(project, alice, "support", "You are Nova. Always start with 'Hello'.", RULES).version
    upload = import_dataset(
        project,
        alice,
        "queries",
        io.BytesIO(b"How do I reset it?\nWhere is my parcel?\nCan I pay by invoice?\nWho are you?\n"),
        filename="q.txt",
        eval_percent=25,
    )
    answered = derive_version(
        upload,
        alice,
        [(r.index, [*r.messages, {"role": "assistant", "content": "Hello!"}]) for r in upload.rows.all()],
        kind="teacher",
    )
    base = FoundationModel.objects.create(name="tiny", path=str(tmp_path / "no-model"))
    teacher = Job.objects.create(
        project=project,
        kind="teacher",
        base_model=base,
        prompt_version=prompt,
        dataset_version=upload,
        status=Job.SUCCEEDED,
        output_dataset=answered,
    )
    variant = Variant.objects.create(
        project=project,
        name="support-absorbed",
        base_model=base,
        prompt_version=prompt,
        dataset_version=answered,
    )
    finetune = Job.objects.create(
        project=project,
        kind="finetune",
        base_model=base,
        prompt_version=prompt,
        depends_on=teacher,
        status=Job.SUCCEEDED,
        variant=variant,
    )
    suite = create_suite(project, alice, "held out", upload, prompt_version=prompt)
    evaljob = Job.objects.create(
        project=project, kind="eval", base_model=base, status=Job.SUCCEEDED, params={"suite": suite.pk}
    )
    comparison = ArmComparison.objects.create(
        project=project,
        suite=suite,
        variant=variant,
        absorb_job=finetune,
        job=evaljob,
        headline={
            "metric": "all_rules",
            "tokens_saved_per_1000": 12000,
            "retained": {"value": 0.8, "low": 0.5, "high": 1.1, "n": 1},
        },
    )
    runs = [
        EvalRun.objects.create(
            project=project,
            suite=suite,
            job=evaljob,
            comparison=comparison,
            base_model=base,
            arm=arm,
            variant=variant if with_variant else None,
            prompt_version=prompt if with_prompt else None,
            summary={"complete": True},
        )
        for arm, with_variant, with_prompt in [
            ("floor", False, False),
            ("teacher", False, True),
            ("student", True, False),
            ("student+prompt", True, True),
        ]
    ]
    merge = Job.objects.create(project=project, kind="merge", params={"variant": variant.pk})
    return {
        "project": project,
        "upload": upload,
        "answered": answered,
        "teacher": teacher,
        "finetune": finetune,
        "variant": variant,
        "suite": suite,
        "evaljob": evaljob,
        "comparison": comparison,
        "runs": runs,
        "merge": merge,
    }


def row(html: str, job: Job) -> str:
    found = re.search(rf'<tr id="job-row-{job.pk}">(.*?)</tr>', html, re.S)
    assert found, f"no row for {job}"
    return found.group(1)


def variant_url(world) -> str:
    return reverse("variant_detail", args=[world["project"].slug, world["variant"].pk])


def test_an_eval_job_row_shows_its_suite_its_variant_and_its_result(world, alice_client):
    html = alice_client.get(reverse("job_list", args=[world["project"].slug])).content.decode()
    cells = row(html, world["evaljob"])
    assert "None" not in cells and "after #" not in cells
    assert world["suite"].get_absolute_url() in cells and "held out" in cells  # what it takes
    assert variant_url(world) in cells and "support-absorbed" in cells
    assert world["comparison"].get_absolute_url() in cells and "retained 0.80" in cells  # what it made
    # The other kinds: the fine-tune takes the teacher's answers, the merge its variant.
    finetune = row(html, world["finetune"])
    assert world["teacher"].get_absolute_url() in finetune and variant_url(world) in finetune
    assert "None" not in finetune
    teacher = row(html, world["teacher"])
    assert world["upload"].get_absolute_url() in teacher and world["answered"].get_absolute_url() in teacher
    assert variant_url(world) in row(html, world["merge"])


def test_an_eval_job_row_without_a_comparison_links_its_runs_and_the_leaderboard(world, alice_client):
    world["comparison"].delete()  # runs started from the Evals page belong to no comparison
    html = alice_client.get(reverse("job_list", args=[world["project"].slug])).content.decode()
    cells = row(html, world["evaljob"])
    assert world["suite"].get_absolute_url() in cells and "leaderboard" in cells
    assert all(r.get_absolute_url() in cells for r in world["runs"])


def test_the_job_pages_link_what_they_made(world, alice_client):
    html = alice_client.get(world["evaljob"].get_absolute_url()).content.decode()
    produced = html[html.index('id="job-produced"') :]
    assert world["comparison"].get_absolute_url() in produced
    assert "0.80" in produced and "12,000" in produced
    assert world["suite"].get_absolute_url() in produced and "leaderboard" in produced
    assert all(r.get_absolute_url() in produced for r in world["runs"])
    assert variant_url(world) in html[html.index('id="job-input"') :]
    assert variant_url(world) in alice_client.get(world["finetune"].get_absolute_url()).content.decode()
    teacher = alice_client.get(world["teacher"].get_absolute_url()).content.decode()
    assert world["answered"].get_absolute_url() in teacher
    merge = alice_client.get(world["merge"].get_absolute_url()).content.decode()
    assert variant_url(world) in merge[merge.index('id="job-input"') :]


def test_the_variant_page_shows_its_comparison_and_headline(world, alice_client):
    html = alice_client.get(variant_url(world)).content.decode()
    evals = html[html.index('id="variant-evals"') :]
    assert world["comparison"].get_absolute_url() in evals
    assert '<b class="retained">0.80</b>' in evals and "[0.50, 1.10]" in evals and "12,000" in evals
    assert world["suite"].get_absolute_url() in evals and world["evaljob"].get_absolute_url() in evals
    assert world["runs"][2].get_absolute_url() in evals  # the student's run


def test_a_variant_without_evals_says_how_to_get_one(world, alice_client):
    world["comparison"].delete()
    EvalRun.objects.all().delete()
    html = alice_client.get(variant_url(world)).content.decode()
    assert "No four-arm comparison of this variant yet" in html
    assert reverse("evals_home", args=[world["project"].slug]) in html


def test_job_references_in_a_log_link_to_jobs_of_the_same_project_and_nothing_else(
    world, alice_client, bob_project
):
    elsewhere = Job.objects.create(project=bob_project, kind="teacher")
    ev, slug = world["evaljob"], world["project"].slug
    finetune = world["finetune"]
    finetune.append_log(f"eval: four-arm comparison queued on held out (job #{ev.pk})")
    finetune.append_log(f"see #{world['teacher'].pk} and job #{elsewhere.pk} and job #999999")
    finetune.append_log("<script>alert('x')</script> & #12abc")
    html = alice_client.get(finetune.get_absolute_url()).content.decode()
    log = html[html.index('id="job-log"') : html.index("</pre>", html.index('id="job-log"'))]
    assert f'<a href="{reverse("job_detail", args=[slug, ev.pk])}">job #{ev.pk}</a>' in log
    assert f'<a href="{world["teacher"].get_absolute_url()}">#{world["teacher"].pk}</a>' in log
    assert f"job #{elsewhere.pk}" in log and f"/jobs/{elsewhere.pk}/" not in log  # another project's job
    assert "job #999999" in log and "/jobs/999999/" not in log
    assert "<script>" not in log and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; #12abc" in log
    assert log.count("<a ") == 2


def test_the_log_filter_escapes_even_text_marked_safe(world):
    from django.utils.safestring import mark_safe

    out = Template("{% load job_links %}{{ log|link_jobs:project }}").render(
        Context({"log": mark_safe('<img src=x onerror="#1">'), "project": world["project"]})
    )
    assert "<img" not in out and "&lt;img" in out


def test_cancel_and_rollback_ask_for_confirmation(world, alice_client):
    queued = Job.objects.create(project=world["project"], kind="finetune")
    html = alice_client.get(queued.get_absolute_url()).content.decode()
    form = re.search(r'<form method="post" action="[^"]*/cancel"[^>]*>', html)
    assert form and 'onsubmit="return confirm(' in form.group(0)
    other = Variant.objects.create(
        project=world["project"], name="it's-older", base_model=world["variant"].base_model
    )
    alias = Alias.objects.create(project=world["project"], name="production", variant=world["variant"])
    AliasMove.objects.create(
        alias=alias, action=AliasMove.PROMOTE, from_variant=other, to_variant=world["variant"]
    )
    html = alice_client.get(
        reverse("serving_alias", args=[world["project"].slug, "production"])
    ).content.decode()
    form = re.search(r'<form method="post" action="[^"]*/rollback"[^>]*>', html)
    assert form and 'onsubmit="return confirm(' in form.group(0)
    assert "it\\u0027s" in form.group(0) and "it's" not in form.group(
        0
    )  # the name cannot end the script's string


def test_a_web_upload_error_names_the_form_field_not_a_command_flag(world, alice_client):
    response = alice_client.post(
        reverse("dataset_upload", args=[world["project"].slug]),
        {
            "name": "fields",
            "format": "fields",
            "file": io.BytesIO(b"q\nhello\n"),
            "eval_percent": 0,
            "seed": 0,
        },
    )
    html = response.content.decode()
    assert response.status_code == 400 and "needs the name of the query field (Query column on" in html
    assert "--query-column" not in html
