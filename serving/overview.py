"""The panels of a project's dashboard and of the Models & serving page that
need the floors above workbench: what each alias serves, the latest four-arm
result per variant, running and queued jobs, the engine, and the next step.
The workbench pages load them with htmx (workbench imports none of this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.urls import reverse

from evals.models import ArmComparison
from jobs.models import Job
from serving import actions, engine_client
from serving.engine_client import ADAPTER_PREFIX, MERGED_PREFIX, EngineStatus
from serving.gate import evaluate_gate
from serving.models import DEFAULT_ALIASES, AliasMove
from workbench.models import DatasetVersion, FoundationModel, Project, PromptVersion, Variant
from workbench.shortcuts import AuthedHttpRequest, get_project

# The kinds of job that make a variant: while one is active, following it is the next step.
ABSORB_KINDS = ("teacher", "finetune")
LATEST_VARIANTS = 8
# The dashboard listens for this event: a job it followed ended, so every panel may have changed.
CHANGED_EVENT = "overview-changed"


@dataclass(frozen=True)
class Step:
    """The one thing to do next, and the page that does it."""

    key: str  # stable, for tests and styling: prompt, data, absorb, review, wait, ...
    title: str
    text: str
    url: str
    action: str


def _url(name: str, *args: Any, query: str = "") -> str:
    return reverse(name, args=args) + (f"?{query}" if query else "")


def next_step(project: Project) -> Step:
    """What the project needs next, from its state: a prompt, queries, an
    absorbed variant, its evaluation, a promotion through the gate, a key."""
    slug = project.slug
    if not PromptVersion.objects.filter(prompt__project=project).exists():
        return Step(
            "prompt",
            "Add the system prompt",
            "Paste or upload the system prompt the model should absorb, and list the rules it states.",
            _url("prompt_list", slug),
            "Add a prompt",
        )
    if not DatasetVersion.objects.filter(dataset__project=project).exists():
        return Step(
            "data",
            "Upload user queries",
            "The teacher (the base model with your prompt) answers them, and the adapter learns from "
            "those answers. Keep some held out for the evals.",
            _url("dataset_list", slug),
            "Upload queries",
        )
    active = Job.objects.filter(project=project, status__in=Job.ACTIVE, kind__in=ABSORB_KINDS)
    running = active.order_by("created_at").first()
    wait = (
        Step(
            "wait",
            f"Wait for {running.label.lower()} #{running.pk}",
            f"It is {running.status} ({running.percent}%). The next step appears here when it ends.",
            running.get_absolute_url(),
            "Follow the job",
        )
        if running is not None
        else None
    )
    variant = (
        project.variants.exclude(adapter_path="")
        .select_related("base_model", "prompt_version__prompt")
        .order_by("-created_at", "-id")
        .first()
    )
    if variant is None:
        return wait or _before_first_variant(project)
    # A variant exists: it goes on to its evals and promotion while another absorb runs,
    # unless it is stale (then that absorb is what makes the next one).
    newer = variant.newer_prompt_version()
    if newer is not None:
        if wait is not None:
            return wait
        return Step(
            "reabsorb",
            f"Absorb {newer} again",
            f"{variant.name} learned {variant.prompt_version}; the prompt has changed since. "
            "Absorb the new version so the adapter behaves as the prompt says now.",
            _url("job_list", slug, query=f"prompt_version={newer.pk}&base_model={variant.base_model_id}"),
            "Absorb again",
        )
    comparison = variant.comparisons.select_related("job", "suite").order_by("-created_at", "-id").first()
    if comparison is None:
        return Step(
            "evaluate",
            f"Evaluate {variant.name}",
            "Run the four arms (base without and with the prompt, adapter without and with it) on "
            "held-out queries to see how much of the prompt's effect the adapter retained.",
            _url("evals_home", slug),
            "Go to evals",
        )
    if comparison.job is not None and comparison.job.status in Job.ACTIVE:
        return Step(
            "wait",
            f"Wait for the four-arm comparison of {variant.name}",
            f"It is {comparison.job.status} ({comparison.job.percent}%).",
            comparison.get_absolute_url(),
            "Follow the comparison",
        )
    if "retained" not in comparison.headline:
        return Step(
            "evaluate",
            f"Evaluate {variant.name} again",
            "Its last four-arm comparison ended without a result.",
            comparison.get_absolute_url(),
            "See what happened",
        )
    return _promotion_step(project, variant)


def _before_first_variant(project: Project) -> Step:
    slug = project.slug
    teacher = (
        Job.objects.filter(
            project=project, kind="teacher", status=Job.SUCCEEDED, output_dataset__isnull=False
        )
        .select_related("output_dataset__dataset")
        .order_by("-finished_at", "-id")
        .first()
    )
    if teacher is not None and not Job.objects.filter(project=project, kind="finetune").exists():
        answers = teacher.output_dataset
        assert answers is not None  # filtered above
        return Step(
            "review",
            "Review the teacher's answers, then fine-tune",
            f"{answers} holds what the base model answered with your prompt. Fix or drop bad answers, "
            "then start the fine-tune from the reviewed version.",
            _url("dataset_review", slug, answers.dataset_id, answers.number),
            "Review answers",
        )
    return Step(
        "absorb",
        "Absorb the prompt",
        "The base model with your prompt answers your queries (the teacher); a LoRA adapter then "
        "learns to answer the same without the prompt.",
        _url("job_list", slug),
        "Start an absorb",
    )


def _promotion_step(project: Project, variant: Variant) -> Step:
    slug = project.slug
    actions.ensure_default_aliases(project)
    aliases = {a.name: a for a in project.aliases.select_related("gating_suite", "variant")}
    for name in DEFAULT_ALIASES:  # staging first, then production
        alias = aliases.get(name)
        if alias is None or alias.variant_id == variant.pk:
            continue
        promote = _url("serving_promote", slug, query=f"alias={alias.name}&variant={variant.pk}")
        verdict = evaluate_gate(alias, variant)
        if verdict.passed:
            return Step(
                "promote",
                f"Promote {variant.name} to {alias.name}",
                f"It passes the gate of {alias.model_name}"
                + (f" on “{verdict.suite}”." if verdict.suite else " (the alias has no gate yet).")
                + " You confirm on the next page; the move can be rolled back.",
                promote,
                f"Promote to {alias.name}",
            )
        failed = verdict.failed[0]
        return Step(
            "improve",
            f"{variant.name} does not pass the gate of {alias.name}",
            f"{failed.name}: {failed.detail}. Improve the data or the settings and absorb again, "
            "or see the whole verdict (the gate can be overridden with a reason).",
            promote,
            "See the verdict",
        )
    if not project.api_keys.filter(revoked_at__isnull=True).exists():
        return Step(
            "call",
            "Make an API key",
            f"{variant.name} is served. Any OpenAI client can call it with a project key "
            f"(model {project.slug}/production).",
            _url("serving_keys", slug),
            "Make a key",
        )
    return Step(
        "done",
        "Watch it serve",
        f"{project.slug}/production serves {variant.name}. Compare answers in the playground, or log "
        "requests on an alias to turn real traffic into the next dataset.",
        _url("playground", slug),
        "Open the playground",
    )


# --- panels ---------------------------------------------------------------------------------


def _aliases(project: Project) -> list[dict[str, Any]]:
    actions.ensure_default_aliases(project)
    rows = []
    for alias in project.aliases.select_related("variant__base_model", "gating_suite"):
        since = None
        if alias.variant_id:
            move = (
                AliasMove.objects.filter(alias=alias, to_variant_id=alias.variant_id)
                .order_by("-created_at")
                .first()
            )
            since = move.created_at if move else alias.updated_at
        rows.append({"alias": alias, "since": since})
    return rows


def _latest_results(project: Project) -> list[dict[str, Any]]:
    variants = list(
        project.variants.exclude(adapter_path="")
        .select_related("base_model")
        .only("pk", "name", "adapter_path", "created_at", "base_model__name", "project_id")
        .order_by("-created_at", "-id")[:LATEST_VARIANTS]
    )
    latest: dict[int, ArmComparison] = {}
    comparisons = ArmComparison.objects.filter(variant__in=variants).select_related("suite", "job")
    for c in comparisons.order_by("-created_at", "-id"):
        latest.setdefault(c.variant_id, c)
    return [{"variant": v, "comparison": latest.get(v.pk)} for v in variants]


def _active_jobs(project: Project) -> list[Job]:
    jobs = Job.objects.filter(project=project, status__in=Job.ACTIVE).defer("log", "params")
    # Running first, then queued, oldest first: the order they will finish in.
    return sorted(jobs, key=lambda j: (j.status != Job.RUNNING, j.created_at, j.pk))


@login_required
def overview_panels(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    ctx = {
        "project": project,
        "step": next_step(project),
        "aliases": _aliases(project),
        "results": _latest_results(project),
        "jobs": _active_jobs(project),
        "finetuned": project.variants.exclude(adapter_path="").count(),
    }
    return render(request, "serving/overview.html", ctx)


@login_required
def overview_jobs(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """The jobs panel, polled while a job is active. When the last one ended
    the dashboard is told to reload every panel (results, aliases, next step)."""
    project = get_project(request, slug)
    jobs = _active_jobs(project)
    response = render(request, "serving/overview.html#jobs", {"project": project, "jobs": jobs})
    if not jobs:
        response["HX-Trigger"] = CHANGED_EVENT
    return response


# --- the engine ------------------------------------------------------------------------------


def _variant_ids(names: Any, prefix: str) -> dict[int, str]:
    return {int(n[len(prefix) :]): n for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()}


def _variants_of(status: EngineStatus, projects: Any) -> dict[str, Variant]:
    """The loaded adapters that are variants of `projects`, by engine name."""
    ids = _variant_ids(status.adapters, ADAPTER_PREFIX)
    found = Variant.objects.filter(pk__in=ids, project__in=projects).select_related("project")
    return {v.engine_model: v for v in found}


def _merged_of(status: EngineStatus, projects: Any) -> tuple[list[Variant], int]:
    """The merged deployments among the engine's bases that are variants of
    `projects`, and how many more there are (other projects': not named)."""
    ids = _variant_ids(status.bases, MERGED_PREFIX)
    found = list(
        Variant.objects.filter(pk__in=ids, project__in=projects).select_related("project", "base_model")
    )
    return sorted(found, key=lambda v: v.pk), len(ids) - len(found)


def _engine_context(request: AuthedHttpRequest, projects: Any) -> dict[str, Any]:
    status = engine_client.client().status()
    mine = _variants_of(status, projects)
    merged, other_merged = _merged_of(status, projects)
    plain = [b for b in status.bases if not b.startswith(MERGED_PREFIX)]
    registered = set(FoundationModel.objects.filter(name__in=plain).values_list("name", flat=True))
    return {
        "engine": status,
        "bases": [{"name": b, "registered": b in registered} for b in plain],
        "adapters": [{"variant": v, "base": status.adapters[name]} for name, v in sorted(mine.items())],
        "merged": merged,
        "other_adapters": len(status.adapters) - len(mine),
        "other_merged": other_merged,
        "show_address": request.user.is_staff,
        "address": engine_client.client().url,
    }


@login_required
def overview_engine(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """The engine as one project sees it: its bases, this project's loaded
    adapters (other projects' only counted) and the queue."""
    project = get_project(request, slug)
    ctx = {"project": project, **_engine_context(request, [project])}
    return render(request, "serving/_engine.html", ctx)


@login_required
def engine_status(request: AuthedHttpRequest) -> HttpResponse:
    """The engine on the Models & serving page: adapters of the user's projects by name."""
    ctx = _engine_context(request, Project.objects.for_user(request.user))
    return render(request, "serving/_engine.html", {**ctx, "all_projects": True})
