"""The OpenAI-compatible /v1 gateway: per-project API keys, model names
(PROJECT_SLUG/ALIAS or a variant id) resolved to variants, requests checked
and forwarded to the inference engine, answers (streamed or not) relayed with
the client's model name, and the request log of aliases that keep one.

Every error is OpenAI-shaped ({"error": {"message", "type", "param", "code"}});
bad input is a 4xx, never a 500. Every /v1 response carries an `x-request-id`
header; error messages end with that id, and what went wrong inside (the
engine's address, its own words) is in the server log under it, never in the
answer. Per-key limits (serving.limits) answer 429 with Retry-After.

Every request field is honoured, ignored (and logged) or refused by the one
table in serving.params; completions and chunks carry a system_fingerprint
of the deployment (backend, base model, variant). With V1_CORS_ORIGINS set,
a browser on a listed origin may call /v1 (preflight answered 204)."""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.csrf import csrf_exempt

from engines import jsonguard
from engines.inference import OPENAI_DEFAULT_MAX_TOKENS, OPENAI_PARAMS, GenerationSettings, openai_n
from engines.protocol import OpenAIError, parse_messages
from serving import ft_models, limits, params
from serving.calls import Call, error_response
from serving.models import Alias, ApiKey, hash_key
from workbench.models import FoundationModel, Variant

log = logging.getLogger(__name__)

MAX_MODEL_CHARS = 300
# torch.manual_seed and vLLM take a 64-bit seed; 2**70 overflowed inside the engine.
SEED_RANGE = (-(2**63), 2**63 - 1)
LAST_USED_EVERY = timedelta(seconds=60)
VARIANT_NAME = re.compile(r"variant-(\d{1,18})")
ROUTES = (
    "GET /v1/models, GET /v1/models/{model}, POST /v1/chat/completions, POST /v1/completions, "
    "/v1/files and /v1/fine_tuning/jobs"
)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = ("Authorization", "Content-Type")
CORS_MAX_AGE = 600
# transformers' "no limit known" value of a tokenizer's model_max_length.
NO_LIMIT = 10**12


def max_body_bytes() -> int:
    return settings.V1_MAX_BODY_BYTES


def max_json_depth() -> int:
    return settings.V1_MAX_JSON_DEPTH


class ApiRequest(HttpRequest):
    """The request of a /v1 view: api_view gives it its id."""

    request_id: str


