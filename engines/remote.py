"""Generation through an engine server over HTTP: the same answers as
`engines.inference.generate`, from the hf engine server or a vLLM server
(both speak the OpenAI chat-completions subset of the engine protocol).

Concurrent requests are what make a remote engine fast (it batches them
continuously), so conversations are sent from a thread pool, `concurrency`
at a time, and the answers come back in input order. Any OpenAI-compatible
endpoint can answer (a hosted API too), so a request that meets a 429, a 5xx
or a dropped connection is tried again after an exponential, jittered wait
(the server's Retry-After honoured), within a bounded number of attempts and
a bounded total wait; any other 4xx fails at once with the server's message.
Plain Python: no Django.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from engines.chat import Message
from engines.inference import Completion, GenerationCancelled, GenerationSettings, Opening, per_row_openings
from engines.progress import Progress, ProgressFn, StopFn
from engines.protocol import apply_system_prompt

DEFAULT_TIMEOUT = 600.0  # seconds per request: a long answer on a busy CPU engine takes minutes


class RemoteGenerationError(Exception):
    """The engine at a URL failed; the message names the URL and what it answered."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how long, a request is tried again after a 429, a 5xx
    or a connection error: attempt k waits a uniform draw in
    [0, min(max_delay, base_delay * 2**k)] ("full jitter", so clients that
    failed together do not come back together), or the server's Retry-After
    when that is longer. A request gives up after `max_attempts` sends or once
    its waits would pass `max_total_wait` seconds."""

    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total_wait: float = 180.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.max_total_wait < 0:
            raise ValueError(f"bad retry policy: {self}")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before send number `attempt + 1` (attempt counts from 1)."""
        backoff = rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        return max(backoff, retry_after) if retry_after is not None else backoff


# What generate_remote uses unless told otherwise (tests shorten it).
DEFAULT_RETRY = RetryPolicy()


class TransportStats:
    """What a run of requests cost, summed across threads: HTTP requests sent
    (retries included), retries, answers and their tokens, and seconds spent
    waiting to retry."""

    FIELDS = ("requests", "retries", "answers", "prompt_tokens", "completion_tokens", "retry_wait_seconds")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.answers = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.retry_wait_seconds = 0.0

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                if name not in self.FIELDS:
                    raise KeyError(name)
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return {name: getattr(self, name) for name in self.FIELDS}


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The Retry-After header as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


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
    opening: Opening = None,
    *,
    retry: RetryPolicy | None = None,
    stats: TransportStats | None = None,
    on_answer: Callable[[int, Completion], None] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> list[Completion]:
    """Answer every conversation through `base_url` (the server root, without
    /v1) as `model` (a base name or a loaded adapter name), in input order.

    Same contract as `engines.inference.generate`: `system_prompt` replaces any
    system message, None means none; `progress` gets a Progress (unit
    "conversations") as answers arrive; `should_stop()` is checked before each
    request and raises GenerationCancelled. Any failed request raises
    RemoteGenerationError naming the URL (nothing partial is returned).
    With `opening` (one for all, or one per conversation), each answer begins
    with its row's text: it is sent as the final assistant message to continue
    (vLLM's `continue_final_message`, which the hf engine server speaks too);
    a row without one sends no assistant message.

    `retry` (default DEFAULT_RETRY) bounds the retries of each request;
    `stats` sums what was sent and answered; `on_answer(index, completion)`
    is called the moment each answer arrives (from a pool thread), so a
    caller can keep it even when a later request fails; `seeds`, one per
    conversation, overrides the settings' seed (distinct samples of one
    conversation need distinct seeds)."""
    import httpx

    settings = settings or GenerationSettings()
    total = len(conversations)
    openings = per_row_openings(opening, total)
    if total == 0:
        return []
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    retry = retry or DEFAULT_RETRY
    stats = stats if stats is not None else TransportStats()
    if seeds is not None and len(seeds) != total:
        raise ValueError(f"{len(seeds)} seeds for {total} conversations")
    started = time.monotonic()
    results: list[Completion | None] = [None] * total
    lock = threading.Lock()
    cancelled = threading.Event()
    done = 0

    def send(client: httpx.Client, body: dict[str, Any]) -> httpx.Response | None:
        """POST the body, again after a retryable failure, within the policy;
        None when the run stopped while it waited (another request failed, or a cancel)."""
        rng = random.Random()
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            stats.add(requests=1)
            problem: str
            retry_after: float | None = None
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"could not be reached: {type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200 or not retryable_status(response.status_code):
                    return response
                problem = f"answered {response.status_code} for model {model!r}: {_error_detail(response)}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            if attempt >= retry.max_attempts:
                raise RemoteGenerationError(
                    f"the engine at {url} {problem} (gave up after {attempt} attempts)"
                )
            delay = retry.delay(attempt, retry_after, rng)
            if waited + delay > retry.max_total_wait:
                raise RemoteGenerationError(
                    f"the engine at {url} {problem} (gave up after {attempt} attempts: waiting "
                    f"{delay:.1f} s more would pass the {retry.max_total_wait:g} s retry budget)"
                )
            stats.add(retries=1, retry_wait_seconds=delay)
            waited += delay
            if cancelled.wait(delay) or (should_stop is not None and should_stop()):
                cancelled.set()
                return None

    def one(index: int, client: httpx.Client) -> None:
        nonlocal done
        if cancelled.is_set() or (should_stop is not None and should_stop()):
            cancelled.set()
            return
        messages = conversation_messages(conversations[index], system_prompt)
        body = request_body(model, messages, settings)
        if seeds is not None and seeds[index] is not None:
            body["seed"] = seeds[index]
        row_opening = openings[index]
        if row_opening:
            body["messages"] = [*messages, {"role": "assistant", "content": row_opening}]
            body.update(continue_final_message=True, add_generation_prompt=False)
        began = time.perf_counter()
        response = send(client, body)
        if response is None:
            return
        if response.status_code != 200:
            raise RemoteGenerationError(
                f"the engine at {url} answered {response.status_code} for model {model!r}: {_error_detail(response)}"
            )
        completion = _completion(response.json(), time.perf_counter() - began, url)
        if row_opening:
            completion = dataclasses.replace(completion, text=row_opening + completion.text)
        stats.add(
            answers=1, prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
        )
        if on_answer is not None:
            on_answer(index, completion)
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
