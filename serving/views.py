"""Pages of promotion: aliases and their audit trail, the gated promote
flow (verdict shown before the user confirms), variants with lineage, and
the project's API keys."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.db.models.fields.json import KeyTextTransform
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from jobs.models import Job
from serving import actions
from serving.forms import (
    AliasForm,
    ApiKeyForm,
    ConfirmForm,
    DeploymentForm,
    GateForm,
    PromoteForm,
    RequestLogForm,
)
from serving.gate import evaluate_gate
from serving.models import Alias, AliasMove
from workbench.actions import ActionError
from workbench.models import DatasetVersion, Project, PromptVersion, Variant
from workbench.shortcuts import AuthedHttpRequest, get_project

LAST_MOVES = Prefetch(
    "moves", queryset=AliasMove.objects.select_related("user", "from_variant", "to_variant")
)


def _alias(project: Project, name: str) -> Alias:
    return get_object_or_404(
        Alias.objects.select_related("project", "variant__base_model", "gating_suite"),
        project=project,
        name=name,
    )


def _home(request: HttpRequest, project: Project, alias_form: AliasForm, status: int = 200) -> HttpResponse:
    actions.ensure_default_aliases(project)
    aliases = list(
        project.aliases.select_related("variant__base_model", "gating_suite").prefetch_related(LAST_MOVES)
    )
    rows = [
        {"alias": a, "last": next(iter(a.moves.all()), None), "moves": len(a.moves.all())} for a in aliases
    ]
    return render(
        request,
        "serving/home.html",
        {"project": project, "rows": rows, "alias_form": alias_form, "api_base": _api_base(request)},
        status=status,
    )


def _api_base(request: HttpRequest) -> str:
    return request.build_absolute_uri("/v1")


@login_required
def serving_home(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    return _home(request, get_project(request, slug), AliasForm())


@login_required
@require_POST
def alias_create(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    form = AliasForm(request.POST)
    if form.is_valid():
        try:
            alias = actions.create_alias(request.user, project, form.cleaned_data["name"])
        except ActionError as exc:
            form.add_error("name", str(exc))
        else:
            messages.success(request, f"Alias {alias.model_name} created: promote a variant to it.")
            return redirect("serving_alias", slug, alias.name)
    return _home(request, project, form, status=400)


def _detail(
    request: HttpRequest,
    alias: Alias,
    gate_form: GateForm,
    status: int = 200,
    log_form: RequestLogForm | None = None,
    deployment_form: DeploymentForm | None = None,
) -> HttpResponse:
    project = alias.project
    actions.ensure_base_variants(project)
    moves = alias.moves.select_related("user", "from_variant", "to_variant")
    last, target = actions.rollback_target(alias)
    ctx = {
        "project": project,
        "alias": alias,
        "moves": moves,
        "gate_form": gate_form,
        "log_form": log_form or RequestLogForm(instance=alias),
        "deployment_form": deployment_form or DeploymentForm(instance=alias),
        "backend": settings.INFERENCE_BACKEND,
        "promote_form": PromoteForm(project),
        "rollback_to": target,
        "holder_verdict": evaluate_gate(alias, alias.variant) if alias.variant else None,
    }
    return render(request, "serving/alias_detail.html", ctx, status=status)


@login_required
def alias_detail(request: AuthedHttpRequest, slug: str, alias_name: str) -> HttpResponse:
    alias = _alias(get_project(request, slug), alias_name)
    return _detail(request, alias, GateForm(alias.project, instance=alias))


@login_required
@require_POST
def alias_gate(request: AuthedHttpRequest, slug: str, alias_name: str) -> HttpResponse:
    alias = _alias(get_project(request, slug), alias_name)
    form = GateForm(alias.project, request.POST, instance=Alias.objects.get(pk=alias.pk))
    if form.is_valid():
        d = form.cleaned_data
        try:
            actions.update_gate(
                request.user,
                alias,
                gating_suite=d["gating_suite"],
                min_all_rules=d["min_all_rules"],
                min_retained_lower=d["min_retained_lower"],
                max_regression=d["max_regression"],
                min_fact_recall=d["min_fact_recall"],
                fact_recall_vs_teacher=d["fact_recall_vs_teacher"],
                max_skills_drop=d["max_skills_drop"],
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Gate of {alias.model_name} saved.")
            return redirect("serving_alias", slug, alias.name)
    return _detail(request, alias, form, status=400)


@login_required
@require_POST
def alias_logging(request: AuthedHttpRequest, slug: str, alias_name: str) -> HttpResponse:
    alias = _alias(get_project(request, slug), alias_name)
    form = RequestLogForm(request.POST, instance=Alias.objects.get(pk=alias.pk))
    if not form.is_valid():
        return _detail(request, alias, GateForm(alias.project, instance=alias), status=400, log_form=form)
    on = form.cleaned_data["log_requests"]
    actions.set_request_logging(request.user, alias, on)
    messages.success(
        request,
        f"{alias.model_name} now keeps a log of its requests."
        if on
        else f"{alias.model_name} no longer logs its requests; those already logged stay.",
    )
    return redirect(reverse("serving_alias", args=[slug, alias.name]) + "#request-log")


@login_required
@require_POST
def alias_deployment(request: AuthedHttpRequest, slug: str, alias_name: str) -> HttpResponse:
    alias = _alias(get_project(request, slug), alias_name)
    form = DeploymentForm(request.POST, instance=Alias.objects.get(pk=alias.pk))
    if form.is_valid():
        try:
            actions.set_deployment(request.user, alias, form.cleaned_data["serve_merged"])
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request,
                f"{alias.model_name} is served as merged weights."
                if alias.serve_merged
                else f"{alias.model_name} is served as an adapter over its base.",
            )
            return redirect(reverse("serving_alias", args=[slug, alias.name]) + "#deployment")
    gate = GateForm(alias.project, instance=alias)
    return _detail(request, alias, gate, status=400, deployment_form=form)


@login_required
@require_POST
def alias_rollback(request: AuthedHttpRequest, slug: str, alias_name: str) -> HttpResponse:
    alias = _alias(get_project(request, slug), alias_name)
    try:
        move = actions.rollback(request.user, alias, request.POST.get("reason", ""))
    except ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{alias.model_name} rolled back to {move.to_variant}.")
        if move.gated and not move.verdict.get("passed"):
            failed = "; ".join(
                f"{c['name']}: {c['detail']}" for c in move.verdict["checks"] if not c["passed"]
            )
            messages.warning(
                request,
                f"The gate of {alias.model_name} would refuse {move.to_variant} today ({failed}); "
                "a rollback is never blocked, and the history keeps this verdict.",
            )
    return redirect("serving_alias", slug, alias.name)


@login_required
def promote(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """GET ?alias=&variant=: the verdict with its numbers and a confirm form;
    POST: promote (or override, with a reason). Without an alias or a
    variant the page asks for it."""
    project = get_project(request, slug)
    actions.ensure_base_variants(project)
    actions.ensure_default_aliases(project)
    data = request.POST if request.method == "POST" else request.GET
    aliases = list(project.aliases.all())
    alias = next((a for a in aliases if a.name == data.get("alias")), None)
    variant_id = data.get("variant", "")
    variant = (
        get_object_or_404(
            Variant.objects.select_related("base_model", "prompt_version__prompt"),
            project=project,
            pk=variant_id,
        )
        if variant_id.isdigit()
        else None
    )
    if data.get("alias") and alias is None:
        return render(request, "404.html", {"project": project}, status=404)
    if alias is None or variant is None:
        return render(
            request,
            "serving/promote_pick.html",
            {
                "project": project,
                "aliases": aliases,
                "alias": alias,
                "variant": variant,
                "form": PromoteForm(project, initial={"variant": variant.pk} if variant else None),
            },
        )
    alias = _alias(project, alias.name)
    form = ConfirmForm(request.POST if request.method == "POST" else None, initial={"variant": variant.pk})
    status = 200
    if request.method == "POST" and form.is_valid():
        force = bool(form.cleaned_data["force"])
        try:
            move = actions.promote(
                request.user, alias, variant, force=force, reason=form.cleaned_data["reason"]
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
            status = 400
        else:
            how = ", the gate overridden" if move.action == AliasMove.OVERRIDE else ""
            messages.success(request, f"{alias.model_name} now serves {variant}{how}.")
            return redirect("serving_alias", slug, alias.name)
    elif request.method == "POST":
        status = 400
    verdict = evaluate_gate(alias, variant)
    ctx = {
        "project": project,
        "alias": alias,
        "variant": variant,
        "verdict": verdict,
        "form": form,
        "already": alias.variant_id == variant.pk,
    }
    return render(request, "serving/promote_confirm.html", ctx, status=status)


# What the variants page never shows and can be large: prompt texts and rules, datasets' stats and
# lineage notes, a variant's own metrics.
LARGE_VARIANT_FIELDS = (
    "prompt_version__text",
    "prompt_version__rules",
    "prompt_version__token_counts",
    "dataset_version__token_stats",
    "dataset_version__meta",
    "dataset_version__parent__token_stats",
    "dataset_version__parent__meta",
    "metrics",
)
# A job's log and progress can be megabytes; the page shows only its name.
LINEAGE_JOBS = Prefetch("jobs", queryset=Job.objects.only("pk", "kind", "variant_id", "created_at"))


def _lineage(project: Project, variants: Sequence[Variant]) -> list[dict[str, Any]]:
    # Variant.newer_prompt_version() for all variants at once: one query, not one per variant.
    latest: dict[int, PromptVersion] = {}
    # Only the numbers: a prompt version's text can be megabytes.
    versions = (
        PromptVersion.objects.filter(prompt__project=project)
        .select_related("prompt")
        .only("pk", "number", "prompt__name", "prompt__project_id")
    )
    for pv in versions.order_by("number"):
        latest[pv.prompt_id] = pv
    rows: list[dict[str, Any]] = []
    for v in variants:
        top = latest.get(v.prompt_version.prompt_id) if v.adapter_path and v.prompt_version else None
        newer = top if top is not None and v.prompt_version and top.number > v.prompt_version.number else None
        rows.append(
            {
                "variant": v,
                "newer": newer,
                "aliases": [a.name for a in v.aliases.all()],
                "jobs": list(v.jobs.all()),
                "source": _source(v.dataset_version),
                "checkpoints": [],
            }
        )
    # An earlier epoch's adapter (a checkpoint variant) folds under the variant its fine-tune made.
    finals: dict[int, dict[str, Any]] = {
        j.pk: row for row in rows for j in row["jobs"] if j.kind == "finetune"
    }
    kept = []
    for row in rows:
        of = getattr(row["variant"], "checkpoint_of", None)
        final = finals.get(int(of)) if of and str(of).isdigit() else None
        if final is not None and final is not row:
            final["checkpoints"].append(row)
        else:
            kept.append(row)
    return kept


def _source(version: DatasetVersion | None) -> DatasetVersion | None:
    """The data a re-absorb starts from: the upload the teacher answered,
    not the old teacher answers."""
    while version is not None and version.kind != DatasetVersion.UPLOAD and version.parent_id:
        version = version.parent
    return version


@login_required
def variant_list(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    actions.ensure_base_variants(project)
    variants = list(
        project.variants.select_related(
            "base_model", "prompt_version__prompt", "dataset_version__dataset", "dataset_version__parent"
        )
        .defer(*LARGE_VARIANT_FIELDS)
        .annotate(checkpoint_of=KeyTextTransform("checkpoint_of_job", "metrics"))
        .prefetch_related("aliases", LINEAGE_JOBS)
    )
    return render(request, "serving/variants.html", {"project": project, "rows": _lineage(project, variants)})


NEW_KEY_SESSION = "serving.new_api_key"
KEY_TOKENS_SESSION = "serving.api_key_form_tokens"


def _keys_page(request: HttpRequest, project: Project, form: ApiKeyForm, status: int = 200) -> HttpResponse:
    keys = project.api_keys.select_related("created_by")
    actions.ensure_default_aliases(project)
    example_alias = "production"
    # The new key's raw value waits in the session for this one GET after the POST, then is gone.
    new = request.session.pop(f"{NEW_KEY_SESSION}:{project.pk}", None) if request.method == "GET" else None
    new_key = next((k for k in keys if k.pk == new["id"]), None) if new else None
    response = render(
        request,
        "serving/keys.html",
        {
            "project": project,
            "keys": keys,
            "form": form,
            "new_key": new_key,
            "raw_key": new["raw"] if new and new_key else None,
            "api_base": _api_base(request),
            "example_model": f"{project.slug}/{example_alias}",
        },
        status=status,
    )
    if new_key:
        response["Cache-Control"] = "no-store"
    return response


@login_required
def api_keys(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """GET: the keys (and, once, the raw value of the key just made); POST:
    a new key, then a redirect (a reload makes no second key). The form's
    token makes a resubmitted form (Back, double click) make one key."""
    project = get_project(request, slug)
    if request.method != "POST":
        return _keys_page(request, project, ApiKeyForm(initial={"form_token": uuid.uuid4()}))
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        return _keys_page(request, project, form, status=400)
    token = form.cleaned_data.get("form_token")
    used: dict[str, int] = request.session.get(KEY_TOKENS_SESSION, {})
    if token is not None and str(token) in used:
        messages.info(request, "This form was already submitted: that key exists, nothing new was made.")
        return redirect(reverse("serving_keys", args=[slug]))
    key, raw = actions.create_api_key(request.user, project, form.cleaned_data["name"])
    if token is not None:
        used[str(token)] = key.pk
        request.session[KEY_TOKENS_SESSION] = dict(list(used.items())[-20:])  # the latest forms only
    request.session[f"{NEW_KEY_SESSION}:{project.pk}"] = {"id": key.pk, "raw": raw}
    return redirect(reverse("serving_keys", args=[slug]))


@login_required
@require_POST
def api_key_revoke(request: AuthedHttpRequest, slug: str, key_id: int) -> HttpResponse:
    project = get_project(request, slug)
    key = get_object_or_404(project.api_keys, pk=key_id)
    try:
        actions.revoke_api_key(request.user, key)
    except ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Key {key.prefix}… revoked: requests with it now get 401.")
    return redirect(reverse("serving_keys", args=[slug]))
