"""OpenAI's response_format as constrained decoding, with llguidance (vLLM's
"guidance" backend).

    grammar = grammar_for(body.get("response_format"))       # None for text; OpenAIError 400 if bad
    row = constraint(tokenizer, grammar, stop_ids, vocab_size)  # one per generated row
    apply(scores, [(r, row), ...])                           # every step, before picking tokens
    row.accept(token)                                        # the token the row picked

The grammar is a string (llguidance's JSON grammar format), so a request can
carry it to the batcher. Bounds: the schema's size and nesting are checked
before llguidance sees it, and llguidance's own limits (LIMITS) bound the
work of compiling and of every step, so a hostile schema costs milliseconds.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engines.protocol import OpenAIError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from llguidance import LLMatcher, LLParserLimits, LLTokenizer

PARAM = "response_format"
KINDS = ("text", "json_object", "json_schema")
KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
SPEC_KEYS = {"name", "description", "schema", "strict"}
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
MAX_SCHEMA_BYTES = 64 * 1024  # the schema as compact JSON, UTF-8
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in the schema's own JSON
# Between two JSON tokens at most one space, as OpenAI's own JSON reads: llguidance's
# default is unbounded, and a small model spends its max_tokens on newlines or loops on them.
WHITESPACE = r"[\x20]?"
ANY_OBJECT = '{"type":"object"}'
MATCHERS_PER_TOKENIZER = 32  # compiled grammars kept per tokenizer (LRU)
MAX_MESSAGE = 300  # llguidance's words quoted back to the client

# llguidance's parser limits (its speeds from its docs): compiling and each
# step stay in the tens of milliseconds, the lexer's memory ~100-200 MB at worst.
LIMITS: dict[str, Any] = {
    "max_items_in_row": 2000,
    "initial_lexer_fuel": 1_000_000,  # ~20 ms building the lexer's regexes
    "step_lexer_fuel": 200_000,  # ~15 ms per token
    "step_max_items": 50_000,  # ~2.5 ms of Earley items per token
    "max_lexer_states": 100_000,  # ~1-2 kB each
    "max_grammar_size": 200_000,  # symbols in the compiled grammar
    "verbose_errors": False,  # no parser dump in the messages clients read
}


def _bad(message: str) -> OpenAIError:
    return OpenAIError(400, message, param=PARAM)


def _shown(value: object) -> str:
    try:
        return json.dumps(value)[:50]
    except (TypeError, ValueError):
        return type(value).__name__


@lru_cache(maxsize=1)
def _limits() -> LLParserLimits:
    from llguidance import LLParserLimits

    return LLParserLimits(**LIMITS)


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar for an OpenAI response_format value, or None
    when it is absent or {"type": "text"}. Every bad shape, and a schema too
    big, too deep or not followable, raises OpenAIError(400, param="response_format").

    `strict: true` refuses JSON-schema keywords llguidance cannot enforce
    (uniqueItems, unknown formats...); otherwise they are ignored, as OpenAI's
    non-strict mode does not promise them either."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _bad(
            'response_format must be an object: {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, '
            f"not {_shown(response_format)}."
        )
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad(f"response_format.type must be one of {', '.join(KINDS)}, not {_shown(kind)}.")
    _only(response_format, KEYS[kind], "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile(ANY_OBJECT, strict=True)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(
            'response_format.json_schema must be an object with a name and a schema: {"name": ..., "schema": {...}}.'
        )
    _only(spec, SPEC_KEYS, "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _bad(
            "response_format.json_schema.name must be 1-64 letters, digits, underscores or dashes, "
            f"not {_shown(name)}."
        )
    if not isinstance(spec.get("description"), str | None):
        raise _bad("response_format.json_schema.description must be a string.")
    strict = spec.get("strict")
    if not isinstance(strict, bool | None):
        raise _bad(f"response_format.json_schema.strict must be true or false, not {_shown(strict)}.")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _bad(f"response_format.json_schema.schema must be a JSON schema object, not {_shown(schema)}.")
    return _compile(_schema_text(schema), strict=bool(strict))


def _only(value: dict[str, Any], allowed: set[str], where: str) -> None:
    # A misplaced key (say {"type": "json_object", "schema": ...}) would otherwise be silently unenforced.
    extra = sorted(str(k) for k in value if k not in allowed)
    if extra:
        raise _bad(f"{where} has unknown field {extra[0]!r}; it takes {', '.join(sorted(allowed))}.")


def _schema_text(schema: dict[str, Any]) -> str:
    """The schema as compact JSON, its depth and size checked first. The
    top-level "x-guidance" (llguidance's own options) is dropped: those are ours."""
    _check_depth(schema)
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _bad(f"response_format.json_schema.schema is not plain JSON: {e}.") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise _bad(
            f"response_format.json_schema.schema is {size} bytes as JSON; the limit is {MAX_SCHEMA_BYTES}."
        )
    return text


def _check_depth(schema: dict[str, Any]) -> None:
    # Iterative, and it stops early: more nodes than the byte limit is over the size limit anyway.
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise _bad(
                f"response_format.json_schema.schema nests more than {MAX_SCHEMA_DEPTH} levels deep "
                f"(the limit is {MAX_SCHEMA_DEPTH})."
            )
        if nodes > MAX_SCHEMA_BYTES:
            raise _bad(f"response_format.json_schema.schema is larger than {MAX_SCHEMA_BYTES} bytes as JSON.")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


@lru_cache(maxsize=64)
def _compile(schema_text: str, strict: bool) -> str:
    from llguidance import LLMatcher

    options: dict[str, Any] = {"whitespace_pattern": WHITESPACE, "lenient": not strict}
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_text, overrides=options)  # type: ignore[arg-type]
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_limits())
    except Exception as e:  # whatever llguidance raises on a client's schema is the client's 400
        is_error, messages = True, [str(e)]
    if is_error:
        reason = (messages[0] if messages else "unknown error").strip()[:MAX_MESSAGE]
        raise _bad(f"response_format.json_schema.schema cannot be followed: {reason}")
    return grammar


