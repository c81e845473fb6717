"""The OpenAI chat shape, parsed once (as vLLM's protocol.py + chat_utils.py).

Uploads, the /v1 gateway, the engine server, capture and remote generation
all call this module, so a conversation trains exactly as it is served: the
same roles, the same join of content parts, the same system-prompt rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role; read as "system" everywhere.
ROLE_ALIASES = {"developer": "system"}
# vLLM's chat_utils joins text parts with a newline; training and serving must agree.
TEXT_PART_SEPARATOR = "\n"
SYSTEM_JOIN = "\n\n"


class OpenAIError(Exception):
    """The one OpenAI-shaped error: a status and {"error": {message, type, param, code}}.
    `headers` go on the HTTP answer (Retry-After, Allow); `detail` (an
    engine's address, its own words) is for the server's log, never the client."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return f"{self.message} [{self.detail}]" if self.detail else self.message

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, param={self.param!r})"


def _shown(value: object) -> str:
    try:
        return json.dumps(value)[:50]
    except (TypeError, ValueError):
        return type(value).__name__


def content_text(content: object, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": str}
    parts joined with TEXT_PART_SEPARATOR. Anything else (images, audio, other
    shapes) is refused, naming `where`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise OpenAIError(
                    400,
                    f'{where}[{j}] must be a text part ({{"type": "text", "text": ...}}); '
                    "this model reads text only.",
                    param=where,
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIError(400, f"{where}[{j}].text must be a string.", param=where)
            texts.append(text)
        return TEXT_PART_SEPARATOR.join(texts)
    raise OpenAIError(
        400, f"{where} must be a string or a list of text parts, not {_shown(content)}.", param=where
    )


def role_of(role: object, where: str) -> str:
    """A message's role with "developer" read as "system"; others refused, naming `where`."""
    name = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
    if name is None or name not in ROLES:
        raise OpenAIError(
            400, f"{where} must be one of {', '.join(ROLES)} (or developer), not {_shown(role)}.", param=where
        )
    return name


def parse_messages(messages: object, param: str = "messages") -> list[dict[str, str]]:
    """[{"role", "content"}] from an OpenAI `messages` value: a non-empty list
    of objects, each role checked and each content reduced to text."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, f"{param} must be a non-empty list of {{role, content}} objects.", param=param)
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenAIError(
                400, f"{param}[{i}] must be an object with role and content.", param=f"{param}[{i}]"
            )
        role = role_of(m.get("role"), f"{param}[{i}].role")
        parsed.append({"role": role, "content": content_text(m.get("content"), f"{param}[{i}].content")})
    return parsed


def system_prompt_of(messages: Sequence[Mapping[str, str]]) -> str | None:
    """The system messages' contents joined with a blank line, or None when there are none."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    return SYSTEM_JOIN.join(system) if system else None


def apply_system_prompt(
    messages: Sequence[Mapping[str, str]], system_prompt: str | None
) -> list[dict[str, str]]:
    """The one replacement rule: drop every system message, then put
    system_prompt first when it is not None (None means no system message)."""
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system_prompt is None:
        return rest
    return [{"role": "system", "content": system_prompt}, *rest]
