"""The playground page of a project, the stream of one column's answer and
saving a turn (serving.playground does the work)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from engines.protocol import OpenAIError
from serving import playground
from serving.forms import PlaygroundForm
from workbench.actions import ActionError
from workbench.models import DatasetRow
from workbench.shortcuts import AuthedHttpRequest, get_project


@login_required
def playground_page(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    offered = playground.offer(project)
    picks = offered.pop("picks")
    ctx = {
        "project": project,
        **offered,
        "columns": [*picks, *[("", "")] * (playground.MAX_MODELS - len(picks))],
        "max_tokens": min(playground.DEFAULT_MAX_TOKENS, settings.GATEWAY_MAX_TOKENS),
        "max_tokens_cap": settings.GATEWAY_MAX_TOKENS,
        "max_message": playground.MAX_MESSAGE_CHARS,
    }
    return render(request, "serving/playground.html", ctx)


@login_required
@require_POST
def playground_stream(request: AuthedHttpRequest, slug: str) -> HttpResponseBase:
    project = get_project(request, slug)
    form = PlaygroundForm(project, request.POST)
    if not form.is_valid():
        return JsonResponse({"error": form.problems()}, status=400)
    data = form.cleaned_data
    try:
        picks = [playground.resolve(project, spec) for spec in data["model"]]
        params = playground.engine_params(data["message"], data["max_tokens"], data["temperature"])
    except ValueError as exc:
        return JsonResponse({"error": f"model: {exc}."}, status=400)
    except playground.NotFound as exc:
        return JsonResponse({"error": f"There is no model {str(exc)[:120]!r} in this project."}, status=404)
    except OpenAIError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    pick = picks[data["column"]]
    # The rules shown: of the prompt version picked for checking, else of the one the model absorbed or carries.
    rules_of = data["rules"] or pick.variant.prompt_version
    return playground.start(project, request.user, pick, data["message"], params, rules_of)


@login_required
@require_POST
def playground_save(request: AuthedHttpRequest, slug: str) -> JsonResponse:
    project = get_project(request, slug)
    split = request.POST.get("split", "")
    if split not in (DatasetRow.TRAIN, DatasetRow.EVAL):
        return JsonResponse({"error": f"split: {split[:20]!r} is not train or eval."}, status=400)
    try:
        turn = playground.read_turn(project, request.user, request.POST.get("turn", ""))
        version, index, made = playground.save_turn(
            project, request.user, turn, eval_split=split == DatasetRow.EVAL
        )
    except ActionError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    where = "its eval split" if split == DatasetRow.EVAL else "its train split"
    done = "Saved" if made else "Already saved"
    return JsonResponse(
        {
            "message": f"{done} as row {index} of {version}, in {where}.",
            "url": version.get_absolute_url(),
            "version": str(version),
            "row": index,
            "split": split,
        },
        status=201 if made else 200,
    )
