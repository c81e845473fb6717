"""The LLM-as-judge protocol: the chat a judge answers, and its score read back."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.chat import Message
from engines.progress import StopFn

if TYPE_CHECKING:
    from engines.generator import Generator
    from engines.inference import GenerationSettings


MAX_REASONING_CHARS = 400  # a structured verdict's reasoning: room for the score within the token budget


def judge_format(scale: tuple[int, int] = (1, 10)) -> dict[str, Any]:
    """The response_format a structured judge answers under: its reasoning
    first (it thinks before it scores), then a whole-number score the grammar
    keeps on the scale. A small judge that never writes `Score: N` by itself
    still ends every verdict with a score."""
    low, high = scale
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "verdict",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "reasoning": {"type": "string", "maxLength": MAX_REASONING_CHARS},
                    "score": {"type": "integer", "minimum": low, "maximum": high},
                },
                "required": ["reasoning", "score"],
                "additionalProperties": False,
            },
        },
    }


def judge_messages(
    rubric: str,
    query: str,
    answer: str,
    reference: str | None = None,
    scale: tuple[int, int] = (1, 10),
    structured: bool = False,
) -> list[Message]:
    """The chat a judge model answers to grade one answer against a rubric:
    free text ending `Score: N`, or with `structured` a JSON verdict (`judge_format`)."""
    low, high = scale
    output = (
        'Output format: a JSON object {"reasoning": "<a few sentences>", "score": N}, '
        f"where N is a whole number from {low} to {high}."
        if structured
        else "Output format: first your reasoning in a few sentences, then a final line "
        f"`Score: N`, where N is a whole number from {low} to {high}. Nothing after that line."
    )
    system = (
        "You are an impartial judge. Grade the assistant's answer to the user's query against this rubric.\n\n"
        f"## Rubric\n{rubric.strip()}\n\n"
        f"Use a scale from {low} (worst) to {high} (best)"
        + (", and compare the answer with the reference answer" if reference is not None else "")
        + ".\n"
        + output
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
    if text.lstrip().startswith("{"):
        structured = _parse_structured(text, scale)
        if structured is not None:
            return structured
    matches = [(m.start(1), m.group(1)) for m in _SCORE_LABEL.finditer(text)]
    matches += [(m.start(1), m.group(1)) for m in _SCORE_FRACTION.finditer(text) if int(m.group(2)) == high]
    if not matches:
        if text.lstrip().startswith('{"'):
            return JudgeVerdict(None, text.strip(), "the judge's verdict was cut off before its score")
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


def _parse_structured(text: str, scale: tuple[int, int]) -> JudgeVerdict | None:
    """A JSON verdict (`judge_format`), or None when the text is no such object."""
    low, high = scale
    try:
        data, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return None  # not JSON (or cut off): read as free text
    if not isinstance(data, dict) or "score" not in data:
        return None
    score, reasoning = data["score"], str(data.get("reasoning", "")).strip()
    if isinstance(score, bool) or not isinstance(score, int | float):
        return JudgeVerdict(None, reasoning, f"the score {score!r} is not a number")
    if not low <= score <= high:
        return JudgeVerdict(None, reasoning, f"score {score} is outside the scale {low}-{high}")
    return JudgeVerdict(float(score), reasoning)


def judge_answers(
    generator: Generator,
    rubric: str,
    items: Sequence[tuple[str, str, str | None]],
    settings: GenerationSettings | None = None,
    should_stop: StopFn | None = None,
    scale: tuple[int, int] = (1, 10),
    structured: bool = True,
) -> list[tuple[JudgeVerdict, str]]:
    """Grade (query, answer, reference) items with a judge model: each
    verdict and the judge's raw text, in input order. The judge's
    instructions are its system prompt (a generator replaces any system
    message in a conversation with the one it is given). `structured`
    (the default) decodes each verdict under `judge_format`'s grammar, so
    every finished verdict carries a score on the scale; without it the judge
    writes free text ending `Score: N`."""
    from engines.inference import GenerationSettings, response_format_json

    if structured:
        settings = dataclasses.replace(
            settings or GenerationSettings(), response_format=response_format_json(judge_format(scale))
        )
    chats = [
        judge_messages(rubric, query, answer, reference, scale, structured)
        for query, answer, reference in items
    ]
    out: list[tuple[JudgeVerdict, str] | None] = [None] * len(chats)
    systems = [chat[0]["content"] for chat in chats]
    for system in dict.fromkeys(systems):  # with and without a reference answer
        mine = [i for i, s in enumerate(systems) if s == system]
        texts = generator.generate([chats[i][1:] for i in mine], system, settings, should_stop=should_stop)
        for i, completion in zip(mine, texts, strict=True):
            out[i] = (parse_judge(completion.text, scale), completion.text)
    return [o for o in out if o is not None]
