"""The promotion gate on general-skills forgetting (issue 20 item 5): the
largest drop in general skills (student - floor on the gating suite's
general_skills lm-eval task, from the latest four-arm comparison) an alias
accepts. The comparisons are recorded directly: no model runs."""

import io

import pytest
from django.urls import reverse

from evals import actions as eval_actions
from evals.models import ArmComparison, EvalRun
from serving import actions as serving_actions
from serving.actions import GateRefused, ensure_default_aliases, promote
from serving.gate import evaluate_gate
from serving.models import Alias, AliasMove
from workbench.actions import ActionError
from workbench.actions.datasets import import_dataset
from workbench.models import FoundationModel, Variant

QUERIES = [f"How do I {verb} my {thing}?" for verb in ("reset", "close") for thing in ("password", "account")]
CHECK = "general skills drop"


@pytest.fixture
def gated(alice, alice_project):
    base = FoundationModel.objects.create(name="tiny-base", path="/models/tiny")
    rows = io.BytesIO("\n".join(QUERIES).encode())
    data = import_dataset(alice_project, alice, "q", rows, filename="q.txt", eval_percent=50)
    suite = eval_actions.create_suite(
        alice_project, alice, "held out", data, lm_eval_tasks=["general_skills"]
    )
    bare = eval_actions.create_suite(alice_project, alice, "no skills", data)
    variant = Variant.objects.create(
        project=alice_project, name="absorbed", base_model=base, adapter_path="/a"
    )
    ensure_default_aliases(alice_project)
    alias = Alias.objects.get(project=alice_project, name="production")
    return {"suite": suite, "bare": bare, "variant": variant, "alias": alias, "user": alice}


def set_gate(gated, suite=None, **fields):
    alias = gated["alias"]
    serving_actions.update_gate(
        gated["user"],
        alias,
        gating_suite=suite or gated["suite"],
        min_all_rules=None,
        min_retained_lower=None,
        max_regression=None,
        log_requests=False,
        **fields,
    )
    alias.refresh_from_db()
    return alias


def record(gated, change, suite=None, skills=True):
    """A finished student run and a four-arm headline whose general_skills
    student - floor difference is `change` (negative: skills lost)."""
    suite, variant = suite or gated["suite"], gated["variant"]
    EvalRun.objects.create(
        project=suite.project,
        suite=suite,
        base_model=variant.base_model,
        variant=variant,
        arm="student",
        summary={"complete": True, "examples": 2, "metrics": {}},
    )
    headline = {"metric": "judge", "retained": {"value": 1.0, "low": 0.5, "high": 1.0, "n": 2}}
    if skills:
        diff = {"value": change, "low": change - 0.05, "high": change + 0.05, "n": 40, "note": ""}
        headline["lm_eval"] = {"general_skills": diff}
    return ArmComparison.objects.create(
        project=suite.project, suite=suite, variant=variant, headline=headline
    )


@pytest.mark.django_db
def test_the_gate_refuses_a_drop_above_the_bar_and_passes_one_below(gated):
    alias = set_gate(gated, max_skills_drop=0.03)
    assert alias.max_skills_drop == 0.03
    comparison = record(gated, -0.10)
    verdict = evaluate_gate(alias, gated["variant"])
    [check] = verdict.failed
    assert check.name == CHECK and check.value == pytest.approx(0.10) and check.threshold == 0.03
    assert check.detail == (
        f"comparison {comparison.pk}: student − floor on general_skills -0.100 [-0.150, -0.050]; "
        "drop 0.100 > largest allowed 0.030"
    )
    assert verdict.comparison_id == comparison.pk
    with pytest.raises(GateRefused, match=r"general skills drop: .*drop 0\.100 > largest allowed 0\.030"):
        promote(gated["user"], alias, gated["variant"])
    assert Alias.objects.get(pk=alias.pk).variant is None and not AliasMove.objects.exists()

    record(gated, -0.02)  # the latest comparison is the one that counts
    move = promote(gated["user"], alias, gated["variant"])
    assert move.action == AliasMove.PROMOTE and Alias.objects.get(pk=alias.pk).variant == gated["variant"]
    checks = {c["name"]: c for c in move.verdict["checks"]}
    assert checks[CHECK]["passed"] is True
    assert checks[CHECK]["value"] == pytest.approx(0.02) and checks[CHECK]["threshold"] == 0.03
    assert "drop 0.020 ≤ largest allowed 0.030" in checks[CHECK]["detail"]


