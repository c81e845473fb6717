"""GenerationSettings and the one table of generation bounds.

Teacher jobs, the absorb form and command, evals, remote generation, the hf
engine and the /v1 gateway all check generation values here, so a value one
of them refuses is refused by all (the gateway adds only policy: its caps)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engines.protocol import OpenAIError

# torch.manual_seed and vLLM take a 64-bit seed; 2**70 overflowed inside the engine.
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 1000  # each stop string is searched for in every step's text
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# OpenAI's defaults where a body leaves a field out (GenerationSettings' own default is greedy).
OPENAI_DEFAULT_MAX_TOKENS = 256  # vLLM's own default is "until the context is full"
OPENAI_DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Bound:
    """One numeric field: its GenerationSettings name (None for n, which is
    not a setting), its OpenAI parameter, its range and whether it is whole."""

    setting: str | None
    param: str
    low: float
    high: float
    whole: bool
    low_open: bool = False  # the low end itself is refused (top_p > 0)
    meaning: str = ""

    def error(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {'a whole number' if self.whole else 'a number'}, got {value!r}"
        if self.whole and not (isinstance(value, int) or value.is_integer()):
            return f"must be a whole number, got {value!r}"
        if (
            not math.isfinite(value)
            or value > self.high
            or value < self.low
            or (self.low_open and value == self.low)
        ):
            return f"must be {self.range()}{self.meaning}, got {value!r}"
        return None

    def range(self) -> str:
        low, high = (int(self.low), int(self.high)) if self.whole else (self.low, self.high)
        if self.low_open:
            return f"greater than {low:g} and at most {high:g}"
        return f"between {low} and {high}" if self.whole else f"between {low:g} and {high:g}"


# The one table: every numeric bound on generation, by field.
BOUNDS: tuple[Bound, ...] = (
    Bound("max_new_tokens", "max_tokens", 1, 4096, whole=True),
    Bound("temperature", "temperature", 0, 2, whole=False, meaning=" (0 means greedy)"),
    Bound("top_p", "top_p", 0, 1, whole=False, low_open=True),
    Bound("seed", "seed", SEED_RANGE[0], SEED_RANGE[1], whole=True, meaning=" (a 64-bit integer)"),
    Bound("batch_size", "batch_size", 1, 256, whole=True),
    Bound(
        "repetition_penalty",
        "repetition_penalty",
        0,
        10,
        whole=False,
        low_open=True,
        meaning=" (1 means none)",
    ),
    Bound("no_repeat_ngram_size", "no_repeat_ngram_size", 0, 64, whole=True, meaning=" (0 means none)"),
    # OpenAI's penalties, on the completion's own tokens: count x frequency + presence.
    Bound("frequency_penalty", "frequency_penalty", -2, 2, whole=False),
    Bound("presence_penalty", "presence_penalty", -2, 2, whole=False),
    # vLLM's extras. top_k -1 is vLLM's "off", kept as 0.
    Bound("top_k", "top_k", -1, 1_000_000, whole=True, meaning=" (0 or -1 means off)"),
    Bound("min_p", "min_p", 0, 1, whole=False, meaning=" (0 means off)"),
    Bound("min_tokens", "min_tokens", 0, 4096, whole=True),
    Bound(None, "n", 1, 16, whole=True),
    Bound(None, "top_logprobs", 0, MAX_TOP_LOGPROBS, whole=True),
)
BY_SETTING = {b.setting: b for b in BOUNDS if b.setting is not None}
BY_PARAM = {b.param: b for b in BOUNDS}
# The OpenAI body fields a GenerationSettings is built from (batch_size is not one: it is ours).
OPENAI_PARAMS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "min_p",
    "min_tokens",
    "ignore_eos",
    "logit_bias",
)


class SettingsError(ValueError):
    """Invalid GenerationSettings. `errors` maps each bad field to what is wrong."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("Invalid generation settings: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


def stop_error(stop: Any) -> str | None:
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        return f"must be a list of non-empty strings, got {stop!r}"
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        return f"each stop string has at most {MAX_STOP_CHARS} characters"
    return None


