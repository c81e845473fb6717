"""A /v1/chat/completions body, read into a ChatRequest: the chat shape by
engines.protocol, the sampling and n by the bounds table of
engines.inference, and here only what is the engine's own (streaming,
continuing the final message)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.chat import Message
from engines.inference import GenerationSettings, openai_n
from engines.protocol import parse_messages, system_prompt_of
from engines.serving_engine.errors import bad_request


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]  # system messages included, as the client sent them
    settings: GenerationSettings  # max_new_tokens is the request's max_tokens
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    # vLLM's continue_final_message: the answer already begins with this text
    # (the final assistant message) and the model continues it.
    opening: str | None = None
    project: str | None = None  # the fairness bucket (None: requests that name none)

    @property
    def system_prompt(self) -> str | None:
        return system_prompt_of(self.messages)

    def batch_key(self, base: str) -> tuple[Any, ...]:
        """Requests with equal keys can share one generate call (adapters may differ)."""
        s = self.settings
        if s.temperature == 0:  # greedy: top_p and seed do not matter
            return (base, 0.0, 1.0, None, s.repetition_penalty, s.no_repeat_ngram_size, s.stop)
        return (base, s.temperature, s.top_p, s.seed, s.repetition_penalty, s.no_repeat_ngram_size, s.stop)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def parse_chat_request(body: Any, project: str | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; unknown fields are ignored. Raises
    OpenAIError 400 naming the bad field in `param`. `project` is the queue's
    fairness bucket."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a model name from /v1/models)", "model")
    messages = tuple(parse_messages(body.get("messages")))
    n = openai_n(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    settings = GenerationSettings.from_openai(body)
    opening = None
    if _flag(body, "continue_final_message"):
        if messages[-1]["role"] != "assistant":
            raise bad_request(
                "continue_final_message needs a final assistant message to continue", "messages"
            )
        opening, messages = messages[-1]["content"], messages[:-1]
    return ChatRequest(
        model=model,
        messages=messages,
        settings=settings,
        n=n,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        opening=opening,
        project=project,
    )