@pytest.mark.django_db
def test_a_gain_in_skills_passes_even_a_zero_bar(gated):
    alias = set_gate(gated, max_skills_drop=0.0)
    record(gated, 0.05)
    verdict = evaluate_gate(alias, gated["variant"])
    assert verdict.passed and verdict.checks[-1].value == pytest.approx(-0.05)


@pytest.mark.django_db
def test_the_gate_fails_clearly_without_a_general_skills_result(gated):
    alias = set_gate(gated, suite=gated["bare"], max_skills_drop=0.03)
    failed = {c.name: c.detail for c in evaluate_gate(alias, gated["variant"]).failed}
    assert failed[CHECK] == "no four-arm comparison for this variant on “no skills”"

    comparison = record(gated, 0.0, suite=gated["bare"], skills=False)
    [check] = evaluate_gate(alias, gated["variant"]).failed
    assert check.name == CHECK and check.value is None and check.threshold == 0.03
    assert check.detail == (
        f"comparison {comparison.pk}: no general_skills result: "
        "add the general_skills task to the gating suite “no skills”"
    )

    # The suite has the task but the comparison recorded no estimate for it.
    alias = set_gate(gated, max_skills_drop=0.03)
    record(gated, 0.0, skills=False)
    [check] = evaluate_gate(alias, gated["variant"]).failed
    assert "no general_skills result (did the floor and student lm-eval runs finish?)" in check.detail


@pytest.mark.django_db
def test_update_gate_validates_the_bar_and_keeps_old_callers_working(gated):
    for bad in (-0.1, 1.5):
        with pytest.raises(ActionError, match="largest drop in general skills must be between 0 and 1"):
            set_gate(gated, max_skills_drop=bad)
    with pytest.raises(ActionError, match="need a gating suite"):
        serving_actions.update_gate(
            gated["user"],
            gated["alias"],
            gating_suite=None,
            min_all_rules=None,
            min_retained_lower=None,
            max_regression=None,
            log_requests=False,
            max_skills_drop=0.03,
        )
    set_gate(gated, max_skills_drop=0.03)
    alias = set_gate(gated)  # a caller that does not know the bar sets no bar
    assert alias.max_skills_drop is None
    record(gated, -0.5)
    assert evaluate_gate(alias, gated["variant"]).passed


@pytest.mark.django_db
def test_the_gate_form_takes_the_bar_and_the_home_page_shows_it(alice_client, gated):
    alias = gated["alias"]
    url = reverse("serving_alias_gate", args=[alias.project.slug, alias.name])
    form = {"gating_suite": gated["suite"].pk, "max_skills_drop": "0.03"}
    assert alice_client.post(url, form).status_code == 302
    alias.refresh_from_db()
    assert alias.max_skills_drop == 0.03
    detail = alice_client.get(reverse("serving_alias", args=[alias.project.slug, alias.name]))
    assert b'name="max_skills_drop"' in detail.content
    home = alice_client.get(reverse("serving_home", args=[alias.project.slug]))
    assert "skills drop ≤ 0.03" in home.content.decode()
    for bad in ("-1", "2"):
        r = alice_client.post(url, {**form, "max_skills_drop": bad})
        assert r.status_code == 400, bad
        assert "The largest drop in general skills must be between 0 and 1" in r.content.decode()
    alias.refresh_from_db()
    assert alias.max_skills_drop == 0.03


@pytest.mark.django_db
def test_another_projects_alias_is_a_404(gated, bob, client):
    alias = gated["alias"]
    client.force_login(bob)
    url = reverse("serving_alias_gate", args=[alias.project.slug, alias.name])
    r = client.post(url, {"gating_suite": gated["suite"].pk, "max_skills_drop": "0.5"})
    assert r.status_code == 404
    assert client.get(reverse("serving_alias", args=[alias.project.slug, alias.name])).status_code == 404
    alias.refresh_from_db()
    assert alias.max_skills_drop is None
