"""Forms: parse and type what the user sent. A bound form with errors is
shown again with what was typed (status 400); the actions check the rest."""

from __future__ import annotations

import uuid
from typing import Any, cast

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.template.defaultfilters import filesizeformat

from engines import facts, formats, rules
from workbench.actions import ActionError
from workbench.actions.datasets import held_out_count
from workbench.actions.prompts import parse_rules_json, read_prompt_file
from workbench.models import FoundationModel, Membership


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=100, error_messages={"required": "A project needs a name."})
    description = forms.CharField(required=False)


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150, error_messages={"required": "Which user? Enter a username."})
    role = forms.ChoiceField(
        choices=Membership.ROLES,
        required=False,
        error_messages={"invalid_choice": "Unknown role '%(value)s'."},
    )

    def clean_role(self) -> str:
        return self.cleaned_data["role"] or Membership.MEMBER


def form_token_field() -> forms.UUIDField:
    """The hidden token of a form that starts work (an import, a job): what it
    made keeps the token, so posting the same form twice (Back + resubmit, a
    double click) makes one."""
    return forms.UUIDField(required=False, widget=forms.HiddenInput)


def model_choice(form: forms.BaseForm, name: str) -> forms.ModelChoiceField[Any]:
    """The form's model choice field `name` (also a multiple one), typed as
    such: `form.fields` types each as a plain Field."""
    return cast("forms.ModelChoiceField[Any]", form.fields[name])  # generic in the stubs only


