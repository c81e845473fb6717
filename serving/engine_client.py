"""The gateway's HTTP client to the inference engine (the hf engine server or
vLLM: both speak the protocol of engines.engine_server's docstring).

It makes sure the engine holds what a variant needs (its base model, its
adapter) before a request names it. What was loaded is remembered per process;
the engine is the truth, so a request the engine answers with "model not
found" (restarted engine, adapter unloaded by another process) loads it again
and is retried once.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from django.conf import settings

from engines.protocol import OpenAIError
from workbench.backend import api_key, engine_url
from workbench.models import Variant

if TYPE_CHECKING:
    from serving.models import Alias

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "variant-"
MERGED_PREFIX = "merged-variant-"  # a variant served as merged weights: a base of its own
CONNECT_SECONDS = 5.0
# The hf engine takes work round-robin by this header, so one project's flood cannot starve another.
PROJECT_HEADER = "X-Project"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# The hf engine's code for a model another request is loading (engines.serving_engine.errors.unavailable).
STILL_LOADING_CODE = "unavailable"
LOAD_POLL_SECONDS = 0.25
# A status page asks the engine briefly: a busy or absent engine must not hold the page.
STATUS_SECONDS = 3.0
# vLLM's /health answers an empty 200; its queue depth is in its Prometheus metrics.
VLLM_WAITING = re.compile(r"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


@dataclass
class EngineStatus:
    """What the engine reports about itself: reachable or not (and why), the
    base models it holds, the adapters loaded over them and its queue."""

    reachable: bool
    backend: str
    bases: list[str] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)  # engine name -> base name
    queued: int | None = None  # requests (hf: rows) waiting for the engine; None: not reported
    error: str = ""


def unavailable(url: str, exc: Exception | str) -> OpenAIError:
    return OpenAIError(
        503,
        "The inference engine is not reachable; try again later.",
        type="engine_unavailable",
        code="engine_unavailable",
        detail=f"the engine at {url} is not reachable ({exc}); start it with `make run` or "
        "`python manage.py serve_engine`",
    )


def timed_out(url: str, what: str) -> OpenAIError:
    return OpenAIError(
        503,
        f"The inference engine did not {what} within {settings.ENGINE_TIMEOUT_SECONDS:g} s; "
        "it may be saturated.",
        type="engine_unavailable",
        code="engine_timeout",
        detail=f"the engine at {url} timed out",
    )


def _error_from(response: httpx.Response) -> OpenAIError:
    """The engine's error, in OpenAI's shape whatever shape it came in."""
    try:
        data = response.json()
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or response.reason_phrase)
        code = err.get("code")
        return OpenAIError(
            response.status_code,
            message,
            type=str(err.get("type") or "engine_error"),
            code=None if code is None else str(code),
            param=err.get("param"),
        )
    if isinstance(data, dict) and "detail" in data:  # FastAPI's own errors (vLLM)
        message = data["detail"] if isinstance(data["detail"], str) else json.dumps(data["detail"])
    elif isinstance(err, str):
        message = err
    else:
        message = response.text[:1000] or response.reason_phrase
    kind = "invalid_request_error" if response.status_code < 500 else "engine_error"
    return OpenAIError(response.status_code, message, type=kind)


def shown(variant: Variant) -> str:
    """The variant as errors name it; an unsaved one (the playground's base + prompt) by its base."""
    return f"variant {variant.pk}" if variant.pk is not None else f"the base model {variant.base_model.name}"


def served_name(variant: Variant, merged: bool = False) -> str:
    """The engine's name for the variant as an alias serves it: merged
    weights are a model of their own, loaded beside the base."""
    return f"{MERGED_PREFIX}{variant.pk}" if merged and variant.adapter_path else variant.engine_model


def serves_merged(alias: Alias | None) -> bool:
    """Whether the alias's variant goes to the engine as merged weights: the
    hf engine's; other backends serve the adapter (the alias page says so)."""
    return bool(alias is not None and alias.serve_merged and settings.INFERENCE_BACKEND == "hf")


def _model_not_found(err: OpenAIError) -> bool:
    return err.status == 404 or err.code == "model_not_found"


class EngineClient:
    """One per engine URL and process (see `client()`); thread-safe."""

    def __init__(self, url: str, timeout: float, backend: str = "hf", api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.backend = backend
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=CONNECT_SECONDS), headers=headers
        )
        self.timeout = timeout
        self._loaded: set[str] = set()  # engine model names known to be loaded
        self._lock = threading.Lock()
        # One load at a time in this process: requests arriving together for a model not yet
        # loaded (the playground's columns) wait for the first one's load instead of failing.
        self._loading = threading.Lock()

    def close(self) -> None:
        self.http.close()

    # --- plain calls --------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            kwargs: dict[str, Any] = {"json": body} if body is not None else {}
            if headers:
                kwargs["headers"] = headers
            if timeout is not None:
                kwargs["timeout"] = httpx.Timeout(timeout, connect=CONNECT_SECONDS)
            return self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise unavailable(self.url, exc) from exc
            raise timed_out(self.url, "answer") from exc
        except httpx.HTTPError as exc:
            raise unavailable(self.url, exc) from exc

    def _post_ok(self, path: str, body: dict[str, Any]) -> httpx.Response:
        response = self._request("POST", path, body)
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def models(self) -> list[dict[str, Any]]:
        response = self._request("GET", "/v1/models", timeout=30)
        if response.status_code != 200:
            raise _error_from(response)
        return list(response.json().get("data", []))

    def status(self) -> EngineStatus:
        """The engine's health, models and queue depth, asked within
        STATUS_SECONDS. An engine that does not answer is a status, not an error."""
        try:
            health = self._request("GET", "/health", timeout=STATUS_SECONDS)
            if health.status_code != 200:
                raise _error_from(health)
            response = self._request("GET", "/v1/models", timeout=STATUS_SECONDS)
            if response.status_code != 200:
                raise _error_from(response)
            cards = response.json().get("data", [])
        except (OpenAIError, ValueError, AttributeError) as exc:
            log.info("engine status at %s: %s", self.url, exc)
            why = (
                exc.message
                if isinstance(exc, OpenAIError)
                else "it answered something that is not a model list"
            )
            return EngineStatus(False, self.backend, error=why)
        status = EngineStatus(True, self.backend, queued=self._queued(health))
        for card in cards if isinstance(cards, list) else []:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            parent = card.get("parent")
            if isinstance(parent, str) and parent:
                status.adapters[card["id"]] = parent
            else:
                status.bases.append(card["id"])
        return status

    def _queued(self, health: httpx.Response) -> int | None:
        try:
            data = health.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("queued_rows"), int):
            return int(data["queued_rows"])
        if self.backend != "vllm":
            return None
        try:
            metrics = self._request("GET", "/metrics", timeout=STATUS_SECONDS)
        except OpenAIError:
            return None
        waiting = VLLM_WAITING.findall(metrics.text) if metrics.status_code == 200 else []
        return int(sum(float(v) for v in waiting)) if waiting else None

    def load_base(self, name: str, path: str, merge: str | None = None) -> None:
        body = {"model": name, "path": path}
        if merge:
            body["lora_path"] = merge
        self._post_ok("/v1/load_model", body)

    def unload_base(self, name: str) -> None:
        self._unload("/v1/unload_model", "model", name)

    def load_adapter(self, name: str, path: str, base_name: str) -> None:
        body = {"lora_name": name, "lora_path": path}
        if self.backend == "hf":
            body["base_model_name"] = base_name
        try:
            self._post_ok("/v1/load_lora_adapter", body)
        except OpenAIError as exc:
            # vLLM refuses a second load of a name instead of ignoring it.
            if not (exc.status == 400 and "already" in exc.message.lower()):
                raise

    def unload_adapter(self, name: str) -> None:
        self._unload("/v1/unload_lora_adapter", "lora_name", name)

    def _unload(self, path: str, field: str, name: str) -> None:
        with self._lock:
            self._loaded.discard(name)
        try:
            self._post_ok(path, {field: name})
        except OpenAIError as exc:
            if exc.status != 404:  # already gone
                raise

    # --- what a variant needs -------------------------------------------------

    def forget(self, name: str) -> None:
        with self._lock:
            self._loaded.discard(name)

    def ensure_loaded(self, variant: Variant, refresh: bool = False, merged: bool = False) -> None:
        """Load the variant's base and adapter (or, `merged`, its merged
        weights) into the engine unless they are there, waiting while another
        request loads them. Raises OpenAIError (503) when the engine cannot load them."""
        name = served_name(variant, merged)
        if not refresh:
            with self._lock:
                if name in self._loaded:
                    return
        with self._loading:
            with self._lock:
                if name in self._loaded and not refresh:
                    return
            self._ensure_loaded(variant, merged)

    def _ensure_loaded(self, variant: Variant, merged: bool = False) -> None:
        name = served_name(variant, merged)
        base = variant.base_model
        served = {m.get("id") for m in self.models()}
        try:
            if name != variant.engine_model:
                if name not in served:
                    self._load_base_waiting(name, base.path, variant.adapter_path)
            elif base.name not in served:
                if self.backend != "hf":
                    raise OpenAIError(
                        503,
                        f"The inference engine does not serve {shown(variant)}'s base model.",
                        type="engine_unavailable",
                        code="model_not_loaded",
                        detail=f"the engine at {self.url} does not serve the base model "
                        f"{base.name}: start it with that model",
                    )
                self._load_base_waiting(base.name, base.path)
            if variant.adapter_path and name not in served:
                self.load_adapter(name, variant.adapter_path, base.name)
        except OpenAIError as exc:
            if exc.status >= 500 and exc.type == "engine_unavailable":
                raise
            raise OpenAIError(
                503,
                f"The inference engine could not load {shown(variant)}.",
                type="engine_unavailable",
                code="model_load_failed",
                detail=f"loading {name} ({variant.name}) failed: {exc}",
            ) from exc
        with self._lock:
            self._loaded.add(name)
            if name == variant.engine_model:
                self._loaded.add(base.name)

    def _load_base_waiting(self, name: str, path: str, merge: str | None = None) -> None:
        """Load a base, or wait while another process loads it: the hf engine
        answers 503 "still loading" meanwhile, then "already loaded" (200)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.load_base(name, path, merge)
            except OpenAIError as exc:
                if exc.code != STILL_LOADING_CODE or "still loading" not in exc.message:
                    raise
                if time.monotonic() > deadline:
                    raise timed_out(self.url, f"finish loading {name}") from exc
            time.sleep(LOAD_POLL_SECONDS)

    # --- completions (chat and legacy text) ---------------------------------------

    def chat(
        self, variant: Variant, body: dict[str, Any], project: str | None = None, merged: bool = False
    ) -> dict[str, Any]:
        """A non-streamed chat completion (body["model"] is set here), queued
        under `project`; `merged`: from the variant's merged weights."""
        return self._complete(CHAT_PATH, variant, body, project, merged)

    def completions(
        self, variant: Variant, body: dict[str, Any], project: str | None = None, merged: bool = False
    ) -> dict[str, Any]:
        """A non-streamed legacy text completion (a prompt in, text out), as `chat`."""
        return self._complete(COMPLETIONS_PATH, variant, body, project, merged)

    def stream(
        self, variant: Variant, body: dict[str, Any], project: str | None = None, merged: bool = False
    ) -> AbstractContextManager[Iterator[str]]:
        """A streamed chat completion: yields an iterator of the SSE `data:`
        payloads (JSON text or "[DONE]"). Errors before the first byte raise
        OpenAIError, so the caller can still answer with a status."""
        return self._stream(CHAT_PATH, variant, body, project, merged)

    def stream_completions(
        self, variant: Variant, body: dict[str, Any], project: str | None = None, merged: bool = False
    ) -> AbstractContextManager[Iterator[str]]:
        """A streamed legacy text completion, as `stream`."""
        return self._stream(COMPLETIONS_PATH, variant, body, project, merged)

    def _complete(
        self, path: str, variant: Variant, body: dict[str, Any], project: str | None, merged: bool
    ) -> dict[str, Any]:
        self.ensure_loaded(variant, merged=merged)
        payload = {**body, "model": served_name(variant, merged)}
        headers = {PROJECT_HEADER: project} if project else None
        response = self._request("POST", path, payload, headers=headers)
        if response.status_code == 404:
            self.ensure_loaded(variant, refresh=True, merged=merged)
            response = self._request("POST", path, payload, headers=headers)
        if response.status_code >= 400:
            raise self._chat_error(response, variant)
        data: dict[str, Any] = response.json()
        return data

    @contextmanager
    def _stream(
        self, path: str, variant: Variant, body: dict[str, Any], project: str | None, merged: bool
    ) -> Iterator[Iterator[str]]:
        self.ensure_loaded(variant, merged=merged)
        payload = {**body, "model": served_name(variant, merged), "stream": True}
        headers = {PROJECT_HEADER: project} if project else {}
        response = self._open_stream(path, payload, headers)
        if response.status_code == 404:
            response.read()
            response.close()
            self.ensure_loaded(variant, refresh=True, merged=merged)
            response = self._open_stream(path, payload, headers)
        try:
            if response.status_code >= 400:
                response.read()
                raise self._chat_error(response, variant)
            yield self._events(response)
        finally:
            response.close()

    def _open_stream(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        try:
            request = self.http.build_request("POST", path, json=payload, headers=headers)
            return self.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise timed_out(self.url, "start answering") from exc
        except httpx.HTTPError as exc:
            raise unavailable(self.url, exc) from exc

    def _events(self, response: httpx.Response) -> Iterator[str]:
        try:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        except httpx.HTTPError as exc:
            raise unavailable(self.url, f"the stream broke off: {exc}") from exc

    def _chat_error(self, response: httpx.Response, variant: Variant) -> OpenAIError:
        err = _error_from(response)
        if _model_not_found(err):
            # Loaded a moment ago and still unknown: the engine, not the client, is wrong.
            self.forget(variant.engine_model)
            return OpenAIError(
                503,
                f"The inference engine lost {shown(variant)} right after loading it.",
                type="engine_unavailable",
                code="model_load_failed",
                detail=f"{variant.engine_model}: {err.message}",
            )
        if err.status >= 500:
            # The engine's own failure: its words (paths, tracebacks) stay in the log.
            return OpenAIError(
                503 if err.status == 503 else 502,
                "The inference engine is unavailable; try again later."
                if err.status == 503
                else "The inference engine failed to answer.",
                type=err.type,
                code=err.code,
                detail=f"the engine answered {err.status}: {err.message}",
            )
        return err


_clients: dict[tuple[str, str, float, str], EngineClient] = {}
_clients_lock = threading.Lock()


def client() -> EngineClient:
    """This process's client for the configured engine (settings may change in tests)."""
    key = (engine_url(), settings.INFERENCE_BACKEND, float(settings.ENGINE_TIMEOUT_SECONDS), api_key() or "")
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = EngineClient(key[0], key[2], backend=key[1], api_key=key[3])
        return found
