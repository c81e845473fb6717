"""Flags on teacher answers that leak the system prompt, so a human can drop
them before the student learns to talk about instructions it no longer has.
Plain Python: no Django."""

from __future__ import annotations

import re

PHRASES = (
    "system prompt",
    "system message",
    "my instructions",
    "my guidelines",
    "as instructed",
    "i was instructed",
    "i've been instructed",
    "i have been instructed",
    "i was told to",
    "i am instructed",
    "according to my instructions",
    "my prompt",
    "the instructions above",
    "the prompt says",
)
SPAN_WORDS = 12  # a run of this many consecutive prompt words quoted in an answer

_WORD = re.compile(r"[\w']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prompt_spans(system_prompt: str, n: int = SPAN_WORDS) -> set[tuple[str, ...]]:
    words = _words(system_prompt)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def leak_flags(answer: str, system_prompt: str, spans: set[tuple[str, ...]] | None = None) -> list[str]:
    """Reasons the answer may leak the prompt (empty when it looks clean).
    Pass `spans` (from prompt_spans) when checking many answers."""
    flags = []
    lowered = " ".join(answer.lower().split())
    hits = [p for p in PHRASES if p in lowered]
    if hits:
        flags.append("mentions " + ", ".join(f'"{p}"' for p in hits[:3]))
    spans = prompt_spans(system_prompt) if spans is None else spans
    words = _words(answer)
    if spans and any(tuple(words[i : i + SPAN_WORDS]) in spans for i in range(len(words) - SPAN_WORDS + 1)):
        flags.append(f"quotes {SPAN_WORDS}+ words of the prompt")
    return flags
