"""Where a generated row ends and what it becomes: the Completion, the
per-row stops of a batched generate (stop tokens, max_tokens, stop strings,
streaming text) and the completion-only no-repeat n-gram processor."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from engines.inference.settings import GenerationSettings

if TYPE_CHECKING:
    import torch

    from engines.inference.loading import LoadedModel

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens, counting the stop token when there is one
    finish_reason: FinishReason
    seconds: float  # wall time of the batch that produced it


class CompletionNoRepeatNGram:
    """Bans any n-gram the completion already holds (from `start`, where the
    prompt ends): small models loop, greedy ones most of all. Unlike
    transformers' no_repeat_ngram_size, the prompt's n-grams stay allowed,
    so an answer may still say what the system prompt or the question says."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = self.n
        generated = input_ids[:, self.start :].tolist()
        if not generated or len(generated[0]) < n:
            return scores
        for row, tokens in enumerate(generated):
            tail = tokens[len(tokens) - n + 1 :]
            banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == tail]
            if banned:
                scores[row, banned] = -float("inf")
        return scores


def completion_processors(settings: GenerationSettings, prompt_length: int) -> Any:
    """The logits processors `generation_config` cannot express, for a batch
    whose prompts (left-padded) end at `prompt_length`."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if settings.no_repeat_ngram_size:
        processors.append(CompletionNoRepeatNGram(settings.no_repeat_ngram_size, prompt_length))
    return processors


@dataclass
class _Row:
    max_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: FinishReason = "length"
    emitted: int = 0  # characters of `text` already handed out by `take_text`


class RowStops:
    """Per-row ends of one batched `generate` call: the stop tokens, each row's
    own max_tokens and the stop strings (the text is cut before the first one
    and that row stops generating). Fed each step's new tokens by the stopping
    criterion from `stopping_criteria()`, it also gives each row's text as it
    grows, for streaming (`take_text`).

    With `live` (forced when there are stop strings) every step decodes each
    running row's tokens so far: decoding the cumulative ids, not token by
    token, keeps multi-byte characters split across tokens whole."""

    def __init__(
        self, loaded: LoadedModel, max_tokens: Sequence[int], stop: Sequence[str] = (), live: bool = False
    ) -> None:
        self.tokenizer = loaded.tokenizer
        self.stop_ids = frozenset(loaded.stop_token_ids)
        self.stop = tuple(stop)
        self.live = live or bool(self.stop)
        self.rows = [_Row(max_tokens=m) for m in max_tokens]
        self.cancelled: set[int] = set()

    def step(self, new_tokens: Sequence[int]) -> list[bool]:
        """Take one new token per row; return which rows are done."""
        for i, token in enumerate(new_tokens):
            row = self.rows[i]
            if row.done:
                continue
            if i in self.cancelled:
                row.done, row.finish_reason = True, "stop"
                continue
            row.tokens.append(int(token))
            if token in self.stop_ids:
                row.done, row.finish_reason = True, "stop"
                continue
            if self.live:
                row.text = decode_text(self.tokenizer, row.tokens)
                cut = self._first_stop(row.text)
                if cut is not None:
                    row.text = row.text[:cut]
                    row.done, row.finish_reason = True, "stop"
                    continue
            if len(row.tokens) >= row.max_tokens:
                row.done, row.finish_reason = True, "length"
        return [row.done for row in self.rows]

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def finish(self) -> None:
        """After generate: decode what was not decoded live."""
        for row in self.rows:
            row.done = True
            if not self.live:
                answer = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.stop_ids else row.tokens
                row.text = decode_text(self.tokenizer, answer)

    def take_text(self, i: int) -> str:
        """Row i's text not handed out yet that is final: while the row runs,
        a trailing partial character or the start of a possible stop string is held back."""
        row = self.rows[i]
        end = len(row.text)
        if not row.done:
            while end and row.text[end - 1] == "\ufffd":
                end -= 1
            end -= self._held_for_stop(row.text[:end])
        if end <= row.emitted:
            return ""
        piece = row.text[row.emitted : end]
        row.emitted = end
        return piece

    def _held_for_stop(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def completion(self, i: int, prompt_tokens: int, seconds: float) -> Completion:
        row = self.rows[i]
        return Completion(
            text=row.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(row.tokens),
            finish_reason=row.finish_reason,
            seconds=seconds,
        )

    def stopping_criteria(self) -> Any:
        """A transformers StoppingCriteriaList that feeds this object each step."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        rows = self

        class _Criterion(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                done = rows.step(input_ids[:, -1].tolist())
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Criterion()])


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated ids as text. A NUL (a byte-level token a small model may
    emit) becomes U+FFFD: PostgreSQL cannot store it in text or JSON."""
    return str(tokenizer.decode(ids, skip_special_tokens=True)).replace("\x00", "\ufffd")