def logit_bias_error(bias: Any) -> str | None:
    if not isinstance(bias, Mapping | list | tuple):
        return f"must be an object mapping token ids to numbers, got {bias!r}"
    pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        return f"holds {len(pairs)} entries, at most {MAX_LOGIT_BIAS}"
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            return f"must be an object mapping token ids to numbers, got {bias!r}"
        key, value = pair
        if isinstance(key, bool) or not (
            (isinstance(key, int) and key >= 0) or (isinstance(key, str) and key.isdigit() and len(key) < 10)
        ):
            return f"keys must be token ids (whole numbers from 0), got {key!r}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            return f"values must be numbers between -100 and 100, got {value!r} for token {key}"
    return None


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """A checked logit_bias as sorted (token id, bias) pairs: one hashable form
    whether it came as OpenAI's {"id": bias} or as pairs."""
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    return tuple(sorted((int(k), float(v)) for k, v in pairs))


def openai_n(body: Mapping[str, Any]) -> int:
    """The body's n (1 when absent), bounded by the table."""
    value = body.get("n")
    if value is None:
        return 1
    problem = BY_PARAM["n"].error(value)
    if problem:
        raise OpenAIError(400, f"n {problem}.", param="n")
    return int(value)


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate, and the one place that owns the defaults and bounds:
    teacher jobs, the absorb form and command, evals and serving all start from it."""

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
    # OpenAI's penalties on the completion's tokens (0 means none) and logit_bias
    # as (token id, bias) pairs; vLLM's top_k (0 off), min_p (0 off), min_tokens
    # (no end-of-sequence before) and ignore_eos (only max_tokens or a stop string ends).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # OpenAI's response_format as canonical JSON text (hashable; `response_format_json`
    # makes it): the answer is decoded under its grammar (engines.inference.grammar),
    # in process and on a remote engine alike. None: free text.
    response_format: str | None = None

    MAX_STOP_STRINGS: ClassVar[int] = MAX_STOP_STRINGS

    def __post_init__(self) -> None:
        errors: dict[str, str] = {}
        for name, bound in BY_SETTING.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            problem: str | None = f"must be a whole number, got {value!r}"
            if not (bound.whole and isinstance(value, float)):  # 2.0 is no int in a Python setting
                problem = bound.error(value)
            if problem:
                errors[name] = problem
        stop_problem = stop_error(self.stop)
        if stop_problem:
            errors["stop"] = stop_problem
        else:  # a list given in Python is kept as a tuple, so settings stay hashable
            object.__setattr__(self, "stop", tuple(self.stop))
        bias_problem = logit_bias_error(self.logit_bias)
        if bias_problem:
            errors["logit_bias"] = bias_problem
        else:
            object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if not isinstance(self.ignore_eos, bool):
            errors["ignore_eos"] = f"must be true or false, got {self.ignore_eos!r}"
        if self.top_k == -1:  # vLLM's "off"
            object.__setattr__(self, "top_k", 0)
        if self.response_format is not None:
            format_problem = response_format_error(self.response_format)
            if format_problem:
                errors["response_format"] = format_problem
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
        for name in ("max_new_tokens", "batch_size", "seed", "no_repeat_ngram_size", "top_k", "min_tokens"):
            if isinstance(data.get(name), float) and data[name].is_integer():
                data[name] = int(data[name])
        if isinstance(data.get("response_format"), dict):
            data["response_format"] = response_format_json(data["response_format"])
        if isinstance(data.get("stop"), str):
            data["stop"] = (data["stop"],)
        elif data.get("stop") is None:
            data.pop("stop", None)
        return cls(**{k: v for k, v in data.items() if v is not None or k == "seed"})

    @classmethod
    def from_openai(
        cls, body: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> GenerationSettings:
        """From an OpenAI chat-completions body: max_tokens (or
        max_completion_tokens), temperature, top_p, seed, stop and the extra
        repetition_penalty and no_repeat_ngram_size; other fields are ignored,
        n is checked against the same table. Fields left out take `defaults`
        (OpenAI-named, e.g. a variant's guard rails), then OpenAI's defaults.
        Raises OpenAIError(400) naming the first bad OpenAI parameter."""
        given = {
            **(defaults or {}),
            **{k: v for k, v in body.items() if k in OPENAI_PARAMS and v is not None},
        }
        openai_n(body)
        # OpenAI deprecated max_tokens for max_completion_tokens: when both are sent, the newer wins.
        tokens_param = (
            "max_completion_tokens" if given.get("max_completion_tokens") is not None else "max_tokens"
        )
        params = {"max_new_tokens": tokens_param}
        values: dict[str, Any] = {
            "max_new_tokens": OPENAI_DEFAULT_MAX_TOKENS,
            "temperature": OPENAI_DEFAULT_TEMPERATURE,
        }
        for name, bound in BY_SETTING.items():
            param = params.get(name, bound.param)
            if name == "batch_size" or given.get(param) is None:
                continue
            value = given[param]
            problem = bound.error(value)
            if problem:
                raise OpenAIError(400, f"{param} {problem}.", param=param)
            values[name] = int(value) if bound.whole else float(value)
        stop = given.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            problem = stop_error(stop)
            if problem:
                raise OpenAIError(
                    400,
                    f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty "
                    f"strings of at most {MAX_STOP_CHARS} characters ({problem}).",
                    param="stop",
                )
            values["stop"] = tuple(stop)
        bias = given.get("logit_bias")
        if bias is not None:
            problem = logit_bias_error(bias)
            if problem:
                raise OpenAIError(400, f"logit_bias {problem}.", param="logit_bias")
            values["logit_bias"] = _logit_bias(bias)
        ignore_eos = given.get("ignore_eos")
        if ignore_eos is not None:
            if not isinstance(ignore_eos, bool):
                raise OpenAIError(
                    400, f"ignore_eos must be true or false, got {ignore_eos!r}.", param="ignore_eos"
                )
            values["ignore_eos"] = ignore_eos
        return cls(**values)

    def to_openai(self, params: Iterable[str] | None = None) -> dict[str, Any]:
        """The OpenAI body fields for these settings: max_tokens, temperature,
        top_p, and seed and the extras only where they change something. With
        `params` (OpenAI names), exactly those fields, defaults included (a
        request's repetition_penalty 1 overrides a variant's guard rail); an
        empty stop is never sent."""
        every: dict[str, Any] = {
            "max_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "seed": self.seed,
            "repetition_penalty": float(
                self.repetition_penalty
            ),  # a vLLM extra parameter, the hf engine's too
            "no_repeat_ngram_size": self.no_repeat_ngram_size,  # the hf engine's; vLLM ignores it
            "stop": list(self.stop),
            "frequency_penalty": float(self.frequency_penalty),
            "presence_penalty": float(self.presence_penalty),
            "logit_bias": {str(k): v for k, v in self.logit_bias},
            "top_k": self.top_k,
            "min_p": float(self.min_p),
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "response_format": json.loads(self.response_format) if self.response_format else None,
        }
        if params is None:
            unset: dict[str, Any] = {
                "seed": None,
                "repetition_penalty": 1.0,
                "no_repeat_ngram_size": 0,
                "frequency_penalty": 0.0,
                "presence_penalty": 0.0,
                "logit_bias": {},
                "top_k": 0,
                "min_p": 0.0,
                "min_tokens": 0,
                "ignore_eos": False,
                "response_format": None,
            }
            return {k: v for k, v in every.items() if v != [] and (k not in unset or v != unset[k])}
        wanted = {"max_tokens" if p == "max_completion_tokens" else p for p in params}
        return {k: v for k, v in every.items() if k in wanted and v is not None and v != []}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def grammar(self) -> str | None:
        """The llguidance grammar of `response_format` (None for free text)."""
        if not self.response_format:
            return None
        from engines.inference.grammar import grammar_for

        return grammar_for(json.loads(self.response_format))

    # What keeps a small model from looping: set where a variant is made, kept
    # with it, and applied wherever it answers (evals, /v1) unless overridden.
    GUARD_RAILS: ClassVar[tuple[str, ...]] = ("repetition_penalty", "no_repeat_ngram_size", "stop")

    def guard_rails(self) -> dict[str, Any]:
        """The guard-rail settings that differ from the defaults, as JSON."""
        default = GenerationSettings()
        return {
            name: list(v) if isinstance(v := getattr(self, name), tuple) else v
            for name in self.GUARD_RAILS
            if getattr(self, name) != getattr(default, name)
        }


def response_format_json(response_format: Mapping[str, Any]) -> str:
    """The canonical JSON text of a response_format, for GenerationSettings."""
    return json.dumps(response_format, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def response_format_error(text: Any) -> str | None:
    """Why `text` is no usable response_format for GenerationSettings, or None."""
    if not isinstance(text, str):
        return f"must be a response_format object as JSON text, got {type(text).__name__}"
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"is not JSON: {e}"
    from engines.inference.grammar import grammar_for

    try:
        grammar_for(value)
    except OpenAIError as e:
        return e.message
    return None
