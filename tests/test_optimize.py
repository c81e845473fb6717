"""Objectives instead of settings (serving.pipeline.search.py): the spec's
search section is checked with its line; the shortfall weighs each
objective; the stopping rule (met, budget, max trials) holds with the trials
faked, and on the tiny model a search runs its trials through a real worker,
reuses the teacher across training-only trials and promotes the best one."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from jobs.models import Job
from serving.models import Alias
from serving.pipeline.search import Optimizer, measure, shortfall, space_of
from tests import test_apply
from tests.test_apply import SPEC
from workbench.pipeline import SpecError, parse_spec

# tests/test_apply.py's spec folder (prompt, rules, data files), used here by name.
spec = test_apply.spec

SEARCH = """\
objectives:
  min_all_rules: 0.9
  max_prompt_tokens: 20
search:
  budget_minutes: 30
  max_trials: 3
  space:
    training.learning_rate: [0.0001, 0.0003]
"""


def search_spec(folder: Path, extra: str = SEARCH):
    return parse_spec(SPEC + extra, "spec.yaml", folder)


# --- the spec -----------------------------------------------------------------------------------


def test_a_search_names_real_settings_and_values_they_take(spec):
    with pytest.raises(SpecError) as err:
        search_spec(
            spec.parent,
            """\
objectives: {min_all_rules: 0.9}
search:
  budget_minutes: 10
  space:
    training.epoch: [1, 2]
    training.rank: [8, 0]
    curation.best_of: [1, 99]
