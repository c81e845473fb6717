"""Finished tickets as OpenAI's answers: chat.completion, text_completion, usage."""

from __future__ import annotations

import time
import uuid
from typing import Any

from engines.serving_engine.logprobs import chat_logprobs, completion_logprobs
from engines.serving_engine.tickets import Ticket

# How long a handler waits for its answer before giving up (a stuck engine must not hang clients forever).
ANSWER_TIMEOUT_S = 600.0


def usage(*tickets: Ticket) -> dict[str, Any]:
    results = [t.result(timeout=0) for t in tickets]
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # This engine keeps no prefix cache between requests: nothing is ever cached.
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def chat_completion(ticket: Ticket, tokenizer: Any) -> dict[str, Any]:
    result = ticket.result(timeout=ANSWER_TIMEOUT_S)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None if c.logprobs is None else chat_logprobs(tokenizer, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in result.choices
        ],
        "usage": usage(ticket),
    }


def text_completion(tickets: list[Ticket], tokenizer: Any, echo: bool) -> dict[str, Any]:
    """One choice per prompt and sample (index prompt x n + sample); with
    echo the text, and the logprobs when asked, begin with the prompt's."""
    choices = []
    for p, ticket in enumerate(tickets):
        result = ticket.result(timeout=ANSWER_TIMEOUT_S)
        prompt = ticket.request.prompt or ""
        for c in result.choices:
            logprobs = None
            if c.logprobs is not None and result.prompt_logprobs is not None:
                logprobs = completion_logprobs(
                    tokenizer, c.logprobs, 0, result.prompt_logprobs, ticket.prompt_ids
                )
            elif c.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, c.logprobs, len(prompt) if echo else 0)
            choices.append(
                {
                    "index": p * ticket.request.n + c.index,
                    "text": (prompt if echo else "") + c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": tickets[0].request.model,
        "choices": choices,
        "usage": usage(*tickets),
    }
