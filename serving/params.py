"""The one table of /v1 request fields: for every field of POST
/v1/chat/completions and POST /v1/completions, what each backend does with
it and why. A field is honoured (the engine acts on it), ignored (OpenAI
documents it as not changing the answer: accepted, logged) or refused (a 400
naming it). A field not in the table is refused in OpenAI's own words, so
nothing a client sends is silently dropped. The gateway checks a body here
before it reads anything else; the README's table is `markdown_table()`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engines.inference import BOUNDS, grammar_for
from engines.protocol import OpenAIError
from engines.serving_engine import MAX_PROMPTS, chat_logprobs, completion_logprobs, prefill, prompt_list

HONOURED, IGNORED, REFUSED = "honoured", "ignored", "refused"
NO_TOOLS = "this model does not call tools"
GUIDED = 'use response_format {"type": "json_schema", ...}, which both backends decode under constraint'
MESSAGE_KEYS = ("role", "content")
# The legacy endpoint's logprobs: how many alternatives per token (OpenAI's own limit).
MAX_COMPLETION_LOGPROBS = 5
MAX_SHOWN = 100  # characters of a client's field name repeated in an error
TOP_LOGPROBS = next(b for b in BOUNDS if b.param == "top_logprobs")  # GenerationSettings' table


@dataclass(frozen=True)
class Field:
    """One request field: its status on the hf engine and on vLLM, a one-line
    note, and, where refused, why (the 400 says it)."""

    name: str
    hf: str
    vllm: str
    note: str
    refusal: str = ""
    # Refused only when this holds of the body (None: refused whenever sent).
    refuse_when: Callable[[Mapping[str, Any]], bool] | None = None

    def status(self, backend: str) -> str:
        return self.vllm if backend == "vllm" else self.hf


def honoured(name: str, note: str) -> Field:
    return Field(name, HONOURED, HONOURED, note)


def ignored(name: str, note: str) -> Field:
    return Field(name, IGNORED, IGNORED, note)


def refused(name: str, why: str, note: str = "") -> Field:
    return Field(name, REFUSED, REFUSED, note or why, why)


# Sampling and streaming: the same on both endpoints.
SHARED: tuple[Field, ...] = (
    honoured("model", "PROJECT_SLUG/ALIAS, PROJECT_SLUG/variant-ID or variant-ID (GET /v1/models)"),
    honoured("max_tokens", "1 to GATEWAY_MAX_TOKENS; 256 when left out"),
    honoured("temperature", "0 to 2 (0 is greedy); 1 when left out"),
    honoured("top_p", "greater than 0, at most 1"),
    honoured("n", "1 to 16; n x max_tokens is capped by V1_MAX_N_TIMES_TOKENS"),
    honoured("stream", "server-sent events ending with `data: [DONE]`, after an error too"),
    honoured("stream_options", "include_usage (include_obfuscation is accepted and ignored)"),
    honoured("stop", "a string or up to 8 strings; the answer ends before the first"),
    honoured("seed", "a 64-bit integer; the same seed gives the same answer"),
    honoured("frequency_penalty", "-2 to 2"),
    honoured("presence_penalty", "-2 to 2"),
    honoured("logit_bias", "token id -> -100 to 100, at most 300 entries"),
    honoured("repetition_penalty", "vLLM's extra: greater than 0, at most 10 (1 is none)"),
    honoured("top_k", "vLLM's extra: 0 or -1 is off"),
    honoured("min_p", "vLLM's extra: 0 to 1 (0 is off)"),
    honoured("min_tokens", "vLLM's extra: no end of sequence before this many tokens"),
    honoured("ignore_eos", "vLLM's extra: only max_tokens or a stop string ends the answer"),
    Field(
        "no_repeat_ngram_size",
        HONOURED,
        REFUSED,
        "transformers' no-repeat n-grams (0 is none); vLLM has no such parameter",
        "vLLM has no no_repeat_ngram_size and would drop it; use repetition_penalty or frequency_penalty",
    ),
)
USER = ignored("user", "an end-user id for OpenAI's abuse monitoring; does not change the answer")

CHAT: tuple[Field, ...] = (
    *SHARED[:1],
    honoured(
        "messages",
        "roles system (or developer), user, assistant; content a string or text parts; "
        "a tool role or any key but role and content (name, tool_calls) is refused",
    ),
    honoured("max_completion_tokens", "as max_tokens, and preferred to it when both are sent"),
    *SHARED[1:],
    honoured("logprobs", "true or false: each answer token's log probability"),
    honoured("top_logprobs", "0 to 20 alternatives per token; needs logprobs: true"),
    honoured(
        "response_format",
        "text, json_object or json_schema (with json_schema.name and .schema), decoded under constraint",
    ),
    honoured("continue_final_message", "vLLM's extra: the answer continues the final assistant message"),
    honoured("add_generation_prompt", "vLLM's extra: false with continue_final_message"),
    Field(
        "modalities",
        HONOURED,
        HONOURED,
        'only ["text"]: this model answers in text',
        'this model answers in text only (modalities ["text"])',
        refuse_when=lambda body: body["modalities"] != ["text"],
    ),
    USER,
    ignored("metadata", "tags for OpenAI's stored completions; nothing is stored by it"),
    ignored("store", "OpenAI's stored completions; does not change the answer (see an alias's request log)"),
    ignored("service_tier", "OpenAI's processing tier; one tier here"),
    ignored("safety_identifier", "an end-user id for OpenAI's abuse monitoring"),
    ignored("prompt_cache_key", "a hint for OpenAI's prompt cache; does not change the answer"),
    ignored("prompt_cache_retention", "OpenAI's prompt cache lifetime; does not change the answer"),
    ignored("prompt_cache_options", "OpenAI's prompt cache breakpoints; does not change the answer"),
    ignored("parallel_tool_calls", "meaningful with tools only, which are refused"),
    refused("tools", NO_TOOLS),
    refused("tool_choice", NO_TOOLS),
    refused("functions", NO_TOOLS),
    refused("function_call", NO_TOOLS),
    refused("audio", "this model answers in text only"),
    refused("prediction", "predicted outputs are not supported"),
    refused("web_search_options", "this server does not search the web"),
    refused("reasoning_effort", "this model does not reason before answering"),
    refused("verbosity", "this model has no verbosity setting; say it in the messages"),
    refused("moderation", "this server does not moderate"),
    *(
        refused(name, GUIDED, "vLLM's guided decoding: use response_format json_schema")
        for name in (
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "guided_decoding_backend",
            "guided_whitespace_pattern",
            "structured_outputs",
        )
    ),
)

COMPLETIONS: tuple[Field, ...] = (
    *SHARED[:1],
    honoured("prompt", f"a string or a list of up to {MAX_PROMPTS} strings (token ids are refused)"),
    *SHARED[1:],
    honoured("logprobs", f"0 to {MAX_COMPLETION_LOGPROBS}: the legacy shape (tokens, token_logprobs, ...)"),
    honoured(
        "echo",
        "true: the answer begins with the prompt; with logprobs the prompt's tokens are scored too "
        "(lm-eval's loglikelihood; not streamed)",
    ),
    Field(
        "best_of",
        REFUSED,
        REFUSED,
        "accepted only when equal to n",
        "best_of is accepted only equal to n (which changes nothing); use n",
        refuse_when=lambda body: body["best_of"] != (body.get("n") or 1),
    ),
    refused("suffix", "insertion (suffix) is not supported by this model"),
    USER,
)

CHAT_FIELDS = {f.name: f for f in CHAT}
COMPLETION_FIELDS = {f.name: f for f in COMPLETIONS}
STREAM_OPTIONS = {"include_usage": HONOURED, "include_obfuscation": IGNORED}


def shown(name: str) -> str:
    return name if len(name) <= MAX_SHOWN else name[:MAX_SHOWN] + "…"


def unrecognized(name: str) -> OpenAIError:
    # OpenAI's own words for a field it does not know.
    return OpenAIError(400, f"Unrecognized request argument supplied: {shown(name)}", param=shown(name))


def check_fields(body: Mapping[str, Any], fields: Mapping[str, Field], backend: str) -> list[str]:
    """Refuse (OpenAIError 400 naming it) the first field the table refuses
    or does not know; return the ignored fields the body sends. A null value
    is a field not sent."""
    ignored_fields = []
    for name, value in body.items():
        field = fields.get(name)
        if field is None:
            raise unrecognized(name)
        if value is None:
            continue
        status = field.status(backend)
        refuse = field.refuse_when(body) if field.refuse_when is not None else status == REFUSED
        if refuse:
            what = name if field.refuse_when is None else f"{name} {_short(value)}"
            raise OpenAIError(
                400, f"{what} is not supported: {field.refusal}.", param=name, code="unsupported_parameter"
            )
        if status == IGNORED:
            ignored_fields.append(name)
    return ignored_fields


def check_messages(messages: Any, param: str = "messages") -> None:
    """Refuse what a message may carry beyond role and content (tool roles,
    tool_calls, name, ...), naming `messages[i].KEY`; engines.protocol then
    reads role and content. A null value (an SDK's unset field) is not sent."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("tool", "function"):
            raise OpenAIError(
                400,
                f"{param}[{i}].role {role!r} is not supported: {NO_TOOLS}.",
                param=f"{param}[{i}].role",
                code="unsupported_parameter",
            )
        for key, value in message.items():
            if key in MESSAGE_KEYS or value is None or (key == "tool_calls" and value == []):
                continue
            where = f"{param}[{i}].{shown(str(key))}"
            tools = key in ("tool_calls", "function_call", "tool_call_id")
            why = NO_TOOLS if tools else "a message has only role and content here"
            raise OpenAIError(
                400, f"{where} is not supported: {why}.", param=where, code="unsupported_parameter"
            )
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            extra = (
                sorted(str(k) for k, v in part.items() if k not in ("type", "text") and v is not None)
                if isinstance(part, dict)
                else []
            )
            if extra:
                where = f"{param}[{i}].content[{j}].{shown(extra[0])}"
                raise OpenAIError(
                    400,
                    f"{where} is not supported: a text part has only type and text here.",
                    param=where,
                    code="unsupported_parameter",
                )


def _flag(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(400, f"{name} must be true or false, not {_short(value)}.", param=name)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 50 else text[:50] + "…"


def stream_options(body: Mapping[str, Any], stream: bool) -> tuple[bool, list[str]]:
    """include_usage, and the ignored stream_options keys sent."""
    options = body.get("stream_options")
    if options is None:
        return False, []
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise OpenAIError(
            400, 'stream_options must be an object like {"include_usage": true}.', param="stream_options"
        )
    for key in options:
        if key not in STREAM_OPTIONS:
            raise unrecognized(f"stream_options.{key}")
    if not stream:
        raise OpenAIError(400, "stream_options is only allowed with stream: true.", param="stream_options")
    ignored_keys = [f"stream_options.{k}" for k, v in options.items() if STREAM_OPTIONS[k] == IGNORED]
    return bool(options.get("include_usage")), ignored_keys


def response_format(value: Any) -> dict[str, Any]:
    """OpenAI's response_format, checked whole as the hf engine will read it
    (the same grammar_for), so both backends refuse the same values."""
    grammar_for(value)
    return dict(value)


def chat_options(body: Mapping[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat fields the engine honours beyond sampling (logprobs,
    response_format, assistant prefill), checked by the engine's own readers;
    only those the body sends are forwarded."""
    chat_logprobs(body)
    prefill(body, tuple(messages))
    out = {
        name: body[name]
        for name in ("logprobs", "top_logprobs", "continue_final_message", "add_generation_prompt")
        if body.get(name) is not None
    }
    if body.get("response_format") is not None:
        out["response_format"] = response_format(body["response_format"])
    return out


def prompts(value: Any) -> list[str]:
    """/v1/completions' prompt: a string or a non-empty list of strings."""
    return prompt_list(value)


def completion_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy completion fields beyond sampling (echo, logprobs), checked."""
    completion_logprobs(body)
    return {name: body[name] for name in ("echo", "logprobs") if body.get(name) is not None}


# --- the README's table ------------------------------------------------------------


def _status(field: Field, backend: str) -> str:
    status = field.status(backend)
    return f"{status} (see note)" if field.refuse_when is not None else status


def _rows(fields: Iterable[Field]) -> list[str]:
    return [
        f"| `{f.name}` | {_status(f, 'hf')} | {_status(f, 'vllm')} | {f.note.replace('|', '/')} |"
        for f in fields
    ]


def markdown_table() -> str:
    """Both endpoints' tables in Markdown: chat in full, then what
    /v1/completions adds or reads otherwise (the shared fields are one row each)."""
    head = ["| Field | hf | vLLM | Note |", "| --- | --- | --- | --- |"]
    chat = [
        *head,
        *_rows(CHAT),
        "| any other field | refused | refused | `Unrecognized request argument supplied: NAME` |",
    ]
    own = [f for f in COMPLETIONS if CHAT_FIELDS.get(f.name) is not f]
    shared = ", ".join(f"`{f.name}`" for f in COMPLETIONS if CHAT_FIELDS.get(f.name) is f)
    completions = [*head, *_rows(own), "| any other field | refused | refused | as on chat |"]
    return "\n".join(
        [
            "`POST /v1/chat/completions`:",
            "",
            *chat,
            "",
            f"`POST /v1/completions` takes {shared} as chat does, and:",
            "",
            *completions,
        ]
    )
