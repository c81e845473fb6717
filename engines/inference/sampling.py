"""Per-row sampling: every row of a batched `generate` call its own settings.

`RowSampler` is the last (and, with a greedy GenerationConfig, the only)
logits processor of a call. For each row it applies the penalties
(repetition, frequency, presence), logit_bias, the completion-only no-repeat
n-grams, min_tokens and a response_format grammar, then picks the row's
token itself: the argmax for greedy rows, a draw from the row's own
torch.Generator after temperature / top_k / top_p / min_p for sampled rows.
It returns scores that allow only that token, so transformers' greedy step
takes it. So requests with different seeds or sampling settings share one
batch, and a seeded row draws the same tokens alone or beside others.
With `logprobs`, each picked token's log-probability and the top
alternatives are recorded from the model's raw distribution (vLLM's default
"raw_logprobs"), before any penalty or temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engines.inference.settings import GenerationSettings

if TYPE_CHECKING:
    import torch


class Constraint(Protocol):
    """A row's grammar (engines.inference.grammar.RowConstraint)."""

    def accept(self, token_id: int) -> None: ...


# Masks rows of a batch's scores in place: [(row, constraint), ...].
ApplyConstraints = Callable[["torch.Tensor", Sequence[tuple[int, Any]]], None]


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this step, best first


def needs_sampler(settings: GenerationSettings) -> bool:
    """Whether these settings need anything beyond plain greedy decoding."""
    return bool(
        settings.temperature > 0
        or settings.repetition_penalty != 1.0
        or settings.frequency_penalty
        or settings.presence_penalty
        or settings.logit_bias
        or settings.no_repeat_ngram_size
        or settings.min_tokens
    )


