"""The OpenAI-compatible /v1 gateway: per-project API keys, model names
(PROJECT_SLUG/ALIAS or a variant id) resolved to variants, requests checked
and forwarded to the inference engine, answers (streamed or not) relayed with
the client's model name, and the request log of aliases that keep one.

Every error is OpenAI-shaped ({"error": {"message", "type", "param", "code"}});
bad input is a 4xx, never a 500. Every /v1 response carries an `x-request-id`
header; error messages end with that id, and what went wrong inside (the
engine's address, its own words) is in the server log under it, never in the
answer. Per-key limits (serving.limits) answer 429 with Retry-After."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from engines import jsonguard
from engines.inference import OPENAI_DEFAULT_MAX_TOKENS, OPENAI_PARAMS, GenerationSettings, openai_n
from engines.protocol import SYSTEM_JOIN, OpenAIError, apply_system_prompt, parse_messages, system_prompt_of
from serving import engine_client, limits
from serving.models import Alias, ApiKey, RequestLog, hash_key
from workbench.models import Variant

log = logging.getLogger(__name__)

MAX_MODEL_CHARS = 300
# torch.manual_seed and vLLM take a 64-bit seed; 2**70 overflowed inside the engine.
SEED_RANGE = (-(2**63), 2**63 - 1)
LAST_USED_EVERY = timedelta(seconds=60)
VARIANT_NAME = re.compile(r"variant-(\d{1,18})")
ROUTES = "GET /v1/models, GET /v1/models/{model} and POST /v1/chat/completions"


def max_body_bytes() -> int:
    return settings.V1_MAX_BODY_BYTES


def max_json_depth() -> int:
    return settings.V1_MAX_JSON_DEPTH


def with_id(message: str, request_id: str) -> str:
    return f"{message.rstrip()} (request id {request_id})"


def error_body(request_id: str, exc: OpenAIError) -> dict[str, Any]:
    """The client's error body: the message ends with the request id; the
    detail (what the engine said, where it is) goes to the log only."""
    if exc.detail or exc.status >= 500:
        log.warning("v1 %s: error %s: %s", request_id, exc.status, exc)
    body = exc.body()
    body["error"]["message"] = with_id(exc.message, request_id)
    return body


def error_response(request_id: str, exc: OpenAIError) -> JsonResponse:
    response = JsonResponse(error_body(request_id, exc), status=exc.status)
    headers = dict(exc.headers)
    if exc.status == 429:  # the engine is saturated: when to come back
        headers.setdefault("Retry-After", str(limits.BUSY_RETRY_AFTER))
    for name, value in headers.items():
        response[name] = value
    return response


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
            try:
                if method is not None and request.method != method:
                    raise OpenAIError(
                        405,
                        f"{request.method} is not allowed on {request.path[:200]}; use {method}.",
                        code="method_not_allowed",
                        headers={"Allow": method},
                    )
                response = view(request, *args, **kwargs)
            except OpenAIError as exc:
                response = error_response(request_id, exc)
            except Exception:
                log.exception("v1 %s: %s %s failed", request_id, request.method, request.path[:200])
                response = error_response(
                    request_id, OpenAIError(500, "The server failed to answer this request.", "server_error")
                )
            response["x-request-id"] = request_id
            return response

        return inner

    return wrap


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
    """PROJECT_SLUG/ALIAS, PROJECT_SLUG/variant-ID or variant-ID, within the key's project only."""
    if len(name) > MAX_MODEL_CHARS or "\x00" in name:  # no name is that long; PostgreSQL refuses NUL
        raise model_not_found(name[:MAX_MODEL_CHARS])
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


