"""The one inference engine: load a model (optionally with a LoRA adapter) and
generate chat completions in batches.

Teacher generation, evals and serving all call `generate`, so the chat
template (`engines.chat.render`), the generation settings and the stop
tokens are the same everywhere. Plain Python: no Django, no Celery; importing
it is cheap (torch and transformers load on first use), so the web process
can use its settings.

Teacher generation runs many queries behind one long system prompt. With
`reuse_prefix`, the token prefix that every rendered input shares is encoded
once and its KV cache is copied into every batch, which is 3-5x faster on CPU
and gives the same tokens as plain batched generation (bench/teacher_throughput.py
measures both; figures in bench/README.md).

This module is the package's public face:
- settings: GenerationSettings and the one table of generation bounds (BOUNDS)
- loading: pick_device, load_model (safetensors only, no remote code), LoadedModel
- stops: Completion, RowStops (where each row ends, its streamed text)
- sampling: RowSampler (each row's penalties, sampling, seed, logprobs, grammar)
- generation: encode, left_pad, generation_config, generate, generate_samples,
  Opening (one opening for every row, or one per row) and per_row_openings
"""

from engines.inference.generation import (
    MIN_PREFIX_TOKENS,
    GenerationCancelled,
    Opening,
    count_tokens,
    encode,
    generate,
    generate_samples,
    generation_config,
    grammar_constraints,
    left_pad,
    per_row_openings,
    row_sampler,
)
from engines.inference.grammar import grammar_for
from engines.inference.loading import LoadedModel, ModelLoadError, load_model, pick_device
from engines.inference.sampling import RowSampler, TokenLogprob, needs_sampler, row_seed
from engines.inference.settings import (
    BOUNDS,
    OPENAI_DEFAULT_MAX_TOKENS,
    OPENAI_PARAMS,
    SEED_RANGE,
    Bound,
    GenerationSettings,
    SettingsError,
    openai_n,
    response_format_json,
)
from engines.inference.stops import Completion, FinishReason, RowStops, decode_text

__all__ = [
    "BOUNDS",
    "MIN_PREFIX_TOKENS",
    "OPENAI_DEFAULT_MAX_TOKENS",
    "OPENAI_PARAMS",
    "SEED_RANGE",
    "Bound",
    "Completion",
    "FinishReason",
    "GenerationCancelled",
    "GenerationSettings",
    "LoadedModel",
    "ModelLoadError",
    "Opening",
    "RowSampler",
    "RowStops",
    "SettingsError",
    "TokenLogprob",
    "count_tokens",
    "decode_text",
    "encode",
    "generate",
    "generate_samples",
    "generation_config",
    "grammar_constraints",
    "grammar_for",
    "left_pad",
    "load_model",
    "needs_sampler",
    "openai_n",
    "per_row_openings",
    "row_sampler",
    "response_format_json",
    "row_seed",
    "pick_device",
]
