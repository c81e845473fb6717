"""One /v1 completion through the engine (chat or text), whole or streamed,
relayed with the client's model name and this deployment's fingerprint, and
logged when its alias logs requests; the OpenAI-shaped error bodies that end
with the request id (serving.gateway checks the request first)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from django.conf import settings
from django.http import HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse

from engines.protocol import SYSTEM_JOIN, OpenAIError, apply_system_prompt, system_prompt_of
from serving import engine_client, limits
from serving.models import Alias, ApiKey, RequestLog
from workbench.models import Variant

log = logging.getLogger("serving.gateway")


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


def with_variant_prompt(messages: list[dict[str, str]], variant: Variant) -> list[dict[str, str]]:
    """A prompted variant's prompt goes first in the system message, before
    the client's own system messages, if any. An absorbed variant gets the
    messages as it was trained on them: as sent, or with its prompt's
    passages after the last user message (`Variant.student_view`)."""
    prompt = variant.system_prompt
    if prompt is None:
        return variant.student_view(messages)
    client = system_prompt_of(messages)
    return apply_system_prompt(messages, prompt if client is None else f"{prompt}{SYSTEM_JOIN}{client}")


def engine_request(
    variant: Variant, engine_params: dict[str, Any], chat: bool = True, request_id: str = "-"
) -> dict[str, Any]:
    """The engine's request for `variant`: its guard rails (its teacher's
    repetition penalty, ...) unless the request sets them, and on chat the
    messages as the variant reads them (`with_variant_prompt`). /v1 and the
    playground both build it here, so a variant answers both alike; the
    variant may be unsaved (a base model with a prompt version)."""
    rails = dict(variant.generation)
    if settings.INFERENCE_BACKEND == "vllm" and rails.pop("no_repeat_ngram_size", None):
        # vLLM has no such parameter and would drop it without a word: say so in the log.
        log.info("v1 %s: variant-%s's no_repeat_ngram_size is not applied on vLLM", request_id, variant.pk)
    body = {**rails, **engine_params}
    if chat:
        body["messages"] = with_variant_prompt(engine_params["messages"], variant)
    return body


def fingerprint(variant: Variant, merged: bool = False) -> str:
    """OpenAI's system_fingerprint: stable for one deployment of a variant
    (backend, base model, variant, merged or not), changed when any of them changes."""
    key = f"{settings.INFERENCE_BACKEND}|{variant.base_model.name}|{variant.base_model.path}|{variant.pk}"
    if merged:
        key += "|merged"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Relay:
    """The streamed body: closing it (Django does, even before the first chunk)
    ends the engine stream and releases the lease (a generator's own
    `finally` would not run when it was never started)."""

    def __init__(self, chunks: Iterator[bytes], close: Callable[[], None]) -> None:
        self.chunks, self._close = chunks, close

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        try:
            self.chunks.close()  # type: ignore[attr-defined]  # a generator in practice; Iterator has no close
        finally:
            self._close()


def sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


class Call:
    """One completion through the engine (chat, or legacy text with
    `chat=False`), logged when its alias logs."""

    def __init__(
        self,
        request_id: str,
        key: ApiKey,
        alias: Alias | None,
        variant: Variant,
        body: dict[str, Any],
        engine_params: dict[str, Any],
        lease: limits.Lease,
        chat: bool = True,
    ) -> None:
        self.request_id, self.key, self.alias, self.variant, self.body = request_id, key, alias, variant, body
        self.lease = lease
        self.chat = chat
        self.asked = body["model"]
        self.merged = engine_client.serves_merged(alias)
        self.fingerprint = fingerprint(variant, self.merged)
        # The engine queues work round-robin by project (its fairness bucket).
        self.project = key.project.slug
        self.engine_body = engine_request(variant, engine_params, chat=chat, request_id=request_id)
        self.began = time.perf_counter()

    def _relabel(self, data: dict[str, Any]) -> dict[str, Any]:
        """The engine's answer or chunk as the client's: its model name, this deployment's fingerprint."""
        data["model"] = self.asked
        data["system_fingerprint"] = self.fingerprint
        return data

    def complete(self) -> HttpResponse:
        client = engine_client.client()
        ask = client.chat if self.chat else client.completions
        try:
            data = ask(self.variant, self.engine_body, project=self.project, merged=self.merged)
        except OpenAIError as exc:
            response = error_response(self.request_id, exc)
            self.log(exc.status, json.loads(response.content))
            return response
        finally:
            self.lease.release()
        self._relabel(data)
        self.log(200, data)
        return JsonResponse(data)

    def stream(self) -> HttpResponseBase:
        include_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        # The engine always reports usage, for the log; the client gets it only when asked.
        self.engine_body["stream_options"] = {"include_usage": True}
        client = engine_client.client()
        opened = client.stream if self.chat else client.stream_completions
        stack = ExitStack()
        stack.callback(self.lease.release)
        try:
            events = stack.enter_context(
                opened(self.variant, self.engine_body, project=self.project, merged=self.merged)
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
            Relay(self._relay(events, stack, include_usage), stack.close), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    def _stream_error(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The engine's in-stream error, with its words kept in the log."""
        err = chunk.get("error", chunk)
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

    def _piece(self, choice: dict[str, Any]) -> str:
        if self.chat:
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""

    def _relay(self, events: Iterator[str], stack: ExitStack, include_usage: bool) -> Iterator[bytes]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage: dict[str, Any] = {}
        status, error = 200, None
        try:
            for event in events:
                if event == "[DONE]":
                    break
                try:
                    chunk = json.loads(event)
                except ValueError:
                    chunk = {"error": {"message": f"an event that is not JSON: {event[:200]}"}}
                # {"error": {...}}, or older vLLM's flat {"object": "error", "message": ...}
                if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
                    status, error = (
                        502,
                        self._stream_error(chunk if isinstance(chunk, dict) else {"error": chunk}),
                    )
                    yield sse(error)
                    break
                self._relabel(chunk)
                for choice in chunk.get("choices") or []:
                    index = choice.get("index", 0)
                    texts.setdefault(index, []).append(self._piece(choice))
                    if choice.get("finish_reason"):
                        finish[index] = choice["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not chunk.get("choices") and not include_usage:
                        continue
                    if not include_usage:
                        chunk.pop("usage")
                yield sse(chunk)
            else:
                # The engine hung up without [DONE]: the answer may be cut short.
                status, error = (
                    502,
                    self._stream_error({"error": {"message": "the stream ended without [DONE]"}}),
                )
                yield sse(error)
        except OpenAIError as exc:
            status, error = exc.status, error_body(self.request_id, exc)
            yield sse(error)
        finally:
            stack.close()
            self.log(status, error or self._streamed(texts, finish, usage))
        # Clients read to [DONE] whatever happened (as vLLM ends its streams).
        yield sse("[DONE]")

    def _streamed(
        self, texts: dict[int, list[str]], finish: dict[int, str | None], usage: dict[str, Any]
    ) -> dict[str, Any]:
        """The streamed answer as one, for the log."""
        choices: list[dict[str, Any]] = []
        for i in sorted(texts):
            text = "".join(texts[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}})
            else:
                choices.append({"index": i, "text": text})
            choices[-1]["finish_reason"] = finish.get(i)
        return {
            "object": "chat.completion" if self.chat else "text_completion",
            "model": self.asked,
            "system_fingerprint": self.fingerprint,
            "streamed": True,
            "choices": choices,
            "usage": usage,
        }

    def log(self, status: int, response: dict[str, Any]) -> None:
        if self.alias is None or not self.alias.log_requests:
            return
        usage = response.get("usage") or {}
        RequestLog.objects.create(
            project_id=self.key.project_id,
            alias=self.alias,
            variant=self.variant,
            api_key=self.key,
            request_id=self.request_id,
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
