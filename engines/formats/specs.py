"""One spec per format, registered in SPECS: its name and help, how its
file is laid out, the field that gives it away, and the reader that turns one
JSON record into messages. Chat content and roles are read by
engines.protocol, the one owner of the OpenAI chat shape, so an uploaded
conversation trains exactly as the gateway serves it."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from engines import protocol
from engines._types import type_name
from engines.formats.base import ANSWER_COLUMNS, QUERY_COLUMNS, Bad, Message, shown
from engines.formats.values import (
    NO_USER_TURN,
    as_object,
    check_text,
    check_turns,
    list_field,
    optional_string,
    required_string,
    text_field,
)

# One JSON record's messages and the fields read to make them (any other field is kept as `Row.extra`).
Read = tuple[list[Message], Collection[str]]


@dataclass(frozen=True)
class Spec:
    name: str
    help: str
    # How the file is read: "json" (JSONL or a JSON array), "csv" or "lines".
    layout: str
    # A field that marks a JSON record as this format, for detection; `rank`
    # decides between formats when a record holds several such fields.
    key: str | None = None
    rank: int = 0
    # The fields as the hint for a record without `key` lists them.
    shape: str = ""
    # One JSON record (with the caller's query and answer fields) -> Read.
    read: Callable[[dict[str, object], str | None, str | None], Read] | None = None


SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
_SYSTEM_ROLES = ("system", *(alias for alias, role in protocol.ROLE_ALIASES.items() if role == "system"))
_CHAT_FIELDS = frozenset({"messages"})
_SHAREGPT_FIELDS = frozenset({"conversations", "system"})
_ALPACA_FIELDS = frozenset({"instruction", "input", "output", "system"})
_COMPLETION_FIELDS = frozenset({"prompt", "completion"})
_INSTANCES_FIELDS = frozenset({"instruction", "instances", "system"})
CHOSEN_NOTE = "preference pairs: only the chosen answers were loaded; the rejected answers were dropped"
INSTANCES_NOTE = (
    "self-instruct seed tasks: each instance became a row (query: the instruction and the instance "
    "input; answer: the instance output)"
)


def _role(name: str, where: str) -> str:
    """The role as the gateway reads it (developer is system); the upload's wording when refused."""
    try:
        return protocol.role_of(name, f"{where}.role")
    except protocol.OpenAIError:
        expected = ", ".join([*protocol.ROLES, *protocol.ROLE_ALIASES])
        raise Bad(f"{where}.role: unknown role {name!r} (expected one of {expected})") from None


def _text_parts(parts: list[object], where: str) -> str:
    """OpenAI multi-part content, joined exactly as the gateway joins it."""
    try:
        text = protocol.content_text(parts, where)
    except protocol.OpenAIError as err:
        raise Bad(err.message.rstrip(".")) from None
    if not text.strip():
        raise Bad(f"{where}: empty content")
    if not text.isascii():  # name the part holding an unpaired surrogate
        for j, part in enumerate(parts):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                check_text(part["text"], f"{where}[{j}].text")
    return text


def _from_chat(obj: object) -> list[Message]:
    row = as_object(obj)
    out: list[Message] = []
    items = list_field(row, "messages")
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        message = as_object(item, where)
        role = required_string(message, "role", where)
        if role not in protocol.ROLES:  # the hot path: no call for a role already canonical
            role = _role(role, where)
        value = message.get("content")
        if (
            role == "assistant"
            and i == len(items) - 1
            and i > 0
            and isinstance(value, str)
            and not value.strip()
        ):
            break  # an empty last answer: a query-only row
        if isinstance(value, list):
            out.append({"role": role, "content": _text_parts(value, f"{where}.content")})
        else:
            out.append({"role": role, "content": text_field(message, "content", where)})
    if not out:
        raise Bad(NO_USER_TURN)
    return check_turns(out, "messages")


