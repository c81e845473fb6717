from __future__ import annotations

import difflib
import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from engines import rules
from engines.tokens import load_tokenizer, prompt_cost
from workbench.actions import ActionError
from workbench.actions_data import decode_prompt_file, save_prompt
from workbench.models import BaseModel, Prompt, PromptVersion
from workbench.views import get_project


def token_costs(text: str) -> list[dict[str, Any]]:
    costs = []
    for model in BaseModel.objects.all():
        try:
            costs.append({"model": model, **prompt_cost(load_tokenizer(model.path), text)})
        except Exception as exc:  # a broken model directory must not break the page
            costs.append({"model": model, "error": str(exc)[:200]})
    return costs


def _text_from_request(request: HttpRequest) -> str:
    upload = request.FILES.get("file")
    if upload:
        return decode_prompt_file(upload.read(), upload.name)
    return request.POST.get("text", "")


@login_required
def prompt_list(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    prompts = project.prompts.prefetch_related("versions")
    return render(request, "workbench/prompt_list.html", {"project": project, "prompts": prompts})


@login_required
@require_POST
def prompt_create(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    try:
        rules_json = request.POST.get("rules", "").strip()
        rules_data = json.loads(rules_json) if rules_json else []
        saved = save_prompt(project, request.user, request.POST.get("name", ""), _text_from_request(request),
                            rules_data, request.POST.get("note", ""))
    except json.JSONDecodeError as exc:
        messages.error(request, f"Rules are not valid JSON: {exc}")
        return redirect("prompt_list", slug)
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect("prompt_list", slug)
    v = saved.version
    messages.success(request, f"Saved {v.prompt.name} version {v.number}." if saved.created
                     else f"{v.prompt.name} is unchanged (version {v.number}).")
    return redirect(v.prompt)


def _get_prompt(request: HttpRequest, slug: str, prompt_id: int) -> Prompt:
    project = get_project(request, slug)
    return get_object_or_404(Prompt.objects.select_related("project"), pk=prompt_id, project=project)


@login_required
def prompt_detail(request: HttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    return _version_page(request, prompt, prompt.latest)


@login_required
def prompt_version(request: HttpRequest, slug: str, prompt_id: int, number: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    return _version_page(request, prompt, get_object_or_404(prompt.versions, number=number))


def _version_page(request: HttpRequest, prompt: Prompt, version: PromptVersion | None) -> HttpResponse:
    versions = prompt.versions.select_related("author")
    ctx = {
        "project": prompt.project, "prompt": prompt, "version": version, "versions": versions,
        "latest": prompt.latest, "costs": token_costs(version.text) if version else [],
        "rule_list": [(r, rules.describe(rules.validate_rules([r])[0])) for r in version.rules] if version else [],
        "kinds": rules.KINDS,
    }
    return render(request, "workbench/prompt_detail.html", ctx)


@login_required
@require_POST
def prompt_save(request: HttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """A new version with edited text (rules carried over)."""
    prompt = _get_prompt(request, slug, prompt_id)
    try:
        saved = save_prompt(prompt.project, request.user, prompt.name, _text_from_request(request),
                            None, request.POST.get("note", ""))
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(prompt)
    messages.success(request, f"Saved version {saved.version.number}." if saved.created else "No change.")
    return redirect(prompt)


def _rule_from_post(post: Any) -> dict[str, Any]:
    kind = rules.KINDS.get(post.get("kind", ""))
    rule: dict[str, Any] = {"name": post.get("rule_name", "").strip(), "kind": post.get("kind", "")}
    for param in kind.params if kind else ():
        raw = post.getlist(param.name) if param.type == "flags" else post.get(param.name, "")
        if param.type == "boolean":  # a checkbox: absent means unchecked
            rule[param.name] = raw == "on"
        elif param.type == "integer":
            try:
                rule[param.name] = int(raw)
            except ValueError:
                rule[param.name] = raw
        elif param.type == "flags":
            rule[param.name] = list(raw)
        elif raw or param.required:
            rule[param.name] = raw
    return rule


@login_required
@require_POST
def prompt_rules(request: HttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """Add or remove a rule: a new version with the same text."""
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        return redirect(prompt)
    current = list(latest.rules)
    if "remove" in request.POST:
        current = [r for r in current if r["name"] != request.POST["remove"]]
    else:
        current.append(_rule_from_post(request.POST))
    try:
        saved = save_prompt(prompt.project, request.user, prompt.name, latest.text, current, "rules edited")
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(prompt)
    messages.success(request, f"Rules saved as version {saved.version.number}.")
    return redirect(prompt)


@login_required
def rule_params(request: HttpRequest, slug: str) -> HttpResponse:
    """The parameter fields of one rule kind (htmx swaps them into the form)."""
    get_project(request, slug)
    kind = rules.KINDS.get(request.GET.get("kind", ""))
    return render(request, "workbench/prompt_detail.html#rule-params", {"kind": kind})


@login_required
def prompt_diff(request: HttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        return redirect(prompt)
    try:
        a_num = int(request.GET.get("a", max(1, latest.number - 1)))
        b_num = int(request.GET.get("b", latest.number))
    except ValueError:
        a_num, b_num = max(1, latest.number - 1), latest.number
    a = get_object_or_404(prompt.versions, number=a_num)
    b = get_object_or_404(prompt.versions, number=b_num)
    lines = []
    for line in difflib.unified_diff(a.text.splitlines(), b.text.splitlines(), f"version {a.number}",
                                     f"version {b.number}", lineterm="", n=3):
        kind = ("meta" if line.startswith(("---", "+++", "@@")) else
                "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        lines.append((kind, line))
    rules_changed = a.rules != b.rules
    ctx = {"project": prompt.project, "prompt": prompt, "a": a, "b": b, "lines": lines,
           "versions": prompt.versions.all(), "rules_changed": rules_changed}
    return render(request, "workbench/prompt_diff.html", ctx)
