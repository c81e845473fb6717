"""Prompts: immutable versions of a text with its checkable rules and facts."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction

from engines import facts, jsonguard, rules
from workbench.actions import ActionError
from workbench.models import FoundationModel, Project, Prompt, PromptVersion
from workbench.prompt_costs import TokenCountError


@dataclass
class PromptSaved:
    version: PromptVersion
    created: bool  # False: identical to the latest version, nothing stored


def decode_prompt_file(data: bytes, filename: str = "") -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ActionError(
            f"{filename or 'prompt file'}: not valid UTF-8 on line {line}; save it as UTF-8."
        ) from exc


def prompt_max_bytes() -> int:
    """The most bytes a prompt file may have: a UTF-8 character is at most 4 bytes, a BOM 3."""
    return int(settings.PROMPT_MAX_BYTES)


def read_prompt_file(stream: IO[bytes], filename: str = "") -> str:
    """A prompt file's text, reading at most one byte past the limit: a larger
    file is refused without reading the rest."""
    limit = prompt_max_bytes()
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ActionError(
            f"{filename or 'prompt file'}: the file is larger than {limit:,} bytes; a prompt is "
            f"at most {settings.PROMPT_MAX_CHARS:,} characters."
        )
    return decode_prompt_file(data, filename)


def rules_json_max_chars() -> int:
    return int(settings.PROMPT_RULES_MAX_CHARS)


def parse_rules_json(raw: str | bytes, source: str = "Rules") -> Any:
    """Rules typed or uploaded as JSON, with their size and nesting bounded
    (engines.jsonguard); ActionError names the line."""
    limit = rules_json_max_chars()
    if len(raw) > limit:
        raise ActionError(f"{source}: the JSON has {len(raw):,} characters; the limit is {limit:,}.")
    try:
        return jsonguard.loads(raw)
    except jsonguard.TooDeep as exc:
        raise ActionError(f"{source}: line {exc.line}: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise ActionError(
            f"{source}: line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4,300 digits
        raise ActionError(f"{source}: invalid JSON: {exc}") from None


def _unicode_problem(what: str, value: str) -> None:
    problem = rules.surrogate_problem(value)
    if problem:
        raise ActionError(f"The {what} {problem}.")


class PromptNameTaken(ActionError):
    """A new prompt was given the name of an existing one."""

    def __init__(self, prompt: Prompt) -> None:
        super().__init__(f"A prompt named “{prompt.name}” already exists in this project.")
        self.prompt = prompt


def _checked_text(text: str) -> str:
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ActionError("The prompt text is empty.")
    if len(text) > settings.PROMPT_MAX_CHARS:
        raise ActionError(
            f"The prompt has {len(text):,} characters; the limit is {settings.PROMPT_MAX_CHARS:,}."
        )
    _unicode_problem("prompt text", text)
    return text


def _checked_name_and_note(name: str, note: str) -> tuple[str, str]:
    name = name.strip()
    if not name:
        raise ActionError("A prompt needs a name.")
    if len(name) > 200:
        raise ActionError(f"The prompt name has {len(name):,} characters; the limit is 200.")
    _unicode_problem("prompt name", name)
    _unicode_problem("note", note)
    return name, note


def _checked_rules(rules_data: object) -> list[dict[str, Any]]:
    try:
        return rules.rules_to_json(rules.validate_rules(rules_data))
    except rules.RulesError as exc:
        raise ActionError("Invalid rules:\n" + "\n".join(exc.errors)) from exc


def _checked_facts(facts_data: object) -> list[dict[str, Any]]:
    try:
        return facts.facts_to_json(facts.validate_facts(facts_data))
    except facts.FactsError as exc:
        raise ActionError("Invalid facts:\n" + "\n".join(exc.errors)) from exc


@dataclass(frozen=True)
class CheckedPrompt:
    """A prompt's text, rules and facts as save_prompt would store them."""

    text: str
    sha256: str
    rules: list[dict[str, Any]]
    facts: list[dict[str, Any]]

    def same_as(self, version: PromptVersion | None) -> bool:
        """save_prompt would return `version` unchanged (it is the latest)."""
        return (
            version is not None
            and version.sha256 == self.sha256
            and version.rules == self.rules
            and version.facts == self.facts
        )


def check_prompt(text: str, rules_data: object, facts_data: object) -> CheckedPrompt:
    """Validate without storing (ActionError says what is wrong): a plan can
    tell whether saving would make a new version."""
    checked = _checked_text(text)
    return CheckedPrompt(
        checked,
        hashlib.sha256(checked.encode("utf-8")).hexdigest(),
        _checked_rules(rules_data),
        _checked_facts(facts_data),
    )


