"""Variants as a registry, aliases moved through an eval gate, the audit
trail, rollback, two promotions racing on one alias (PostgreSQL row locks),
the pages (verdict shown before confirming, another team's pages out of
reach) and the headless commands."""

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse

from evals.actions import create_suite
from evals.models import ArmComparison, EvalRun
from jobs.models import Job
from serving import actions
from serving.actions import GateRefused, ensure_base_variants, ensure_default_aliases, promote, rollback
from serving.gate import evaluate_gate
from serving.models import Alias, AliasMove, alias_moved
from tests.threads import run_together
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"}]
QUERIES = "\n".join(
    f"How do I reset my {thing}?"
    for thing in ("password", "account", "order", "invoice", "project", "card", "plan", "team")
)


@pytest.fixture
def world(alice, alice_project):
    base = FoundationModel.objects.create(name="tiny-base", path="/models/tiny")
    prompt = save_prompt(alice_project, alice, "support", "Start with Hello.", RULES).version
    data = import_dataset(
        alice_project, alice, "q", io.BytesIO(QUERIES.encode()), filename="q.txt", eval_percent=50
    )
    suite = create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    a = Variant.objects.create(
        project=alice_project,
        name="absorbed-a",
        base_model=base,
        adapter_path="/a",
        prompt_version=prompt,
        dataset_version=data,
    )
    b = Variant.objects.create(
        project=alice_project,
        name="absorbed-b",
        base_model=base,
        adapter_path="/b",
        prompt_version=prompt,
        dataset_version=data,
    )
    ensure_default_aliases(alice_project)
    production = Alias.objects.get(project=alice_project, name="production")
    return {
        "project": alice_project,
        "user": alice,
        "base": base,
        "prompt": prompt,
        "data": data,
        "suite": suite,
        "a": a,
        "b": b,
        "alias": production,
    }


def evaluated(world, variant, all_rules, *, retained_low=None, prompt=None, job=None, base_alone=False):
    """A finished run of the variant on the suite (and, with retained_low, its four-arm headline)."""
    run = EvalRun.objects.create(
        project=world["project"],
        suite=world["suite"],
        base_model=variant.base_model,
        variant=None if base_alone else variant,
        prompt_version=prompt,
        arm="" if prompt else "student",
        job=job,
        summary={
            "complete": True,
            "examples": 4,
            "metrics": {"all_rules": {"value": all_rules, "low": 0.0, "high": 1.0, "n": 4}},
        },
    )
    if retained_low is not None:
        ArmComparison.objects.create(
            project=world["project"],
            suite=world["suite"],
            variant=variant,
            headline={
                "metric": "all_rules",
                "retained": {
                    "value": retained_low + 0.2,
                    "low": retained_low,
                    "high": retained_low + 0.4,
                    "n": 4,
                },
            },
        )
    return run


def gate(world, **rules):
    alias = world["alias"]
    actions.update_gate(
        world["user"],
        alias,
        gating_suite=world["suite"],
        min_all_rules=rules.get("all_rules"),
        min_retained_lower=rules.get("retained"),
        max_regression=rules.get("regression"),
        log_requests=False,
    )
    alias.refresh_from_db()
    return alias


# --- the gate --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_promotes_when_the_gate_passes_and_tells_the_gateway_on_commit(
    world, django_capture_on_commit_callbacks
):
    alias = gate(world, all_rules=0.8, retained=0.5, regression=0.05)
    evaluated(world, world["a"], 0.9, retained_low=0.6)
    moved = []

    def receiver(sender, alias, **kwargs):
        moved.append(alias.variant_id)

    alias_moved.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            move = promote(world["user"], alias, world["a"])
            assert moved == []  # not before the commit
    finally:
        alias_moved.disconnect(receiver)
    assert moved == [world["a"].pk]
    assert move.action == AliasMove.PROMOTE and move.from_variant is None and move.to_variant == world["a"]
    assert move.user == world["user"] and move.verdict["passed"] is True
    checks = {c["name"]: c for c in move.verdict["checks"]}
    assert (
        checks["all-rules compliance"]["value"] == 0.9 and checks["all-rules compliance"]["threshold"] == 0.8
    )
    assert checks["prompt effect retained (lower bound)"]["value"] == 0.6
    assert checks["All rules vs holder"]["detail"] == "no current holder"
    assert Alias.objects.get(pk=alias.pk).variant == world["a"] and alias.variant == world["a"]


