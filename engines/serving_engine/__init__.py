"""The model holder and dynamic batcher behind the `hf` engine server
(engines/engine_server.py holds the HTTP layer; the protocol is the
OpenAI-compatible subset that vLLM's server speaks, parsed by engines.protocol).

- registry: base models are loaded once by name with `engines.inference.load_model`;
  the LoRA adapters loaded over a base wrap its targeted Linear layers once
  (lora: stacked per module), and a batch may mix adapters and the bare base:
  each row runs through its own adapter, a batch of one kind takes the plain path.
- batcher: requests wait in one queue, taken round-robin by project (the `project`
  of each request; None is a project of its own), so a flood of one project
  cannot starve another's small request; no project may hold more than
  `max_queue_per_project` waiting rows. One background thread (the batcher) runs every
  `generate`: everything that queued while a generate ran, plus the
  requests that arrive within `batch_window_ms` of each other before the
  next call starts (up to WINDOW_CAP windows; clients the last call just
  answered come back within it), share a call when they use the same base
  (up to `max_batch` rows; each row keeps its own sampling settings). On a 2-core CPU one generate at batch 16 gives 6-11x the
  tokens/s of 16 requests one by one, so batching is where the speed is.
- requests and tickets: a parsed request, and what its HTTP thread waits on.
  Prompts are rendered with `engines.inference.encode` and the generation
  config comes from `engines.inference.generation_config`, exactly as
  teacher generation and evals do (template parity).

Seeds: a request with a seed sets torch's generator before its generate
call, so it gets the same answer again for the same batch composition. Rows
sampled in one batch share that generator, so a seeded request that shares
a call with other requests can sample differently than alone.
"""

from engines.serving_engine.batcher import ServingEngine
from engines.serving_engine.errors import bad_request, unavailable
from engines.serving_engine.registry import resolve_dtype
from engines.serving_engine.requests import (
    MAX_PROMPTS,
    ChatRequest,
    chat_logprobs,
    completion_logprobs,
    parse_chat_request,
    parse_completion_request,
    prefill,
    prompt_list,
)
from engines.serving_engine.tickets import ChatResult, Choice, Ticket

__all__ = [
    "MAX_PROMPTS",
    "chat_logprobs",
    "completion_logprobs",
    "prefill",
    "prompt_list",
    "ChatRequest",
    "ChatResult",
    "Choice",
    "ServingEngine",
    "Ticket",
    "bad_request",
    "parse_chat_request",
    "parse_completion_request",
    "resolve_dtype",
    "unavailable",
]
