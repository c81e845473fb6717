"""Batched generation: encoding a conversation exactly as it is fed, left
padding, the shared-prefix KV cache, the generation config, `generate` and
best-of-N `generate_samples`; openings (prefilled answer starts) per row."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from engines.chat import Message, render
from engines.inference.loading import LoadedModel
from engines.inference.sampling import RowSampler, row_seed
from engines.inference.settings import GenerationSettings, SettingsError
from engines.inference.stops import Completion, RowStops, decode_text
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    import torch

# Below this many shared tokens, encoding the prefix separately is not worth it.
MIN_PREFIX_TOKENS = 32

# How answers open (prefilled text the model continues): one string (or None)
# for every row, or one `str | None` per conversation.
Opening: TypeAlias = str | Sequence[str | None] | None


def per_row_openings(opening: Opening, rows: int) -> list[str | None]:
    """`opening` as one entry per row; a sequence must have exactly `rows`
    entries, each a string or None (ValueError / TypeError otherwise)."""
    if opening is None or isinstance(opening, str):
        return [opening] * rows
    openings = list(opening)
    if len(openings) != rows:
        raise ValueError(f"{len(openings)} openings for {rows} conversations")
    for i, o in enumerate(openings):
        if o is not None and not isinstance(o, str):
            raise TypeError(f"opening {i} is a {type(o).__name__}, not a string or None")
    return openings


class GenerationCancelled(Exception):
    """Raised between batches when `should_stop()` says so."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"generation cancelled after {done} of {total} conversations")
        self.done = done
        self.total = total


def encode(
    tokenizer: Any,
    messages: Sequence[Message],
    system_prompt: str | None,
    opening: str | None = None,
    generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the rendered prompt, exactly as `generate` feeds them;
    with `opening`, the assistant's answer already begins with that text.
    Without `generation_prompt` the text ends with the last message as sent
    (vLLM's add_generation_prompt false)."""
    # The template writes any BOS itself, so the tokenizer must not add one.
    text = render(tokenizer, messages, system_prompt, add_generation_prompt=generation_prompt) + (
        opening or ""
    )
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def count_tokens(tokenizer: Any, messages: Sequence[Message], system_prompt: str | None) -> int:
    """Tokens of the rendered prompt, exactly as `generate` feeds it."""
    return len(encode(tokenizer, messages, system_prompt))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, prefix: Sequence[int] = ()) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of a batch, each row padded on the left to
    the longest. With `prefix` (shared by every row, its KV cache computed
    once), the layout is [prefix | pad | row] with mask [1 | 0 | 1]: generate
    derives positions from the mask's cumulative sum, so they match plain left padding."""
    import torch

    start = len(prefix)
    width = start + max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    if start:
        input_ids[:, :start] = torch.tensor(list(prefix))
        mask[:, :start] = 1
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(list(row))
        mask[i, width - len(row) :] = 1
    return input_ids, mask


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    # Every row keeps at least one token of its own, so generate has a suffix to prefill.
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def generation_config(loaded: LoadedModel, settings: GenerationSettings) -> Any:
    """The transformers GenerationConfig of every generate call: greedy, since
    `RowSampler` (the call's logits processor, `row_sampler`) applies the
    penalties and sampling and picks each row's token itself. Stop strings and
    per-row limits are not in it either: `RowStops` applies them. With
    ignore_eos no end token is given (an empty list: None would fall back to
    the model's own), so only RowStops ends a row."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        eos_token_id=[] if settings.ignore_eos else list(loaded.stop_token_ids),
        pad_token_id=loaded.tokenizer.pad_token_id,
        # Compiling would recompile for every batch shape.
        disable_compile=True,
    )


def row_sampler(
    loaded: LoadedModel,
    settings: Sequence[GenerationSettings],
    prompt_length: int,
    seeds: Sequence[int | None],
    **kwargs: Any,
) -> Any:
    """The logits processors of a batch whose prompts (left-padded) end at
    `prompt_length`: one RowSampler with each row's settings and seed."""
    from transformers import LogitsProcessorList

    sampler = RowSampler(settings, prompt_length, loaded.stop_token_ids, seeds=seeds, **kwargs)
    return LogitsProcessorList([sampler]), sampler


def grammar_constraints(loaded: LoadedModel, grammars: Sequence[str | None]) -> dict[str, Any]:
    """RowSampler's arguments for each row's response_format grammar (None:
    free text), a fresh matcher per row; {} when no row has one."""
    if not any(grammars):
        return {}
    from engines.inference import grammar as grammar_module

    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])  # may exceed the tokenizer's
    return {
        "constraints": [
            grammar_module.constraint(loaded.tokenizer, g, loaded.stop_token_ids, vocab) if g else None
            for g in grammars
        ],
        "apply_constraints": grammar_module.apply,
    }


