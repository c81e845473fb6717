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


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], start: int = 0) -> dict[str, Any]:
    tokens, offsets, offset = [], [], start
    for e in entries:
        text = tokenizer.decode([e.token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": [{tokenizer.decode([t]): _lp(lp) for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