def _from_completion(row: dict[str, object], query: str | None, answer: str | None) -> Read:
    out: list[Message] = [{"role": "user", "content": text_field(row, "prompt")}]
    completion = optional_string(row, "completion")
    if completion and completion.strip():
        out.append({"role": "assistant", "content": completion})
    return out, _COMPLETION_FIELDS


def _from_fields(row: dict[str, object], query: str | None, answer: str | None) -> Read:
    query = query or ""  # format fields named without a query field: the row says it is missing
    out: list[Message] = [{"role": "user", "content": text_field(row, query)}]
    if answer is not None:
        out.append({"role": "assistant", "content": text_field(row, answer)})
        return out, {query, answer}
    return out, {query}


def read_chosen(row: dict[str, object]) -> Read:
    """A DPO pair read as its chosen answer: the prompt from prompt/question/
    instruction, or the chosen conversation's turns before its last answer."""
    chosen = row.get("chosen")
    used = {"chosen", "rejected", "system"}
    system = optional_string(row, "system")
    out: list[Message] = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt_key = next((k for k in ("prompt", "question", "instruction") if k in row), None)
    if prompt_key is not None:
        used.add(prompt_key)
    if isinstance(chosen, str):
        if prompt_key is None:
            raise Bad(
                "chosen: a chosen answer without a prompt (expected a prompt, question or instruction field)"
            )
        prompt = row[prompt_key]
        if isinstance(prompt, list):
            out += _from_chat({"messages": prompt})
        else:
            out.append({"role": "user", "content": text_field(row, prompt_key)})
        if not chosen.strip():
            raise Bad("chosen: empty content")
        out.append({"role": "assistant", "content": check_text(chosen, "chosen")})
        return out, used
    if not isinstance(chosen, list):
        raise Bad(f"chosen: expected a string or a list of messages, got {type_name(chosen)}")
    prompt_turns: list[Message] = []
    roles = [m.get("role") for m in chosen if isinstance(m, dict) and m.get("role") not in _SYSTEM_ROLES]
    if roles[:1] == ["user"]:
        pass  # the chosen conversation holds its prompt (UltraFeedback): the prompt field repeats it
    elif prompt_key is not None and isinstance(row[prompt_key], list):
        prompt_turns = _from_chat({"messages": row[prompt_key]})
    elif prompt_key is not None:
        prompt_turns = [{"role": "user", "content": text_field(row, prompt_key)}]
    turns = (
        _from_chat({"messages": [*[dict(m) for m in prompt_turns], *chosen]})
        if prompt_turns
        else _from_chat({"messages": chosen})
    )
    if turns[-1]["role"] != "assistant":
        raise Bad("chosen: the chosen conversation has no answer")
    return out + turns if not (out and turns[0]["role"] == "system") else turns, used


def read_instances(row: dict[str, object]) -> tuple[list[list[Message]], Collection[str]]:
    """Self-instruct seed tasks: one row per instance."""
    instruction = text_field(row, "instruction")
    system = optional_string(row, "system")
    rows: list[list[Message]] = []
    instances = row["instances"]
    assert isinstance(instances, list)
    if not instances:
        raise Bad("instances: the list is empty")
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        instance = as_object(item, where)
        extra = optional_string(instance, "input", where)
        output = optional_string(instance, "output", where)
        out: list[Message] = [{"role": "system", "content": system}] if system and system.strip() else []
        query = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        out.append({"role": "user", "content": query})
        if output and output.strip():
            out.append({"role": "assistant", "content": output})
        rows.append(out)
    return rows, _INSTANCES_FIELDS