class RowConstraint:
    """One row's grammar state: `apply` masks its scores, `accept` advances it."""

    __slots__ = ("_matcher", "eos_ids", "vocab_size")

    def __init__(self, matcher: LLMatcher, eos_ids: tuple[int, ...], vocab_size: int) -> None:
        self._matcher = matcher
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size  # the mask's width: the tokenizer's, or the model's if wider

    def accept(self, token_id: int) -> None:
        """Consume the token the engine picked. A token the grammar forbids is
        the engine's bug (apply never allows one) and raises ValueError."""
        matcher = self._matcher
        if matcher.is_error():
            # The mask of a failed matcher allows only eos: the row ends and `error` says why.
            if token_id in self.eos_ids:
                return
        elif matcher.consume_token(token_id):
            return
        raise ValueError(f"token {token_id} breaks the response_format grammar: {matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete (or failed): only end-of-sequence may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        """Why the matcher failed mid-answer (a step limit), or "" when it did not."""
        return self._matcher.get_error() if self._matcher.is_error() else ""


class _Vocabulary:
    """One tokenizer's llguidance view and its compiled grammars (LRU)."""

    def __init__(self, lltokenizer: LLTokenizer) -> None:
        self.lltokenizer = lltokenizer
        self.matchers: OrderedDict[str, LLMatcher] = OrderedDict()


_lock = threading.Lock()
# Keyed by the tokenizer object itself: building an LLTokenizer takes ~0.6 s.
_vocabularies: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], int], _Vocabulary]] = (
    weakref.WeakKeyDictionary()
)


def _vocabulary(tokenizer: Any, eos_ids: tuple[int, ...], vocab_size: int) -> _Vocabulary:
    per_tokenizer = _vocabularies.setdefault(tokenizer, {})
    key = (eos_ids, vocab_size)
    found = per_tokenizer.get(key)
    if found is None:
        import llguidance.hf

        try:
            # The chat template's end token as llguidance's EOS: a finished grammar then allows (and forces) it.
            lltokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=max(vocab_size, len(tokenizer)), eos_token=list(eos_ids)
            )
        except ValueError as e:  # a slow (non-Rust) tokenizer
            raise _bad(f"response_format is not available for this model: {e}.") from None
        found = per_tokenizer[key] = _Vocabulary(lltokenizer)
    return found


