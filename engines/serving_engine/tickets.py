"""Tickets: one per request, what the HTTP thread waits on while the batcher
fills in its choices (whole, or streamed as events)."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from engines.inference import TokenLogprob
from engines.protocol import OpenAIError
from engines.serving_engine.errors import timed_out
from engines.serving_engine.requests import ChatRequest


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of the text (the end token is not)
    stop_reason: str | None = None  # the stop string that ended it


@dataclass
class ChatResult:
    model: str
    choices: list[Choice]
    prompt_tokens: int
    # With the request's prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


# Stream events: ("delta", index, (text, logprobs)), ("finish", index, Choice), ("end", None, None)
Event = tuple[str, int | None, Any]


class Ticket:
    """A submitted request: `result()` waits for the whole answer, `events()`
    yields its text as it is generated (when submitted with stream)."""

    _ids = itertools.count()

    def __init__(self, request: ChatRequest, base: str, adapter: str | None, prompt_ids: list[int]) -> None:
        self.seq = next(self._ids)
        self.request = request
        self.base = base
        self.adapter = adapter
        self.prompt_ids = prompt_ids
        self.choices: list[Choice | None] = [None] * request.n
        self.error: OpenAIError | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()

    @property
    def rows(self) -> int:
        return self.request.n

    @property
    def batch_key(self) -> tuple[Any, ...]:
        return self.request.batch_key(self.base)

    def cancel(self) -> None:
        """The client went away: stop generating for it."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> ChatResult:
        if not self._done.wait(timeout):
            raise timed_out()
        if self.error is not None:
            raise self.error
        return ChatResult(
            self.request.model,
            [c for c in self.choices if c is not None],
            len(self.prompt_ids),
            self.prompt_logprobs,
        )

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Deltas and finishes as they come, until the end; raises OpenAIError on failure."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise timed_out() from None
            if event[0] == "error":
                raise event[2]
            if event[0] == "end":
                return
            yield event

    # -- the batcher's side

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
        if self.request.stream and (text or logprobs):
            self._events.put(("delta", index, (text, logprobs)))

    def finish(self, choice: Choice) -> None:
        if self.choices[choice.index] is not None:
            return
        self.choices[choice.index] = choice
        if self.request.stream:
            self._events.put(("finish", choice.index, choice))
        if all(c is not None for c in self.choices):
            self._events.put(("end", None, None))
            self._done.set()

    def fail(self, error: OpenAIError) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._events.put(("error", None, error))
        self._done.set()