def _from_sharegpt(row: dict[str, object], query: str | None, answer: str | None) -> Read:
    out: list[Message] = []
    system = optional_string(row, "system")
    if system and system.strip():
        out.append({"role": "system", "content": system})
    turns = list_field(row, "conversations")
    for i, item in enumerate(turns):
        where = f"conversations[{i}]"
        turn = as_object(item, where)
        speaker = required_string(turn, "from", where)
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise Bad(f"{where}.from: unknown role {speaker!r} (expected system, human or gpt)")
        value = turn.get("value")
        if (
            role == "assistant"
            and i == len(turns) - 1
            and out
            and isinstance(value, str)
            and not value.strip()
        ):
            break  # an empty last answer: a query-only row
        out.append({"role": role, "content": text_field(turn, "value", where)})
    if not out:
        raise Bad(NO_USER_TURN)
    return check_turns(out, "conversations"), _SHAREGPT_FIELDS


def _from_alpaca(row: dict[str, object], query: str | None, answer: str | None) -> Read:
    instruction = text_field(row, "instruction")
    extra = optional_string(row, "input")
    output = optional_string(row, "output")
    system = optional_string(row, "system")
    out: list[Message] = []
    if system and system.strip():
        out.append({"role": "system", "content": system})
    query = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    out.append({"role": "user", "content": query})
    if output and output.strip():
        out.append({"role": "assistant", "content": output})
    return out, _ALPACA_FIELDS


def read_chat(row: dict[str, object], query: str | None, answer: str | None) -> Read:
    return _from_chat(row), _CHAT_FIELDS


def how_to_load(obj: dict[str, object]) -> str:
    """What would load a row whose format field is missing."""
    keys = [k for k in obj if isinstance(obj[k], str)]
    lowered = {k.lower(): k for k in keys}
    query = next((lowered[c] for c in QUERY_COLUMNS if c in lowered), keys[0] if keys else None)
    answer = next((lowered[c] for c in ANSWER_COLUMNS if c in lowered and lowered[c] != query), None)
    formats = ", ".join(f"{s.name} ({s.shape})" for s in SPECS.values() if s.shape)
    hint = f"; supported formats: {formats} — choose the format, or name the fields: "
    option = (
        "query column and answer column"
        if query is None
        else f'query column "{shown(query)}"' + (f', answer column "{shown(answer)}"' if answer else "")
    )
    return hint + option


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec(
            "chat",
            'OpenAI chat: {"messages": [{"role", "content"}, ...]} per line (JSONL) or in a JSON array',
            "json",
            key="messages",
            rank=0,
            shape="messages",
            read=read_chat,
        ),
        Spec(
            "alpaca",
            'Alpaca: {"instruction", "input", "output"} as a JSON array or JSONL',
            "json",
            key="instruction",
            rank=2,
            shape="instruction/input/output",
            read=_from_alpaca,
        ),
        Spec(
            "sharegpt",
            'ShareGPT: {"conversations": [{"from", "value"}, ...]} as JSONL or a JSON array',
            "json",
            key="conversations",
            rank=1,
            shape="conversations",
            read=_from_sharegpt,
        ),
        Spec(
            "completion",
            'OpenAI legacy completions: {"prompt", "completion"} as JSONL or a JSON array',
            "json",
            key="prompt",
            rank=3,
            shape="prompt/completion",
            read=_from_completion,
        ),
        Spec(
            "fields", "JSON or JSONL with the query (and answer) fields you name", "json", read=_from_fields
        ),
        Spec("csv", "CSV with a header row: a query column and optionally an answer column", "csv"),
        Spec("lines", "Plain text: one query per line", "lines"),
    )
}
FORMATS: dict[str, str] = {name: spec.help for name, spec in SPECS.items()}
# Fields that make a top-level object a row of some format, not a file of rows.
RECORD_FIELDS = frozenset(
    {
        "messages",
        "conversations",
        "instruction",
        "input",
        "output",
        "prompt",
        "completion",
        "chosen",
        "rejected",
        "instances",
    }
)
# Detection: the format each key gives away, by rank.
FORMAT_OF_KEY = {s.key: s.name for s in sorted(SPECS.values(), key=lambda s: s.rank) if s.key}