def check_params(body: dict[str, Any]) -> dict[str, Any]:
    """The engine's request from the client's: the messages and the generation
    fields the client gave, checked by the one protocol and the one table of
    bounds (GenerationSettings), then this gateway's policy (its caps).
    Fields it does not know are ignored, as OpenAI-compatible servers do."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise OpenAIError(
            400, "model is required: PROJECT_SLUG/ALIAS or a variant id (GET /v1/models).", param="model"
        )
    messages = parse_messages(body.get("messages"))
    generation = GenerationSettings.from_openai(body)
    n = openai_n(body)
    name = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    given = body.get(name) is not None
    cap = settings.GATEWAY_MAX_TOKENS
    if given and generation.max_new_tokens > cap:
        raise OpenAIError(
            400, f"{name} must be between 1 and {cap}, not {generation.max_new_tokens}.", param=name
        )
    # Both engines get an explicit max_tokens: vLLM's own default is "until the context is full".
    max_tokens = generation.max_new_tokens if given else min(OPENAI_DEFAULT_MAX_TOKENS, cap)
    asked, most = n * max_tokens, limits.max_n_times_tokens()
    if asked > most:
        shown = name if given else "max_tokens"
        raise OpenAIError(
            400,
            f"n x {shown} asks for {asked} tokens (n={n}, {shown}={max_tokens}); "
            f"one request may ask for at most {most}: lower n or {shown}.",
            param=shown,
        )
    # Only what the client gave: the variant's guard rails fill the rest.
    out: dict[str, Any] = {
        "messages": messages,
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
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise OpenAIError(
                400, 'stream_options must be an object like {"include_usage": true}.', param="stream_options"
            )
        if not stream:
            raise OpenAIError(
                400, "stream_options is only allowed with stream: true.", param="stream_options"
            )
    return out


def with_variant_prompt(messages: list[dict[str, str]], variant: Variant) -> list[dict[str, str]]:
    """A prompted variant's prompt goes first in the system message, before
    the client's own system messages, if any. An absorbed variant gets the
    messages as sent: it is served exactly as it was trained."""
    prompt = variant.system_prompt
    if prompt is None:
        return messages
    client = system_prompt_of(messages)
    return apply_system_prompt(messages, prompt if client is None else f"{prompt}{SYSTEM_JOIN}{client}")


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
    for alias in Alias.objects.filter(project=key.project, variant__isnull=False).select_related("variant"):
        entries.append(
            {
                "id": alias.model_name,
                "object": "model",
                "created": int(alias.updated_at.timestamp()),
                "owned_by": slug,
                "variant": f"variant-{alias.variant_id}",
            }
        )
    for variant in Variant.objects.filter(project=key.project).order_by("pk"):
        entries.append(
            {
                "id": f"{slug}/variant-{variant.pk}",
                "object": "model",
                "created": int(variant.created_at.timestamp()),
                "owned_by": slug,
                "name": variant.name,
            }
        )
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
    key = authenticate(request)
    body = parse_body(request)
    params = check_params(body)
    alias, variant = resolve_model(key, body["model"])
    try:
        lease = limits.acquire(key.pk, params.get("n", 1) * params["max_tokens"])
    except limits.RateLimited as exc:
        raise OpenAIError(
            429, exc.message, "rate_limit_error", code=exc.code, headers={"Retry-After": str(exc.retry_after)}
        ) from None
    try:
        call = Call(request.request_id, key, alias, variant, body, params, lease)
    except BaseException:
        lease.release()
        raise
    if params["stream"]:
        return call.stream()
    return call.complete()


class _Relay:
    """The streamed body: closing it (Django does, even before the first chunk)
    ends the engine stream and releases the key's lease."""

    def __init__(self, chunks: Iterator[bytes], close: Callable[[], None]) -> None:
        self.chunks, self._close = chunks, close

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        try:
            self.chunks.close()  # type: ignore[attr-defined]  # a generator in practice; Iterator has no close
        finally:
            self._close()


