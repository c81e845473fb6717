"""Which engine answers teacher generation and eval runs, chosen by the
INFERENCE_BACKEND setting, so a variant answers the same there as in serving.

`hf` (default): the job loads the model in-process (`engines.inference`);
`remote_model` returns None and the runner does what it always did.
`vllm`: the job asks the vLLM server (VLLM_URL, else ENGINE_URL where the
workbench started one) through `engines.remote.generate_remote`, after
loading the variant's adapter into it under the variant's engine name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from django.conf import settings

from engines.chat import Message
from engines.inference import Completion, GenerationSettings
from engines.progress import ProgressFn, StopFn
from engines.remote import RemoteGenerationError, generate_remote
from engines.vllm_server import VLLMError, load_adapter
from jobs.registry import JobError
from workbench.models import BaseModel, Variant


@dataclass(frozen=True)
class RemoteModel:
    """A model (a base, or an adapter over it) served by an engine at `url`."""

    url: str
    name: str
    api_key: str | None = None

    def generate(self, conversations: Sequence[Sequence[Message]], system_prompt: str | None,
                 gen: GenerationSettings, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None, concurrency: int | None = None,
                 opening: str | None = None) -> list[Completion]:
        # The batch size a job asks for is how many requests the engine gets at once.
        try:
            return generate_remote(self.url, self.name, conversations, system_prompt, gen,
                                   concurrency=concurrency or gen.batch_size, api_key=self.api_key,
                                   progress=progress, should_stop=should_stop, opening=opening)
        except RemoteGenerationError as exc:
            raise JobError(f"generation on the vLLM backend failed: {exc}") from exc

    def single_request_latency(self, conversations: Sequence[Sequence[Message]], system_prompt: str | None,
                               gen: GenerationSettings, sample: int = 8) -> list[float]:
        """Wall seconds of single requests, one after another, on the first
        `sample` conversations (what one user waits), after one untimed warm-up:
        the remote twin of `engines.evaluation.single_request_latency`."""
        chosen = list(conversations[:sample])
        if not chosen:
            return []
        self.generate(chosen[:1], system_prompt, replace(gen, max_new_tokens=2), concurrency=1)
        seconds = []
        for conv in chosen:
            began = time.perf_counter()
            self.generate([conv], system_prompt, gen, concurrency=1)
            seconds.append(time.perf_counter() - began)
        return seconds


def remote_model(base_model: BaseModel, variant: Variant | None = None) -> RemoteModel | None:
    """None with the in-process backend; else the base model (or the
    variant's adapter, loaded into the engine if it is not yet) on the vLLM server."""
    if getattr(settings, "INFERENCE_BACKEND", "hf") != "vllm":
        return None
    url = getattr(settings, "VLLM_URL", "") or getattr(settings, "ENGINE_URL", "")
    if not url:
        raise JobError("INFERENCE_BACKEND is vllm but neither VLLM_URL nor ENGINE_URL is set")
    api_key = getattr(settings, "VLLM_API_KEY", None) or None
    if variant is not None and variant.adapter_path:
        try:
            load_adapter(url, variant.engine_model, variant.adapter_path, api_key=api_key)
        except VLLMError as exc:
            raise JobError(f"could not load the adapter of {variant} into the vLLM backend: {exc}") from exc
        return RemoteModel(url, variant.engine_model, api_key)
    return RemoteModel(url, base_model.name, api_key)
