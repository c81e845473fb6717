from __future__ import annotations

import json
import re
from itertools import zip_longest
from typing import Any, cast

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Length, Substr
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from engines import facts, rules
from workbench.actions import ActionError
from workbench.actions.prompts import (
    PromptNameTaken,
    RulesMoved,
    create_prompt,
    describe_rule,
    diff_versions,
    remove_rule,
    restore_version,
    save_prompt,
    save_rules,
    token_costs,
)
from workbench.forms import (
    RULES_PREFIX,
    AddFactsForm,
    BaseRuleFormSet,
    DiffForm,
    FactsForm,
    PromptForm,
    PromptTextForm,
    RuleForm,
    RuleFormSet,
)
from workbench.models import Project, Prompt, PromptVersion
from workbench.shortcuts import AuthedHttpRequest, get_for_project, get_project
from workbench.uploads import limit_upload


def _get_prompt(request: HttpRequest, slug: str, prompt_id: int) -> Prompt:
    return get_for_project(request, slug, Prompt.objects.select_related("project"), pk=prompt_id)


PROMPTS_PER_PAGE = 25
VERSIONS_PER_PAGE = 50
PREVIEW_CHARS = 300
# What a list shows of a version: never its text (up to PROMPT_MAX_CHARS each).
VERSION_FIELDS = ("id", "prompt_id", "number", "sha256", "note", "author", "created_at")


def _list_page(
    request: HttpRequest,
    project: Project,
    form: PromptForm,
    status: int = 200,
    existing: Prompt | None = None,
) -> HttpResponse:
    """One page of prompts; counts, text lengths and previews come from SQL,
    so a page costs the same whatever the size of the texts."""
    latest_id = PromptVersion.objects.filter(prompt=OuterRef("pk")).order_by("-number").values("pk")[:1]
    prompts = project.prompts.annotate(version_count=Count("versions"), latest_id=Subquery(latest_id))
    page = Paginator(prompts.order_by("name", "pk"), PROMPTS_PER_PAGE).get_page(request.GET.get("page"))
    latest = {
        v.pk: v
        for v in PromptVersion.objects.filter(pk__in=[p.latest_id for p in page])
        .only(*VERSION_FIELDS, "rules")
        .select_related("author")
        .annotate(text_chars=Length("text"), preview=Substr("text", 1, PREVIEW_CHARS + 1))
    }
    for p in page:
        p.latest_version = latest.get(p.latest_id)  # type: ignore[attr-defined]  # for the template only
    ctx = {
        "project": project,
        "prompts": page,
        "page": page,
        "form": form,
        "existing": existing,
        "existing_rules": len(existing.latest.rules) if existing and existing.latest else 0,
    }
    return render(request, "workbench/prompt_list.html", ctx, status=status)


