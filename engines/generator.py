"""One seam for generation: a `Generator` answers conversations, in process
(`LocalGenerator`: a loaded model, `engines.inference.generate`) or on an
OpenAI-compatible server (`RemoteGenerator`: the hf engine server or vLLM,
`engines.remote.generate_remote`). Teacher generation, evals, the judge and
lm-eval call it, so which backend answers is chosen once, by whoever builds
the generator (the apps: `jobs.backend`).

A generator stands for a base model and at most one adapter over it;
`adapter=False` asks the base alone (the floor and teacher arms) and is how
one loaded model, or one server, answers every arm. `CachingGenerator` wraps
any of them with an `engines.response_cache.ResponseCache`: only the misses
are asked, and each answer is stored as it arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engines.chat import Message
from engines.inference import (
    Completion,
    GenerationSettings,
    LoadedModel,
    Opening,
    SettingsError,
    generate,
    generate_samples,
    per_row_openings,
)
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    from engines.remote import RetryPolicy, TransportStats
    from engines.response_cache import ResponseCache

AnswerFn = Callable[[int, Completion], None]


class Generator(Protocol):
    @property
    def has_adapter(self) -> bool:
        """Whether `adapter=True` answers with an adapter (else the base answers either way)."""
        ...

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[Completion]:
        """Answer every conversation in input order: `system_prompt` replaces
        any system message (None: none); `progress` gets a Progress (unit
        "conversations"); `should_stop()` is checked as work goes and raises
        GenerationCancelled; with `opening` (one for all, or one `str | None`
        per conversation) each answer starts with its row's text."""
        ...

    def generate_samples(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings,
        samples: int,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[list[Completion]]:
        """`samples` answers to each conversation (best-of-N), grouped per
        conversation; a per-conversation `opening` is shared by its samples."""
        ...


@dataclass(frozen=True)
class LocalGenerator:
    """A model loaded in this process (base + optional unmerged adapter)."""

    loaded: LoadedModel
    reuse_prefix: bool = True

    @property
    def has_adapter(self) -> bool:
        return self.loaded.has_adapter

    def _adapter(self, adapter: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if adapter else self.loaded.adapter_disabled()

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[Completion]:
        with self._adapter(adapter):
            return generate(
                self.loaded,
                conversations,
                system_prompt,
                settings,
                reuse_prefix=self.reuse_prefix,
                progress=progress,
                should_stop=should_stop,
                opening=opening,
            )

    def generate_samples(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings,
        samples: int,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[list[Completion]]:
        with self._adapter(adapter):
            return generate_samples(
                self.loaded,
                conversations,
                system_prompt,
                settings,
                samples,
                opening=opening,
                progress=progress,
                should_stop=should_stop,
            )


@dataclass(frozen=True)
class SampleAsk:
    """Samples wanted of one conversation: their indexes (the i-th of N,
    which fixes the seed) and the opening they share."""

    conversation: Sequence[Message]
    opening: str | None
    samples: tuple[int, ...]


def sample_requests(samples: Sequence[int], seeded: bool) -> list[tuple[int, ...]]:
    """Sample indexes in request groups of at most MAX_N, in order: seeded,
    a group is a run of consecutive indexes (its seed is its first one's);
    unseeded, any indexes share a request."""
    from engines.remote import MAX_N

    groups: list[list[int]] = []
    for index in samples:
        last = groups[-1] if groups else None
        if last is not None and len(last) < MAX_N and (not seeded or index == last[-1] + 1):
            last.append(index)
        else:
            groups.append([index])
    return [tuple(g) for g in groups]


@dataclass(frozen=True)
class RemoteGenerator:
    """A base model, and optionally an adapter already loaded beside it
    under `adapter_model`, on the OpenAI-compatible server at `url` (its root,
    without /v1). A job's batch size is how many requests are in flight at
    once, at most `max_concurrency` when set (an endpoint's own limit).
    `stats` sums the requests, retries and tokens of every call. A request
    waits for its answer at most `timeout` seconds, then counts as failed (and
    is retried): a deep queue on a slow engine needs more than the default."""

    url: str
    model: str
    adapter_model: str | None = None
    api_key: str | None = None
    max_concurrency: int | None = None
    retry: RetryPolicy | None = None
    stats: TransportStats | None = field(default=None, compare=False)
    timeout: float | None = None  # seconds per request (None: engines.remote.DEFAULT_TIMEOUT)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_model is not None

    def served_name(self, adapter: bool = True) -> str:
        return self.adapter_model if adapter and self.adapter_model else self.model

    def _timeout(self) -> float:
        from engines.remote import DEFAULT_TIMEOUT

        return DEFAULT_TIMEOUT if self.timeout is None else self.timeout

    def _concurrency(self, settings: GenerationSettings) -> int:
        if self.max_concurrency is not None:
            return min(settings.batch_size, self.max_concurrency)
        return settings.batch_size

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
        on_answer: AnswerFn | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> list[Completion]:
        """As Generator.generate; `on_answer(index, completion)` as each
        answer arrives, `seeds` one per conversation (engines.remote)."""
        return self._remote(
            conversations,
            system_prompt,
            settings or GenerationSettings(),
            adapter,
            progress,
            should_stop,
            opening=opening,
            on_answer=on_answer,
            seeds=seeds,
        )

    def _remote(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings,
        adapter: bool,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
        **each: Any,
    ) -> list[Completion]:
        """generate_remote against this endpoint; `each`: its per-call extras
        (opening, on_answer, seeds, n)."""
        from engines.remote import generate_remote

        return generate_remote(
            self.url,
            self.served_name(adapter),
            conversations,
            system_prompt,
            settings,
            concurrency=self._concurrency(settings),
            api_key=self.api_key,
            timeout=self._timeout(),
            progress=progress,
            should_stop=should_stop,
            retry=self.retry,
            stats=self.stats,
            **each,
        )

    def generate_samples(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings,
        samples: int,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[list[Completion]]:
        """As Generator.generate_samples: one request with n = `samples` per
        conversation (at most MAX_N a request), sample s seeded `sample_seed(settings, s)`."""
        _check_samples(samples)
        openings = per_row_openings(opening, len(conversations))
        flat = self.ask_samples(
            [SampleAsk(c, o, tuple(range(samples))) for c, o in zip(conversations, openings, strict=True)],
            system_prompt,
            settings,
            adapter=adapter,
            progress=progress,
            should_stop=should_stop,
        )
        return [flat[i : i + samples] for i in range(0, len(flat), samples)]

    def ask_samples(
        self,
        asks: Sequence[SampleAsk],
        system_prompt: str | None,
        settings: GenerationSettings,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        on_answer: AnswerFn | None = None,
    ) -> list[Completion]:
        """One answer per sample index of every ask, flat in order
        (`on_answer` counts the same way), in as few requests as keep each
        sample's seed: a seeded request's row j draws with its seed + j, so
        only consecutive indexes share a request (`sample_requests`)."""
        requests = [
            (ask, run) for ask in asks for run in sample_requests(ask.samples, settings.seed is not None)
        ]
        return self._remote(
            [ask.conversation for ask, _ in requests],
            system_prompt,
            settings,
            adapter,
            progress,
            should_stop,
            opening=[ask.opening for ask, _ in requests],
            on_answer=on_answer,
            seeds=[sample_seed(settings, run[0]) for _, run in requests],
            n=[len(run) for _, run in requests],
        )


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise SettingsError({"samples": f"must be at least 1, got {samples}"})


def sample_seed(settings: GenerationSettings, sample: int) -> int | None:
    """The seed of the `sample`-th remote sample of a conversation: row j of
    a request seeded s draws with s + j (`engines.inference.row_seed`, and
    vLLM's n), so sample k is the same answer whether it is row k of one
    request seeded `settings.seed` or a request of its own."""
    return None if settings.seed is None else settings.seed + sample


@dataclass
class CacheStats:
    """What a CachingGenerator answered from its cache and what it asked."""

    hits: int = 0
    asked: int = 0
    prompt_tokens: int = 0  # of the answers asked for, not of the hits
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, completion: Completion) -> None:
        with self.lock:
            self.asked += 1
            self.prompt_tokens += completion.prompt_tokens
            self.completion_tokens += completion.completion_tokens

    def to_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "cache_hits": self.hits,
                "asked": self.asked,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }


@dataclass
class CachingGenerator:
    """`inner` behind a ResponseCache: every call asks `inner` only for the
    answers the cache lacks and stores each one as it arrives (a remote
    answer the moment its response comes; a local one per batch), so a
    failed or killed run loses nothing it was given. `identity` names what
    answers (the endpoint URL and model, or the local model): it is part of
    every key, with whether the adapter answers."""

    inner: Generator
    cache: ResponseCache
    identity: str
    stats: CacheStats = field(default_factory=CacheStats)
    _asked: dict[str, int] = field(default_factory=dict, repr=False)

    def _index(
        self,
        identity: str,
        system_prompt: str | None,
        messages: Sequence[Message],
        settings: GenerationSettings,
        opening: str | None,
        sample: int,
        samples: int,
    ) -> int:
        """The sample index in the key. A sampled request asked again (a
        later best-of-N round repeating the first) wants new answers, not the
        cached ones: the k-th repeat of a request within this generator's
        life takes indexes k*N.. . A rerun repeats the same requests in the
        same order, so it finds the same keys; greedy requests never repeat."""
        if settings.temperature == 0:
            return sample
        from engines.response_cache import cache_key

        base = cache_key(identity, system_prompt, messages, settings, opening, sample)
        seen = self._asked.get(base, 0)
        self._asked[base] = seen + 1
        return sample + seen * samples

    @property
    def has_adapter(self) -> bool:
        return self.inner.has_adapter

    def _identity(self, adapter: bool) -> str:
        return f"{self.identity}|adapter={adapter and self.inner.has_adapter}"

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[Completion]:
        settings = settings or GenerationSettings()
        openings = per_row_openings(opening, len(conversations))
        wanted = [(c, 0, o) for c, o in zip(conversations, openings, strict=True)]
        return self._answer(wanted, system_prompt, settings, adapter, progress, should_stop)

    def generate_samples(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings,
        samples: int,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: Opening = None,
    ) -> list[list[Completion]]:
        _check_samples(samples)
        openings = per_row_openings(opening, len(conversations))
        wanted = [(c, s, o) for c, o in zip(conversations, openings, strict=True) for s in range(samples)]
        if not isinstance(self.inner, RemoteGenerator):
            # As engines.inference.generate_samples: the N copies share wider batches (the size is not in the key).
            batch = max(settings.batch_size, min(settings.batch_size * samples, 64))
            settings = dataclasses.replace(settings, batch_size=batch)
        flat = self._answer(wanted, system_prompt, settings, adapter, progress, should_stop)
        return [flat[i : i + samples] for i in range(0, len(flat), samples)]

    def _answer(
        self,
        wanted: list[tuple[Sequence[Message], int, str | None]],
        system_prompt: str | None,
        settings: GenerationSettings,
        adapter: bool,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> list[Completion]:
        """One answer per (conversation, sample index, opening), in order, the misses asked."""
        from engines.response_cache import cache_key

        identity = self._identity(adapter)
        samples = 1 + max((s for _, s, _ in wanted), default=0)
        with self.stats.lock:
            indexes = [self._index(identity, system_prompt, c, settings, o, s, samples) for c, s, o in wanted]
        keys = [
            cache_key(identity, system_prompt, c, settings, o, i)
            for (c, _, o), i in zip(wanted, indexes, strict=True)
        ]
        found = self.cache.get_many(keys)
        results: list[Completion | None] = [found.get(k) for k in keys]
        misses = [i for i, r in enumerate(results) if r is None]
        hits = len(wanted) - len(misses)
        with self.stats.lock:
            self.stats.hits += hits
        if not misses:
            if progress is not None and wanted:
                progress(Progress(done=len(wanted), total=len(wanted), unit="conversations"))
            return [r for r in results if r is not None]

        def keep(miss: int, completion: Completion) -> None:
            index = misses[miss]
            self.cache.put(keys[index], completion)
            self.stats.count(completion)
            results[index] = completion

        def shifted(p: Progress) -> None:  # the hits count as done
            if progress is not None:
                progress(dataclasses.replace(p, done=hits + p.done, total=len(wanted)))

        if isinstance(self.inner, RemoteGenerator):
            # A conversation's missing samples go together (one request with n = their count
            # when their indexes run on), each stored the moment its answer arrives.
            grouped: dict[int, list[int]] = {}
            for miss in misses:
                grouped.setdefault(miss // samples, []).append(miss)  # wanted is conversation-major
            asks = [
                SampleAsk(wanted[group[0]][0], wanted[group[0]][2], tuple(indexes[m] for m in group))
                for group in grouped.values()
            ]
            # ask_samples answers in ask order, so its k-th answer is the k-th miss.
            self.inner.ask_samples(
                asks,
                system_prompt,
                settings,
                adapter=adapter,
                progress=shifted,
                should_stop=should_stop,
                on_answer=keep,
            )
        else:
            # In process answers come a batch at a time: store each batch before the next.
            conversations = [wanted[i][0] for i in misses]
            openings = [wanted[i][2] for i in misses]
            step = max(1, settings.batch_size)
            for start in range(0, len(misses), step):

                def batch_progress(p: Progress, offset: int = start) -> None:
                    shifted(dataclasses.replace(p, done=offset + p.done))

                part = self.inner.generate(
                    conversations[start : start + step],
                    system_prompt,
                    settings,
                    adapter=adapter,
                    progress=batch_progress,
                    should_stop=should_stop,
                    opening=_one_or_each(openings[start : start + step]),
                )
                for offset, completion in enumerate(part):
                    keep(start + offset, completion)
        answered = [r for r in results if r is not None]
        if len(answered) != len(wanted):  # the inner generator broke its contract
            raise RuntimeError(f"{len(wanted) - len(answered)} answers are missing")
        return answered


def _one_or_each(openings: Sequence[str | None]) -> Opening:
    """One opening when the rows share it (what an inner generator was given
    before openings could differ per row), else one per row."""
    first = openings[0] if openings else None
    return first if all(o == first for o in openings) else list(openings)
