from __future__ import annotations

from typing import Any

from django import forms

from evals.models import METRICS, NOTE_MAX, EvalSuite
from jobs.models import TeacherEndpoint
from workbench.forms import form_token_field, model_choice
from workbench.models import DatasetVersion, FoundationModel, Project, PromptVersion, Variant

# Ids are BigAutoField: anything outside 1..2**63-1 is a form error, not an overflow in the database.
MAX_ID = 2**63 - 1


def id_field(**kwargs: Any) -> forms.IntegerField:
    return forms.IntegerField(min_value=1, max_value=MAX_ID, **kwargs)


class SuiteForm(forms.Form):
    name = forms.CharField(max_length=200)
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.none(),
        empty_label=None,
        help_text="Its eval split becomes the suite's queries; row answers become reference answers.",
    )
    prompt_version = forms.ModelChoiceField(
        queryset=PromptVersion.objects.none(),
        required=False,
        help_text="Its rules are checked, and the 'with prompt' arms get it.",
    )
    main_metric = forms.ChoiceField(
        choices=[("", "auto (all rules when there are rules)"), *METRICS.items()], required=False
    )
    judge = forms.ModelChoiceField(queryset=Variant.objects.none(), required=False, label="Judge (a variant)")
    judge_base = forms.ModelChoiceField(
        queryset=FoundationModel.objects.all(), required=False, label="Judge (a base model)"
    )
    judge_endpoint = forms.ModelChoiceField(
        queryset=TeacherEndpoint.objects.none(),
        required=False,
        label="Judge (an endpoint)",
        help_text="A larger model behind an OpenAI-compatible endpoint (Jobs → Teacher endpoints): "
        "a judge as small as the student scores little but noise.",
    )
    judge_rubric = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        required=False,
        help_text="What a good answer is; the judge answers with reasoning and a 1-10 score.",
    )
    lm_eval_tasks = forms.CharField(
        required=False,
        label="lm-eval tasks",
        help_text="Comma-separated: suite (a task built from these queries and their "
        "references), general_skills (short questions shipped with the "
        "workbench) or any installed lm-eval task whose data is on disk.",
    )

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model_choice(self, "dataset_version").queryset = DatasetVersion.objects.filter(
            dataset__project=project
        ).select_related("dataset")
        model_choice(self, "prompt_version").queryset = PromptVersion.objects.filter(
            prompt__project=project
        ).select_related("prompt")
        model_choice(self, "judge").queryset = Variant.objects.filter(project=project)
        model_choice(self, "judge_endpoint").queryset = TeacherEndpoint.objects.filter(project=project)

    def clean_lm_eval_tasks(self) -> list[str]:
        return [t.strip() for t in self.cleaned_data["lm_eval_tasks"].split(",") if t.strip()]


class RunForm(forms.Form):
    suite = forms.ModelChoiceField(queryset=EvalSuite.objects.none(), empty_label=None)
    variants = forms.ModelMultipleChoiceField(
        queryset=Variant.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Variants (adapters)",
    )
    base_models = forms.ModelMultipleChoiceField(
        queryset=FoundationModel.objects.all(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Base models",
    )
    with_prompt = forms.BooleanField(
        required=False,
        label="send the suite's prompt",
        help_text="Off: each answers without a system prompt (how an absorbed adapter is served).",
    )
    form_token = form_token_field()

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model_choice(self, "suite").queryset = EvalSuite.objects.filter(project=project)
        model_choice(self, "variants").queryset = Variant.objects.filter(project=project).select_related(
            "base_model"
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not data.get("variants") and not data.get("base_models"):
            raise forms.ValidationError("Choose at least one variant or base model.")
        return data


class RatingForm(forms.Form):
    choice = forms.ChoiceField(choices=[("a", "A better"), ("b", "B better"), ("tie", "Tie")])
    example = id_field()


VERDICTS = [("pass", "passes"), ("fail", "fails"), ("", "not said")]


class BlindRatingForm(forms.Form):
    """A blind rating, in the sides the person saw ("a" is the answer shown
    first): the view maps each side back to the run it belongs to."""

    choice = forms.ChoiceField(choices=[("a", "A better"), ("b", "B better"), ("tie", "Tie")])
    example = id_field()
    pass_a = forms.ChoiceField(choices=VERDICTS, required=False, label="answer A")
    pass_b = forms.ChoiceField(choices=VERDICTS, required=False, label="answer B")
    note = forms.CharField(required=False, max_length=NOTE_MAX, strip=True)


class RunPairForm(forms.Form):
    """The two runs of a rating, from the query string (?a=&b=)."""

    a = id_field(label="run a")
    b = id_field(label="run b")


class ComparisonForm(forms.Form):
    """Start the four arms of one of the project's variants."""

    variant = forms.ModelChoiceField(
        queryset=Variant.objects.none(),
        empty_label=None,
        error_messages={"invalid_choice": "No such variant in this project."},
    )
    form_token = form_token_field()

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model_choice(self, "variant").queryset = Variant.objects.filter(project=project)


def error_text(form: forms.Form) -> str:
    """A form's errors in one line, each with the field it is about."""
    parts = []
    for name, errors in form.errors.items():
        label = form.fields[name].label or name if name in form.fields else ""
        text = " ".join(map(str, errors))  # an ErrorList already yields its messages as text
        parts.append(f"{label}: {text}" if label else text)
    return "; ".join(parts)
