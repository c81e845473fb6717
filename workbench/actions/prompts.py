"""Prompts: immutable versions of a text with its checkable rules."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from engines import rules
from engines.tokens import load_tokenizer, prompt_cost
from workbench.actions import ActionError
from workbench.models import BaseModel, Project, Prompt, PromptVersion


@dataclass
class PromptSaved:
    version: PromptVersion
    created: bool  # False: identical to the latest version, nothing stored


def decode_prompt_file(data: bytes, filename: str = "") -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ActionError(f"{filename or 'prompt file'}: not valid UTF-8 on line {line}; save it as UTF-8.") from exc


@transaction.atomic
def save_prompt(
    project: Project, user: AbstractBaseUser | None, name: str, text: str,
    rules_data: object = None, note: str = "",
) -> PromptSaved:
    """Save a new version of the named prompt (created if new). rules_data
    None keeps the latest version's rules."""
    name = name.strip()
    if not name:
        raise ActionError("A prompt needs a name.")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ActionError("The prompt text is empty.")
    if len(text) > settings.PROMPT_MAX_CHARS:
        raise ActionError(f"The prompt has {len(text):,} characters; the limit is {settings.PROMPT_MAX_CHARS:,}.")
    prompt, _ = Prompt.objects.get_or_create(project=project, name=name, defaults={"created_by": user})
    # Lock the prompt row so two saves cannot take the same version number.
    prompt = Prompt.objects.select_for_update().get(pk=prompt.pk)
    latest = prompt.latest
    if rules_data is None:
        rule_list = latest.rules if latest else []
    else:
        try:
            rule_list = rules.rules_to_json(rules.validate_rules(rules_data))
        except rules.RulesError as exc:
            raise ActionError("Invalid rules:\n" + "\n".join(exc.errors)) from exc
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if latest and latest.sha256 == sha and latest.rules == rule_list:
        return PromptSaved(latest, created=False)
    version = PromptVersion.objects.create(
        prompt=prompt, number=(latest.number + 1 if latest else 1), text=text, sha256=sha,
        rules=rule_list, note=note[:300], author=user,
    )
    return PromptSaved(version, created=True)


def _latest_locked(prompt: Prompt) -> PromptVersion:
    # Under the lock, so two rule edits cannot both start from the same rules.
    locked = Prompt.objects.select_for_update().get(pk=prompt.pk)
    latest = locked.latest
    if latest is None:
        raise ActionError(f"The prompt {prompt.name} has no saved text yet.")
    return latest


@transaction.atomic
def add_rule(prompt: Prompt, user: AbstractBaseUser | None, rule: dict[str, Any]) -> PromptSaved:
    """A new version with the same text and one more rule."""
    latest = _latest_locked(prompt)
    return save_prompt(prompt.project, user, prompt.name, latest.text, [*latest.rules, rule], "rules edited")


@transaction.atomic
def remove_rule(prompt: Prompt, user: AbstractBaseUser | None, name: str) -> PromptSaved:
    """A new version with the same text, without the named rule."""
    latest = _latest_locked(prompt)
    kept = [r for r in latest.rules if r["name"] != name]
    if len(kept) == len(latest.rules):
        raise ActionError(f"The prompt has no rule named '{name}'.")
    return save_prompt(prompt.project, user, prompt.name, latest.text, kept, "rules edited")


def find_prompt_version(project: Project, spec: str) -> PromptVersion:
    """`NAME` (latest) or `NAME@N`."""
    name, _, number = spec.partition("@")
    qs = PromptVersion.objects.filter(prompt__project=project, prompt__name=name)
    version = qs.filter(number=int(number)).first() if number.isdigit() else qs.order_by("-number").first()
    if version is None:
        raise ActionError(f"No prompt '{spec}' in project {project.slug}.")
    return version


@dataclass
class PromptDiff:
    a: PromptVersion
    b: PromptVersion
    lines: list[tuple[str, str]]  # (meta|add|del|ctx, line)

    @property
    def rules_changed(self) -> bool:
        return self.a.rules != self.b.rules


def diff_versions(a: PromptVersion, b: PromptVersion) -> PromptDiff:
    """A unified diff of two versions' texts, each line tagged for display."""
    lines = []
    for line in difflib.unified_diff(a.text.splitlines(), b.text.splitlines(), f"version {a.number}",
                                     f"version {b.number}", lineterm="", n=3):
        kind = ("meta" if line.startswith(("---", "+++", "@@")) else
                "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        lines.append((kind, line))
    return PromptDiff(a, b, lines)


def token_costs(text: str) -> list[dict[str, Any]]:
    """What the text costs per request under each registered base model."""
    costs = []
    for model in BaseModel.objects.all():
        try:
            costs.append({"model": model, **prompt_cost(load_tokenizer(model.path), text)})
        except Exception as exc:  # a broken model directory must not break the prompt page
            costs.append({"model": model, "error": str(exc)[:200]})
    return costs