def _encode_prefix(loaded: LoadedModel, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Key/value states of the shared prefix at batch 1, one pair per layer; None
    when the model's cache is not plain full attention (sliding windows,
    linear attention), where copying states into a StaticCache is not sound."""
    import torch
    from transformers.cache_utils import DynamicLayer

    ids = torch.tensor([prefix], device=loaded.device)
    out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.cache
    if cache is None or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_for_batch(
    loaded: LoadedModel, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int, max_len: int
) -> Any:
    # A fresh cache per batch: generate extends the cache it is given in place.
    # StaticCache measured faster than an expanded DynamicCache (no re-concatenation per step).
    from transformers import StaticCache

    cache = StaticCache(config=loaded.model.config, max_cache_len=max_len)
    for layer_idx, (keys, values) in enumerate(prefix_kv):
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer_idx)
    return cache


def _finish(loaded: LoadedModel, new_tokens: list[int], prompt_tokens: int, seconds: float) -> Completion:
    stops = set(loaded.stop_token_ids)
    end = next((i for i, t in enumerate(new_tokens) if t in stops), None)
    answer = new_tokens if end is None else new_tokens[:end]
    return Completion(
        text=decode_text(loaded.tokenizer, answer),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_tokens) if end is None else end + 1,
        finish_reason="length" if end is None else "stop",
        seconds=seconds,
    )


def generate(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    reuse_prefix: bool = True,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    opening: Opening = None,
) -> list[Completion]:
    """Answer every conversation (the assistant's next turn), in input order.

    `system_prompt` replaces any system message in the conversations; None
    means no system message (see `engines.chat`). `progress` gets a Progress
    (unit "conversations") after each batch; `should_stop()` is checked
    before each batch and raises GenerationCancelled. With `opening` (one for
    all, or one per conversation: `Opening`), each answer starts with its
    row's text (prefilled) and the model continues it."""
    settings = settings or GenerationSettings()
    batch_size = settings.batch_size
    started = time.monotonic()
    total = len(conversations)
    openings = per_row_openings(opening, total)
    if total == 0:
        return []
    tokenizer = loaded.tokenizer
    rows = [
        encode(tokenizer, conv, system_prompt, o) for conv, o in zip(conversations, openings, strict=True)
    ]
    # Longest first: similar lengths share a batch (less padding), and an
    # out-of-memory error comes at once rather than at the end.
    order = sorted(range(total), key=lambda i: -len(rows[i]))
    gen_config = generation_config(loaded, settings)
    pad_id = int(tokenizer.pad_token_id)
    grammar = settings.grammar()
    results: list[Completion | None] = [None] * total
    import torch

    with torch.inference_mode():
        prefix_len = _common_prefix_length(rows) if reuse_prefix and total > 1 else 0
        prefix_kv = None
        if prefix_len >= MIN_PREFIX_TOKENS:
            prefix_kv = _encode_prefix(loaded, rows[0][:prefix_len])
        if prefix_kv is None:
            prefix_len = 0

        done = 0
        for start in range(0, total, batch_size):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(done, total)
            began = time.perf_counter()
            batch = order[start : start + batch_size]
            input_ids, mask = left_pad(
                [rows[i][prefix_len:] for i in batch], pad_id, rows[batch[0]][:prefix_len]
            )
            kwargs: dict[str, Any] = {}
            rows_stops = None
            if settings.stop or settings.ignore_eos:
                rows_stops = RowStops(
                    loaded,
                    [settings.max_new_tokens] * len(batch),
                    settings.stop,
                    ignore_eos=[settings.ignore_eos] * len(batch),
                )
                kwargs["stopping_criteria"] = rows_stops.stopping_criteria()
            if prefix_kv is not None:
                max_len = input_ids.shape[1] + settings.max_new_tokens
                kwargs["cache"] = _cache_for_batch(loaded, prefix_kv, len(batch), max_len)
            out = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                generation_config=gen_config,
                logits_processor=row_sampler(
                    loaded,
                    [settings] * len(batch),
                    input_ids.shape[1],
                    [row_seed(settings.seed, i) for i in batch],
                    **grammar_constraints(loaded, [grammar] * len(batch)),
                )[0],
                **kwargs,
            )
            new = out[:, input_ids.shape[1] :].tolist()
            seconds = time.perf_counter() - began
            if rows_stops is not None:
                rows_stops.finish()
            for row, i in enumerate(batch):
                results[i] = (
                    _finish(loaded, new[row], len(rows[i]), seconds)
                    if rows_stops is None
                    else rows_stops.completion(row, len(rows[i]), seconds)
                )
            done += len(batch)
            if progress is not None:
                progress(Progress.since(started, done, total, "conversations"))

    done_results = [r for r in results if r is not None]
    return [
        dataclasses.replace(r, text=o + r.text) if o else r
        for r, o in zip(done_results, openings, strict=True)
    ]


def generate_samples(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings,
    samples: int,
    opening: Opening = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[list[Completion]]:
    """`samples` answers to each conversation (best-of-N). The copies of a
    conversation sit side by side in the same batches, so they share the
    encoded prompt prefix and each generate call. A per-conversation
    `opening` is shared by that conversation's samples."""
    if samples < 1:
        raise SettingsError({"samples": f"must be at least 1, got {samples}"})
    openings = per_row_openings(opening, len(conversations))
    expanded = [conv for conv in conversations for _ in range(samples)]
    # N samples of a query ride in one batch N times as wide: a decode step of
    # a wider batch costs far less than N steps (at most 64 rows: KV memory).
    wide = dataclasses.replace(
        settings, batch_size=max(settings.batch_size, min(settings.batch_size * samples, 64))
    )
    flat = generate(
        loaded,
        expanded,
        system_prompt,
        wide,
        progress=progress,
        should_stop=should_stop,
        opening=[o for o in openings for _ in range(samples)],
    )
    return [flat[i : i + samples] for i in range(0, len(flat), samples)]
