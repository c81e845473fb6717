"""Generation through an engine server over HTTP: the same answers as
`engines.inference.generate`, from the hf engine server or a vLLM server
(both speak the OpenAI chat-completions subset of the engine protocol).

Concurrent requests are what make a remote engine fast (it batches them
continuously), so conversations are sent from a thread pool, `concurrency`
at a time, and the answers come back in input order. Plain Python: no Django.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from engines.chat import Message
from engines.inference import Completion, GenerationCancelled, GenerationSettings
from engines.progress import Progress, ProgressFn, StopFn
from engines.protocol import apply_system_prompt

DEFAULT_TIMEOUT = 600.0  # seconds per request: a long answer on a busy CPU engine takes minutes


class RemoteGenerationError(Exception):
    """The engine at a URL failed; the message names the URL and what it answered."""


def conversation_messages(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """What is sent: the conversation with any system message replaced by
    `system_prompt` (None: no system message), by the rule `engines.chat.render`
    applies, so the engine's chat template sees what `generate` would render."""
    return apply_system_prompt(messages, system_prompt)


def request_body(model: str, messages: list[Message], settings: GenerationSettings) -> dict[str, Any]:
    """The /v1/chat/completions body for one conversation under `settings`
    (GenerationSettings.to_openai: the inverse of from_openai)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        **settings.to_openai(),
        "n": 1,
        "stream": False,
    }
    if settings.temperature == 0:  # greedy: top_p means nothing, and a seed neither
        body.update(temperature=0.0, top_p=1.0)
    return body


def _error_detail(response: Any) -> str:
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else None
        return str(message or data.get("message") or data)[:500]
    except ValueError:
        return response.text[:500]


def _completion(data: dict[str, Any], seconds: float, url: str) -> Completion:
    try:
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        finish = choice.get("finish_reason")
        return Completion(
            text=choice["message"]["content"] or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            # "abort" and friends only happen on a failing engine; treat as cut off.
            finish_reason="stop" if finish == "stop" else "length",
            seconds=seconds,
        )
    except (KeyError, IndexError, TypeError) as exc:
        raise RemoteGenerationError(
            f"the engine at {url} answered a malformed chat completion: {data!r:.300}"
        ) from exc


def generate_remote(
    base_url: str,
    model: str,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    concurrency: int = 16,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    opening: str | None = None,
) -> list[Completion]:
    """Answer every conversation through `base_url` (the server root, without
    /v1) as `model` (a base name or a loaded adapter name), in input order.

    Same contract as `engines.inference.generate`: `system_prompt` replaces any
    system message, None means none; `progress` gets a Progress (unit
    "conversations") as answers arrive; `should_stop()` is checked before each
    request and raises GenerationCancelled. Any failed request raises
    RemoteGenerationError naming the URL (nothing partial is returned).
    With `opening`, every answer begins with that text: it is sent as the
    final assistant message to continue (vLLM's `continue_final_message`,
    which the hf engine server speaks too)."""
    import httpx

    settings = settings or GenerationSettings()
    total = len(conversations)
    if total == 0:
        return []
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    results: list[Completion | None] = [None] * total
    lock = threading.Lock()
    cancelled = threading.Event()
    done = 0

    def one(index: int, client: httpx.Client) -> None:
        nonlocal done
        if cancelled.is_set() or (should_stop is not None and should_stop()):
            cancelled.set()
            return
        messages = conversation_messages(conversations[index], system_prompt)
        body = request_body(model, messages, settings)
        if opening:
            body["messages"] = [*messages, {"role": "assistant", "content": opening}]
            body.update(continue_final_message=True, add_generation_prompt=False)
        began = time.perf_counter()
        try:
            response = client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RemoteGenerationError(f"the engine at {url} could not be reached: {exc}") from exc
        if response.status_code != 200:
            raise RemoteGenerationError(
                f"the engine at {url} answered {response.status_code} for model {model!r}: {_error_detail(response)}"
            )
        completion = _completion(response.json(), time.perf_counter() - began, url)
        if opening:
            completion = dataclasses.replace(completion, text=opening + completion.text)
        with lock:
            results[index] = completion
            done += 1
            if progress is not None:
                progress(Progress.since(started, done, total, "conversations"))

    workers = max(1, min(concurrency, total))
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with (
        httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate-remote") as pool,
    ):
        futures: list[Future[None]] = [pool.submit(one, i, client) for i in range(total)]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            cancelled.set()  # requests not yet sent are skipped
            for f in futures:
                f.cancel()
            exc = failed.exception()
            assert exc is not None
            raise exc
    if cancelled.is_set():
        raise GenerationCancelled(done, total)
    return [r for r in results if r is not None]
