"""What a system prompt costs under a base model's tokenizer and chat template,
explained: the prompt's own tokens, the template's default system line that
the prompt replaces, the net added per request, and the model's context."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from engines.chat import Message, render
from engines.tokens import load_tokenizer, prompt_cost

log = logging.getLogger(__name__)

# Far outside any real system prompt, so it shares no first or last character
# with the default system line it is compared with.
_MARK = "\x00workbench-system-mark\x00"
_PROBE: list[Message] = [{"role": "user", "content": "Hi"}]
# transformers' "no limit known" value of model_max_length.
_NO_LIMIT = 10**12


def default_system_line(tokenizer: Any) -> str:
    """The system text the chat template inserts when a conversation has no
    system message (SmolLM2: "You are a helpful AI assistant named SmolLM,
    trained by Hugging Face"), or "" when the template inserts none."""
    without = render(tokenizer, _PROBE, None)
    marked = render(tokenizer, _PROBE, _MARK)
    head = 0
    while head < min(len(without), len(marked)) and without[head] == marked[head]:
        head += 1
    tail = 0
    while tail < min(len(without), len(marked)) - head and without[-1 - tail] == marked[-1 - tail]:
        tail += 1
    if marked[head : len(marked) - tail] != _MARK:
        return ""  # the mark brought framing with it: the template adds no default system message
    return without[head : len(without) - tail]


def context_length(tokenizer: Any, model_dir: str) -> int | None:
    """The most tokens the model reads: the tokenizer's model_max_length, or
    the config's max_position_embeddings when the tokenizer sets no limit."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


class TokenCountError(ValueError):
    """The base model's tokenizer or chat template cannot count a prompt (a
    missing or broken model directory, a template that fails to render).
    Pages show it beside the model; any other error is a bug and is raised."""


def breakdown(model_dir: str, text: str) -> dict[str, Any]:
    """text: the prompt's own tokens; default_system (and default_tokens): the
    template's default system line, which a system prompt replaces;
    per_request: the net tokens the prompt adds to every request (the request
    with it minus the request without any system message, so it is negative
    when the prompt is shorter than the default line); request_total: a short
    request with the prompt; context: the most tokens the model reads."""
    try:
        tokenizer = load_tokenizer(model_dir)
        cost = prompt_cost(tokenizer, text)
    except (OSError, ValueError, TemplateError) as exc:
        # transformers says OSError or ValueError for a directory it cannot load;
        # jinja raises TemplateError for a chat template that does not render.
        log.warning("cannot count tokens under %s: %s", model_dir, exc)
        raise TokenCountError(f"cannot count tokens with the tokenizer in {model_dir}: {exc}") from exc
    default = default_system_line(tokenizer)
    default_tokens = len(tokenizer(default, add_special_tokens=False)["input_ids"]) if default else 0
    return {
        **cost,
        "default_system": default,
        "default_tokens": default_tokens,
        "framing": cost["per_request"] - cost["text"] + default_tokens,
        "context": context_length(tokenizer, model_dir),
    }
