"""Token counts and length statistics. Plain Python: no Django."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from engines.chat import Message, render


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str) -> Any:
    """Tokenizers are small and loaded often (web views, stats): keep a few."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_cost(tokenizer: Any, system_prompt: str) -> dict[str, int]:
    """What a system prompt costs: its own tokens, and the tokens it adds to
    every request once the chat template is applied (the rendering with it
    minus the rendering without any system message)."""
    probe: list[Message] = [{"role": "user", "content": "Hi"}]
    with_prompt = _length(tokenizer, render(tokenizer, probe, system_prompt))
    without = _length(tokenizer, render(tokenizer, probe, None))
    return {
        "text": _length(tokenizer, system_prompt),
        "per_request": with_prompt - without,
        "request_total": with_prompt,
    }


def length_stats(
    tokenizer: Any, conversations: Iterable[Sequence[Message]], batch: int = 512
) -> dict[str, int]:
    """min/median/p95/max tokens of each conversation as rendered for
    training (no system prompt, whole conversation)."""
    lengths: list[int] = []
    chunk: list[str] = []

    def flush() -> None:
        if chunk:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            lengths.extend(len(x) for x in ids)
            chunk.clear()

    for messages in conversations:
        chunk.append(
            render(tokenizer, messages, None, add_generation_prompt=messages[-1]["role"] != "assistant")
        )
        if len(chunk) >= batch:
            flush()
    flush()
    if not lengths:
        return {"count": 0}
    lengths.sort()
    p95 = lengths[min(len(lengths) - 1, int(round(0.95 * (len(lengths) - 1))))]
    return {
        "count": len(lengths),
        "min": lengths[0],
        "median": int(statistics.median(lengths)),
        "p95": p95,
        "max": lengths[-1],
        "total": sum(lengths),
    }
