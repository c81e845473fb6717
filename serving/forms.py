from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from evals.models import EvalSuite
from serving import playground
from serving.models import Alias
from workbench.forms import form_token_field, model_choice
from workbench.models import Project, PromptVersion, Variant


class AliasForm(forms.Form):
    name = forms.SlugField(
        max_length=50,
        label="New alias",
        help_text="Lowercase letters, digits, - and _; clients call PROJECT/NAME.",
    )


class GateForm(forms.ModelForm):
    class Meta:
        model = Alias
        fields = ["gating_suite", *Alias.GATE_FIELDS]
        labels = {
            "gating_suite": "Gating suite",
            "min_all_rules": "Minimum all-rules compliance",
            "min_retained_lower": "Minimum prompt effect retained (lower CI bound)",
            "max_regression": "Largest drop on the main metric vs the holder",
            "min_fact_recall": "Minimum fact recall",
            "fact_recall_vs_teacher": "Fact recall at least the teacher's (four arms)",
            "max_skills_drop": "Largest drop in general skills (four arms)",
        }

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        suite = model_choice(self, "gating_suite")
        suite.queryset = EvalSuite.objects.filter(project=project)
        suite.empty_label = "none: promotions are not gated"
        suite.help_text = "A candidate needs a finished eval run on it; the rules below are measured there."
        fields = (
            "min_all_rules",
            "min_retained_lower",
            "max_regression",
            "min_fact_recall",
            "max_skills_drop",
        )
        for name in fields:
            self.fields[name].widget.attrs.update(step="any", placeholder="no rule")


class RequestLogForm(forms.ModelForm):
    """Whether the alias keeps its /v1 requests: decided where the log is, not in the gate."""

    class Meta:
        model = Alias
        fields = ["log_requests"]
        labels = {"log_requests": "Keep a log of this alias's requests"}
        help_texts = {
            "log_requests": "Each /v1 request and the answer served, listed on the request log page; "
            "logged requests can become a dataset."
        }


class DeploymentForm(forms.ModelForm):
    """How the engine serves the alias's variant."""

    class Meta:
        model = Alias
        fields = ["serve_merged"]
        labels = {"serve_merged": "Serve as merged weights"}
        help_texts = {
            "serve_merged": "The adapter folded into a copy of the base: each token costs what the bare "
            "base's does (an adapter adds its LoRA matmuls to every step), at the memory of one more "
            "copy of the base. Worth it when this is the only adapter over its base that takes traffic. "
            "The hf engine only."
        }


class PromoteForm(forms.Form):
    variant = forms.ModelChoiceField(queryset=Variant.objects.none(), empty_label=None)

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = model_choice(self, "variant")
        field.queryset = Variant.objects.filter(project=project).select_related("base_model")
        # Django calls the field's label_from_instance(obj): this form's labels, set on its instance.
        field.label_from_instance = variant_label  # type: ignore[method-assign,assignment]


class ConfirmForm(forms.Form):
    variant = forms.IntegerField(widget=forms.HiddenInput)
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}),
        required=False,
        help_text="Kept in the audit trail. Required to override a failed gate.",
    )
    force = forms.BooleanField(required=False, widget=forms.HiddenInput)


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100, required=False, help_text="Who or what uses it, e.g. “support bot”."
    )
    # A resubmitted form (Back, double click) makes no second key.
    form_token = form_token_field()


def variant_label(v: Variant) -> str:
    kind = "base" if v.is_base else ("adapter" if v.adapter_path else "prompted")
    return f"#{v.pk} {v.name} ({kind}, {v.base_model.name})"


class ModelsField(forms.Field):
    """Every `model` value the page posts (one per picked column), in order."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value: Any) -> list[str]:
        return [str(v) for v in value or []]


class PlaygroundForm(forms.Form):
    """One column's request: the whole turn (so its bounds hold whichever column asks) and its index."""

    message = forms.CharField(strip=False, max_length=playground.MAX_MESSAGE_CHARS)
    model = ModelsField()
    column = forms.IntegerField(min_value=0, max_value=playground.MAX_MODELS - 1)
    temperature = forms.FloatField(min_value=0, max_value=2)
    rules = forms.ModelChoiceField(queryset=PromptVersion.objects.none(), required=False)

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Built here, not at import: the cap is a setting (tests change it).
        self.fields["max_tokens"] = forms.IntegerField(min_value=1, max_value=settings.GATEWAY_MAX_TOKENS)
        model_choice(self, "rules").queryset = PromptVersion.objects.filter(
            prompt__project=project
        ).select_related("prompt")

    def clean_message(self) -> str:
        message: str = self.cleaned_data["message"]
        if not message.strip():
            raise forms.ValidationError("Type a message.")
        return message

    def clean_model(self) -> list[str]:
        specs: list[str] = self.cleaned_data["model"]
        if not 1 <= len(specs) <= playground.MAX_MODELS:
            raise forms.ValidationError(f"Pick 1 to {playground.MAX_MODELS} models, not {len(specs)}.")
        return specs

    def clean(self) -> dict[str, Any] | None:
        data = super().clean() or {}
        specs, column = data.get("model"), data.get("column")
        if specs and column is not None and column >= len(specs):
            self.add_error("column", f"Column {column} is not one of the {len(specs)} model(s) picked.")
        return data

    def problems(self) -> str:
        """The errors in one line, each with its field."""
        return " ".join(f"{name}: {' '.join(str(e) for e in errors)}" for name, errors in self.errors.items())