@pytest.mark.django_db
def test_a_failed_gate_refuses_and_writes_nothing(world):
    alias = gate(world, all_rules=0.8)
    evaluated(world, world["a"], 0.5)
    with pytest.raises(GateRefused, match=r"all-rules compliance: 0\.500 < minimum 0\.800") as exc:
        promote(world["user"], alias, world["a"])
    assert exc.value.verdict.passed is False
    assert AliasMove.objects.count() == 0 and Alias.objects.get(pk=alias.pk).variant is None


@pytest.mark.django_db
def test_the_gate_needs_a_finished_run_and_a_comparison(world):
    alias = gate(world, all_rules=0.5, retained=0.5)
    verdict = evaluate_gate(alias, world["a"])
    assert not verdict.passed
    assert "has no finished eval run on “held out”" in verdict.checks[0].detail
    # A run whose job has not succeeded does not count.
    job = Job.objects.create(project=world["project"], kind="eval", status=Job.RUNNING)
    evaluated(world, world["a"], 0.9, job=job)
    assert evaluate_gate(alias, world["a"]).checks[0].passed is False
    Job.objects.filter(pk=job.pk).update(status=Job.SUCCEEDED)
    verdict = evaluate_gate(alias, world["a"])
    assert [c.passed for c in verdict.checks] == [True, True, False]
    assert verdict.checks[2].detail == "no four-arm comparison for this variant on “held out”"
    # A base model is a variant too: its run is the base alone, and it has no four arms.
    base = next(v for v in ensure_base_variants(world["project"]) if v.base_model == world["base"])
    evaluated(world, base, 1.0, base_alone=True)
    checks = evaluate_gate(alias, base).checks
    assert [c.passed for c in checks] == [True, True, False] and "no four-arm comparison" in checks[2].detail


@pytest.mark.django_db
def test_a_prompted_variant_is_judged_on_its_run_with_the_prompt(world):
    alias = gate(world, all_rules=0.8)
    prompted = Variant.objects.create(
        project=world["project"],
        name="base+prompt",
        base_model=world["base"],
        prompt_version=world["prompt"],
        prepend_prompt=True,
    )
    evaluated(world, prompted, 0.3, base_alone=True)  # the base without the prompt: not how it is served
    assert not evaluate_gate(alias, prompted).checks[0].passed
    evaluated(world, prompted, 0.95, prompt=world["prompt"], base_alone=True)
    assert evaluate_gate(alias, prompted).passed


@pytest.mark.django_db
def test_without_a_gating_suite_there_is_nothing_to_check(world):
    verdict = evaluate_gate(world["alias"], world["a"])
    assert verdict.passed and verdict.checks[0].detail == "no gating suite: nothing to check"
    assert promote(None, world["alias"], world["a"]).action == AliasMove.PROMOTE


@pytest.mark.django_db
def test_the_candidate_may_not_be_worse_than_the_holder_by_more_than_the_margin(world):
    alias = gate(world, regression=0.05)
    evaluated(world, world["a"], 0.9)
    evaluated(world, world["b"], 0.8)
    promote(world["user"], alias, world["a"])
    verdict = evaluate_gate(alias, world["b"])
    check = verdict.checks[-1]
    assert not verdict.passed and check.value == 0.8 and check.threshold == pytest.approx(0.85)
    assert "candidate 0.800 vs holder absorbed-a 0.900" in check.detail
    gate(world, regression=0.15)
    assert evaluate_gate(alias, world["b"]).passed


@pytest.mark.django_db
def test_overriding_a_failed_gate_needs_a_reason_and_is_audited(world):
    alias = gate(world, all_rules=0.8)
    evaluated(world, world["a"], 0.5)
    with pytest.raises(ActionError, match="Overriding the gate needs a reason"):
        promote(world["user"], alias, world["a"], force=True, reason="  ")
    assert AliasMove.objects.count() == 0
    move = promote(world["user"], alias, world["a"], force=True, reason="hotfix for the launch")
    assert move.action == AliasMove.OVERRIDE and move.reason == "hotfix for the launch"
    assert move.verdict["passed"] is False and move.verdict["checks"][1]["value"] == 0.5
    assert Alias.objects.get(pk=alias.pk).variant == world["a"]