def facts_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """A short note on how the facts changed (names added and removed, a count of changed)."""
    before = {f["name"]: f for f in old}
    after = {f["name"]: f for f in new}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and before[n] != after[n]]
    parts = []
    if added:
        parts.append(
            f"added fact{'s' if len(added) > 1 else ''} {', '.join(added[:3])}"
            + (" …" if len(added) > 3 else "")
        )
    if removed:
        parts.append(
            f"removed fact{'s' if len(removed) > 1 else ''} {', '.join(removed[:3])}"
            + (" …" if len(removed) > 3 else "")
        )
    if changed:
        parts.append(f"changed {len(changed)} fact{'s' if len(changed) > 1 else ''}")
    return "; ".join(parts)


@transaction.atomic
def create_prompt(
    project: Project,
    user: User | None,
    name: str,
    text: str,
    rules_data: object = None,
    note: str = "",
    facts_data: object = None,
) -> PromptVersion:
    """A new prompt with its first version. A name already in use is refused
    (PromptNameTaken): a new version of an existing prompt is saved on its
    page, where its rules are kept, never by reusing its name here."""
    name, note = _checked_name_and_note(name, note)
    text = _checked_text(text)
    rule_list = _checked_rules([] if rules_data is None else rules_data)
    fact_list = _checked_facts([] if facts_data is None else facts_data)
    existing = project.prompts.filter(name=name).first()
    if existing is not None:
        raise PromptNameTaken(existing)
    prompt = Prompt.objects.create(project=project, name=name, created_by=user)
    return PromptVersion.objects.create(
        prompt=prompt,
        number=1,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        rules=rule_list,
        facts=fact_list,
        note=note[:300],
        author=user,
    )


@transaction.atomic
def save_prompt(
    project: Project,
    user: User | None,
    name: str,
    text: str,
    rules_data: object = None,
    note: str = "",
    facts_data: object = None,
) -> PromptSaved:
    """Save a new version of the named prompt (created if new). rules_data
    (facts_data) None keeps the latest version's rules (facts); a version that
    changes them without a note gets one naming what was added, removed and
    changed."""
    name, note = _checked_name_and_note(name, note)
    text = _checked_text(text)
    prompt, _ = Prompt.objects.get_or_create(project=project, name=name, defaults={"created_by": user})
    # Lock the prompt row so two saves cannot take the same version number.
    prompt = Prompt.objects.select_for_update().get(pk=prompt.pk)
    latest = prompt.latest
    rule_list = (latest.rules if latest else []) if rules_data is None else _checked_rules(rules_data)
    fact_list = (latest.facts if latest else []) if facts_data is None else _checked_facts(facts_data)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if latest and latest.sha256 == sha and latest.rules == rule_list and latest.facts == fact_list:
        return PromptSaved(latest, created=False)
    if not note and latest and (latest.rules != rule_list or latest.facts != fact_list):
        note = "; ".join(
            [c.summary for c in rule_changes(latest.rules, rule_list)]
            + ([facts_changes(latest.facts, fact_list)] if latest.facts != fact_list else [])
        )
    version = PromptVersion.objects.create(
        prompt=prompt,
        number=(latest.number + 1 if latest else 1),
        text=text,
        sha256=sha,
        rules=rule_list,
        facts=fact_list,
        note=note[:300],
        author=user,
    )
    return PromptSaved(version, created=True)


def _latest_locked(prompt: Prompt) -> PromptVersion:
    # Under the lock, so two rule edits cannot both start from the same rules.
    locked = Prompt.objects.select_for_update().get(pk=prompt.pk)
    latest = locked.latest
    if latest is None:
        raise ActionError(f"The prompt {prompt.name} has no saved text yet.")
    return latest


class RulesMoved(ActionError):
    """The rules were saved by someone else since the editor was opened."""


@transaction.atomic
def save_rules(prompt: Prompt, user: User | None, rule_list: list[dict[str, Any]], base: int) -> PromptSaved:
    """The prompt's rules replaced as one change: one new version with the same
    text (or none, when nothing changed), its note naming every rule added,
    removed and changed. `base` is the version the editor showed: when a newer
    one was saved since, nothing is stored (RulesMoved)."""
    latest = _latest_locked(prompt)
    if latest.number != base:
        raise RulesMoved(
            f"{prompt.name} was saved as version {latest.number} since you opened version {base}: "
            "nothing was saved. Your edits are below; check them against the new version and save again."
        )
    return save_prompt(prompt.project, user, prompt.name, latest.text, rule_list)


@transaction.atomic
def add_rule(prompt: Prompt, user: User | None, rule: dict[str, Any]) -> PromptSaved:
    """A new version with the same text and one more rule; its note names the rule."""
    latest = _latest_locked(prompt)
    return save_prompt(
        prompt.project,
        user,
        prompt.name,
        latest.text,
        [*latest.rules, rule],
        f"added rule {rule.get('name', '')}",
    )


