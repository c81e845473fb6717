"""The one inference engine: load a model (optionally with a LoRA adapter) and
generate chat completions in batches.

Teacher generation, evals and serving all call `generate`, so the chat
template (`engines.chat.render`), the generation settings and the stop
tokens are the same everywhere. Plain Python: no Django, no Celery; importing it is cheap (torch and
transformers load on first use), so the web process can use its settings.

Teacher generation runs many queries behind one long system prompt. With
`reuse_prefix`, the token prefix that every rendered input shares is encoded
once and its KV cache is copied into every batch, which is 3-5x faster on CPU
and gives the same tokens as plain batched generation (bench/teacher_throughput.py
measures both; figures in bench/README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from engines.chat import Message, render
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    import torch

# Below this many shared tokens, encoding the prefix separately is not worth it.
MIN_PREFIX_TOKENS = 32

FinishReason = Literal["stop", "length"]


class ModelLoadError(Exception):
    """A user-facing error: the message says what was wrong and where."""


class GenerationCancelled(Exception):
    """Raised between batches when `should_stop()` says so."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"generation cancelled after {done} of {total} conversations")
        self.done = done
        self.total = total


class SettingsError(ValueError):
    """Invalid GenerationSettings. `errors` maps each bad field to what is wrong."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("Invalid generation settings: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate, and the one place that owns the defaults: teacher
    jobs, the absorb form and command, evals and serving all start from it."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    # Conversations per generate call. 16 measured 3.7x plain batching with
    # the shared prompt prefix on 2 CPU cores (bench/README.md).
    batch_size: int = 16
    repetition_penalty: float = 1.0  # 1 means none
    no_repeat_ngram_size: int = 0  # 0 means none
    # The completion ends before the first of these strings (which is not part of it).
    stop: tuple[str, ...] = ()

    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {
        "max_new_tokens": (1, 4096), "batch_size": (1, 256), "no_repeat_ngram_size": (0, 64)}
    MAX_STOP_STRINGS: ClassVar[int] = 8

    def __post_init__(self) -> None:
        errors: dict[str, str] = {}
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                errors[name] = f"must be a whole number, got {value!r}"
            elif not low <= value <= high:
                errors[name] = f"must be between {low} and {high}, got {value}"
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            errors["temperature"] = f"must be 0 (greedy) or positive, got {self.temperature!r}"
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            errors["top_p"] = f"must be in (0, 1], got {self.top_p!r}"
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            errors["seed"] = f"must be a whole number or empty, got {self.seed!r}"
        penalty = self.repetition_penalty
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not math.isfinite(penalty) \
                or penalty <= 0:
            errors["repetition_penalty"] = f"must be positive (1 means none), got {penalty!r}"
        stop_error = _stop_error(self.stop)
        if stop_error:
            errors["stop"] = stop_error
        else:  # a list given in Python is kept as a tuple, so settings stay hashable
            object.__setattr__(self, "stop", tuple(self.stop))
        if errors:
            raise SettingsError(errors)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GenerationSettings:
        """From JSON-like data (a job's params, a command's options); unknown
        keys and bad values raise SettingsError naming each field."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError({k: "unknown setting" for k in unknown})
        for name in ("max_new_tokens", "batch_size", "seed", "no_repeat_ngram_size"):
            if isinstance(data.get(name), float) and data[name].is_integer():
                data[name] = int(data[name])
        if isinstance(data.get("stop"), str):
            data["stop"] = (data["stop"],)
        elif data.get("stop") is None:
            data.pop("stop", None)
        return cls(**{k: v for k, v in data.items() if v is not None or k == "seed"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # What keeps a small model from looping: set where a variant is made, kept
    # with it, and applied wherever it answers (evals, /v1) unless overridden.
    GUARD_RAILS: ClassVar[tuple[str, ...]] = ("repetition_penalty", "no_repeat_ngram_size", "stop")

    def guard_rails(self) -> dict[str, Any]:
        """The guard-rail settings that differ from the defaults, as JSON."""
        default = GenerationSettings()
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v
                for name in self.GUARD_RAILS if getattr(self, name) != getattr(default, name)}


def _stop_error(stop: Any) -> str | None:
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        return f"must be a list of non-empty strings, got {stop!r}"
    if len(stop) > GenerationSettings.MAX_STOP_STRINGS:
        return f"at most {GenerationSettings.MAX_STOP_STRINGS} stop strings, got {len(stop)}"
    return None


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft PeftModel around one
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: tuple[int, ...]

    @property
    def has_adapter(self) -> bool:
        """Whether an unmerged peft adapter is attached (a merged one is part
        of the weights and cannot be switched off)."""
        peft = sys.modules.get("peft")  # no PeftModel can exist unless peft was imported
        return peft is not None and isinstance(self.model, peft.PeftModel)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside the block the base model answers alone (the eval arms floor
        and teacher), through peft's `disable_adapter`; a no-op without an adapter."""
        if not self.has_adapter:
            yield
            return
        with self.model.disable_adapter():
            yield


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens, counting the stop token when there is one
    finish_reason: FinishReason
    seconds: float  # wall time of the batch that produced it


def pick_device(prefer: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device to run on and its dtype: CUDA with bf16 (fp16 where bf16 is
    unsupported), else MPS, else CPU in float32. `prefer` ("cuda", "cuda:1",
    "mps", "cpu") forces a device and fails if it is unavailable."""
    import torch

    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {prefer!r} was asked for but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {prefer!r} was asked for but MPS is not available")
        if device.type not in ("cuda", "mps", "cpu"):
            raise ModelLoadError(f"unsupported device {prefer!r}: use cuda, mps or cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # float32 on MPS: bf16 support there depends on the OS version.
    return device, torch.float32


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant
    message (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), if any."""
    marker = "WORKBENCH-END-OF-TURN-PROBE"
    try:
        text = render(
            tokenizer,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            add_generation_prompt=False,
        )
    except Exception:  # a template without assistant turns: nothing to derive
        return None
    if marker not in text:
        return None
    tail = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    if not tail:
        return None
    first = int(tail[0])
    added = tokenizer.added_tokens_decoder.get(first)
    if first in tokenizer.all_special_ids or (added is not None and added.special):
        return first
    return None


def _stop_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id, _end_of_turn_id(tokenizer)]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for token_id in candidates:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ModelLoadError("the tokenizer has no end-of-sequence token and the chat template no end-of-turn token")
    return tuple(ids)


def load_model(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = False,
) -> LoadedModel:
    """Load a safetensors causal LM and its tokenizer, optionally with a peft
    adapter (merged into the weights when `merge`). Never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{model_dir} is not a model directory (config.json and *.safetensors weights)")
    picked_device, picked_dtype = pick_device(None if device is None else str(device))
    dtype = dtype or picked_dtype

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(picked_device)
    stop_ids = _stop_token_ids(tokenizer, model)
    # Only GenerationSettings decide how we sample: drop the checkpoint's own
    # sampling defaults (top_k, repetition_penalty...) so every model behaves alike.
    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id,
        eos_token_id=list(stop_ids),
        pad_token_id=model.generation_config.pad_token_id,
    )

    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{adapter_dir} has no adapter_model.safetensors (only safetensors adapters load)")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    model.eval()

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, device=picked_device, dtype=dtype, stop_token_ids=stop_ids)


def encode(tokenizer: Any, messages: Sequence[Message], system_prompt: str | None,
           opening: str | None = None) -> list[int]:
    """Token ids of the rendered prompt, exactly as `generate` feeds them;
    with `opening`, the assistant's answer already begins with that text."""
    # The template writes any BOS itself, so the tokenizer must not add one.
    text = render(tokenizer, messages, system_prompt, add_generation_prompt=True) + (opening or "")
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def count_tokens(tokenizer: Any, messages: Sequence[Message], system_prompt: str | None) -> int:
    """Tokens of the rendered prompt, exactly as `generate` feeds it."""
    return len(encode(tokenizer, messages, system_prompt))


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    # Every row keeps at least one token of its own, so generate has a suffix to prefill.
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


class CompletionNoRepeatNGram:
    """Bans any n-gram the completion already holds (from `start`, where the
    prompt ends): small models loop, greedy ones most of all. Unlike
    transformers' no_repeat_ngram_size, the prompt's n-grams stay allowed,
    so an answer may still say what the system prompt or the question says."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = self.n
        generated = input_ids[:, self.start:].tolist()
        if not generated or len(generated[0]) < n:
            return scores
        for row, tokens in enumerate(generated):
            tail = tokens[len(tokens) - n + 1:]
            banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == tail]
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


def generation_config(loaded: LoadedModel, settings: GenerationSettings) -> Any:
    """The transformers GenerationConfig for these settings: the one used by
    teacher generation, evals and the serving engine alike. Stop strings and
    per-row limits are not in it: `RowStops` applies them."""
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    extra: dict[str, Any] = {}
    if settings.repetition_penalty != 1.0:
        extra["repetition_penalty"] = float(settings.repetition_penalty)
    # no_repeat_ngram_size is applied by `completion_processors`, not here: transformers'
    # own bans every n-gram of the prompt too (a sign-off the system prompt spells out).
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        # Unset fields fall back to transformers' defaults (top_k=50): switch it off.
        **({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} if sample else {}),
        **extra,
        eos_token_id=list(loaded.stop_token_ids),
        pad_token_id=loaded.tokenizer.pad_token_id,
        # Compiling would recompile for every batch shape.
        disable_compile=True,
    )


_generation_config = generation_config


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

    def __init__(self, loaded: LoadedModel, max_tokens: Sequence[int], stop: Sequence[str] = (),
                 live: bool = False) -> None:
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
        piece = row.text[row.emitted:end]
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
        return Completion(text=row.text, prompt_tokens=prompt_tokens, completion_tokens=len(row.tokens),
                          finish_reason=row.finish_reason, seconds=seconds)

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


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated ids as text. A NUL (a byte-level token a small model may
    emit) becomes U+FFFD: PostgreSQL cannot store it in text or JSON."""
    return str(tokenizer.decode(ids, skip_special_tokens=True)).replace("\x00", "\ufffd")


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
    opening: str | None = None,
) -> list[Completion]:
    """Answer every conversation (the assistant's next turn), in input order.

    `system_prompt` replaces any system message in the conversations; None
    means no system message (see `engines.chat`). `progress` gets a Progress
    (unit "conversations") after each batch; `should_stop()` is checked
    before each batch and raises GenerationCancelled. With `opening`, every
    answer starts with that text (prefilled) and the model continues it."""
    settings = settings or GenerationSettings()
    batch_size = settings.batch_size
    started = time.monotonic()
    total = len(conversations)
    if total == 0:
        return []
    tokenizer = loaded.tokenizer
    rows = [encode(tokenizer, conv, system_prompt, opening) for conv in conversations]
    # Longest first: similar lengths share a batch (less padding), and an
    # out-of-memory error comes at once rather than at the end.
    order = sorted(range(total), key=lambda i: -len(rows[i]))
    gen_config = generation_config(loaded, settings)
    pad_id = int(tokenizer.pad_token_id)
    results: list[Completion | None] = [None] * total
    import torch

    if settings.seed is not None:
        torch.manual_seed(settings.seed)

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
            batch = order[start:start + batch_size]
            suffixes = [rows[i][prefix_len:] for i in batch]
            width = max(len(s) for s in suffixes)
            # [prefix | pad | suffix] with mask [1 | 0 | 1]: generate derives
            # positions from the mask's cumulative sum, so they match plain left padding.
            input_ids = torch.full((len(batch), prefix_len + width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            if prefix_len:
                input_ids[:, :prefix_len] = torch.tensor(rows[batch[0]][:prefix_len])
                mask[:, :prefix_len] = 1
            for row, suffix in enumerate(suffixes):
                input_ids[row, input_ids.shape[1] - len(suffix):] = torch.tensor(suffix)
                mask[row, input_ids.shape[1] - len(suffix):] = 1
            kwargs: dict[str, Any] = {}
            rows_stops = None
            if settings.stop:
                rows_stops = RowStops(loaded, [settings.max_new_tokens] * len(batch), settings.stop)
                kwargs["stopping_criteria"] = rows_stops.stopping_criteria()
            if prefix_kv is not None:
                max_len = input_ids.shape[1] + settings.max_new_tokens
                kwargs["cache"] = _cache_for_batch(loaded, prefix_kv, len(batch), max_len)
            out = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                generation_config=gen_config,
                logits_processor=completion_processors(settings, input_ids.shape[1]),
                **kwargs,
            )
            new = out[:, input_ids.shape[1]:].tolist()
            seconds = time.perf_counter() - began
            if rows_stops is not None:
                rows_stops.finish()
            for row, i in enumerate(batch):
                results[i] = (_finish(loaded, new[row], len(rows[i]), seconds) if rows_stops is None
                              else rows_stops.completion(row, len(rows[i]), seconds))
            done += len(batch)
            if progress is not None:
                progress(Progress.since(started, done, total, "conversations"))

    done_results = [r for r in results if r is not None]
    if opening:
        done_results = [dataclasses.replace(r, text=opening + r.text) for r in done_results]
    return done_results


def generate_samples(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings,
    samples: int,
    opening: str | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[list[Completion]]:
    """`samples` answers to each conversation (best-of-N). The copies of a
    conversation sit side by side in the same batches, so they share the
    encoded prompt prefix and each generate call."""
    if samples < 1:
        raise SettingsError({"samples": f"must be at least 1, got {samples}"})
    expanded = [conv for conv in conversations for _ in range(samples)]
    # N samples of a query ride in one batch N times as wide: a decode step of
    # a wider batch costs far less than N steps (at most 64 rows: KV memory).
    wide = dataclasses.replace(settings, batch_size=max(settings.batch_size,
                                                        min(settings.batch_size * samples, 64)))
    flat = generate(loaded, expanded, system_prompt, wide, progress=progress, should_stop=should_stop,
                    opening=opening)
    return [flat[i:i + samples] for i in range(0, len(flat), samples)]