@pytest.mark.django_db
def test_it_refuses_another_projects_variant_and_a_no_op(world, bob, bob_project):
    foreign = Variant.objects.create(
        project=bob_project, name="theirs", base_model=world["base"], adapter_path="/x"
    )
    with pytest.raises(ActionError, match="belongs to another project"):
        promote(world["user"], world["alias"], foreign)
    promote(world["user"], world["alias"], world["a"])
    with pytest.raises(ActionError, match="already points at absorbed-a"):
        promote(world["user"], world["alias"], world["a"])
    assert AliasMove.objects.count() == 1


@pytest.mark.django_db
def test_rollback_returns_to_the_previous_holder_and_back_again(world):
    alias = world["alias"]
    with pytest.raises(ActionError, match="never moved"):
        rollback(world["user"], alias)
    promote(world["user"], alias, world["a"])
    with pytest.raises(ActionError, match="no holder before absorbed-a"):
        rollback(world["user"], alias)
    promote(world["user"], alias, world["b"])
    move = rollback(world["user"], alias, "b answers in French")
    assert (move.action, move.from_variant, move.to_variant) == (AliasMove.ROLLBACK, world["b"], world["a"])
    assert Alias.objects.get(pk=alias.pk).variant == world["a"] and move.reason == "b answers in French"
    again = rollback(world["user"], alias)
    assert (again.from_variant, again.to_variant) == (world["a"], world["b"])
    assert list(alias.moves.values_list("action", flat=True)) == [
        "rollback",
        "rollback",
        "promote",
        "promote",
    ]