def with_form_token(initial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Initial data for a freshly rendered form: a new token. (Set by the page,
    not the form: a form built without it, by a script, simply has no token.)"""
    return {**(initial or {}), "form_token": uuid.uuid4()}


# --- prompts ------------------------------------------------------------------


def _unicode_text(value: str) -> None:
    """Refuse a lone surrogate: it cannot be stored as UTF-8 nor rendered."""
    problem = rules.surrogate_problem(value)
    if problem:
        raise ValidationError(f"The text {problem}.")


class PromptTextForm(forms.Form):
    """A new version's text, typed or uploaded (the file wins)."""

    text = forms.CharField(required=False, strip=False, widget=forms.Textarea, validators=[_unicode_text])
    file = forms.FileField(required=False, allow_empty_file=True)
    note = forms.CharField(max_length=300, required=False, validators=[_unicode_text])

    def clean_file(self) -> str | None:
        upload = self.cleaned_data["file"]
        if not upload:
            return None
        try:
            return read_prompt_file(upload, upload.name)
        except ActionError as exc:
            raise ValidationError(str(exc)) from exc

    @property
    def prompt_text(self) -> str:
        uploaded = self.cleaned_data["file"]
        return uploaded if uploaded is not None else self.cleaned_data["text"]


class PromptForm(PromptTextForm):
    """A new prompt: name, text and optionally its rules as JSON. With
    version_of (a prompt's id, sent by the explicit "new version of X" button
    when the name is taken), a new version of that prompt."""

    name = forms.CharField(
        max_length=200, error_messages={"required": "A prompt needs a name."}, validators=[_unicode_text]
    )
    rules = forms.CharField(required=False, widget=forms.Textarea)
    facts = forms.CharField(required=False, widget=forms.Textarea)
    version_of = forms.IntegerField(required=False, widget=forms.HiddenInput)

    field_order = ["name", "text", "file", "rules", "facts", "note"]

    def clean_facts(self) -> Any:
        """The parsed facts checks, or None when left empty (a new version keeps its facts)."""
        return clean_facts_json(self.cleaned_data["facts"])

    def clean_rules(self) -> Any:
        """The parsed JSON, or None when left empty (a new prompt then has
        no rules, a new version keeps those it has)."""
        raw = self.cleaned_data["rules"]
        if not raw.strip():
            return None
        try:
            data = parse_rules_json(raw)
        except ActionError as exc:
            raise ValidationError(str(exc)) from exc
        try:
            return rules.rules_to_json(rules.validate_rules(data))
        except rules.RulesError as exc:
            raise ValidationError([f"Rules: {e}" for e in exc.errors]) from exc


def clean_facts_json(raw: str) -> Any:
    """Facts checks typed as JSON, validated (engines.facts); None when empty."""
    if not raw.strip():
        return None
    try:
        data = parse_rules_json(raw, "Facts")
    except ActionError as exc:
        raise ValidationError(str(exc)) from exc
    try:
        return facts.facts_to_json(facts.validate_facts(data))
    except facts.FactsError as exc:
        raise ValidationError([f"Facts: {e}" for e in exc.errors]) from exc


class FactsForm(forms.Form):
    """The facts checks of a prompt as JSON: saving makes a new version with the same text."""

    facts = forms.CharField(required=False, widget=forms.Textarea)

    def clean_facts(self) -> Any:
        value = clean_facts_json(self.cleaned_data["facts"])
        return [] if value is None else value


class AddFactsForm(forms.Form):
    """Drafts proposed from one version's text, picked by their place in the list."""

    version = forms.IntegerField(min_value=1, widget=forms.HiddenInput)
    pick = forms.TypedMultipleChoiceField(
        coerce=int,
        choices=[],
        error_messages={
            "required": "Check at least one proposed fact to add.",
            "invalid_choice": "%(value)s is not one of the proposed facts; propose them again.",
        },
    )

    def __init__(self, drafts: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["pick"].choices = [(str(i), str(i)) for i in range(drafts)]  # type: ignore[attr-defined]


def _param_field(param: rules.Param) -> forms.Field:
    common: dict[str, Any] = {"label": param.name, "help_text": param.help}
    if param.type == "boolean":  # a checkbox: absent means unchecked
        return forms.BooleanField(required=False, initial=param.default, **common)
    if param.type == "integer":
        return forms.IntegerField(
            min_value=1,
            max_value=rules.MAX_INTEGER,
            required=param.required,
            **common,
            error_messages={
                "invalid": "Enter a positive whole number.",
                "min_value": "Enter a positive whole number.",
                "max_value": f"Enter at most {rules.MAX_INTEGER:,}.",
            },
        )
    if param.type == "flags":
        return forms.MultipleChoiceField(
            choices=[(c, c) for c in param.choices],
            required=False,
            initial=list(param.default or ()),
            **common,
        )
    return forms.CharField(
        required=param.required,
        strip=False,
        max_length=param.max_chars,
        validators=[_unicode_text],
        **common,
        error_messages={
            "max_length": f"{param.name} is at most {param.max_chars:,} characters (it has %(show_value)s)."
        },
    )


class RuleForm(forms.Form):
    """A rule's name, kind, and the parameters of that kind (engines.rules.KINDS),
    typed by the form. The rule as a whole is checked by the action."""

    rule_name = forms.CharField(
        max_length=rules.MAX_NAME_CHARS,
        validators=[_unicode_text],
        error_messages={
            "required": "A rule needs a name.",
            "max_length": f"A rule name is at most {rules.MAX_NAME_CHARS} "
            "characters (it has %(show_value)s).",
        },
    )
    kind = forms.ChoiceField(
        choices=[(k, k) for k in rules.KINDS],
        error_messages={
            "required": "Choose a kind of rule.",
            "invalid_choice": "Unknown kind of rule '%(value)s'.",
        },
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        kind_name = (
            self.data.get(self.add_prefix("kind"), "") if self.is_bound else self.initial.get("kind", "")
        )
        self.rule_kind: rules.Kind | None = rules.KINDS.get(kind_name)
        for param in self.rule_kind.params if self.rule_kind else ():
            self.fields[param.name] = _param_field(param)

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data  # what Form.clean returns, typed as never None
        # The pattern is compiled when the rule is saved, so a bad one is an error here, naming the rule.
        if self.rule_kind and self.rule_kind.name == "regex" and data.get("pattern"):
            try:
                rules.compile_pattern(data["pattern"], data.get("flags") or ())
            except ValueError as exc:
                name = data.get("rule_name", "").strip()
                self.add_error("pattern", f"Rule “{name}”: invalid regex: {exc}")
        return data

    @property
    def params(self) -> list[tuple[rules.Param, forms.BoundField]]:
        """The kind's parameters with their bound fields, for the template."""
        return [(p, self[p.name]) for p in self.rule_kind.params] if self.rule_kind else []

    def rule(self) -> dict[str, Any]:
        data = self.cleaned_data
        rule: dict[str, Any] = {"name": data["rule_name"].strip(), "kind": data["kind"]}
        for param in self.rule_kind.params if self.rule_kind else ():
            value = data.get(param.name)
            if param.type == "string" and not value and not param.required:
                continue  # an empty optional text takes the kind's default
            if value is not None:
                rule[param.name] = value
        return rule

    @staticmethod
    def initial_of(rule: dict[str, Any]) -> dict[str, Any]:
        """A stored rule as the form's initial values."""
        return {**{k: v for k, v in rule.items() if k != "name"}, "rule_name": rule.get("name", "")}

    def as_data(self, rule: dict[str, Any]) -> list[tuple[str, list[str]]]:
        """A stored rule as a browser would post it under this form's prefix."""
        data = [(self.add_prefix("rule_name"), [str(rule.get("name", ""))])]
        data.append((self.add_prefix("kind"), [str(rule.get("kind", ""))]))
        kind = rules.KINDS.get(str(rule.get("kind", "")))
        for param in kind.params if kind else ():
            value = rule.get(param.name, param.default)
            if param.type == "boolean":
                data.append((self.add_prefix(param.name), ["on"] if value else []))
            elif param.type == "flags":
                data.append((self.add_prefix(param.name), [str(v) for v in value or ()]))
            elif value is not None:
                data.append((self.add_prefix(param.name), [str(value)]))
        return data


class BaseRuleFormSet(forms.BaseFormSet):
    """A prompt's rules edited together: one Save makes one version."""

    default_error_messages = {
        "too_many_forms": f"A prompt version has at most {rules.MAX_RULES} rules; fewer rows, please.",
        "missing_management_form": "The rules form was incomplete; reload the page and edit the rules again.",
    }

    def rules(self) -> list[dict[str, Any]]:
        """The rules of the rows kept, in order (empty new rows and removed ones left out)."""
        return [
            f.rule()
            for f in self.forms
            if f.cleaned_data and not f.cleaned_data.get("DELETE")  # an untouched new row has none
        ]


RuleFormSet = forms.formset_factory(
    RuleForm,
    formset=BaseRuleFormSet,
    extra=1,
    can_delete=True,
    max_num=rules.MAX_RULES,
    absolute_max=rules.MAX_RULES + 50,
)
RULES_PREFIX = "rules"


class DiffForm(forms.Form):
    a = forms.IntegerField(min_value=1, required=False)
    b = forms.IntegerField(min_value=1, required=False)


# --- datasets -----------------------------------------------------------------

FORMAT_CHOICES = [
    ("auto", "Detect automatically"),
    *((k, f"{k} — {help}") for k, help in formats.FORMATS.items()),
]


class DatasetUploadForm(forms.Form):
    # An empty file is not refused here: the import says "the file is empty" like for any bad file.
    file = forms.FileField(allow_empty_file=True, error_messages={"required": "Choose a file to upload."})
    name = forms.CharField(max_length=200, required=False)
    format = forms.ChoiceField(
        choices=FORMAT_CHOICES,
        required=False,
        initial="auto",
        error_messages={
            "invalid_choice": f"Unknown format '%(value)s' (expected auto or one of "
            f"{', '.join(formats.FORMATS)})."
        },
    )
    query_column = forms.CharField(max_length=200, required=False)
    answer_column = forms.CharField(max_length=200, required=False)
    eval_percent = forms.IntegerField(
        label="Eval split %",
        min_value=0,
        max_value=100,
        required=False,
        help_text="Empty: 10% of the rows, but at least {min} held out (at most half the rows), so the "
        "eval has enough queries to decide on: {examples}. A number is used as it is; 100 makes a "
        "held-out set: every row is for evals, none for training.",
        error_messages={
            "invalid": "Invalid number: the eval split is a whole percent from 0 to 100.",
            "min_value": "The eval split must be between 0 and 100 percent.",
            "max_value": "The eval split must be between 0 and 100 percent.",
        },
    )
    seed = forms.IntegerField(
        label="Split seed",
        required=False,
        initial=0,
        min_value=0,
        max_value=2**31 - 1,
        error_messages={
            "invalid": "Invalid number: the split seed is a whole number.",
            "min_value": "The split seed must be from 0 to 2,147,483,647.",
            "max_value": "The split seed must be from 0 to 2,147,483,647.",
        },
    )
    records_key = forms.CharField(
        label="Records key",
        max_length=200,
        required=False,
        help_text='For a file that is one JSON object holding the rows under a key, e.g. {"qa": [...]}: that key.',
    )
    skip_bad = forms.BooleanField(
        label="skip bad rows (store the good ones and list the rest)", required=False
    )
    form_token = form_token_field()
    use_chosen = forms.BooleanField(label="use only the chosen answers (DPO pairs)", required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["eval_percent"]
        examples = ", ".join(f"{n:,} rows hold out {held_out_count(n, None):,}" for n in (40, 200, 1000))
        field.help_text = str(field.help_text).format(min=settings.EVAL_MIN_HELD_OUT, examples=examples)

    def clean_file(self) -> Any:
        upload = self.cleaned_data["file"]
        # The size the client sends is checked here; the import counts the stream too.
        if upload.size and upload.size > settings.UPLOAD_MAX_BYTES:
            raise ValidationError(
                f"The file is {filesizeformat(upload.size)}; the limit is "
                f"{filesizeformat(settings.UPLOAD_MAX_BYTES)}."
            )
        return upload

    def clean_format(self) -> str:
        return self.cleaned_data["format"] or "auto"

    def clean_query_column(self) -> str | None:
        return self.cleaned_data["query_column"] or None

    def clean_answer_column(self) -> str | None:
        return self.cleaned_data["answer_column"] or None

    def clean_eval_percent(self) -> int | None:
        return self.cleaned_data["eval_percent"]  # None: the default split, with its minimum

    def clean_seed(self) -> int:
        value = self.cleaned_data["seed"]
        return 0 if value is None else value

    def clean_records_key(self) -> str | None:
        return self.cleaned_data["records_key"].strip() or None

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data  # what Form.clean returns, typed as never None
        if not data.get("name") and data.get("file"):
            data["name"] = data["file"].name.rsplit(".", 1)[0]  # named after the file
        return data


class TokenStatsForm(forms.Form):
    base_model = forms.ModelChoiceField(queryset=FoundationModel.objects.all())