""",
        )
    problems = "\n".join(err.value.problems)
    assert (
        "line 27: search.space.training.epoch: not a training or curation setting (did you mean" in problems
    )
    assert "search.space.training.rank[1]: must be >= 1, got 0" in problems
    assert "search.space.curation.best_of[1]: best_of must be" not in problems  # the key is not repeated
    assert "search.space.curation.best_of[1]: must be a whole number from 1 to 16, got 99" in problems
    with pytest.raises(SpecError, match="a search needs objectives to meet"):
        search_spec(spec.parent, "search: {budget_minutes: 10}\n")
    with pytest.raises(SpecError, match=r"objectives.min_all_rules: must be a number"):
        search_spec(spec.parent, "objectives: {min_all_rules: high}\nsearch: {budget_minutes: 10}\n")


def test_the_spec_own_settings_are_among_the_values_tried(spec):
    space = space_of(search_spec(spec.parent))
    assert space == {"training.learning_rate": [0.001, 0.0001, 0.0003]}  # TrainConfig's default first
    assert space_of(search_spec(spec.parent, SEARCH.replace("[0.0001, 0.0003]", "[0.001, 0.0003]"))) == {
        "training.learning_rate": [0.001, 0.0003]
    }


# --- the shortfall ------------------------------------------------------------------------------


def test_the_shortfall_is_zero_only_when_every_objective_is_met():
    objectives = {"min_all_rules": 0.9, "max_prompt_tokens": 100, "max_skills_drop": 0.02}
    met = {"min_all_rules": 0.95, "max_prompt_tokens": 44, "max_skills_drop": 0.0}
    assert shortfall(objectives, met) == (0.0, [])
    total, unmet = shortfall(objectives, {**met, "min_all_rules": 0.7, "max_prompt_tokens": 150})
    assert total == pytest.approx(0.2 + 0.5)  # a share by its gap, tokens by the gap's share of the bound
    assert unmet == ["all_rules 0.7 (wants >= 0.9)", "prompt_tokens 150 (wants <= 100)"]
    total, unmet = shortfall(objectives, {**met, "max_skills_drop": None})
    assert total == 1.0 and unmet == ["skills_drop not measured"]


def test_measure_reads_the_student_and_the_headline():
    runs = {
        "student": SimpleNamespace(
            arm="student",
            summary={
                "metrics": {"all_rules": {"value": 0.8}, "fact_recall": {"value": 0.4}},
                "latency": {"p50": 1.5},
                "prompt_tokens": 44,
            },
        )
    }
    runs["student"].metric = lambda name: runs["student"].summary["metrics"].get(name)
    comparison = SimpleNamespace(
        runs=SimpleNamespace(all=lambda: runs.values()),
        headline={
            "retained": {"value": 1.1},
            "lm_eval": {"skills": {"value": -0.05}, "other": {"value": 0.01}},
        },
    )
    assert measure(comparison) == {
        "min_all_rules": 0.8,
        "min_retained": 1.1,
        "min_fact_recall": 0.4,
        "max_skills_drop": 0.05,
        "max_latency_p50": 1.5,
        "max_prompt_tokens": 44.0,
    }


# --- the stopping rule, trials faked -------------------------------------------------------------


@dataclass
class Fake:
    """Plans and runs of the optimizer faked: each trial 'costs' its estimate on a fake clock and
    scores what `scores` says for its learning rate."""

    scores: dict[float, float]
    estimate: float = 60.0
    now: float = 0.0
    ran: list[dict[str, Any]] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def optimizer(self, spec) -> Optimizer:
        fake = self

        class Faked(Optimizer):
            def plan(self, settings, promote=False):
                return SimpleNamespace(
                    seconds=fake.estimate, steps=[], settings=settings, prompt_version=None
                )

            def check(self, first):
                pass

        def run(plan):
            self.ran.append(plan.settings)
            self.now += self.estimate
            rules = self.scores[plan.settings["training.learning_rate"]]
            comparison = SimpleNamespace(pk=len(self.ran))
            return SimpleNamespace(
                comparison=comparison, variant=SimpleNamespace(pk=len(self.ran)), rules=rules
            )

        optimizer = Faked(spec, run, lambda _line: None, self.clock)
        return optimizer


@pytest.fixture
def fake_measure(monkeypatch):
    """measure() of a faked outcome: its all-rules score, 10 prompt tokens."""
    scores = {}

    def measured(comparison):
        return {"min_all_rules": scores[comparison.pk], "max_prompt_tokens": 10.0}

    monkeypatch.setattr("serving.pipeline.search.measure", measured)
    return scores


def run_search(spec, fake: Fake, fake_measure, extra=SEARCH):
    optimizer = fake.optimizer(search_spec(spec.parent, extra))
    original = optimizer.run_plan

    def run(plan):
        outcome = original(plan)
        fake_measure[outcome.comparison.pk] = outcome.rules
        return outcome

    optimizer.run_plan = run
    return optimizer.search()


def test_it_stops_at_the_first_trial_that_meets_every_objective(spec, fake_measure):
    fake = Fake({0.001: 0.95, 0.0001: 0.5, 0.0003: 0.5})
    result = run_search(spec, fake, fake_measure)
    assert [t.number for t in result.trials] == [1] and result.stopped == "trial 1 meets every objective"
    assert fake.ran == [{"training.learning_rate": 0.001}]  # trial 1: the spec's own settings
    assert result.best.number == 1 and result.best.met


def test_it_stops_after_max_trials_and_picks_the_smallest_shortfall(spec, fake_measure):
    fake = Fake({0.001: 0.5, 0.0001: 0.7, 0.0003: 0.6})
    result = run_search(spec, fake, fake_measure, SEARCH.replace("max_trials: 3", "max_trials: 6"))
    assert len(result.trials) == 6 and result.stopped.startswith("tried 6 trials")
    ran = [t for t in result.trials if t.same_as is None]
    assert {t.settings["training.learning_rate"] for t in ran} == {0.001, 0.0001, 0.0003}
    assert len(ran) == 3 and len(fake.ran) == 3  # settings asked again are not run again
    assert result.best.settings == {"training.learning_rate": 0.0001}
    assert result.best.unmet == ["all_rules 0.7 (wants >= 0.9)"]


def test_it_starts_no_trial_whose_estimate_exceeds_what_is_left_of_the_budget(spec, fake_measure):
    # 30 minutes; each trial takes 20: the second would end past the budget.
    fake = Fake({0.001: 0.5, 0.0001: 0.7, 0.0003: 0.6}, estimate=1200)
    result = run_search(spec, fake, fake_measure)
    assert len(result.trials) == 1 and len(fake.ran) == 1
    assert result.stopped == "budget: trial 2 would take about 1200 s, 600 s of the budget are left"
    assert result.best.number == 1


def test_it_stops_when_the_budget_is_spent(spec, fake_measure):
    fake = Fake({0.001: 0.5, 0.0001: 0.7, 0.0003: 0.6}, estimate=100)
    optimizer_spec = SEARCH.replace("budget_minutes: 30", "budget_minutes: 1")
    result = run_search(spec, fake, fake_measure, optimizer_spec)  # trial 1 (100 s) overran the 60 s
    assert len(result.trials) == 1 and result.stopped == "budget: 60 s spent after trial 1"


# --- on the tiny model ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_search_on_the_tiny_model_reuses_the_teacher_and_promotes_the_best(spec, alice, worker):
    spec.write_text(
        SPEC
        + """\