@pytest.mark.django_db(transaction=True)
def test_two_promotions_racing_on_one_alias_end_with_one_holder_and_two_audit_rows(world):
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (CI runs this with DATABASE_URL=postgres://...)")
    alias, a, b = world["alias"], world["a"], world["b"]
    for _ in range(3):  # the threads start together; which one wins varies
        AliasMove.objects.all().delete()
        Alias.objects.filter(pk=alias.pk).update(variant=None)
        run_together(
            lambda: promote(None, Alias.objects.get(pk=alias.pk), a),
            lambda: promote(None, Alias.objects.get(pk=alias.pk), b),
        )
        first, second = AliasMove.objects.order_by("id")
        assert {first.to_variant_id, second.to_variant_id} == {a.pk, b.pk} and first.from_variant_id is None
        assert second.from_variant_id == first.to_variant_id  # the second saw the first's move
        assert Alias.objects.get(pk=alias.pk).variant_id == second.to_variant_id


# --- variants ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_base_model_is_a_variant_once(world):
    FoundationModel.objects.create(name="other-base", path="/models/other")
    first = ensure_base_variants(world["project"])
    again = ensure_base_variants(world["project"])
    assert sorted(v.name for v in first) == ["other-base", "tiny-base"] == sorted(v.name for v in again)
    assert all(v.is_base and not v.adapter_path and not v.prepend_prompt for v in again)
    assert Variant.objects.filter(project=world["project"]).count() == 4


@pytest.mark.django_db
def test_the_variants_page_shows_lineage_stale_and_aliases(world, alice_client):
    promote(world["user"], world["alias"], world["a"])
    newer = save_prompt(world["project"], world["user"], "support", "Start with Hello. Be brief.").version
    page = alice_client.get(reverse("serving_variants", args=[world["project"].slug])).content.decode()
    row_a = page.split(f'id="variant-{world["a"].pk}"')[1].split("</tr>")[0]
    assert "stale" in row_a and f"?prompt_version={newer.pk}&amp;base_model={world['base'].pk}" in row_a
    assert "/a" in row_a and "production" in row_a and str(world["prompt"]) in row_a
    assert "tiny-base" in page and '<span class="pill">base</span>' in page
    detail = alice_client.get(
        reverse("variant_detail", args=[world["project"].slug, world["a"].pk])
    ).content.decode()
    assert 'id="stale"' in detail and "production" in detail
    absorb = alice_client.get(
        reverse("job_list", args=[world["project"].slug]),
        {"prompt_version": newer.pk, "base_model": world["base"].pk},
    )
    assert absorb.context["form"].initial["prompt_version"] == str(newer.pk)


@pytest.mark.django_db
def test_earlier_epochs_fold_under_the_variant_their_fine_tune_made(world, alice_client):
    job = Job.objects.create(
        project=world["project"], kind="finetune", status=Job.SUCCEEDED, variant=world["a"]
    )
    epoch = Variant.objects.create(
        project=world["project"],
        name="absorbed-a epoch 1",
        base_model=world["base"],
        adapter_path="/a/epochs/epoch-1",
        prompt_version=world["prompt"],
        metrics={"checkpoint_of_job": job.pk, "step": 3},
    )
    orphan = Variant.objects.create(  # its fine-tune's final variant is gone: a row of its own
        project=world["project"],
        name="gone epoch 1",
        base_model=world["base"],
        adapter_path="/gone/epochs/epoch-1",
        metrics={"checkpoint_of_job": job.pk + 1000},
    )
    promote(world["user"], world["alias"], epoch)
    page = alice_client.get(reverse("serving_variants", args=[world["project"].slug])).content.decode()
    row_a = page.split(f'id="variant-{world["a"].pk}"')[1].split("</tr>")[0]
    assert "1 earlier epoch" in row_a and f'id="variant-{epoch.pk}"' in row_a and "production" in row_a
    assert f'<tr id="variant-{epoch.pk}"' not in page and f'<tr id="variant-{orphan.pk}"' in page


@pytest.mark.django_db
def test_the_serving_pages_use_constant_queries(world, alice_client):
    from django.db import connection as conn
    from django.test.utils import CaptureQueriesContext

    slug = world["project"].slug
    urls = [
        reverse("serving_variants", args=[slug]),
        reverse("serving_home", args=[slug]),
        reverse("serving_alias", args=[slug, "production"]),
    ]

    def counts():
        result = []
        for url in urls:
            with CaptureQueriesContext(conn) as ctx:
                assert alice_client.get(url).status_code == 200
            result.append(len(ctx.captured_queries))
        return result

    promote(world["user"], world["alias"], world["a"])
    counts()  # the first visit makes the base variants
    few = counts()
    for i in range(15):
        v = Variant.objects.create(
            project=world["project"],
            name=f"v{i}",
            base_model=world["base"],
            adapter_path=f"/v{i}",
            prompt_version=world["prompt"],
            dataset_version=world["data"],
        )
        Job.objects.create(project=world["project"], kind="finetune", variant=v, status=Job.SUCCEEDED)
        promote(world["user"], world["alias"], v)
    assert counts() == few


# --- pages -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_confirm_page_shows_the_verdict_numbers_before_anything_moves(world, alice_client):
    gate(world, all_rules=0.8)
    evaluated(world, world["a"], 0.5)
    url = reverse("serving_promote", args=[world["project"].slug])
    page = alice_client.get(url, {"alias": "production", "variant": world["a"].pk})
    text = page.content.decode()
    assert page.status_code == 200 and "failed" in text and "0.500" in text and "0.800" in text
    assert "Override the gate and promote" in text and AliasMove.objects.count() == 0
    refused = alice_client.post(
        url, {"alias": "production", "variant": world["a"].pk, "force": "on", "reason": ""}
    )
    assert refused.status_code == 400 and "needs a reason" in refused.content.decode()
    assert AliasMove.objects.count() == 0
    done = alice_client.post(
        url,
        {
            "alias": "production",
            "variant": world["a"].pk,
            "force": "on",
            "reason": "the suite is out of date",
        },
    )
    assert done.status_code == 302
    move = AliasMove.objects.get()
    assert (
        move.action == "override" and move.reason == "the suite is out of date" and move.user == world["user"]
    )
    history = alice_client.get(done["Location"]).content.decode()
    assert "the suite is out of date" in history and "promote (gate overridden)" in history


@pytest.mark.django_db
def test_a_passing_gate_promotes_from_the_page_and_the_alias_page_rolls_back(world, alice_client):
    gate(world, all_rules=0.8)
    evaluated(world, world["a"], 0.9)
    evaluated(world, world["b"], 0.95)
    slug, url = world["project"].slug, reverse("serving_promote", args=[world["project"].slug])
    assert alice_client.post(url, {"alias": "production", "variant": world["b"].pk + 99}).status_code == 404
    # The gate is judged again on confirm: tightened in between, it refuses and the page says why.
    assert (
        "passed" in alice_client.get(url, {"alias": "production", "variant": world["a"].pk}).content.decode()
    )
    gate(world, all_rules=0.92)
    refused = alice_client.post(url, {"alias": "production", "variant": world["a"].pk})
    assert refused.status_code == 400 and "0.900 &lt; minimum 0.920" in refused.content.decode()
    assert AliasMove.objects.count() == 0
    gate(world, all_rules=0.8)
    for v in (world["a"], world["b"]):
        assert "passed" in alice_client.get(url, {"alias": "production", "variant": v.pk}).content.decode()
        assert alice_client.post(url, {"alias": "production", "variant": v.pk}).status_code == 302
    assert alice_client.post(reverse("serving_alias_rollback", args=[slug, "production"])).status_code == 302
    assert Alias.objects.get(pk=world["alias"].pk).variant == world["a"]
    home = alice_client.get(reverse("serving_home", args=[slug])).content.decode()
    assert "absorbed-a" in home and "held out" in home and "rollback by alice" in home


@pytest.mark.django_db
def test_gate_settings_and_custom_aliases_from_the_pages(world, alice_client, bob, bob_project):
    slug = world["project"].slug
    r = alice_client.post(reverse("serving_alias_create", args=[slug]), {"name": "canary"})
    assert r.status_code == 302 and Alias.objects.filter(project=world["project"], name="canary").exists()
    assert (
        alice_client.post(reverse("serving_alias_create", args=[slug]), {"name": "canary"}).status_code == 400
    )
    url = reverse("serving_alias_gate", args=[slug, "canary"])
    r = alice_client.post(
        url,
        {
            "gating_suite": world["suite"].pk,
            "min_all_rules": "0.9",
            "max_regression": "0.02",
        },
    )
    canary = Alias.objects.get(name="canary")
    assert r.status_code == 302 and canary.gating_suite == world["suite"] and canary.min_all_rules == 0.9
    assert canary.max_regression == 0.02 and canary.min_retained_lower is None and not canary.log_requests
    # The request log is its own setting on the alias page, not part of the gate.
    r = alice_client.post(reverse("serving_alias_logging", args=[slug, "canary"]), {"log_requests": "on"})
    assert r.status_code == 302 and Alias.objects.get(name="canary").log_requests
    r = alice_client.post(url, {"min_all_rules": "1.5", "gating_suite": world["suite"].pk})
    assert r.status_code == 400 and "between 0 and 1" in r.content.decode()
    theirs = create_suite(
        bob_project,
        bob,
        "theirs",
        import_dataset(
            bob_project, bob, "q", io.BytesIO(QUERIES.encode()), filename="q.txt", eval_percent=50
        ),
    )
    assert alice_client.post(url, {"gating_suite": theirs.pk}).status_code == 400
    assert Alias.objects.get(name="canary").gating_suite == world["suite"]


@pytest.mark.django_db
def test_another_team_gets_404_on_every_serving_page(world, bob, client):
    promote(world["user"], world["alias"], world["a"])
    client.force_login(bob)
    slug = world["project"].slug
    for url in (
        reverse("serving_home", args=[slug]),
        reverse("serving_variants", args=[slug]),
        reverse("serving_keys", args=[slug]),
        reverse("serving_alias", args=[slug, "production"]),
        reverse("serving_promote", args=[slug]) + f"?alias=production&variant={world['b'].pk}",
    ):
        assert client.get(url).status_code == 404, url
    for url, data in (
        (reverse("serving_alias_create", args=[slug]), {"name": "mine"}),
        (reverse("serving_alias_gate", args=[slug, "production"]), {}),
        (reverse("serving_alias_rollback", args=[slug, "production"]), {}),
        (reverse("serving_promote", args=[slug]), {"alias": "production", "variant": world["b"].pk}),
        (reverse("serving_keys", args=[slug]), {"name": "k"}),
    ):
        assert client.post(url, data).status_code == 404, url
    assert AliasMove.objects.count() == 1 and Alias.objects.get(pk=world["alias"].pk).variant == world["a"]
    assert not world["project"].api_keys.exists() and not Alias.objects.filter(name="mine").exists()


# --- commands ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_promote_command_prints_the_verdict_and_fails_with_exit_code_1(world, capsys):
    gate(world, all_rules=0.8)
    evaluated(world, world["a"], 0.5)
    slug, a = world["project"].slug, world["a"]
    with pytest.raises(CommandError, match="all-rules compliance") as exc:
        call_command("promote", "--project", slug, "--alias", "production", "--variant", str(a.pk), "--json")
    assert exc.value.returncode == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["action"] == "refused" and refused["verdict"]["passed"] is False
    with pytest.raises(CommandError, match="needs a reason"):
        call_command("promote", "--project", slug, "--alias", "production", "--variant", str(a.pk), "--force")
    capsys.readouterr()
    call_command(
        "promote",
        "--project",
        slug,
        "--alias",
        "production",
        "--variant",
        str(a.pk),
        "--force",
        "--reason",
        "known gap",
        "--user",
        "alice",
        "--json",
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        out
        == {
            "alias": "production",
            "variant": a.pk,
            "action": "override",
            "from": None,
            "verdict": out["verdict"],
        }
        and out["verdict"]["checks"][1]["value"] == 0.5
    )
    assert AliasMove.objects.get().user == world["user"]
    evaluated(world, world["b"], 0.9)
    call_command("promote", "--project", slug, "--alias", "production", "--variant", str(world["b"].pk))
    text = capsys.readouterr().out
    assert (
        "PASS all-rules compliance: 0.900 ≥ minimum 0.800" in text
        and "promote absorbed-a -> absorbed-b" in text
    )
    call_command("rollback", "--project", slug, "--alias", "production", "--json")
    assert json.loads(capsys.readouterr().out) == {
        "alias": "production",
        "variant": a.pk,
        "action": "rollback",
        "from": world["b"].pk,
    }


@pytest.mark.django_db
def test_the_commands_name_what_is_unknown(world, bob_project):
    slug = world["project"].slug
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("promote", "--project", "nope", "--alias", "production", "--variant", "1")
    with pytest.raises(
        CommandError, match=r"No alias 'prod' in project alpha \(aliases: production, staging\)"
    ):
        call_command("promote", "--project", slug, "--alias", "prod", "--variant", str(world["a"].pk))
    with pytest.raises(CommandError, match=f"No variant {world['a'].pk} in project bravo"):
        call_command(
            "promote", "--project", bob_project.slug, "--alias", "production", "--variant", str(world["a"].pk)
        )
    with pytest.raises(CommandError, match="No user 'carol'"):
        call_command(
            "promote",
            "--project",
            slug,
            "--alias",
            "production",
            "--variant",
            str(world["a"].pk),
            "--user",
            "carol",
        )
    with pytest.raises(CommandError, match="never moved"):
        call_command("rollback", "--project", slug, "--alias", "production")


@pytest.mark.django_db
def test_list_variants_lists_every_variant_base_ones_included(world, capsys):
    promote(world["user"], world["alias"], world["a"])
    save_prompt(world["project"], world["user"], "support", "Start with Hello. Be brief.")
    call_command("list_variants", "--project", world["project"].slug, "--json")
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"absorbed-a", "absorbed-b", "tiny-base"}
    assert (
        rows["tiny-base"]["adapter"] is None
        and rows["tiny-base"]["is_base"]
        and not rows["tiny-base"]["stale"]
    )
    a = rows["absorbed-a"]
    assert a["id"] == world["a"].pk and a["adapter"] == "/a" and a["base_model"] == "tiny-base"
    assert a["prompt_version"] == world["prompt"].pk and a["stale"] and a["aliases"] == ["production"]
    call_command("list_variants", "--project", world["project"].slug)
    assert "STALE" in capsys.readouterr().out
