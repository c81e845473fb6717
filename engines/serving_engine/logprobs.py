"""Recorded token logprobs in OpenAI's two shapes: chat's
`{"content": [{token, logprob, bytes, top_logprobs}]}` and the legacy
completions' `{tokens, token_logprobs, top_logprobs, text_offset}`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from engines.inference import TokenLogprob

# OpenAI's stand-in for a log-probability of minus infinity (JSON has no -inf).
FLOOR = -9999.0


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token: int) -> list[int]:
    """The token's raw bytes: a byte-level BPE token may be part of one
    character (its decoded text is then U+FFFD), its bytes are exact."""
    piece = tokenizer.convert_ids_to_tokens(token)
    decoder = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in decoder for c in piece):
        return [decoder[c] for c in piece]
    return list(tokenizer.decode([token]).encode("utf-8"))


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    return {
        "token": tokenizer.decode([token]),
        "logprob": _lp(logprob),
        "bytes": token_bytes(tokenizer, token),
    }


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                **_entry(tokenizer, e.token, e.logprob),
                "top_logprobs": [_entry(tokenizer, t, lp) for t, lp in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(
    tokenizer: Any,
    entries: Sequence[TokenLogprob],
    start: int = 0,
    prompt: Sequence[TokenLogprob | None] | None = None,
    prompt_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The legacy shape; with `prompt` (echo), the prompt's tokens come first,
    the very first with a null logprob, as OpenAI and vLLM answer."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start
    rows: list[tuple[int, TokenLogprob | None]] = []
    if prompt is not None:
        rows.extend(zip(prompt_ids, prompt, strict=True))
    rows.extend((e.token, e) for e in entries)
    for token, e in rows:
        text = tokenizer.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if e is None else _lp(e.logprob))
        top_logprobs.append(None if e is None else {tokenizer.decode([t]): _lp(lp) for t, lp in e.top})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