objectives:
  max_prompt_tokens: 1
search:
  budget_minutes: 60
  max_trials: 2
  space:
    training.learning_rate: [0.0003]
"""
    )
    dry = io.StringIO()
    call_command("apply", str(spec), "--dry-run", stdout=dry)
    assert "then a search of up to 2 trials within 60 minutes" in dry.getvalue()
    out = io.StringIO()
    with pytest.raises(CommandError, match="not promoted: no trial met every objective; the best, trial 1"):
        call_command("apply", str(spec), "--user", "alice", "--json", stdout=out, stderr=io.StringIO())
    result = json.loads(out.getvalue())
    search = result["search"]
    assert [t["settings"] for t in search["trials"]] == [
        {"training.learning_rate": 0.001},
        {"training.learning_rate": 0.0003},
    ]
    assert search["stopped"] == "tried 2 trials (max_trials) without meeting every objective"
    first, second = search["trials"]
    assert first["metrics"]["max_prompt_tokens"] > 1 and not first["met"]
    assert "teacher" in second["reused"]  # a training-only change reuses the teacher's answers
    assert (
        Job.objects.filter(kind="teacher").count() == 1 and Job.objects.filter(kind="finetune").count() == 2
    )
    assert search["best"] == 1  # equal shortfalls: the earliest
    assert result["outcome"]["variant"]["id"] == first["variant"] and result["outcome"]["promoted"] is False
    assert not Alias.objects.filter(project__slug="pirates", variant__isnull=False).exists()

    # Objectives the first trial meets: it stops there and promotes it, reusing every step.
    spec.write_text(spec.read_text().replace("max_prompt_tokens: 1", "max_prompt_tokens: 10000"))
    out = io.StringIO()
    call_command("apply", str(spec), "--user", "alice", "--json", stdout=out, stderr=io.StringIO())
    again = json.loads(out.getvalue())
    assert again["search"]["stopped"] == "trial 1 meets every objective"
    assert again["search"]["trials"][0]["reused"] == ["teacher", "fine-tune", "eval"]
    assert Alias.objects.get(project__slug="pirates", name="staging").variant_id == first["variant"]
    assert Job.objects.filter(kind="finetune").count() == 2  # nothing trained again


def test_a_search_asked_again_asks_the_same_trials(spec, fake_measure):
    """The browser's run replays a search at each advance: with the same finished trials, a new
    optimizer (the sampler seeded) must ask the same settings in the same order."""
    wide = SEARCH.replace("max_trials: 3", "max_trials: 6").replace(
        "    training.learning_rate: [0.0001, 0.0003]\n",
        "    training.learning_rate: [0.0001, 0.0003]\n    training.rank: [4, 8, 32]\n    training.epochs: [1, 2, 3]\n",
    )
    scores = {0.001: 0.5, 0.0001: 0.6, 0.0003: 0.7}
    runs = [run_search(spec, Fake(dict(scores)), fake_measure, wide) for _ in range(2)]
    first, second = ([t.settings for t in r.trials] for r in runs)
    assert len(first) == 6 and first == second
    assert len({repr(sorted(s.items())) for s in first}) > 2  # the sampler did move