def row_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th row drawn for one seeded request (its n
    samples, a job's rows): distinct per row, the same whatever the batch."""
    if seed is None:
        return None
    return (seed + index) % (2**63)


class RowSampler:
    """The logits processor that applies every row's settings and picks its token.

    `settings[r]`, `seeds[r]` (None: a random seed), `logprobs[r]` (None: not
    recorded; k: the chosen token and the top k), `constraints[r]` (None or a
    grammar; `apply_constraints` masks them all at once). `prompt_length`:
    where the completion starts in input_ids (left-padded batch). `finished(r)`
    says a row already ended (it is left alone)."""

    def __init__(
        self,
        settings: Sequence[GenerationSettings],
        prompt_length: int,
        stop_ids: Sequence[int],
        *,
        seeds: Sequence[int | None] | None = None,
        logprobs: Sequence[int | None] | None = None,
        constraints: Sequence[Constraint | None] | None = None,
        apply_constraints: ApplyConstraints | None = None,
        finished: Callable[[int], bool] | None = None,
    ) -> None:
        import torch

        rows = len(settings)
        self.settings = list(settings)
        self.start = prompt_length
        self.stop_ids = list(stop_ids)
        self.logprobs_k = list(logprobs) if logprobs is not None else [None] * rows
        self.constraints = list(constraints) if constraints is not None else [None] * rows
        self.apply_constraints = apply_constraints
        self.finished = finished or (lambda r: False)
        self.recorded: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.sampled = [s.temperature > 0 for s in settings]
        self.generators: list[torch.Generator | None] = []
        for r in range(rows):
            if not self.sampled[r]:
                self.generators.append(None)
                continue
            seed = seeds[r] if seeds is not None else None
            if seed is None:  # from torch's own RNG, so torch.manual_seed still governs unseeded rows
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self.generators.append(torch.Generator().manual_seed(seed))
        self.active = (
            any(needs_sampler(s) for s in settings)
            or any(k is not None for k in self.logprobs_k)
            or any(c is not None for c in self.constraints)
        )
        self._rep = [s.repetition_penalty for s in settings]
        self._counted = any(s.frequency_penalty or s.presence_penalty for s in settings)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return scores
        import torch

        rows = range(scores.shape[0])
        live = [r for r in rows if not self.finished(r)]
        raw = None
        if any(self.logprobs_k[r] is not None for r in live):
            raw = torch.log_softmax(scores.float(), dim=-1)
        scores = self._penalise(input_ids, scores)
        length = input_ids.shape[1] - self.start
        for r in live:
            s = self.settings[r]
            if s.logit_bias:
                ids = torch.tensor([i for i, _ in s.logit_bias if i < scores.shape[1]], dtype=torch.long)
                values = torch.tensor([b for i, b in s.logit_bias if i < scores.shape[1]], dtype=scores.dtype)
                scores[r, ids] += values
            if s.no_repeat_ngram_size:
                _ban_repeats(input_ids[r, self.start :].tolist(), s.no_repeat_ngram_size, scores, r)
            if length < s.min_tokens and not s.ignore_eos:
                scores[r, self.stop_ids] = -float("inf")
        constrained = [(r, c) for r in live if (c := self.constraints[r]) is not None]
        if constrained and self.apply_constraints is not None:
            self.apply_constraints(scores, constrained)
        chosen = scores.argmax(dim=-1)
        sampled = [r for r in live if self.sampled[r]]
        if sampled:
            picks = self._draw(scores[sampled], sampled)
            chosen[sampled] = picks
        for r in live:
            token = int(chosen[r])
            k = self.logprobs_k[r]
            if k is not None and raw is not None:
                top: tuple[tuple[int, float], ...] = ()
                if k:
                    values, ids = raw[r].topk(k)
                    top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
                self.recorded[r].append(TokenLogprob(token, float(raw[r, token]), top))
            constraint = self.constraints[r]
            if constraint is not None:
                constraint.accept(token)
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, chosen.view(-1, 1), 0.0)
        return forced

    def _penalise(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        if any(p != 1.0 for p in self._rep):
            # transformers' RepetitionPenaltyLogitsProcessor, one penalty per row (the whole input, as it does).
            penalty = torch.tensor(self._rep, dtype=scores.dtype).view(-1, 1)
            score = torch.gather(scores, 1, input_ids)
            score = torch.where(score < 0, score * penalty, score / penalty)
            scores = scores.scatter(1, input_ids, score)
        if self._counted and input_ids.shape[1] > self.start:
            completion = input_ids[:, self.start :]
            counts = torch.zeros_like(scores).scatter_add_(
                1, completion, torch.ones_like(completion, dtype=scores.dtype)
            )
            frequency = torch.tensor([s.frequency_penalty for s in self.settings], dtype=scores.dtype)
            presence = torch.tensor([s.presence_penalty for s in self.settings], dtype=scores.dtype)
            scores = (
                scores - counts * frequency.view(-1, 1) - (counts > 0).to(scores.dtype) * presence.view(-1, 1)
            )
        return scores

    def _draw(self, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """One token per sampled row: temperature, top_k, top_p, min_p, then
        a draw from the row's generator (inverse CDF of one uniform number)."""
        import torch

        settings = [self.settings[r] for r in rows]
        logits = scores.float() / torch.tensor([s.temperature for s in settings]).view(-1, 1)
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        ranks = torch.arange(probs.shape[1]).view(1, -1)
        top_k = torch.tensor([s.top_k if s.top_k > 0 else probs.shape[1] for s in settings]).view(-1, 1)
        keep &= ranks < top_k
        # top_p: keep the smallest prefix whose mass reaches p (the best token always stays).
        before = probs.cumsum(dim=-1) - probs
        keep &= before < torch.tensor([s.top_p for s in settings]).view(-1, 1)
        min_p = torch.tensor([s.min_p for s in settings]).view(-1, 1)
        keep &= probs >= min_p * probs[:, :1]
        keep[:, 0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        cdf = probs.cumsum(dim=-1)
        draws = torch.stack(
            [torch.rand(1, generator=self.generators[r], dtype=torch.float64) for r in rows]
        ).to(cdf.dtype)
        at = torch.searchsorted(cdf, draws * cdf[:, -1:]).clamp(max=probs.shape[1] - 1)
        # A zero-probability slot can only be hit at the edge: step back to a kept one.
        picked = at.view(-1)
        for i in range(len(rows)):
            while not keep[i, picked[i]] and picked[i] > 0:
                picked[i] -= 1
        return order.gather(1, picked.view(-1, 1)).view(-1)


def _ban_repeats(tokens: list[int], n: int, scores: Any, row: int) -> None:
    """Ban, in `scores[row]`, every token that would repeat an n-gram of the completion."""
    if len(tokens) < n:
        return
    tail = tokens[len(tokens) - n + 1 :]
    banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == tail]
    if banned:
        scores[row, banned] = -float("inf")
