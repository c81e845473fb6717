"""One seam for generation: a `Generator` answers conversations, in process
(`LocalGenerator`: a loaded model, `engines.inference.generate`) or on an
OpenAI-compatible server (`RemoteGenerator`: the hf engine server or vLLM,
`engines.remote.generate_remote`). Teacher generation, evals, the judge and
lm-eval call it, so which backend answers is chosen once, by whoever builds
the generator (the apps: `jobs.backend`).

A generator stands for a base model and at most one adapter over it;
`adapter=False` asks the base alone (the floor and teacher arms) and is how
one loaded model, or one server, answers every arm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engines.chat import Message
from engines.inference import Completion, GenerationSettings, LoadedModel, generate, generate_samples
from engines.progress import ProgressFn, StopFn


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
        opening: str | None = None,
    ) -> list[Completion]:
        """Answer every conversation in input order: `system_prompt` replaces
        any system message (None: none); `progress` gets a Progress (unit
        "conversations"); `should_stop()` is checked as work goes and raises
        GenerationCancelled; with `opening` every answer starts with that text."""
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
        opening: str | None = None,
    ) -> list[list[Completion]]:
        """`samples` answers to each conversation (best-of-N), grouped per conversation."""
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
        opening: str | None = None,
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
        opening: str | None = None,
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
class RemoteGenerator:
    """A base model, and optionally an adapter already loaded beside it
    under `adapter_model`, on the OpenAI-compatible server at `url` (its root,
    without /v1). A job's batch size is how many requests are in flight at once."""

    url: str
    model: str
    adapter_model: str | None = None
    api_key: str | None = None

    @property
    def has_adapter(self) -> bool:
        return self.adapter_model is not None

    def served_name(self, adapter: bool = True) -> str:
        return self.adapter_model if adapter and self.adapter_model else self.model

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        system_prompt: str | None,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        opening: str | None = None,
    ) -> list[Completion]:
        from engines.remote import generate_remote

        settings = settings or GenerationSettings()
        return generate_remote(
            self.url,
            self.served_name(adapter),
            conversations,
            system_prompt,
            settings,
            concurrency=settings.batch_size,
            api_key=self.api_key,
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
        opening: str | None = None,
    ) -> list[list[Completion]]:
        if samples < 1:
            from engines.inference import SettingsError

            raise SettingsError({"samples": f"must be at least 1, got {samples}"})
        flat = self.generate(
            [c for c in conversations for _ in range(samples)],
            system_prompt,
            settings,
            adapter=adapter,
            progress=progress,
            should_stop=should_stop,
            opening=opening,
        )
        return [flat[i : i + samples] for i in range(0, len(flat), samples)]
