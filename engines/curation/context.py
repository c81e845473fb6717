"""What the teacher sees besides the prompt: the prompt's passages most
relevant to the query, placed next to the question.

A small model lost in a 1,000-token prompt rarely finds the one line that
answers the question; handed that line beside the question it often uses it.
The prompt is cut into passages (sentences, each with its section heading),
BM25 (bm25s) ranks them against the query, and the best few are appended to
the teacher's copy of the user message. The student never sees them: its
training rows keep the user's own words.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines.chat import Message

_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(])")
# Passages that only say how to write (the rules' prose) are not facts to retrieve.
MIN_PASSAGE_WORDS = 4


@dataclass(frozen=True)
class Passage:
    heading: str  # the section heading ("" before the first heading)
    text: str  # one sentence of the prompt


def sections(prompt: str) -> list[tuple[str, str]]:
    """(heading, body) per markdown section; "" heads the text before the first."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in prompt.splitlines():
        m = _HEADING.match(line)
        if m:
            out.append((m.group(2).strip(), []))
        else:
            out[-1][1].append(line)
    return [(h, "\n".join(body)) for h, body in out if "\n".join(body).strip()]


def passages(prompt: str, exclude: Sequence[str] = ()) -> list[Passage]:
    """The prompt's sentences, each with the heading of its section. A
    section holding any of `exclude` (a rule's own text: the section that
    states how replies are written) is left out whole."""
    lowered = [e.casefold() for e in exclude if e.strip()]
    out: list[Passage] = []
    for heading, body in sections(prompt):
        if any(e in body.casefold() for e in lowered):
            continue
        for block in re.split(r"\n\s*\n", body):
            text = " ".join(x.strip().lstrip("-*• ").strip() for x in block.splitlines() if x.strip())
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip()
                if len(sentence.split()) >= MIN_PASSAGE_WORDS:
                    out.append(Passage(heading, sentence))
    return out


class Retriever:
    """BM25 over a prompt's passages. Build once per prompt; `relevant` is
    cheap (~0.1 ms a query)."""

    def __init__(self, prompt: str, exclude: Sequence[str] = ()) -> None:
        import bm25s

        # The rules' own section would win on every query that uses the same
        # words; the rules reach the teacher in the prompt anyway.
        self.passages = passages(prompt, exclude)
        self._bm25: Any = None
        if self.passages:
            self._bm25 = bm25s.BM25()
            self._bm25.index(
                self._tokens([f"{p.heading} {p.text}" for p in self.passages]), show_progress=False
            )

    @staticmethod
    def _tokens(texts: list[str]) -> Any:
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False)

    def relevant(self, query: str, k: int) -> list[Passage]:
        """The k passages that best match the query (none that share no word
        with it), in the order they stand in the prompt."""
        if self._bm25 is None or k <= 0 or not query.strip():
            return []
        k = min(k, len(self.passages))
        tokens = self._tokens([query])
        if not tokens.ids or not tokens.ids[0]:
            return []
        ids, scores = self._bm25.retrieve(tokens, k=k, show_progress=False)
        picked = sorted(int(i) for i, s in zip(ids[0], scores[0], strict=True) if s > 0)
        return [self.passages[i] for i in picked]


@functools.cache
def _stemmer() -> Any:
    import Stemmer  # PyStemmer: "dogs" finds "dog"

    return Stemmer.Stemmer("english").stemWords


def last_user_text(conversation: Sequence[Message]) -> str:
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


def with_note(conversation: Sequence[Message], note: str) -> list[Message]:
    """The conversation with `note` added after the last user message's text
    (teacher-only: what the teacher is told, never what is stored)."""
    out = [dict(m) for m in conversation]
    if not note:
        return out
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = f"{m['content']}\n\n{note}"
            break
    return out


def facts_note(found: Sequence[Passage]) -> str:
    if not found:
        return ""
    return "(Information for your answer: " + " ".join(p.text for p in found) + ")"


def rule_literals(rules: Sequence[Any]) -> list[str]:
    """The texts an opening or closing rule requires (validated `Rule`s or
    their JSON): the section holding them states how to write, not facts."""
    out = []
    for r in rules:
        kind, params = (r.kind, r.params) if hasattr(r, "kind") else (r.get("kind"), r)
        if kind in ("starts_with", "ends_with") and isinstance(params.get("text"), str):
            out.append(params["text"])
    return out


@functools.lru_cache(maxsize=32)
def _retriever(prompt: str, exclude: tuple[str, ...]) -> Retriever:
    return Retriever(prompt, exclude=exclude)


def with_passages(
    conversation: Sequence[Message], prompt: str, k: int, exclude: Sequence[str] = ()
) -> list[Message]:
    """What a student that reads its prompt's passages sees (`student_passages`):
    the conversation with the prompt's k passages most relevant to the last
    user message added after it, as the teacher's note. The same in
    training, in the four arms and when served; k <= 0 leaves it as it is.
    The prompt's index is built once (~ms) and kept."""
    if k <= 0 or not prompt.strip():
        return [dict(m) for m in conversation]
    found = _retriever(prompt, tuple(exclude)).relevant(last_user_text(conversation), k)
    return with_note(conversation, facts_note(found))


def student_view(conversation: Sequence[Message], prompt: str, rules: Sequence[Any], k: int) -> list[Message]:
    """The conversation as a student trained with `student_passages` k reads
    it, in training and when served alike: the prompt's k passages most
    relevant to the question, the rules' required openings and closings left out."""
    return with_passages(conversation, prompt, k, rule_literals(rules))


# Figures a reader would act on: money, clock times, percentages. A number
# with a currency or a clock shape is rarely right by chance.
_FIGURE = re.compile(
    r"[£$€]\s?\d[\d,]*(?:\.\d+)?"
    r"|\b\d[\d,]*(?:\.\d+)?\s?(?:euros?|dollars?|pounds?|pence|p\b)"
    r"|\b\d{1,2}[:.]\d{2}\b"
    r"|\b\d+(?:\.\d+)?\s?%",
    re.IGNORECASE,
)


def _figure_key(figure: str) -> str:
    """The figure's value, written one way: "£1,200" -> "1200", "08.00" -> "8:00"."""
    digits = re.sub(r"[^\d.:%]", "", figure.replace(",", ""))
    clock = re.fullmatch(r"(\d{1,2})[:.](\d{2})", digits)
    return f"{int(clock.group(1))}:{clock.group(2)}" if clock else digits


def unsupported_figures(answer: str, sources: str) -> list[str]:
    """The money amounts, clock times and percentages in `answer` that
    `sources` (the prompt and the question) never states: a small teacher
    often invents one beside a right fact."""
    known = {_figure_key(m.group()) for m in _FIGURE.finditer(sources)}
    return [m.group() for m in _FIGURE.finditer(answer) if _figure_key(m.group()) not in known]
