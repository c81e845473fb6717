"""Which backend answers the jobs' generation (teacher, evals, judge,
lm-eval), on the backend workbench.backend reads from settings, so a variant
answers the same there as in serving.

`hf` (default): the job loads the model in its own process
(`engines.generator.LocalGenerator`). `vllm`: the job asks the vLLM server
(VLLM_URL, else ENGINE_URL where the workbench started one) through
`engines.generator.RemoteGenerator`, after loading the variant's adapter into
it under the variant's engine name.
"""

from __future__ import annotations

from engines.generator import Generator, LocalGenerator, RemoteGenerator
from engines.inference import load_model
from engines.vllm_server import VLLMError, load_adapter
from jobs.registry import JobError
from workbench.backend import api_key, engine_url, remote
from workbench.models import FoundationModel, Variant


def remote_generator(base_model: FoundationModel, variant: Variant | None = None) -> RemoteGenerator | None:
    """None with the in-process backend; else the base model, with the
    variant's adapter beside it (loaded into the engine if it is not yet), on
    the vLLM server."""
    if not remote():
        return None
    url = engine_url()
    if not url:
        raise JobError("INFERENCE_BACKEND is vllm but neither VLLM_URL nor ENGINE_URL is set")
    key = api_key()
    adapter = None
    if variant is not None and variant.adapter_path:
        try:
            load_adapter(url, variant.engine_model, variant.adapter_path, api_key=key)
        except VLLMError as exc:
            raise JobError(f"could not load the adapter of {variant} into the vLLM backend: {exc}") from exc
        adapter = variant.engine_model
    return RemoteGenerator(url, base_model.name, adapter, key)


def generator(base_model: FoundationModel, variant: Variant | None = None) -> Generator:
    """What answers for a job: the base model with the variant's adapter (if
    it has one; `adapter=False` asks the base alone), on the chosen backend.
    In process this loads the weights: call it once per job."""
    found = remote_generator(base_model, variant)
    if found is not None:
        return found
    adapter_path = variant.adapter_path if variant is not None and variant.adapter_path else None
    return LocalGenerator(load_model(base_model.path, adapter_path))