@login_required
def prompt_list(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    return _list_page(request, get_project(request, slug), PromptForm())


def _prompt_bytes() -> int:
    return settings.PROMPT_MAX_BYTES


def _create_refused(request: HttpRequest, message: str, slug: str) -> HttpResponse:
    messages.error(request, message)
    return _list_page(request, get_project(request, slug), PromptForm(), status=413)


def _save_refused(request: HttpRequest, message: str, slug: str, prompt_id: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    messages.error(request, message)
    return _version_page(request, prompt, prompt.latest, status=413)


@login_required
@require_POST
@limit_upload(_create_refused, max_bytes=_prompt_bytes)
def prompt_create(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """A new prompt; with `version_of` (the explicit offer made when the name
    is taken), a new version of that prompt, keeping its rules unless rules
    were typed."""
    project = get_project(request, slug)
    form = PromptForm(request.POST, request.FILES)
    existing = None
    if form.is_valid():
        data = form.cleaned_data
        try:
            if data["version_of"]:
                existing = get_object_or_404(project.prompts, pk=data["version_of"])
                saved = save_prompt(
                    project,
                    request.user,
                    existing.name,
                    form.prompt_text,
                    data["rules"],
                    data["note"],
                    facts_data=data["facts"],
                )
                v = saved.version
                messages.success(
                    request,
                    f"Saved {v.prompt.name} version {v.number}."
                    if saved.created
                    else f"{v.prompt.name} is unchanged (version {v.number}).",
                )
            else:
                v = create_prompt(
                    project,
                    request.user,
                    data["name"],
                    form.prompt_text,
                    data["rules"],
                    data["note"],
                    facts_data=data["facts"],
                )
                messages.success(request, f"Saved {v.prompt.name} version {v.number}.")
        except PromptNameTaken as exc:
            existing = exc.prompt
            form.add_error("name", str(exc))
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(v.prompt)
    return _list_page(request, project, form, status=400, existing=existing)


def _version_page(
    request: HttpRequest,
    prompt: Prompt,
    version: PromptVersion | None,
    *,
    save_form: PromptTextForm | None = None,
    rule_formset: BaseRuleFormSet | None = None,
    rules_error: str = "",
    facts_form: FactsForm | None = None,
    drafts: list[dict[str, Any]] | None = None,
    add_form: AddFactsForm | None = None,
    status: int = 200,
) -> HttpResponse:
    """A version's page. Only the latest version is edited (its text fills the
    editor); an older one offers to restore it as a new version."""
    latest = prompt.versions.only(*VERSION_FIELDS).order_by("-number").first()
    is_latest = version is not None and latest is not None and version.number == latest.number
    rule_list = [(r, describe_rule(r)) for r in version.rules] if version else []
    # The rules editor, on the latest version only: a row per rule (its description beside it) and a new row.
    formset = rule_formset or _rule_formset(version if is_latest else None)
    descriptions = [d for _r, d in rule_list][: len(formset.forms)]
    versions = Paginator(
        prompt.versions.only(*VERSION_FIELDS).select_related("author").order_by("-number"), VERSIONS_PER_PAGE
    ).get_page(request.GET.get("versions"))
    ctx = {
        "project": prompt.project,
        "prompt": prompt,
        "version": version,
        "latest": latest,
        "is_latest": is_latest,
        "versions": versions,
        "costs": token_costs(version) if version else [],
        "rule_list": rule_list,
        "kinds": rules.KINDS,
        "save_form": save_form
        or PromptTextForm(initial={"text": version.text if version and is_latest else ""}),
        "rule_rows": list(zip_longest(formset.forms, descriptions)),
        "rule_formset": formset,
        "rules_error": rules_error,
        "facts_form": facts_form
        or FactsForm(
            initial={"facts": json.dumps(version.facts, indent=1, ensure_ascii=False) if version else ""}
        ),
        "drafts": drafts,
        "add_form": add_form,
    }
    return render(request, "workbench/prompt_detail.html", ctx, status=status)


@login_required
def prompt_detail(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    return _version_page(request, prompt, prompt.latest)


@login_required
def prompt_version(request: AuthedHttpRequest, slug: str, prompt_id: int, number: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    return _version_page(request, prompt, get_object_or_404(prompt.versions, number=number))


@login_required
@require_POST
@limit_upload(_save_refused, max_bytes=_prompt_bytes)
def prompt_save(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """A new version with edited text (rules carried over)."""
    prompt = _get_prompt(request, slug, prompt_id)
    form = PromptTextForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            saved = save_prompt(
                prompt.project, request.user, prompt.name, form.prompt_text, None, form.cleaned_data["note"]
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request, f"Saved version {saved.version.number}." if saved.created else "No change."
            )
            return redirect(prompt)
    return _version_page(request, prompt, prompt.latest, save_form=form, status=400)


@login_required
@require_POST
def prompt_restore(request: AuthedHttpRequest, slug: str, prompt_id: int, number: int) -> HttpResponse:
    """An older version's text and rules saved as a new version."""
    prompt = _get_prompt(request, slug, prompt_id)
    try:
        saved = restore_version(prompt, request.user, number)
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(prompt)
    messages.success(
        request,
        f"Version {number} restored as version {saved.version.number}."
        if saved.created
        else f"Version {number} is already the latest text and rules.",
    )
    return redirect(prompt)


def _rule_formset(version: PromptVersion | None, data: QueryDict | None = None) -> BaseRuleFormSet:
    """The rules editor: a row per rule of the version, and a new row."""
    initial = [RuleForm.initial_of(r) for r in version.rules] if version else []
    return cast(BaseRuleFormSet, RuleFormSet(data, initial=initial, prefix=RULES_PREFIX))


def _one_rule_added(post: QueryDict, latest: PromptVersion) -> QueryDict:
    """A post of one rule's fields alone (not the editor's rows): the editor's
    rows as a browser would post them, the stored rules then this one."""
    data = QueryDict(mutable=True)
    count = len(latest.rules)
    data[f"{RULES_PREFIX}-TOTAL_FORMS"] = str(count + 1)
    data[f"{RULES_PREFIX}-INITIAL_FORMS"] = str(count)
    for i, rule in enumerate(latest.rules):
        for key, values in RuleForm(prefix=f"{RULES_PREFIX}-{i}").as_data(rule):
            data.setlist(key, values)
    for key in post:
        if key != "csrfmiddlewaretoken":
            data.setlist(f"{RULES_PREFIX}-{count}-{key}", post.getlist(key))
    return data


@login_required
@require_POST
def prompt_rules(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """The rules edited as one change: the editor's rows (added, changed,
    removed) saved as one new version with the same text. A post of one
    rule's fields alone adds that rule."""
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        raise Http404("The prompt has no saved text yet.")
    editor = f"{RULES_PREFIX}-TOTAL_FORMS" in request.POST
    formset = _rule_formset(latest, request.POST if editor else _one_rule_added(request.POST, latest))
    base = request.POST.get("base", "") if editor else str(latest.number)
    error, status = "", 400
    if not (base.isdigit() and len(base) < 10):
        error = "The rules form was incomplete; reload the page and edit the rules again."
    elif formset.is_valid():
        try:
            saved = save_rules(prompt, request.user, formset.rules(), int(base))
        except RulesMoved as exc:
            error, status = str(exc), 409
        except ActionError as exc:
            error = str(exc)
        else:
            v = saved.version
            messages.success(
                request,
                f"Rules saved as version {v.number}. {v.note[:1].upper()}{v.note[1:]}."
                if saved.created
                else "The rules are unchanged: no new version.",
            )
            return redirect(prompt)
    return _version_page(request, prompt, latest, rule_formset=formset, rules_error=error, status=status)


@login_required
@require_POST
def prompt_rule_remove(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """Remove a rule: a new version with the same text."""
    prompt = _get_prompt(request, slug, prompt_id)
    try:
        saved = remove_rule(prompt, request.user, request.POST.get("name", ""))
    except ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Rules saved as version {saved.version.number}.")
    return redirect(prompt)


ROW_PREFIX = re.compile(rf"{RULES_PREFIX}-\d{{1,4}}")


@login_required
def rule_params(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """The parameter fields of one rule kind (htmx swaps them into the form);
    `prefix` names the editor's row they are for."""
    get_project(request, slug)
    prefix = request.GET.get("prefix", "")
    prefix = prefix if ROW_PREFIX.fullmatch(prefix) else ""
    kind = request.GET.get(f"{prefix}-kind", "") if prefix else request.GET.get("kind", "")
    form = RuleForm(prefix=prefix or None, initial={"kind": kind})
    return render(request, "workbench/prompt_detail.html#rule-params", {"rule_form": form})


@login_required
def prompt_diff(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.versions.only("id", "number").order_by("-number").first()
    if latest is None:
        return redirect(prompt)
    form = DiffForm(request.GET)
    chosen = form.cleaned_data if form.is_valid() else {}  # a bad number falls back to the latest two
    a = get_object_or_404(prompt.versions, number=chosen.get("a") or max(1, latest.number - 1))
    b = get_object_or_404(prompt.versions, number=chosen.get("b") or latest.number)
    ctx = {"project": prompt.project, "prompt": prompt, "diff": diff_versions(a, b)}
    return render(request, "workbench/prompt_diff.html", ctx)


@login_required
@require_POST
def prompt_facts(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """Replace the facts checks: a new version with the same text and rules."""
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        raise Http404("The prompt has no saved text yet.")
    form = FactsForm(request.POST)
    if form.is_valid():
        try:
            saved = save_prompt(
                prompt.project,
                request.user,
                prompt.name,
                latest.text,
                None,
                facts_data=form.cleaned_data["facts"],
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request, f"Facts saved as version {saved.version.number}." if saved.created else "No change."
            )
            return redirect(prompt)
    return _version_page(request, prompt, latest, facts_form=form, status=400)


@login_required
def prompt_facts_propose(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """Facts checks drafted from the latest text (engines.facts.propose_facts), to pick from."""
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        raise Http404("The prompt has no saved text yet.")
    drafts = facts.propose_facts(latest.text)
    if request.htmx:
        ctx = {"project": prompt.project, "prompt": prompt, "version": latest, "drafts": drafts}
        return render(request, "workbench/prompt_detail.html#fact-drafts", ctx)
    return _version_page(request, prompt, latest, drafts=drafts)


@login_required
@require_POST
def prompt_facts_add(request: AuthedHttpRequest, slug: str, prompt_id: int) -> HttpResponse:
    """The checked drafts added to the facts: a new version with the same text.
    The drafts are made again from the version they were proposed from (the
    proposal is deterministic), so the browser never sends a check to trust."""
    prompt = _get_prompt(request, slug, prompt_id)
    latest = prompt.latest
    if latest is None:
        raise Http404("The prompt has no saved text yet.")
    number = request.POST.get("version", "")
    source = (
        prompt.versions.filter(number=int(number)).first() if number.isdigit() and len(number) < 10 else None
    )
    if source is None:
        messages.error(request, "Propose the facts again: the version they came from is unknown.")
        return _version_page(request, prompt, latest, status=400)
    drafts = facts.propose_facts(source.text)
    form = AddFactsForm(len(drafts), request.POST)
    if form.is_valid():
        have = {f["name"] for f in latest.facts}
        picked = [drafts[i] for i in sorted(set(form.cleaned_data["pick"]))]
        new = [d for d in picked if d["name"] not in have]
        try:
            if not new:
                raise ActionError("The checked facts are already in the prompt's facts (same names).")
            saved = save_prompt(
                prompt.project, request.user, prompt.name, latest.text, None, facts_data=[*latest.facts, *new]
            )
        except ActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request,
                f"Added {len(new)} fact{'s' if len(new) != 1 else ''} as version {saved.version.number}.",
            )
            return redirect(prompt)
    return _version_page(request, prompt, latest, drafts=drafts, add_form=form, status=400)
