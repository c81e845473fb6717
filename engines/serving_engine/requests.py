"""A /v1/chat/completions body, read into a ChatRequest: the chat shape by
engines.protocol, the sampling and n by the bounds table of
engines.inference, and here only what is the engine's own (streaming,
continuing the final message)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.chat import Message
from engines.inference import BOUNDS, GenerationSettings, openai_n
from engines.protocol import parse_messages, system_prompt_of
from engines.serving_engine.errors import bad_request

TOP_LOGPROBS = next(b for b in BOUNDS if b.param == "top_logprobs")
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's own limit
MAX_PROMPTS = 64


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
    # None: no logprobs; k: each token's logprob and the k most likely tokens (0-20).
    logprobs: int | None = None
    grammar: str | None = None  # response_format as a grammar (engines.inference.grammar)
    add_generation_prompt: bool = True  # False: the prompt ends with the last message as sent
    prompt: str | None = None  # /v1/completions: raw text, no chat template (messages are empty)
    # /v1/completions with echo and logprobs: each prompt token's logprob and the top k (lm-eval's loglikelihood).
    prompt_logprobs: int | None = None

    @property
    def system_prompt(self) -> str | None:
        return system_prompt_of(self.messages)

    def batch_key(self, base: str) -> tuple[Any, ...]:
        """Requests with equal keys can share one generate call (adapters may
        differ): every row samples with its own settings (RowSampler), so only
        the base model matters."""
        return (base,)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def _grammar(body: dict[str, Any]) -> str | None:
    response_format = body.get("response_format")
    if response_format is None:
        return None
    from engines.inference.grammar import grammar_for

    return grammar_for(response_format)


def chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """Chat's logprobs / top_logprobs as one value: None (off) or k, the
    alternatives listed per token. The gateway checks with it too."""
    wanted = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    problem = TOP_LOGPROBS.error(top)
    if problem:
        raise bad_request(f"top_logprobs {problem}", "top_logprobs")
    if not wanted:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return int(top)


def prefill(
    body: Mapping[str, Any], messages: tuple[Message, ...]
) -> tuple[str | None, tuple[Message, ...], bool]:
    """(opening, messages, add_generation_prompt) from continue_final_message
    and add_generation_prompt: with continue_final_message the final assistant
    message becomes the answer's opening (vLLM's semantics)."""
    generation_prompt = body.get("add_generation_prompt")
    if generation_prompt is not None and not isinstance(generation_prompt, bool):
        raise bad_request("add_generation_prompt must be true or false", "add_generation_prompt")
    if not _flag(body, "continue_final_message"):
        return None, messages, generation_prompt is not False
    if messages[-1]["role"] != "assistant":
        raise bad_request(
            "continue_final_message needs a final assistant message to continue", "continue_final_message"
        )
    if generation_prompt:
        raise bad_request(
            "continue_final_message continues the last message: add_generation_prompt must be false",
            "add_generation_prompt",
        )
    # The assistant turn is opened, then prefilled with the opening.
    return messages[-1]["content"], messages[:-1], True


def prompt_list(prompt: Any) -> list[str]:
    """/v1/completions' prompt: a string or a list of 1 to MAX_PROMPTS non-empty strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(prompts, list) and any(isinstance(p, int | list) for p in prompts):
        raise bad_request(
            "prompt must be text: token-id prompts are not accepted here; send strings", "prompt"
        )
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise bad_request("prompt must be a non-empty string or a list of non-empty strings", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt holds {len(prompts)} prompts, at most {MAX_PROMPTS}", "prompt")
    return prompts


def completion_logprobs(body: Mapping[str, Any]) -> int | None:
    """/v1/completions' legacy logprobs (0-5 alternatives per token), checked
    with echo and stream: echo with logprobs scores the prompt, answered whole."""
    echo, stream = _flag(body, "echo"), _flag(body, "stream")
    logprobs = body.get("logprobs")
    if logprobs is None:
        return None
    if (
        isinstance(logprobs, bool)
        or not isinstance(logprobs, int)
        or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS
    ):
        raise bad_request(
            f"logprobs must be a whole number between 0 and {MAX_COMPLETION_LOGPROBS} on /v1/completions",
            "logprobs",
        )
    if echo and stream:
        raise bad_request(
            "echo with logprobs (the prompt's own logprobs) is answered whole: not with stream", "echo"
        )
    return logprobs


def parse_chat_request(body: Any, project: str | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; unknown fields are ignored (the
    gateway refuses them before they get here). Raises OpenAIError 400 naming
    the bad field in `param`. `project` is the queue's fairness bucket."""
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
    opening, messages, generation_prompt = prefill(body, messages)
    return ChatRequest(
        model=model,
        messages=messages,
        settings=settings,
        n=n,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        opening=opening,
        project=project,
        logprobs=chat_logprobs(body),
        grammar=_grammar(body),
        add_generation_prompt=generation_prompt,
    )


def parse_completion_request(body: Any, project: str | None = None) -> list[ChatRequest]:
    """Validate a /v1/completions body: one request per prompt (a string or
    a list of at most MAX_PROMPTS strings). `echo` and `suffix` are the
    server's (echo) or refused (suffix, best_of other than n)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a model name from /v1/models)", "model")
    prompts = prompt_list(body.get("prompt"))
    if body.get("suffix") is not None:
        raise bad_request("suffix (insertion) is not supported by this model", "suffix")
    n = openai_n(body)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_request("best_of is not supported (only best_of equal to n)", "best_of")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    echo = _flag(body, "echo")
    logprobs = completion_logprobs(body)
    settings = GenerationSettings.from_openai(body)
    return [
        ChatRequest(
            model=model,
            messages=(),
            settings=settings,
            n=n,
            stream=stream,
            include_usage=bool((options or {}).get("include_usage")),
            project=project,
            logprobs=logprobs,
            grammar=_grammar(body),
            prompt=p,
            prompt_logprobs=logprobs if echo else None,
        )
        for p in prompts
    ]
