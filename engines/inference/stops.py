"""Where a generated row ends and what it becomes: the Completion and the
per-row stops of a batched generate (stop tokens, max_tokens, stop strings,
ignore_eos, streaming text)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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


@dataclass
class _Row:
    max_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: FinishReason = "length"
    emitted: int = 0  # characters of `text` already handed out by `take_text`
    emitted_tokens: int = 0  # tokens whose logprobs were already streamed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_reason: str | None = None  # the stop string that ended the row (vLLM's stop_reason)


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
        self,
        loaded: LoadedModel,
        max_tokens: Sequence[int],
        stop: Sequence[str] = (),
        live: bool = False,
        *,
        row_stop: Sequence[Sequence[str]] | None = None,
        ignore_eos: Sequence[bool] | None = None,
    ) -> None:
        """`stop` holds for every row, `row_stop[r]` for row r (both when given);
        an `ignore_eos[r]` row is ended only by its max_tokens or a stop string."""
        self.tokenizer = loaded.tokenizer
        self.stop_ids = frozenset(loaded.stop_token_ids)
        self.rows = [
            _Row(
                max_tokens=m,
                stop=tuple(dict.fromkeys([*stop, *(row_stop[r] if row_stop else ())])),
                ignore_eos=bool(ignore_eos and ignore_eos[r]),
            )
            for r, m in enumerate(max_tokens)
        ]
        self.live = live or any(row.stop for row in self.rows)
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
            if token in self.stop_ids and not row.ignore_eos:
                row.done, row.finish_reason = True, "stop"
                continue
            if self.live:
                row.text = decode_text(self.tokenizer, row.tokens)
                found = self._first_stop(row.text, row.stop)
                if found is not None:
                    row.text = row.text[: found[0]]
                    row.done, row.finish_reason, row.stop_reason = True, "stop", found[1]
                    continue
            if len(row.tokens) >= row.max_tokens:
                row.done, row.finish_reason = True, "length"
        return [row.done for row in self.rows]

    @staticmethod
    def _first_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
        found = [(i, s) for s in stop if (i := text.find(s)) >= 0]
        return min(found) if found else None

    def ends_with_stop_token(self, i: int) -> bool:
        """Row i ended on an end token (not part of its text)."""
        row = self.rows[i]
        return bool(row.tokens) and row.tokens[-1] in self.stop_ids and not row.ignore_eos

    def finish(self) -> None:
        """After generate: decode what was not decoded live."""
        for row in self.rows:
            row.done = True
            if not self.live:
                ended = row.tokens and row.tokens[-1] in self.stop_ids and not row.ignore_eos
                row.text = decode_text(self.tokenizer, row.tokens[:-1] if ended else row.tokens)

    def take_text(self, i: int) -> str:
        """Row i's text not handed out yet that is final: while the row runs,
        a trailing partial character or the start of a possible stop string is held back."""
        row = self.rows[i]
        end = len(row.text)
        if not row.done:
            while end and row.text[end - 1] == "\ufffd":
                end -= 1
            end -= self._held_for_stop(row.text[:end], row.stop)
        if end <= row.emitted:
            return ""
        piece = row.text[row.emitted : end]
        row.emitted = end
        return piece

    @staticmethod
    def _held_for_stop(text: str, stop: Sequence[str]) -> int:
        longest = 0
        for s in stop:
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