class Call:
    """One chat completion through the engine, logged when its alias logs."""

    def __init__(
        self,
        request_id: str,
        key: ApiKey,
        alias: Alias | None,
        variant: Variant,
        body: dict[str, Any],
        params: dict[str, Any],
        lease: limits.Lease,
    ) -> None:
        self.request_id, self.key, self.alias, self.variant, self.body = request_id, key, alias, variant, body
        self.lease = lease
        self.asked = body["model"]
        # The engine queues work round-robin by project (its fairness bucket).
        self.project = key.project.slug
        # The variant's guard rails (its teacher's repetition penalty, ...) unless the request sets them.
        self.engine_body = {
            **variant.generation,
            **params,
            "messages": with_variant_prompt(params["messages"], variant),
        }
        self.began = time.perf_counter()

    def complete(self) -> HttpResponse:
        try:
            data = engine_client.client().chat(self.variant, self.engine_body, project=self.project)
        except OpenAIError as exc:
            response = error_response(self.request_id, exc)
            self.log(exc.status, json.loads(response.content))
            return response
        finally:
            self.lease.release()
        data["model"] = self.asked
        self.log(200, data)
        return JsonResponse(data)

    def stream(self) -> HttpResponseBase:
        include_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        # The engine always reports usage, for the log; the client gets it only when asked.
        self.engine_body["stream_options"] = {"include_usage": True}
        stack = ExitStack()
        stack.callback(self.lease.release)
        try:
            events = stack.enter_context(
                engine_client.client().stream(self.variant, self.engine_body, project=self.project)
            )
        except OpenAIError as exc:
            stack.close()
            refused = error_response(self.request_id, exc)
            self.log(exc.status, json.loads(refused.content))
            return refused
        except BaseException:
            stack.close()
            raise
        response = StreamingHttpResponse(
            _Relay(self._relay(events, stack, include_usage), stack.close), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    def _stream_error(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The engine's in-stream error, with its words kept in the log."""
        err = chunk.get("error")
        err = err if isinstance(err, dict) else {"message": str(err)}
        code = err.get("code")
        return error_body(
            self.request_id,
            OpenAIError(
                502,
                "The inference engine failed while answering.",
                str(err.get("type") or "engine_error"),
                code=None if code is None else str(code),
                detail=f"the engine stream failed: {json.dumps(err)[:2000]}",
            ),
        )

    def _relay(self, events: Iterator[str], stack: ExitStack, include_usage: bool) -> Iterator[bytes]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage: dict[str, Any] = {}
        status, error = 200, None
        try:
            for event in events:
                if event == "[DONE]":
                    yield b"data: [DONE]\n\n"
                    break
                try:
                    chunk = json.loads(event)
                except ValueError:
                    chunk = {"error": {"message": f"an event that is not JSON: {event[:200]}"}}
                if not isinstance(chunk, dict) or "error" in chunk:
                    status, error = (
                        502,
                        self._stream_error(chunk if isinstance(chunk, dict) else {"error": chunk}),
                    )
                    yield f"data: {json.dumps(error)}\n\n".encode()
                    break
                chunk["model"] = self.asked
                for choice in chunk.get("choices") or []:
                    index = choice.get("index", 0)
                    texts.setdefault(index, []).append((choice.get("delta") or {}).get("content") or "")
                    if choice.get("finish_reason"):
                        finish[index] = choice["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not chunk.get("choices") and not include_usage:
                        continue
                    if not include_usage:
                        chunk.pop("usage")
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except OpenAIError as exc:
            status, error = exc.status, error_body(self.request_id, exc)
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            stack.close()
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(texts[i])},
                    "finish_reason": finish.get(i),
                }
                for i in sorted(texts)
            ]
            self.log(
                status,
                error
                or {
                    "object": "chat.completion",
                    "model": self.asked,
                    "streamed": True,
                    "choices": choices,
                    "usage": usage,
                },
            )

    def log(self, status: int, response: dict[str, Any]) -> None:
        if self.alias is None or not self.alias.log_requests:
            return
        usage = response.get("usage") or {}
        RequestLog.objects.create(
            project_id=self.key.project_id,
            alias=self.alias,
            variant=self.variant,
            api_key=self.key,
            model=self.asked[:300].replace("\x00", "\ufffd"),
            request=storable(self.body),
            response=storable(response),
            status=status,
            latency_ms=(time.perf_counter() - self.began) * 1000,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )


def storable(value: Any) -> Any:
    """`value` with NUL characters replaced: PostgreSQL's jsonb cannot hold \\u0000."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value
