from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Page, Paginator
from django.db.models import Count, F, FilteredRelation, Q, TextField, Value
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Coalesce
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from engines.evaluation import ARMS, judge_human_agreement
from evals import actions
from evals.forms import (
    BlindRatingForm,
    ComparisonForm,
    RatingForm,
    RunForm,
    RunPairForm,
    SuiteForm,
    error_text,
)
from evals.models import (
    ArmComparison,
    EvalResult,
    EvalRun,
    EvalSuite,
    Rating,
    metric_label,
    retained_reason,
    undecided,
)
from jobs.actions import AlreadyStarted
from jobs.models import Job
from workbench.actions import ActionError
from workbench.forms import with_form_token
from workbench.models import Project
from workbench.shortcuts import AuthedHttpRequest, get_for_project, get_project

RUNS = EvalRun.objects.select_related("project", "job", "variant", "prompt_version__prompt", "base_model")


def _json(data: Any) -> str:
    # For a <script type="application/json"> element: no "<" may end it early.
    return json.dumps(data).replace("<", "\\u003c")


def metric_axis(name: str) -> dict[str, float]:
    """The range of a metric's axis: the judge scores 1-10, every other
    metric is a share of answers or a similarity, 0-1."""
    if name == "judge":
        return {"min": 1.0, "max": 10.0}
    return {"min": 0.0, "max": 1.0}


