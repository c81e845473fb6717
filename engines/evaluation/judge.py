"""The LLM-as-judge protocol: the chat a judge answers, and its score read back."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.chat import Message
from engines.progress import StopFn

if TYPE_CHECKING:
    from engines.generator import Generator
    from engines.inference import GenerationSettings


def judge_messages(
    rubric: str, query: str, answer: str, reference: str | None = None, scale: tuple[int, int] = (1, 10)
) -> list[Message]:
    """The chat a judge model answers to grade one answer against a rubric."""
    low, high = scale
    system = (
        "You are an impartial judge. Grade the assistant's answer to the user's query against this rubric.\n\n"
        f"## Rubric\n{rubric.strip()}\n\n"
        f"Use a scale from {low} (worst) to {high} (best)"
        + (", and compare the answer with the reference answer" if reference is not None else "")
        + ".\nOutput format: first your reasoning in a few sentences, then a final line "
        f"`Score: N`, where N is a whole number from {low} to {high}. Nothing after that line."
    )
    parts = [f"## Query\n{query}"]
    if reference is not None:
        parts.append(f"## Reference answer\n{reference}")
    parts.append(f"## Answer to grade\n{answer}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


@dataclass
class JudgeVerdict:
    score: float | None
    reasoning: str
    error: str = ""


_NUMBER = r"(-?\d+(?:\.\d+)?)"
# "Score: 8", "score = 7", "**Score:** 8", "Score: 8/10"
_SCORE_LABEL = re.compile(r"\bscore\b\W{0,3}?\s*[:=]\s*\**\s*" + _NUMBER, re.IGNORECASE)
# "7/10" and "7 / 10" (the denominator must be the scale's top)
_SCORE_FRACTION = re.compile(_NUMBER + r"\s*/\s*(\d+)\b")


def parse_judge(text: str, scale: tuple[int, int] = (1, 10)) -> JudgeVerdict:
    """A judge's score and reasoning from its free text. The LAST score wins
    (judges often restate the rubric's scale first); the reasoning is the
    text before the line holding it."""
    low, high = scale
    text = text or ""
    if not text.strip():
        return JudgeVerdict(None, "", "the judge's output is empty: expected reasoning, then `Score: N`")
    matches = [(m.start(1), m.group(1)) for m in _SCORE_LABEL.finditer(text)]
    matches += [(m.start(1), m.group(1)) for m in _SCORE_FRACTION.finditer(text) if int(m.group(2)) == high]
    if not matches:
        return JudgeVerdict(
            None,
            text.strip(),
            f"no score found: expected a final line `Score: N` with N from {low} to {high}",
        )
    start, number = max(matches)
    line_start = text.rfind("\n", 0, start) + 1
    reasoning = text[:line_start].strip()
    score = float(number)
    if not low <= score <= high:
        return JudgeVerdict(None, reasoning, f"score {number} is outside the scale {low}-{high}")
    return JudgeVerdict(score, reasoning)


def judge_answers(
    generator: Generator,
    rubric: str,
    items: Sequence[tuple[str, str, str | None]],
    settings: GenerationSettings | None = None,
    should_stop: StopFn | None = None,
    scale: tuple[int, int] = (1, 10),
) -> list[tuple[JudgeVerdict, str]]:
    """Grade (query, answer, reference) items with a judge model: each
    verdict and the judge's raw text, in input order. The judge's
    instructions are its system prompt (a generator replaces any system
    message in a conversation with the one it is given)."""
    chats = [judge_messages(rubric, query, answer, reference, scale) for query, answer, reference in items]
    out: list[tuple[JudgeVerdict, str] | None] = [None] * len(chats)
    systems = [chat[0]["content"] for chat in chats]
    for system in dict.fromkeys(systems):  # with and without a reference answer
        mine = [i for i, s in enumerate(systems) if s == system]
        texts = generator.generate([chats[i][1:] for i in mine], system, settings, should_stop=should_stop)
        for i, completion in zip(mine, texts, strict=True):
            out[i] = (parse_judge(completion.text, scale), completion.text)
    return [o for o in out if o is not None]
