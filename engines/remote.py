"""Generation through an engine server over HTTP: the same answers as
`engines.inference.generate`, from the hf engine server or a vLLM server
(both speak the OpenAI chat-completions subset of the engine protocol).

Concurrent requests are what make a remote engine fast (it batches them
continuously), so conversations are sent from a thread pool, `concurrency`
at a time, and the answers come back in input order. Best-of-N asks for the
N samples of a conversation in ONE request (OpenAI's `n`), so the engine
encodes the prompt once and shares its KV cache across them (vLLM's paged
attention; the hf engine batches the n rows side by side). Any OpenAI-compatible
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
from engines.inference.settings import BY_PARAM
from engines.progress import Progress, ProgressFn, StopFn
from engines.protocol import apply_system_prompt

DEFAULT_TIMEOUT = 600.0  # seconds per request: a long answer on a busy CPU engine takes minutes
# The most choices one request asks for: the bound the hf engine and the gateway enforce.
MAX_N = int(BY_PARAM["n"].high)


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


def request_body(
    model: str, messages: list[Message], settings: GenerationSettings, n: int = 1
) -> dict[str, Any]:
    """The /v1/chat/completions body for `n` answers to one conversation under
    `settings` (GenerationSettings.to_openai: the inverse of from_openai)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        **settings.to_openai(),
        "n": n,
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


def split_tokens(total: int, weights: Sequence[int], cap: int | None = None) -> list[int]:
    """`total` shared out in proportion to `weights` (evenly when they are all
    0) as whole numbers that sum to `total`, none above `cap` when the total
    fits under it (a share that would pass it is held there, the rest shared again)."""
    if cap is None:
        return _largest_remainder(total, weights)
    parts = [0] * len(weights)
    open_ = list(range(len(weights)))
    left = total
    while open_ and left > 0:
        shares = _largest_remainder(left, [weights[i] for i in open_])
        over = [i for i, share in zip(open_, shares, strict=True) if share > cap]
        if not over or left > cap * len(open_):  # all fit, or none can: as shared
            for i, share in zip(open_, shares, strict=True):
                parts[i] = share
            break
        for i in over:
            parts[i] = cap
            left -= cap
            open_.remove(i)
    return parts


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    whole = sum(weights)
    shares = [total * w / whole for w in weights]
    parts = [int(x) for x in shares]
    for i in sorted(range(len(shares)), key=lambda i: parts[i] - shares[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _completions(data: dict[str, Any], n: int, max_tokens: int, seconds: float, url: str) -> list[Completion]:
    """The `n` choices of an answer, in index order. Usage comes once per
    answer (OpenAI bills the prompt once for n choices): its prompt tokens are
    split evenly over the choices and its completion tokens by each choice's
    length in characters (at most `max_tokens` each), so the sums stay what
    the engine reported."""
    try:
        choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
        if len(choices) != n:
            raise ValueError(f"{len(choices)} choices for n={n}")
        usage = data.get("usage") or {}
        texts = [c["message"]["content"] or "" for c in choices]
        prompt = split_tokens(int(usage.get("prompt_tokens", 0)), [1] * n)
        completion = split_tokens(int(usage.get("completion_tokens", 0)), [len(t) for t in texts], max_tokens)
        return [
            Completion(
                text=text,
                prompt_tokens=p,
                completion_tokens=c,
                # "abort" and friends only happen on a failing engine; treat as cut off.
                finish_reason="stop" if choice.get("finish_reason") == "stop" else "length",
                seconds=seconds,
            )
            for choice, text, p, c in zip(choices, texts, prompt, completion, strict=True)
        ]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
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
    n: Sequence[int] | None = None,
) -> list[Completion]:
    """Answer every conversation through `base_url` (the server root, without
    /v1) as `model` (a base name or a loaded adapter name), in input order.

    Same contract as `engines.inference.generate`: `system_prompt` replaces any
    system message, None means none; `progress` gets a Progress (unit
    "conversations", one per answer) as answers arrive; `should_stop()` is
    checked before each request and raises GenerationCancelled. Any failed
    request raises RemoteGenerationError naming the URL (nothing partial is
    returned). With `opening` (one for all, or one per conversation), each
    answer begins with its row's text: it is sent as the final assistant
    message to continue (vLLM's `continue_final_message`, which the hf engine
    server speaks too); a row without one sends no assistant message.

    `retry` (default DEFAULT_RETRY) bounds the retries of each request;
    `stats` sums what was sent and answered; `on_answer(index, completion)`
    is called the moment each answer arrives (from a pool thread), so a
    caller can keep it even when a later request fails; `seeds`, one per
    conversation, overrides the settings' seed.

    `n`, one per conversation (each 1..MAX_N, default all 1): how many answers
    its one request asks for. The result is flat, conversation 0's n[0]
    answers first, and `on_answer`'s index counts answers, not requests. Row j
    of a request seeded s draws with seed s + j on vLLM and the hf engine
    (`engines.inference.row_seed`), so n answers seeded s are the answers of n
    requests seeded s..s+n-1. A greedy request asks once and copies the
    answer (vLLM refuses n > 1 without sampling; every copy would be the same)."""
    import httpx

    settings = settings or GenerationSettings()
    total_requests = len(conversations)
    openings = per_row_openings(opening, total_requests)
    if seeds is not None and len(seeds) != total_requests:
        raise ValueError(f"{len(seeds)} seeds for {total_requests} conversations")
    counts = [1] * total_requests if n is None else list(n)
    if len(counts) != total_requests:
        raise ValueError(f"{len(counts)} values of n for {total_requests} conversations")
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_N:
            raise ValueError(
                f"n for conversation {i} must be a whole number from 1 to {MAX_N}, got {count!r}"
            )
    if total_requests == 0:
        return []
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    retry = retry or DEFAULT_RETRY
    stats = stats if stats is not None else TransportStats()
    firsts = [0]  # where each request's answers start in the flat result
    for count in counts:
        firsts.append(firsts[-1] + count)
    total = firsts[-1]
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
        wanted = counts[index]
        asked = 1 if settings.temperature == 0 else wanted
        body = request_body(model, messages, settings, asked)
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
        completions = _completions(
            response.json(), asked, settings.max_new_tokens, time.perf_counter() - began, url
        )
        if asked < wanted:  # greedy copies share the one answer's usage
            only = completions[0]
            prompts = split_tokens(only.prompt_tokens, [1] * wanted)
            outputs = split_tokens(only.completion_tokens, [1] * wanted)
            completions = [
                dataclasses.replace(only, prompt_tokens=p, completion_tokens=c)
                for p, c in zip(prompts, outputs, strict=True)
            ]
        if row_opening:
            completions = [dataclasses.replace(c, text=row_opening + c.text) for c in completions]
        stats.add(
            answers=len(completions),
            prompt_tokens=sum(c.prompt_tokens for c in completions),
            completion_tokens=sum(c.completion_tokens for c in completions),
        )
        first = firsts[index]
        if on_answer is not None:
            for offset, answer in enumerate(completions):
                on_answer(first + offset, answer)
        with lock:
            results[first : first + wanted] = completions
            done += wanted
            if progress is not None:
                progress(Progress.since(started, done, total, "conversations"))

    workers = max(1, min(concurrency, total_requests))
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with (
        httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate-remote") as pool,
    ):
        futures: list[Future[None]] = [pool.submit(one, i, client) for i in range(total_requests)]
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