def suite_charts(runs: list[EvalRun], rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """What the suite page draws: the ranked metric with its CI, quality
    against latency and prompt tokens (each point named), and every rule's
    compliance per run (a cell per pair, with its value)."""
    names = {k for r in runs for k in (r.summary.get("metrics") or {})}
    done = [r for r in rows if r["value"] is not None]
    rules = sorted(n for n in names if n.startswith("rule:")) + (
        ["all_rules"] if "all_rules" in names else []
    )
    # Two runs of one variant and prompt are two rows, not one.
    twice = {r["run"].label for r in done if sum(o["run"].label == r["run"].label for o in done) > 1}
    label = {
        r["run"].pk: f"{r['run'].label} (run {r['run'].pk})" if r["run"].label in twice else r["run"].label
        for r in done
    }
    return {
        "metric": metric_label(metric),
        "axis": metric_axis(metric),
        "labels": [label[r["run"].pk] for r in done],
        "ci": [{"y": r["value"], "yMin": r["low"], "yMax": r["high"]} for r in done],
        "latency": [
            {"x": r["latency"], "y": r["value"], "label": label[r["run"].pk]} for r in done if r["latency"]
        ],
        "tokens": [
            {"x": r["prompt_tokens"], "y": r["value"], "label": label[r["run"].pk]}
            for r in done
            if r["prompt_tokens"] is not None
        ],
        "heat": [
            {
                "x": metric_label(rule),
                "y": label[r["run"].pk],
                "v": (r["run"].metric(rule) or {}).get("value"),
            }
            for r in done
            for rule in rules
        ],
        "rules": [metric_label(rule) for rule in rules],
    }


def comparison_chart(arms: list[tuple[str, EvalRun | None]], names: list[str]) -> dict[str, Any]:
    """The four arms side by side on every 0-1 check (rules, facts), with CIs."""
    checks = [n for n in names if n in ("all_rules", "fact_recall") or n.startswith(("rule:", "fact:"))]
    datasets = []
    for arm, run in arms:
        if run is None:
            continue
        points = []
        for n in checks:
            m = run.metric(n) or {}
            points.append({"y": m.get("value"), "yMin": m.get("low"), "yMax": m.get("high")})
        datasets.append({"arm": arm, "label": run.get_arm_display(), "data": points})
    return {
        "labels": [metric_label(n) for n in checks],
        "datasets": datasets,
        "axis": metric_axis("all_rules"),
    }


def _home_context(project: Project, suite_form: SuiteForm, run_form: RunForm) -> dict[str, Any]:
    return {
        "project": project,
        "suite_form": suite_form,
        "run_form": run_form,
        "suites": project.eval_suites.annotate(
            n_examples=Count("examples", distinct=True), n_runs=Count("runs", distinct=True)
        ),
        "comparisons": project.arm_comparisons.select_related("variant", "suite", "job")[:20],
    }


@login_required
def evals_home(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    return render(
        request,
        "evals/home.html",
        _home_context(project, SuiteForm(project), RunForm(project, initial=with_form_token())),
    )


@login_required
@require_POST
def suite_create(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    form = SuiteForm(project, request.POST)
    if form.is_valid():
        d = form.cleaned_data
        try:
            suite = actions.create_suite(
                project,
                request.user,
                d["name"],
                d["dataset_version"],
                prompt_version=d["prompt_version"],
                main_metric=d["main_metric"],
                judge=d["judge"],
                judge_base=d["judge_base"],
                judge_endpoint=d["judge_endpoint"],
                judge_rubric=d["judge_rubric"],
                lm_eval_tasks=d["lm_eval_tasks"],
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Suite “{suite.name}” created with {suite.examples.count()} queries.")
            return redirect(suite)
    return render(
        request,
        "evals/home.html",
        _home_context(project, form, RunForm(project, initial=with_form_token())),
        status=400,
    )


@login_required
@require_POST
def runs_start(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    form = RunForm(project, request.POST)
    if form.is_valid():
        d = form.cleaned_data
        suite = d["suite"]
        prompt = suite.prompt_version if d["with_prompt"] else None
        specs = [actions.RunSpec(v.base_model, v, prompt) for v in d["variants"]]
        specs += [actions.RunSpec(m, None, prompt) for m in d["base_models"]]
        try:
            runs = actions.start_runs(project, request.user, suite, specs, form_token=d.get("form_token"))
        except AlreadyStarted as exc:
            messages.info(request, f"{exc} Nothing new was queued.")
            return redirect(suite)
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"{len(runs)} eval run{'s' if len(runs) != 1 else ''} queued.")
            return redirect(suite)
    return render(request, "evals/home.html", _home_context(project, SuiteForm(project), form), status=400)


def _leaderboard(runs: list[EvalRun], metric: str, sort: str) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        m = run.metric(metric) or {}
        latency = (run.summary.get("latency") or {}).get("p50")
        rows.append(
            {
                "run": run,
                "value": m.get("value"),
                "low": m.get("low"),
                "high": m.get("high"),
                "latency": latency,
                "prompt_tokens": run.summary.get("prompt_tokens"),
                "seconds_per_example": run.summary.get("seconds_per_example"),
                "undecided": undecided([m], metric),
            }
        )
    key = {
        "latency": lambda r: (r["latency"] is None, r["latency"] or 0),
        "tokens": lambda r: (r["prompt_tokens"] is None, r["prompt_tokens"] or 0),
        "created": lambda r: -r["run"].pk,
    }.get(sort, lambda r: (r["value"] is None, -(r["value"] or 0)))
    return sorted(rows, key=key)


@login_required
def suite_detail(request: AuthedHttpRequest, slug: str, suite_id: int) -> HttpResponse:
    """The leaderboard: a constant number of queries whatever the number of runs."""
    suite = get_for_project(
        request,
        slug,
        EvalSuite.objects.select_related("project", "prompt_version__prompt", "dataset_version__dataset"),
        pk=suite_id,
    )
    runs = list(RUNS.filter(suite=suite))
    names = sorted({k for r in runs for k in (r.summary.get("metrics") or {})})
    metric = request.GET.get("metric") or suite.main_metric
    rows = _leaderboard(runs, metric, request.GET.get("sort", "metric"))
    charts = suite_charts(runs, rows, metric)
    ctx = {
        "project": suite.project,
        "suite": suite,
        "rows": rows,
        "metric": metric,
        "metric_name": metric_label(metric),
        "metric_choices": [(n, metric_label(n)) for n in names],
        "charts": _json(charts),
        "undecided": undecided([r["run"].metric(metric) for r in rows], metric),
        "polling": any(r["run"].status in Job.ACTIVE for r in rows),
        "runs": runs,
    }
    if request.htmx and request.htmx.target == "leaderboard":
        return render(request, "evals/suite_detail.html#leaderboard", ctx)
    return render(request, "evals/suite_detail.html", ctx)


@login_required
def run_detail(request: AuthedHttpRequest, slug: str, run_id: int) -> HttpResponse:
    run = get_for_project(request, slug, RUNS.select_related("suite", "project"), pk=run_id)
    results = run.results.select_related("example").order_by("example__index")
    failing = request.GET.get("failing", "")
    if failing not in (run.summary.get("metrics") or {}):
        failing = ""
    if failing:
        results = results.filter(**{f"checks__{failing}": 0.0})
    page = Paginator(results, 25).get_page(request.GET.get("page"))
    ctx = {
        "project": run.project,
        "run": run,
        "page": page,
        "failing": failing,
        "metrics": [(n, metric_label(n), m) for n, m in sorted((run.summary.get("metrics") or {}).items())],
    }
    if request.htmx and request.htmx.target == "run-live":
        return render(request, "evals/run_detail.html#live", ctx)
    return render(request, "evals/run_detail.html", ctx)


SIDE_BY_SIDE_PAGE = 20
RESULT_FIELDS = ("example_id", "output", "checks", "judge_score", "judge_reasoning", "finish_reason")


def _check_names(suite: EvalSuite, *runs: EvalRun) -> list[str]:
    """Rule metrics of the runs (from their summaries and the suite's rules),
    without reading a single result."""
    names = {
        k for r in runs for k in (r.summary.get("metrics") or {}) if k.startswith("rule:") or k == "all_rules"
    }
    names |= {f"rule:{r['name']}" for r in suite.rules if isinstance(r, dict) and r.get("name")}
    if suite.rules:
        names.add("all_rules")
    return sorted(names)


def _side_by_side_examples(suite: EvalSuite, a: EvalRun, b: EvalRun, only: str, rule_names: list[str]) -> Any:
    """The suite's examples with the filter applied in SQL: each joined to
    its result in run A and in run B."""
    examples = suite.examples.order_by("index")
    if only.startswith("fail:") and only[5:] in rule_names:
        failing = Q()
        for run in (a, b):
            failing |= Q(
                pk__in=EvalResult.objects.filter(run=run)
                .alias(v=KeyTransform(only[5:], "checks"))
                .filter(v=0.0)
                .values("example_id")
            )
        return examples.filter(failing)
    if only != "disagree":
        return examples
    examples = examples.alias(
        ra=FilteredRelation("results", condition=Q(results__run=a)),
        rb=FilteredRelation("results", condition=Q(results__run=b)),
    )
    # One answer missing, a rule (or exact match) scored differently, or two judge scores that differ.
    differs = Q(ra__id__isnull=True, rb__id__isnull=False) | Q(ra__id__isnull=False, rb__id__isnull=True)
    differs |= Q(ra__judge_score__isnull=False, rb__judge_score__isnull=False) & ~Q(
        ra__judge_score=F("rb__judge_score")
    )
    for n, key in enumerate([*rule_names, "exact_match"]):
        examples = examples.alias(
            **{
                f"ka{n}": Coalesce(KeyTextTransform(key, "ra__checks"), Value("-"), output_field=TextField()),
                f"kb{n}": Coalesce(KeyTextTransform(key, "rb__checks"), Value("-"), output_field=TextField()),
            }
        )
        differs |= Q(ra__id__isnull=False, rb__id__isnull=False) & ~Q(**{f"ka{n}": F(f"kb{n}")})
    return examples.filter(differs)


@login_required
def side_by_side(request: AuthedHttpRequest, slug: str, suite_id: int) -> HttpResponse:
    """Two runs of one suite, example by example: one page of examples and
    their two results are read, the filter and the count run in SQL.
    Queries: constant."""
    suite = get_for_project(request, slug, EvalSuite.objects.select_related("project"), pk=suite_id)
    runs = {r.pk: r for r in RUNS.filter(suite=suite)}
    choices = sorted(runs.values(), key=lambda r: -r.pk)
    a, b = _run_pair(request.GET, runs, choices)
    only = request.GET.get("only", "")
    rule_names: list[str] = []
    page: Page[Any] = Paginator([], SIDE_BY_SIDE_PAGE).get_page(1)
    if a is not None and b is not None:
        rule_names = _check_names(suite, a, b)
        page = Paginator(_side_by_side_examples(suite, a, b, only, rule_names), SIDE_BY_SIDE_PAGE).get_page(
            request.GET.get("page")
        )
        shown = [ex.pk for ex in page.object_list]
        results = {
            (r["run_id"], r["example_id"]): r
            for r in EvalResult.objects.filter(run__in=[a, b], example_id__in=shown).values(
                "run_id", *RESULT_FIELDS
            )
        }
        ratings = dict(
            Rating.objects.filter(run_a=a, run_b=b, user=request.user, example_id__in=shown).values_list(
                "example_id", "choice"
            )
        )
        page.object_list = [
            {
                "example": ex,
                "a": results.get((a.pk, ex.pk)),
                "b": results.get((b.pk, ex.pk)),
                "rating": ratings.get(ex.pk, ""),
            }
            for ex in page.object_list
        ]
    ctx = {
        "project": suite.project,
        "suite": suite,
        "a": a,
        "b": b,
        "choices": choices,
        "page": page,
        "only": only,
        "rule_names": [(n, metric_label(n)) for n in rule_names],
        "form": RatingForm(),
        "agreement": _judge_agreement(a, b) if a is not None and b is not None else None,
        "tallies": pair_tallies(suite, runs),
    }
    return render(request, "evals/side_by_side.html", ctx)


def _judge_agreement(a: EvalRun, b: EvalRun) -> dict[str, Any] | None:
    """How often the judge prefers what people preferred, on the examples
    both rated: preferences as +1 (A), 0 (tie), -1 (B). Reads the judge
    scores of the rated examples only."""
    judge_prefs: list[float] = []
    human_prefs: list[float] = []
    value = {Rating.A: 1.0, Rating.TIE: 0.0, Rating.B: -1.0}
    rated = Rating.objects.filter(run_a=a, run_b=b)
    scores = dict(
        ((r, e), s)
        for r, e, s in EvalResult.objects.filter(
            run__in=[a, b], example_id__in=rated.values("example_id"), judge_score__isnull=False
        ).values_list("run_id", "example_id", "judge_score")
    )
    for example_id, choice in rated.values_list("example_id", "choice"):
        sa, sb = scores.get((a.pk, example_id)), scores.get((b.pk, example_id))
        if sa is None or sb is None:
            continue
        diff = sa - sb
        judge_prefs.append(1.0 if diff > 0 else -1.0 if diff < 0 else 0.0)
        human_prefs.append(value[choice])
    if not judge_prefs:
        return None
    return judge_human_agreement(judge_prefs, human_prefs)


def _bad_request(message: str) -> HttpResponse:
    return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")


@login_required
@require_POST
def rate(request: AuthedHttpRequest, slug: str, suite_id: int) -> HttpResponse:
    suite = get_for_project(request, slug, EvalSuite.objects.all(), pk=suite_id)
    pair = RunPairForm(request.GET)
    if not pair.is_valid():
        return _bad_request(f"The runs to rate (?a=&b= in the address): {error_text(pair)}")
    run_a = get_object_or_404(EvalRun, pk=pair.cleaned_data["a"], suite=suite)
    run_b = get_object_or_404(EvalRun, pk=pair.cleaned_data["b"], suite=suite)
    form = RatingForm(request.POST)
    if not form.is_valid():
        if "choice" in form.errors:
            return _bad_request("Choose A better, B better or tie.")
        return _bad_request(f"The rating: {error_text(form)}")
    example = get_object_or_404(suite.examples, pk=form.cleaned_data["example"])
    try:
        rating = actions.rate(request.user, run_a, run_b, example, form.cleaned_data["choice"])
    except ActionError as exc:
        return _bad_request(str(exc))
    if request.htmx:
        return render(
            request,
            "evals/_rating.html",
            {
                "rating": rating.choice,
                "example": example,
                "suite": suite,
                "project": suite.project,
                "a": run_a,
                "b": run_b,
            },
        )
    return redirect(reverse("side_by_side", args=[slug, suite.pk]) + f"?a={run_a.pk}&b={run_b.pk}")


# --- Blind A/B review: two runs' answers to one example as "A" and "B", names hidden until rated ---

VERDICT = {"pass": True, "fail": False, "": None}


def blind_order(user_id: int, example_id: int, one: EvalRun, other: EvalRun) -> tuple[EvalRun, EvalRun]:
    """The two runs in the order a person sees them blind: random, but seeded
    by the person, the example and the pair, so a reload shows the same order."""
    first, second = sorted((one, other), key=lambda r: r.pk)
    seed = hashlib.sha256(f"{user_id}:{example_id}:{first.pk}:{second.pk}".encode()).digest()
    return (second, first) if seed[0] & 1 else (first, second)


def _run_pair(
    query: Any, runs: dict[int, EvalRun], choices: list[EvalRun]
) -> tuple[EvalRun | None, EvalRun | None]:
    ids = [query.get("a", ""), query.get("b", "")]
    a = runs.get(int(ids[0])) if ids[0].isdigit() else (choices[1] if len(choices) > 1 else None)
    b = runs.get(int(ids[1])) if ids[1].isdigit() else (choices[0] if choices else None)
    if (ids[0] and a is None) or (ids[1] and b is None):
        raise Http404("No such run in this suite.")
    return a, b


def pair_tallies(suite: EvalSuite, runs: dict[int, EvalRun]) -> list[dict[str, Any]]:
    """Everyone's ratings of the suite per pair of runs, whichever side each
    run was rated on: wins, ties, passes and fails of each run. One query."""
    counts = (
        Rating.objects.filter(example__suite=suite)
        .values("run_a_id", "run_b_id")
        .order_by()
        .annotate(
            n=Count("pk"),
            n_wins_a=Count("pk", filter=Q(choice=Rating.A)),
            n_wins_b=Count("pk", filter=Q(choice=Rating.B)),
            ties=Count("pk", filter=Q(choice=Rating.TIE)),
            n_pass_a=Count("pk", filter=Q(pass_a=True)),
            n_fail_a=Count("pk", filter=Q(pass_a=False)),
            n_pass_b=Count("pk", filter=Q(pass_b=True)),
            n_fail_b=Count("pk", filter=Q(pass_b=False)),
            blind=Count("pk", filter=Q(blind=True)),
        )
    )
    pairs: dict[tuple[int, int], dict[str, int]] = {}
    for row in counts:
        one, other = row["run_a_id"], row["run_b_id"]
        sides = ("a", "b") if one < other else ("b", "a")
        t = pairs.setdefault(
            (min(one, other), max(one, other)),
            dict.fromkeys(
                ("n", "ties", "blind", "wins_1", "wins_2", "pass_1", "fail_1", "pass_2", "fail_2"), 0
            ),
        )
        for key in ("n", "ties", "blind"):
            t[key] += row[key]
        for number, side in zip(("1", "2"), sides, strict=True):
            for key in ("wins", "pass", "fail"):
                t[f"{key}_{number}"] += row[f"n_{key}_{side}"]
    out = [
        {"first": runs[lo], "second": runs[hi], **t}
        for (lo, hi), t in pairs.items()
        if lo in runs and hi in runs
    ]
    return sorted(out, key=lambda t: (-t["n"], t["first"].pk, t["second"].pk))


def _blind_card(user_id: int, a: EvalRun, b: EvalRun, example: Any) -> dict[str, Any]:
    """One example as a person sees it blind: sides A and B (the runs in
    blind_order), and their rating mapped back onto those sides."""
    first, second = blind_order(user_id, example.pk, a, b)
    low, high = sorted((a, b), key=lambda r: r.pk)
    rating = Rating.objects.filter(run_a=low, run_b=high, example=example, user_id=user_id).first()
    results = {r.run_id: r for r in EvalResult.objects.filter(run__in=[a, b], example=example)}
    sides = []
    for key, run in (("a", first), ("b", second)):
        verdict = None if rating is None else rating.pass_a if run == low else rating.pass_b
        sides.append(
            {
                "key": key,
                "letter": key.upper(),
                "run": run,
                "res": results.get(run.pk),
                "verdict": "" if verdict is None else "pass" if verdict else "fail",
            }
        )
    choice = ""
    if rating is not None:
        better = {Rating.A: low, Rating.B: high}.get(rating.choice)
        choice = "tie" if better is None else "a" if better == first else "b"
    return {
        "example": example,
        "sides": sides,
        "rating": rating,
        "choice": choice,
        "note": rating.note if rating else "",
        "revealed": rating is not None,
    }


def _blind_context(request: AuthedHttpRequest, suite: EvalSuite) -> dict[str, Any]:
    runs = {r.pk: r for r in RUNS.filter(suite=suite)}
    choices = sorted(runs.values(), key=lambda r: -r.pk)
    a, b = _run_pair(request.GET, runs, choices)
    only = request.GET.get("only", "")
    ctx: dict[str, Any] = {
        "project": suite.project,
        "suite": suite,
        "a": a,
        "b": b,
        "choices": choices,
        "only": only,
        "card": None,
        "tallies": pair_tallies(suite, runs),
    }
    if a is None or b is None or a == b:
        return ctx
    rule_names = _check_names(suite, a, b)
    examples = _side_by_side_examples(suite, a, b, only, rule_names)
    number = request.GET.get("page")
    if number is None:
        # Start where this person stopped: the first example of the pair they have not rated.
        low, high = sorted((a, b), key=lambda r: r.pk)
        rated = Rating.objects.filter(run_a=low, run_b=high, user=request.user).values("example_id")
        todo = examples.exclude(pk__in=rated).first()
        number = str(examples.filter(index__lt=todo.index).count() + 1) if todo else "1"
    page = Paginator(examples, 1).get_page(number)
    query = urlencode({"a": a.pk, "b": b.pk, "only": only})
    here = reverse("blind_review", args=[suite.project.slug, suite.pk])
    ctx.update(
        page=page,
        query=query,
        rule_names=[(n, metric_label(n)) for n in rule_names],
        rate_url=reverse("blind_rate", args=[suite.project.slug, suite.pk]) + f"?{query}&page={page.number}",
        next_url=f"{here}?{query}&page={page.next_page_number()}" if page.has_next() else "",
        previous_url=f"{here}?{query}&page={page.previous_page_number()}" if page.has_previous() else "",
    )
    if page.object_list:
        ctx["card"] = _blind_card(request.user.pk, a, b, page.object_list[0])
    return ctx


@login_required
def blind_review(request: AuthedHttpRequest, slug: str, suite_id: int) -> HttpResponse:
    """One example at a time, two runs' answers as A and B in a random order
    (stable per person and example); the names show once it is rated."""
    suite = get_for_project(request, slug, EvalSuite.objects.select_related("project"), pk=suite_id)
    return render(request, "evals/blind.html", _blind_context(request, suite))


@login_required
@require_POST
def blind_rate(request: AuthedHttpRequest, slug: str, suite_id: int) -> HttpResponse:
    """A blind rating, posted in the sides shown, stored for the runs they
    really were; the answer is the same example with the names revealed."""
    suite = get_for_project(request, slug, EvalSuite.objects.select_related("project"), pk=suite_id)
    pair = RunPairForm(request.GET)
    if not pair.is_valid():
        return _bad_request(f"The runs to rate (?a=&b= in the address): {error_text(pair)}")
    run_a = get_object_or_404(EvalRun, pk=pair.cleaned_data["a"], suite=suite)
    run_b = get_object_or_404(EvalRun, pk=pair.cleaned_data["b"], suite=suite)
    if run_a == run_b:
        return _bad_request("Choose two different runs to compare.")
    form = BlindRatingForm(request.POST)
    if not form.is_valid():
        if "choice" in form.errors:
            return _bad_request("Choose A better, B better or tie.")
        return _bad_request(f"The rating: {error_text(form)}")
    d = form.cleaned_data
    example = get_object_or_404(suite.examples, pk=d["example"])
    first, second = blind_order(request.user.pk, example.pk, run_a, run_b)
    low, high = sorted((run_a, run_b), key=lambda r: r.pk)
    shown = {"a": first, "b": second}
    verdicts = {shown["a"]: VERDICT[d["pass_a"]], shown["b"]: VERDICT[d["pass_b"]]}
    choice = Rating.TIE if d["choice"] == "tie" else Rating.A if shown[d["choice"]] == low else Rating.B
    try:
        actions.rate(
            request.user,
            low,
            high,
            example,
            choice,
            pass_a=verdicts[low],
            pass_b=verdicts[high],
            note=d["note"],
            blind=True,
        )
    except ActionError as exc:
        return _bad_request(str(exc))
    back = reverse("blind_review", args=[slug, suite.pk]) + "?" + request.GET.urlencode()
    if not request.htmx:
        return redirect(back)
    ctx = _blind_context(request, suite)
    return render(request, "evals/_blind_card.html", ctx)


@login_required
def comparison_detail(request: AuthedHttpRequest, slug: str, comparison_id: int) -> HttpResponse:
    comparison = get_for_project(
        request,
        slug,
        ArmComparison.objects.select_related(
            "project", "suite", "variant__prompt_version__prompt", "job", "absorb_job"
        ),
        pk=comparison_id,
    )
    runs = {r.arm: r for r in RUNS.filter(comparison=comparison)}
    arms = [(arm, runs.get(arm)) for arm in ARMS]
    names = sorted(
        {k for r in runs.values() for k in (r.summary.get("metrics") or {})},
        # Form then substance: all rules and fact recall first, each rule, each fact.
        key=lambda n: (
            n != "all_rules",
            n != "fact_recall",
            not n.startswith("rule:"),
            not n.startswith("fact:"),
            n,
        ),
    )
    data = comparison.headline.get("data_compliance") or {}
    table = [
        {
            "name": n,
            "label": metric_label(n),
            "cells": [(r.metric(n) if r else None) for _a, r in arms],
            "data": data.get(n),
        }
        for n in names
    ]
    metric = comparison.headline.get("metric") or comparison.suite.main_metric
    polling = comparison.job is not None and comparison.job.status in Job.ACTIVE
    done = {arm for arm, run in runs.items() if run.summary.get("complete")}
    ctx = {
        "project": comparison.project,
        "comparison": comparison,
        "arms": arms,
        "table": table,
        "metric_name": metric_label(metric),
        "headline": comparison.headline,
        "retained_reason": retained_reason(comparison.headline, done, finished=not polling),
        "undecided": undecided([r.metric(metric) for r in runs.values()], metric),
        "job": comparison.job,
        "polling": polling,
        "chart": _json(comparison_chart(arms, names)),
        "prompt": comparison.variant.prompt_version.prompt if comparison.variant.prompt_version else None,
    }
    if request.htmx and request.htmx.target == "comparison-live":
        return render(request, "evals/comparison_detail.html#live", ctx)
    return render(request, "evals/comparison_detail.html", ctx)


@login_required
@require_POST
def comparison_start(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """On demand: the four arms of a variant on its held-out queries."""
    project = get_project(request, slug)
    form = ComparisonForm(project, request.POST)
    if not form.is_valid():
        return _bad_request(f"The comparison to start: {error_text(form)}")
    variant = form.cleaned_data["variant"]
    try:
        suite = actions.suite_for_variant(variant, request.user)
        if suite is None:
            raise ActionError(f"{variant} learned from data without an eval split: create a suite first.")
        comparison = actions.start_comparison(
            project, request.user, suite, variant, form_token=form.cleaned_data.get("form_token")
        )
    except AlreadyStarted as exc:
        messages.info(request, f"{exc} Nothing new was queued.")
        done = exc.job.comparisons.first()
        return redirect(done if done is not None else exc.job)
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect("evals_home", slug)
    messages.success(request, f"Four-arm comparison of {variant} queued.")
    return redirect(comparison)
