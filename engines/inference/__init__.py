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
- stops: Completion, RowStops, the completion-only no-repeat n-gram processor
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
    left_pad,
    per_row_openings,
)
from engines.inference.loading import LoadedModel, ModelLoadError, load_model, pick_device
from engines.inference.settings import (
    BOUNDS,
    OPENAI_DEFAULT_MAX_TOKENS,
    OPENAI_PARAMS,
    SEED_RANGE,
    Bound,
    GenerationSettings,
    SettingsError,
    openai_n,
)
from engines.inference.stops import (
    Completion,
    CompletionNoRepeatNGram,
    FinishReason,
    RowStops,
    completion_processors,
    decode_text,
)

__all__ = [
    "BOUNDS",
    "MIN_PREFIX_TOKENS",
    "OPENAI_DEFAULT_MAX_TOKENS",
    "OPENAI_PARAMS",
    "SEED_RANGE",
    "Bound",
    "Completion",
    "CompletionNoRepeatNGram",
    "FinishReason",
    "GenerationCancelled",
    "GenerationSettings",
    "LoadedModel",
    "ModelLoadError",
    "Opening",
    "RowStops",
    "SettingsError",
    "completion_processors",
    "count_tokens",
    "decode_text",
    "encode",
    "generate",
    "generate_samples",
    "generation_config",
    "left_pad",
    "load_model",
    "openai_n",
    "per_row_openings",
    "pick_device",
]