def constraint(tokenizer: Any, grammar: str, eos_ids: Sequence[int], vocab_size: int) -> RowConstraint:
    """A fresh matcher for one row. `eos_ids`: the ids that end the row (the
    model's stop tokens); `vocab_size`: the model's logits width."""
    from llguidance import LLMatcher

    eos = tuple(int(i) for i in eos_ids)
    if not eos:
        raise ValueError("constraint needs at least one end-of-sequence id")
    with _lock:
        vocabulary = _vocabulary(tokenizer, eos, int(vocab_size))
        prototype = vocabulary.matchers.get(grammar)
        if prototype is None:
            prototype = LLMatcher(vocabulary.lltokenizer, grammar, log_level=0, limits=_limits())
            if prototype.is_error():
                reason = prototype.get_error().strip()[:MAX_MESSAGE]
                raise _bad(f"response_format cannot be followed with this model's tokenizer: {reason}")
            vocabulary.matchers[grammar] = prototype
            while len(vocabulary.matchers) > MATCHERS_PER_TOKENIZER:
                vocabulary.matchers.popitem(last=False)
        else:
            vocabulary.matchers.move_to_end(grammar)
        matcher = prototype.deep_copy()
    return RowConstraint(matcher, eos, vocabulary.lltokenizer.vocab_size)


def apply(scores: torch.Tensor, rows: Sequence[tuple[int, RowConstraint]]) -> None:
    """Set, in place, row r of `scores` (batch x the model's vocab) to -inf on
    every token its grammar forbids; a finished grammar leaves only its eos
    ids. The grammar outranks the processors before it: a row they left with
    no allowed token gets the grammar's tokens back (all equal)."""
    if not rows:
        return
    import torch

    # llguidance.numpy, not llguidance.torch: that one imports torch._dynamo (1.6 s, a
    # DeprecationWarning) for a torch.compile'd apply that takes ~20 s to compile on CPU.
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    width = rows[0][1].vocab_size
    if any(c.vocab_size != width for _, c in rows):
        raise ValueError("apply: every row of one batch must share one tokenizer")
    bitmask = allocate_token_bitmask(len(rows), width)
    for i, (_, row) in enumerate(rows):
        fill_next_token_bitmask(row._matcher, bitmask, i)
    allowed = _unpack(bitmask, scores.shape[1], scores.device)
    order = [r for r, _ in rows]
    whole = order == list(range(scores.shape[0]))  # the usual case: no copies
    index = None if whole else torch.tensor(order, device=scores.device)
    masked = scores if index is None else scores.index_select(0, index)
    masked.masked_fill_(~allowed, -float("inf"))
    dead = masked.amax(dim=1) == -float("inf")
    if bool(dead.any()):
        masked[dead] = torch.zeros_like(masked[dead]).masked_fill_(~allowed[dead], -float("inf"))
    if index is not None:
        scores.index_copy_(0, index, masked)


def _unpack(bitmask: np.ndarray, width: int, device: torch.device) -> torch.Tensor:
    """rows x words int32 bits (token 32w+j is bit j of word w) -> rows x width bool on `device`."""
    import numpy as np
    import torch

    if device.type == "cpu" and sys.byteorder == "little":
        # 6x faster than torch's shifts on CPU (0.09 vs 0.6 ms for 16 x 49152).
        bits = torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")).view(
            torch.bool
        )
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        words = torch.from_numpy(bitmask).to(device)
        bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    # Logits past the tokenizer's tokens (padding rows of the embedding) are never allowed.
    pad = torch.zeros(bits.shape[0], width - bits.shape[1], dtype=torch.bool, device=device)
    return torch.cat([bits, pad], dim=1)