@transaction.atomic
def remove_rule(prompt: Prompt, user: User | None, name: str) -> PromptSaved:
    """A new version with the same text, without the named rule; its note names the rule."""
    latest = _latest_locked(prompt)
    kept = [r for r in latest.rules if r["name"] != name]
    if len(kept) == len(latest.rules):
        raise ActionError(f"The prompt has no rule named '{name}'.")
    return save_prompt(prompt.project, user, prompt.name, latest.text, kept, f"removed rule {name}")


@transaction.atomic
def restore_version(prompt: Prompt, user: User | None, number: int) -> PromptSaved:
    """A new version with the text, rules and facts of an older one (which stays as it was)."""
    _latest_locked(prompt)
    old = prompt.versions.filter(number=number).first()
    if old is None:
        raise ActionError(f"The prompt {prompt.name} has no version {number}.")
    return save_prompt(
        prompt.project,
        user,
        prompt.name,
        old.text,
        old.rules,
        f"restored version {number}",
        facts_data=old.facts,
    )


def find_prompt_version(project: Project, spec: str) -> PromptVersion:
    """`NAME` (latest) or `NAME@N`."""
    name, _, number = spec.partition("@")
    qs = PromptVersion.objects.filter(prompt__project=project, prompt__name=name)
    version = qs.filter(number=int(number)).first() if number.isdigit() else qs.order_by("-number").first()
    if version is None:
        raise ActionError(f"No prompt '{spec}' in project {project.slug}.")
    return version


@dataclass
class RuleChange:
    change: str  # added | removed | changed
    name: str
    details: list[str]  # a description of the rule (added, removed) or "param: old → new" (changed)

    @property
    def summary(self) -> str:
        return f"{self.change} rule {self.name}"


def _value(rule: dict[str, Any], key: str) -> str:
    return json.dumps(rule[key], ensure_ascii=False) if key in rule else "(not set)"


def describe_rule(rule: dict[str, Any]) -> str:
    """A stored rule described; one that today's limits refuse (stored before
    them) is shown as such instead of breaking the page."""
    try:
        return rules.describe(rules.validate_rules([rule])[0])
    except rules.RulesError as exc:
        return f"{rule.get('kind', '')} (invalid: {'; '.join(exc.errors)[:300]})"


def rule_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[RuleChange]:
    """The rules added, removed and changed (by name) from `old` to `new`,
    with the parameters that changed."""
    before = {r["name"]: r for r in old}
    after = {r["name"]: r for r in new}
    changes = [
        RuleChange("removed", name, [describe_rule(r)]) for name, r in before.items() if name not in after
    ]
    for name, rule in after.items():
        if name not in before:
            changes.append(RuleChange("added", name, [describe_rule(rule)]))
        elif before[name] != rule:
            was = before[name]
            details = [
                f"{key}: {_value(was, key)} → {_value(rule, key)}"
                for key in dict.fromkeys([*was, *rule])
                if key != "name" and (key in was, was.get(key)) != (key in rule, rule.get(key))
            ]
            changes.append(RuleChange("changed", name, details))
    return changes


@dataclass
class PromptDiff:
    a: PromptVersion
    b: PromptVersion
    lines: list[tuple[str, str]]  # (meta|add|del|ctx, line)

    @property
    def rules_changed(self) -> bool:
        return self.a.rules != self.b.rules

    @property
    def rule_changes(self) -> list[RuleChange]:
        return rule_changes(self.a.rules, self.b.rules)


def diff_versions(a: PromptVersion, b: PromptVersion) -> PromptDiff:
    """A unified diff of two versions' texts, each line tagged for display."""
    lines = []
    for line in difflib.unified_diff(
        a.text.splitlines(),
        b.text.splitlines(),
        f"version {a.number}",
        f"version {b.number}",
        lineterm="",
        n=3,
    ):
        kind = (
            "meta"
            if line.startswith(("---", "+++", "@@"))
            else "add"
            if line.startswith("+")
            else "del"
            if line.startswith("-")
            else "ctx"
        )
        lines.append((kind, line))
    return PromptDiff(a, b, lines)


def token_costs(version: PromptVersion) -> list[dict[str, Any]]:
    """What the version costs per request under each registered base model,
    explained (see workbench.prompt_costs), and whether it fits the model."""
    costs = []
    for model in FoundationModel.objects.all():
        try:
            costs.append(
                {"model": model, **version.cost_under(model), "too_long": version.too_long_for(model)}
            )
        except TokenCountError as exc:  # a broken model directory must not break the prompt page
            costs.append({"model": model, "error": str(exc)[:200]})
    return costs