def api_view(
    method: str | None,
) -> Callable[[Callable[..., HttpResponseBase]], Callable[..., HttpResponseBase]]:
    """A /v1 view: a request id on every answer, OpenAI-shaped errors for a wrong
    method, an OpenAIError or a bug (logged under the id, never shown)."""

    def wrap(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
        @csrf_exempt
        @functools.wraps(view)
        def inner(request: ApiRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            request_id = f"req_{uuid.uuid4().hex}"
            request.request_id = request_id
            origin = cors_origin(request)
            try:
                if origin is not None and request.method == "OPTIONS":
                    # A preflight carries no credentials: it is answered before any key is asked for.
                    response: HttpResponseBase = HttpResponse(status=204)
                elif method is not None and request.method != method:
                    raise OpenAIError(
                        405,
                        f"{request.method} is not allowed on {request.path[:200]}; use {method}.",
                        code="method_not_allowed",
                        headers={"Allow": method},
                    )
                else:
                    response = view(request, *args, **kwargs)
            except OpenAIError as exc:
                response = error_response(request_id, exc)
            except Exception:
                log.exception("v1 %s: %s %s failed", request_id, request.method, request.path[:200])
                response = error_response(
                    request_id, OpenAIError(500, "The server failed to answer this request.", "server_error")
                )
            response["x-request-id"] = request_id
            if settings.V1_CORS_ORIGINS:  # answers differ by Origin: caches must keep them apart
                patch_vary_headers(response, ("Origin",))
            if origin is not None:
                allow_cors(request, response, origin)
            return response

        return inner

    return wrap


def cors_origin(request: HttpRequest) -> str | None:
    """The request's Origin when V1_CORS_ORIGINS lists it (or lists *), else None."""
    origin = request.headers.get("Origin")
    allowed = settings.V1_CORS_ORIGINS
    if not origin or not allowed:
        return None
    listed = {o.rstrip("/") for o in allowed}
    return origin if origin in listed or "*" in listed else None


def allow_cors(request: HttpRequest, response: HttpResponseBase, origin: str) -> None:
    response["Access-Control-Allow-Origin"] = origin
    response["Access-Control-Allow-Methods"] = CORS_METHODS
    # Browser SDKs (openai-node) add their own headers to the preflight: a listed origin may send them.
    asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
    extra = [h for h in asked if h and h.lower() not in {c.lower() for c in CORS_HEADERS}]
    response["Access-Control-Allow-Headers"] = ", ".join([*CORS_HEADERS, *extra])[:2000]
    response["Access-Control-Expose-Headers"] = "x-request-id, Retry-After"
    response["Access-Control-Max-Age"] = str(CORS_MAX_AGE)


# --- keys and model names ------------------------------------------------------


def authenticate(request: HttpRequest) -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise OpenAIError(
            401,
            "No API key: send it as `Authorization: Bearer YOUR_KEY`. A project's keys are "
            "created on its API keys page or with `python manage.py create_api_key`.",
            code="invalid_api_key",
        )
    key = (
        ApiKey.objects.select_related("project").filter(hashed=hash_key(raw), revoked_at__isnull=True).first()
    )
    if key is None:
        raise OpenAIError(401, "Incorrect API key (unknown or revoked).", code="invalid_api_key")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_EVERY:
        # At most one write a minute per key, not one per request.
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key


def model_not_found(name: str) -> OpenAIError:
    # The same answer for a foreign project's model as for none at all: a key cannot probe other projects.
    return OpenAIError(
        404,
        f"The model '{name}' does not exist or this API key cannot use it. "
        "GET /v1/models lists the models of the key's project.",
        param="model",
        code="model_not_found",
    )


def resolve_model(key: ApiKey, name: str) -> tuple[Alias | None, Variant]:
    """PROJECT_SLUG/ALIAS, PROJECT_SLUG/variant-ID, variant-ID or a fine-tuned
    model's ft: name, within the key's project only."""
    if len(name) > MAX_MODEL_CHARS or "\x00" in name:  # no name is that long; PostgreSQL refuses NUL
        raise model_not_found(name[:MAX_MODEL_CHARS])
    if name.startswith("ft:"):
        found = ft_models.resolve(key.project, name)
        if found is None:
            raise model_not_found(name)
        return None, found
    slug, sep, rest = name.partition("/")
    if sep and slug != key.project.slug:
        raise model_not_found(name)
    if not sep:
        rest = name
    variants = Variant.objects.select_related("base_model", "prompt_version")
    if sep:
        alias = Alias.objects.filter(project=key.project, name=rest).first()
        if alias is not None:
            if alias.variant_id is None:
                raise OpenAIError(
                    404,
                    f"The alias {name} points to no variant yet: promote one to it first.",
                    param="model",
                    code="model_not_found",
                )
            return alias, variants.get(pk=alias.variant_id)
    match = VARIANT_NAME.fullmatch(rest)
    variant = variants.filter(project=key.project, pk=int(match.group(1))).first() if match else None
    if variant is None:
        raise model_not_found(name)
    return None, variant


# --- request checks --------------------------------------------------------------


def read_body(request: HttpRequest) -> bytes:
    """The body, refused (413) by its Content-Length before it is read when it is too large."""
    limit = max_body_bytes()
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise OpenAIError(400, "The Content-Length header is not a number.") from None
    too_large = OpenAIError(
        413, f"The request body is {length:,} bytes; the limit is {limit:,} bytes.", code="request_too_large"
    )
    if length > limit:
        raise too_large
    try:
        return request.body
    except RequestDataTooBig:  # Django's own limit (DATA_UPLOAD_MAX_MEMORY_SIZE) is lower
        too_large.message = (
            f"The request body is {length:,} bytes; the limit is "
            f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes."
        )
        raise too_large from None


def parse_body(request: HttpRequest) -> dict[str, Any]:
    raw = read_body(request)
    try:
        body = jsonguard.loads(raw, max_json_depth())
    except jsonguard.TooDeep as exc:
        raise OpenAIError(400, f"The request body is not accepted: line {exc.line}: {exc.reason}.") from None
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    check_text(body)
    return body


def check_text(body: dict[str, Any]) -> None:
    """Refuse lone surrogates (JSON's \\ud800 escape): they are not Unicode text,
    and neither the engine, the tokenizer nor PostgreSQL can take them."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(path or "the body", k, "a key")
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_string(path, value, "")


def _check_string(path: str, value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"{what} of {path}" if what else path
        raise OpenAIError(
            400,
            f"{where} is not valid Unicode text: it holds a lone surrogate "
            f"({ascii(value[exc.start])}) at character {exc.start}.",
            param=path if not what else None,
        ) from None


def check_params(body: dict[str, Any], request_id: str = "-") -> dict[str, Any]:
    """The engine's request from a chat-completions body: every field checked
    against the table of serving.params first (refused or unknown ones are a
    400 naming them; ignored ones are logged under `request_id`), the
    messages and generation fields by the one protocol and the one table of
    bounds (GenerationSettings), then this gateway's policy (its caps).
    Only what the client gave goes to the engine."""
    ignored = params.check_fields(body, params.CHAT_FIELDS, settings.INFERENCE_BACKEND)
    check_model(body)
    params.check_messages(body.get("messages"))
    messages = parse_messages(body.get("messages"))
    out: dict[str, Any] = {"messages": messages, **sampling(body, request_id, ignored)}
    out.update(params.chat_options(body, messages))
    return out


def check_completion_params(body: dict[str, Any], request_id: str = "-") -> dict[str, Any]:
    """The engine's request from a legacy /v1/completions body, as check_params."""
    ignored = params.check_fields(body, params.COMPLETION_FIELDS, settings.INFERENCE_BACKEND)
    check_model(body)
    prompts = params.prompts(body.get("prompt"))
    out: dict[str, Any] = {"prompt": body["prompt"], **sampling(body, request_id, ignored, rows=len(prompts))}
    out.update(params.completion_options(body))
    return out


def check_model(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise OpenAIError(
            400, "model is required: PROJECT_SLUG/ALIAS or a variant id (GET /v1/models).", param="model"
        )


def sampling(body: dict[str, Any], request_id: str, ignored: list[str], rows: int = 1) -> dict[str, Any]:
    """The generation fields (GenerationSettings' table), max_tokens under the
    caps (`rows` prompts x n x max_tokens), n and stream; logs what is ignored."""
    generation = GenerationSettings.from_openai(body)
    n = openai_n(body)
    # As GenerationSettings: max_completion_tokens wins when both are sent.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    given = body.get(name) is not None
    cap = settings.GATEWAY_MAX_TOKENS
    if given and generation.max_new_tokens > cap:
        raise OpenAIError(
            400, f"{name} must be between 1 and {cap}, not {generation.max_new_tokens}.", param=name
        )
    # Both engines get an explicit max_tokens: vLLM's own default is "until the context is full".
    max_tokens = generation.max_new_tokens if given else min(OPENAI_DEFAULT_MAX_TOKENS, cap)
    asked, most = rows * n * max_tokens, limits.max_n_times_tokens()
    if asked > most:
        shown = name if given else "max_tokens"
        what = f"n x {shown}" if rows == 1 else f"prompts x n x {shown}"
        counts = (
            f"n={n}, {shown}={max_tokens}" if rows == 1 else f"{rows} prompts, n={n}, {shown}={max_tokens}"
        )
        raise OpenAIError(
            400,
            f"{what} asks for {asked} tokens ({counts}); one request may ask for at most {most}: "
            f"lower n or {shown}{'' if rows == 1 else ' or send fewer prompts'}.",
            param=shown,
        )
    # Only what the client gave: the variant's guard rails fill the rest.
    out: dict[str, Any] = {
        **generation.to_openai(p for p in OPENAI_PARAMS if body.get(p) is not None),
        "max_tokens": max_tokens,
    }
    if body.get("n") is not None:
        out["n"] = n
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError(400, "stream must be true or false.", param="stream")
    out["stream"] = stream
    _include_usage, ignored_options = params.stream_options(body, stream)
    ignored = [*ignored, *ignored_options]
    if ignored:
        # As vLLM does: the client hears nothing of them, the log says what was not acted on.
        log.warning(
            "v1 %s: fields present in the request but ignored (they do not change the answer): %s",
            request_id,
            ", ".join(ignored),
        )
    return out


def tokens_asked(engine_params: dict[str, Any]) -> int:
    """What a request may generate at most: prompts x n x max_tokens (the key's lease)."""
    prompt = engine_params.get("prompt")
    rows = len(prompt) if isinstance(prompt, list) else 1
    return rows * int(engine_params.get("n", 1)) * int(engine_params["max_tokens"])


@functools.lru_cache(maxsize=256)
def context_length(model_dir: str) -> int | None:
    """The most tokens a base model reads, as the hf engine takes it
    (serving_engine.registry.Base.max_model_len): the config's
    max_position_embeddings, else the tokenizer's model_max_length. Read
    from the model directory's JSON, so listing models loads no tokenizer."""
    for name, key in (
        ("config.json", "max_position_embeddings"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        try:
            value = json.loads((Path(model_dir) / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < NO_LIMIT:
            return value
    return None


def max_model_len(base: FoundationModel) -> int | None:
    return context_length(base.path)


# --- views -----------------------------------------------------------------------


@api_view("GET")
def models(request: HttpRequest, model: str | None = None) -> HttpResponse:
    key = authenticate(request)
    entries = _model_entries(key)
    if model is not None:
        found = next((e for e in entries if e["id"] == model), None)
        if found is None:
            raise model_not_found(model[:MAX_MODEL_CHARS])
        return JsonResponse(found)
    return JsonResponse({"object": "list", "data": entries})


def _model_entries(key: ApiKey) -> list[dict[str, Any]]:
    slug = key.project.slug
    entries = []
    aliases = Alias.objects.filter(project=key.project, variant__isnull=False)
    for alias in aliases.select_related("variant__base_model"):
        assert alias.variant is not None  # filtered above
        entries.append(
            {
                "id": alias.model_name,
                "object": "model",
                "created": int(alias.updated_at.timestamp()),
                "owned_by": slug,
                "variant": f"variant-{alias.variant_id}",
                "max_model_len": max_model_len(alias.variant.base_model),
            }
        )
    for variant in Variant.objects.filter(project=key.project).select_related("base_model").order_by("pk"):
        entries.append(
            {
                "id": f"{slug}/variant-{variant.pk}",
                "object": "model",
                "created": int(variant.created_at.timestamp()),
                "owned_by": slug,
                "name": variant.name,
                "max_model_len": max_model_len(variant.base_model),
            }
        )
    by_id = {e["id"]: e for e in entries}
    for ft in ft_models.entries(key.project):
        shown = by_id.get(f"{slug}/{ft['variant']}")
        if shown is not None:
            entries.append({**shown, "id": ft["id"], "fine_tuning_job": ft["job"]})
    return entries


@api_view(None)
def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    raise OpenAIError(
        404,
        f"Unknown API route {request.method} {request.path[:200]}: this server answers {ROUTES}.",
        code="unknown_url",
    )


@api_view("POST")
def chat_completions(request: ApiRequest) -> HttpResponseBase:
    return _serve(request, chat=True)


@api_view("POST")
def completions(request: ApiRequest) -> HttpResponseBase:
    """The legacy text completion (lm-eval, LiteLLM's text_completion): a prompt in, text out."""
    return _serve(request, chat=False)


def _serve(request: ApiRequest, chat: bool) -> HttpResponseBase:
    key = authenticate(request)
    body = parse_body(request)
    engine_params = (check_params if chat else check_completion_params)(body, request.request_id)
    alias, variant = resolve_model(key, body["model"])
    if not chat and (variant.system_prompt is not None or variant.student_passages):
        what = (
            "a system prompt"
            if variant.system_prompt is not None
            else "its prompt's passages to each question"
        )
        raise OpenAIError(
            400,
            f"{body['model'][:MAX_MODEL_CHARS]}: this model applies {what}, which only "
            "/v1/chat/completions can carry.",
            param="model",
            code="unsupported_model",
        )
    try:
        lease = limits.acquire(key.pk, tokens_asked(engine_params))
    except limits.RateLimited as exc:
        raise OpenAIError(
            429, exc.message, "rate_limit_error", code=exc.code, headers={"Retry-After": str(exc.retry_after)}
        ) from None
    try:
        call = Call(request.request_id, key, alias, variant, body, engine_params, lease, chat=chat)
    except BaseException:
        lease.release()
        raise
    if engine_params["stream"]:
        return call.stream()
    return call.complete()
