"""The model holder and dynamic batcher behind the `hf` engine server
(engines/engine_server.py holds the HTTP layer; the protocol is the
OpenAI-compatible subset that vLLM's server speaks).

- Base models are loaded once by name with `engines.inference.load_model`;
  each is wrapped in one peft PeftModel that holds every LoRA adapter loaded
  over it, and a batch may mix adapters and the bare base: peft's
  `generate(..., adapter_names=[...])` applies each row's own adapter.
- Requests wait in one queue, taken round-robin by project (the `project`
  of each request; None is a project of its own), so a flood of one project
  cannot starve another's small request; no project may hold more than
  `max_queue_per_project` waiting rows. One background thread (the batcher) runs every
  `generate`: the requests that arrive within `batch_window_ms` of each
  other while the engine is idle (up to WINDOW_CAP windows after the first),
  plus everything that queued while a generate ran, share a call
  when they use the same base and the same sampling settings (up to
  `max_batch` rows). On a 2-core CPU one generate at batch 16 gives 6-11x the
  tokens/s of 16 requests one by one, so batching is where the speed is.
- Prompts are rendered with `engines.inference.encode` and the generation
  config comes from `engines.inference.generation_config`, exactly as
  teacher generation and evals do (template parity).

Seeds: a request with a seed sets torch's generator before its generate
call, so it gets the same answer again for the same batch composition. Rows
sampled in one batch share that generator, so a seeded request that shares
a call with other requests can sample differently than alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engines.chat import Message
from engines.inference import (
    GenerationSettings,
    LoadedModel,
    ModelLoadError,
    RowStops,
    SettingsError,
    completion_processors,
    encode,
    generation_config,
    load_model,
)

log = logging.getLogger(__name__)

BASE_ROW = "__base__"  # peft's name for "no adapter" in adapter_names
MAX_N = 16
# An idle engine waits for more requests while they keep coming, at most this many batch windows.
WINDOW_CAP = 10
ROLES = ("system", "user", "assistant")
# torch.manual_seed and vLLM take a 64-bit seed; a larger one overflowed inside generate (a 500).
SEED_RANGE = (-(2**63), 2**63 - 1)
# The request fields that map onto GenerationSettings fields of another name.
PARAM_OF_SETTING = {"max_new_tokens": "max_tokens"}


class EngineError(Exception):
    """An error the client caused or must hear about, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> EngineError:
    return EngineError(400, message, param=param)


def model_not_found(name: str) -> EngineError:
    return EngineError(404, f"The model {name!r} does not exist or is not loaded.", param="model",
                       code="model_not_found")


def unavailable(message: str) -> EngineError:
    return EngineError(503, message, type_="service_unavailable", code="unavailable")


# --- requests -------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]  # system messages included, as the client sent them
    settings: GenerationSettings  # max_new_tokens is the request's max_tokens
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    # vLLM's continue_final_message: the answer already begins with this text
    # (the final assistant message) and the model continues it.
    opening: str | None = None
    project: str | None = None  # the fairness bucket (None: requests that name none)

    @property
    def system_prompt(self) -> str | None:
        system = [m["content"] for m in self.messages if m["role"] == "system"]
        return "\n\n".join(system) if system else None

    def batch_key(self, base: str) -> tuple[Any, ...]:
        """Requests with equal keys can share one generate call (adapters may differ)."""
        s = self.settings
        if s.temperature == 0:  # greedy: top_p and seed do not matter
            return (base, 0.0, 1.0, None, s.repetition_penalty, s.no_repeat_ngram_size, s.stop)
        return (base, s.temperature, s.top_p, s.seed, s.repetition_penalty, s.no_repeat_ngram_size, s.stop)


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    # OpenAI's list of content parts: only text parts are understood here.
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise bad_request(f"messages[{index}].content must be a string (or a list of text parts)", "messages")


def parse_messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content", "messages")
        if m.get("role") not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                              "messages")
        messages.append({"role": str(m["role"]), "content": _content(m.get("content"), i)})
    return tuple(messages)


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"{name} must be a whole number from {low} to {high}, got {value!r}", name)
    return value


def parse_chat_request(body: Any, project: str | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; unknown fields are ignored. Raises
    EngineError 400 naming the bad field in `param`. `project` is the queue's
    fairness bucket."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a model name from /v1/models)", "model")
    messages = parse_messages(body.get("messages"))
    n = _whole(1 if body.get("n") is None else body["n"], "n", 1, MAX_N)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request(f"seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed}", "seed")
    stop = body.get("stop")
    values = {
        "max_new_tokens": 256 if max_tokens is None else max_tokens,
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "seed": body.get("seed"),
        "repetition_penalty": 1.0 if body.get("repetition_penalty") is None else body["repetition_penalty"],
        # An extra parameter (like vLLM's repetition_penalty): small models loop without one of the two.
        "no_repeat_ngram_size": 0 if body.get("no_repeat_ngram_size") is None else body["no_repeat_ngram_size"],
        "stop": () if stop is None else (stop,) if isinstance(stop, str) else stop,
    }
    if isinstance(values["stop"], list):
        values["stop"] = tuple(values["stop"])
    try:
        settings = GenerationSettings.from_dict(values)
    except SettingsError as exc:
        first = next(iter(exc.errors))
        detail = "; ".join(f"{PARAM_OF_SETTING.get(k, k)} {v}" for k, v in exc.errors.items())
        raise bad_request(detail, PARAM_OF_SETTING.get(first, first)) from exc
    opening = None
    continue_final = body.get("continue_final_message")
    if continue_final is not None and not isinstance(continue_final, bool):
        raise bad_request(f"continue_final_message must be true or false, got {continue_final!r}",
                          "continue_final_message")
    if continue_final:
        if messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message to continue", "messages")
        opening, messages = messages[-1]["content"], messages[:-1]
    return ChatRequest(model=model, messages=messages, settings=settings, n=n, stream=bool(stream),
                       include_usage=bool((options or {}).get("include_usage")), opening=opening,
                       project=project)


# --- tickets: one per request, what the HTTP thread waits on --------------------


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


@dataclass
class ChatResult:
    model: str
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


# Stream events: ("delta", index, text), ("finish", index, reason), ("end", None, None)
Event = tuple[str, int | None, Any]


class Ticket:
    """A submitted request: `result()` waits for the whole answer, `events()`
    yields its text as it is generated (when submitted with stream)."""

    _ids = itertools.count()

    def __init__(self, request: ChatRequest, base: str, adapter: str | None, prompt_ids: list[int]) -> None:
        self.seq = next(self._ids)
        self.request = request
        self.base = base
        self.adapter = adapter
        self.prompt_ids = prompt_ids
        self.choices: list[Choice | None] = [None] * request.n
        self.error: EngineError | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()

    @property
    def rows(self) -> int:
        return self.request.n

    def cancel(self) -> None:
        """The client went away: stop generating for it."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> ChatResult:
        if not self._done.wait(timeout):
            raise EngineError(504, "the engine did not answer in time", "timeout")
        if self.error is not None:
            raise self.error
        return ChatResult(self.request.model, [c for c in self.choices if c is not None], len(self.prompt_ids))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Deltas and finishes as they come, until the end; raises EngineError on failure."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise EngineError(504, "the engine did not answer in time", "timeout") from None
            if event[0] == "error":
                raise event[2]
            if event[0] == "end":
                return
            yield event

    def _delta(self, index: int, text: str) -> None:
        if self.request.stream and text:
            self._events.put(("delta", index, text))

    def _finish(self, choice: Choice) -> None:
        if self.choices[choice.index] is not None:
            return
        self.choices[choice.index] = choice
        if self.request.stream:
            self._events.put(("finish", choice.index, choice.finish_reason))
        if all(c is not None for c in self.choices):
            self._end()

    def _fail(self, error: EngineError) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._events.put(("error", None, error))
        self._done.set()

    def _end(self) -> None:
        self._events.put(("end", None, None))
        self._done.set()


# --- models ------------------------------------------------------------------


@dataclass
class _Base:
    name: str
    path: str
    loaded: LoadedModel
    created: int
    peft: Any = None  # the PeftModel around loaded.model once an adapter is loaded
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    adapter_created: dict[str, int] = field(default_factory=dict)

    @property
    def max_model_len(self) -> int:
        config = self.loaded.model.config
        return int(getattr(config, "max_position_embeddings", None) or self.loaded.tokenizer.model_max_length)


def resolve_dtype(name: str | None) -> Any:
    """"auto": bfloat16 on a CPU that supports it (generation measured 1.46x
    faster than float32 on this stack), else what pick_device gives."""
    import torch

    from engines.inference import pick_device

    if name in (None, "auto"):
        device, dtype = pick_device(None)
        if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return dtype
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(dtypes)}")
    return dtypes[name]


def _adapter_dir(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise EngineError(404, f"adapter path {path} does not exist", param="lora_path", code="not_found")
    if not (folder / "adapter_model.safetensors").is_file() or not (folder / "adapter_config.json").is_file():
        raise bad_request(f"{path} is not a LoRA adapter: it needs adapter_config.json and "
                          "adapter_model.safetensors (only safetensors adapters load)", "lora_path")
    return folder


def _check_adapter(model: Any, folder: Path) -> None:
    """Refuse, before touching the live model, an adapter that is not a plain
    LoRA or whose weights do not fit this base (peft would fail half-way)."""
    import json

    from safetensors import safe_open

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise bad_request(f"{folder}/adapter_config.json is not valid JSON: {exc}", "lora_path") from exc
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise bad_request(f"{folder} is not a plain LoRA adapter (peft_type {config.get('peft_type')!r}, "
                          f"use_dora {bool(config.get('use_dora'))})", "lora_path")
    modules = dict(model.named_modules())
    try:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
            for key in weights.keys():
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                name, part = key.split(".lora_A." if ".lora_A." in key else ".lora_B.")[0], key
                target = modules.get(name.removeprefix("base_model.model."))
                shape = weights.get_slice(key).get_shape()
                if target is None or not hasattr(target, "in_features"):
                    raise bad_request(f"adapter {folder} targets {name}, which this base model lacks", "lora_path")
                size = target.in_features if ".lora_A." in part else target.out_features
                if len(shape) != 2 or shape[1 if ".lora_A." in part else 0] != size:
                    raise bad_request(f"adapter {folder} does not fit this base model: {key} has shape "
                                      f"{list(shape)}", "lora_path")
    except EngineError:
        raise
    except Exception as exc:  # not a readable safetensors file
        raise bad_request(f"could not read {folder}/adapter_model.safetensors: {exc}", "lora_path") from exc


class ServingEngine:
    """Base models with their adapters, a request queue and the batcher thread."""

    def __init__(self, *, max_batch: int = 16, batch_window_ms: float = 25.0, max_queue: int = 256,
                 max_queue_per_project: int | None = None, dtype: str | None = "auto", device: str | None = None,
                 threads: int | None = None) -> None:
        self.max_batch = max_batch
        self.batch_window = batch_window_ms / 1000
        self.max_queue = max_queue
        # Half the queue by default: one project's flood leaves room for everyone else's requests.
        self.max_queue_per_project = max_queue_per_project or max(max_queue // 2, max_batch)
        self.dtype = resolve_dtype(dtype)
        self.device = device
        self.threads = threads
        self.generate_calls = 0  # generate calls made (tests and benchmarks read it)
        self.rows_generated = 0
        self._bases: dict[str, _Base] = {}
        self._loading: dict[str, str] = {}
        self._queue: list[Ticket] = []
        self._served: list[str | None] = []  # projects, least recently served first
        self._cond = threading.Condition()
        self._registry = threading.Lock()  # bases, adapters, loading
        self._model_lock = threading.Lock()  # held while a generate runs or an adapter (un)loads
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 60) -> None:
        """Refuse new requests (503), finish the accepted ones, stop the batcher."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- models

    def load_base(self, name: str, path: str | Path) -> bool:
        """Load a base model under `name`; False when it was already loaded from that path."""
        path = str(path)
        with self._registry:
            known = self._bases.get(name)
            if known is not None and known.path == path:
                return False
            if known is not None or self._loading.get(name, path) != path or self._adapter_base(name):
                raise bad_request(f"model name {name!r} is already in use", "model")
            if name in self._loading:
                raise unavailable(f"model {name!r} is still loading")
            self._loading[name] = path
        try:
            loaded = load_model(path, device=self.device, dtype=self.dtype)
        except ModelLoadError as exc:
            raise bad_request(str(exc), "path") from exc
        finally:
            with self._registry:
                self._loading.pop(name, None)
        with self._registry:
            self._bases[name] = _Base(name=name, path=path, loaded=loaded, created=int(time.time()))
        return True

    def _adapter_base(self, name: str) -> _Base | None:
        return next((b for b in self._bases.values() if name in b.adapters), None)

    def _pick_base(self, base_name: str | None) -> _Base:
        if base_name is not None:
            base = self._bases.get(base_name)
            if base is None:
                raise EngineError(404, f"base model {base_name!r} is not loaded", param="base_model_name",
                                  code="model_not_found")
            return base
        if len(self._bases) != 1:
            raise bad_request("several base models are loaded: name one in base_model_name"
                              if self._bases else "no base model is loaded", "base_model_name")
        return next(iter(self._bases.values()))

    def load_adapter(self, name: str, path: str | Path, base_name: str | None = None) -> bool:
        """Load a safetensors LoRA adapter over a loaded base; False when it
        was already loaded from that path. A failed load leaves nothing behind."""
        path = str(path)
        if not name or name == BASE_ROW:
            raise bad_request(f"invalid adapter name {name!r}", "lora_name")
        with self._registry:
            owner = self._adapter_base(name)
            if owner is not None:
                if owner.adapters[name] == path:
                    return False
                raise bad_request(f"adapter {name!r} is already loaded from {owner.adapters[name]}: unload it first",
                                  "lora_name")
            if name in self._bases or name in self._loading:
                raise bad_request(f"{name!r} is the name of a base model", "lora_name")
            base = self._pick_base(base_name)
        folder = _adapter_dir(path)
        _check_adapter(base.loaded.model, folder)
        with self._model_lock:
            try:
                self._attach(base, name, folder)
            except EngineError:
                raise
            except Exception as exc:  # a broken or mismatched adapter: peft says what
                self._detach(base, name)
                raise bad_request(f"could not load adapter {path} over {base.name}: {exc}", "lora_path") from exc
        with self._registry:
            base.adapters[name] = path
            base.adapter_created[name] = int(time.time())
        return True

    @staticmethod
    def _attach(base: _Base, name: str, folder: Path) -> None:
        if base.peft is None:
            from peft import PeftModel

            base.peft = PeftModel.from_pretrained(base.loaded.model, str(folder), adapter_name=name,
                                                  is_trainable=False)
        else:
            base.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        base.peft.eval()

    @staticmethod
    def _detach(base: _Base, name: str) -> None:
        if base.peft is None or name not in base.peft.peft_config:
            return
        if len(base.peft.peft_config) == 1:
            # peft cannot delete its last adapter: take the LoRA layers out of the base instead.
            base.loaded.model = base.peft.unload()
            base.peft = None
        else:
            if base.peft.active_adapter == name:
                base.peft.set_adapter(next(a for a in base.peft.peft_config if a != name))
            base.peft.delete_adapter(name)

    def unload_adapter(self, name: str) -> None:
        with self._registry:
            base = self._adapter_base(name)
            if base is None:
                raise EngineError(404, f"adapter {name!r} is not loaded", param="lora_name", code="model_not_found")
            del base.adapters[name]
            base.adapter_created.pop(name, None)
        with self._model_lock:
            self._detach(base, name)

    def list_models(self) -> list[dict[str, Any]]:
        with self._registry:
            cards = []
            for base in self._bases.values():
                cards.append({"id": base.name, "object": "model", "created": base.created,
                              "owned_by": "workbench", "root": base.path, "parent": None})
                cards.extend({"id": name, "object": "model", "created": base.adapter_created.get(name, 0),
                              "owned_by": "workbench", "root": path, "parent": base.name}
                             for name, path in base.adapters.items())
            return cards

    def _resolve(self, model: str) -> tuple[_Base, str | None]:
        with self._registry:
            if model in self._loading:
                raise unavailable(f"model {model!r} is still loading")
            if model in self._bases:
                return self._bases[model], None
            base = self._adapter_base(model)
            if base is None:
                raise model_not_found(model)
            if base.name in self._loading:
                raise unavailable(f"model {base.name!r} is still loading")
            return base, model

    def loaded(self, model: str) -> LoadedModel:
        """The base's LoadedModel (its tokenizer, stop ids). While adapters are
        loaded its model carries their LoRA layers: generate through the engine."""
        return self._resolve(model)[0].loaded

    def tokenize(self, model: str, messages: Sequence[Message]) -> tuple[list[int], int]:
        """The prompt ids exactly as a chat request feeds them, and the model's max length."""
        base, _ = self._resolve(model)
        system = [m["content"] for m in messages if m["role"] == "system"]
        ids = encode(base.loaded.tokenizer, messages, "\n\n".join(system) if system else None)
        return ids, base.max_model_len

    # -- requests

    def submit(self, request: ChatRequest) -> Ticket:
        """Queue a request; raises EngineError (404 unknown model, 400 too long,
        429 queue full, 503 shutting down or loading)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[ChatRequest]) -> list[Ticket]:
        """Queue several requests at once (all or none), so that an idle engine
        sees them together: in-process callers batch without relying on the window."""
        if self._stopping:
            raise unavailable("the engine is shutting down")
        tickets = [self._ticket(r) for r in requests]
        rows = sum(t.rows for t in tickets)
        with self._cond:
            if self._stopping:
                raise unavailable("the engine is shutting down")
            waiting = sum(t.rows for t in self._queue)
            if waiting + rows > self.max_queue:
                raise EngineError(429, f"the engine is saturated ({waiting} rows waiting, at most "
                                       f"{self.max_queue}): retry later", "rate_limit_error", code="queue_full")
            for project in {t.request.project for t in tickets}:
                mine = sum(t.rows for t in self._queue if t.request.project == project)
                asked = sum(t.rows for t in tickets if t.request.project == project)
                if mine + asked > self.max_queue_per_project:
                    raise EngineError(429, f"this project has {mine} rows waiting, at most "
                                           f"{self.max_queue_per_project}: retry later", "rate_limit_error",
                                      code="project_queue_full")
            self._queue.extend(tickets)
            self._cond.notify_all()
        return tickets

    def _ticket(self, request: ChatRequest) -> Ticket:
        base, adapter = self._resolve(request.model)
        ids = encode(base.loaded.tokenizer, request.messages, request.system_prompt, request.opening)
        limit = base.max_model_len
        if len(ids) + request.settings.max_new_tokens > limit:
            too_long = len(ids) >= limit
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the messages take {len(ids)} "
                f"and max_tokens asks for {request.settings.max_new_tokens} more",
                "messages" if too_long else "max_tokens")
        return Ticket(request, base.name, adapter, ids)

    def queued_rows(self) -> int:
        with self._cond:
            return sum(t.rows for t in self._queue)

    # -- the batcher

    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._generate(group)
            except EngineError as exc:
                for ticket in group:
                    ticket._fail(exc)
            except Exception as exc:  # never kill the batcher: fail this batch, serve the next
                log.exception("generate failed")
                for ticket in group:
                    ticket._fail(EngineError(500, f"generation failed: {exc}", "server_error"))

    def _next_group(self) -> list[Ticket] | None:
        with self._cond:
            if not self._queue:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                # The engine was idle: give concurrent clients a moment to join this call.
                # Each arrival extends the window (clients that start together reach
                # the queue a few ms apart), up to WINDOW_CAP windows in all.
                now = time.monotonic()
                cap, deadline = now + WINDOW_CAP * self.batch_window, now + self.batch_window
                rows = sum(t.rows for t in self._queue)
                while rows < self.max_batch:
                    left = min(deadline, cap) - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    grown = sum(t.rows for t in self._queue)
                    if grown > rows:
                        rows, deadline = grown, time.monotonic() + self.batch_window
            self._queue = [t for t in self._queue if not t.cancelled]
            if not self._queue:
                return []
            group = self._fair_group()
            taken = set(map(id, group))
            self._queue = [t for t in self._queue if id(t) not in taken]
            return group

    def _fair_group(self) -> list[Ticket]:
        """The next batch, round-robin by project: it is led by the oldest request
        of the project served least recently, and filled with compatible requests
        one project at a time (first come within a project). Holds `_cond`."""
        by_project: dict[str | None, list[Ticket]] = {}
        for ticket in self._queue:
            by_project.setdefault(ticket.request.project, []).append(ticket)
        rank = {p: i for i, p in enumerate(self._served)}
        # Never served projects first, then the least recently served; ties by arrival.
        order = sorted(by_project, key=lambda p: rank.get(p, -1))
        lead = by_project[order[0]][0]
        key = lead.request.batch_key(lead.base)
        pending = [[t for t in by_project[p] if t.request.batch_key(t.base) == key] for p in order]
        group: list[Ticket] = []
        rows = 0
        while any(pending):
            for tickets in pending:
                if not tickets:
                    continue
                if group and rows + tickets[0].rows > self.max_batch:
                    tickets.clear()  # first come within a project: none of its later ones jump ahead
                    continue
                ticket = tickets.pop(0)
                group.append(ticket)
                rows += ticket.rows
        for project in dict.fromkeys(t.request.project for t in group):
            if project in self._served:
                self._served.remove(project)
            self._served.append(project)
        # Projects with nothing queued are forgotten, so the list stays as small as the queue.
        live = set(by_project)
        self._served = [p for p in self._served if p in live]
        return group

    def _generate(self, group: list[Ticket]) -> None:
        if not group:
            return
        import torch

        with self._model_lock:
            base = self._bases.get(group[0].base)
            live = []
            for ticket in group:
                if base is None or (ticket.adapter is not None and ticket.adapter not in base.adapters):
                    ticket._fail(model_not_found(ticket.request.model))
                else:
                    live.append(ticket)
            if base is None or not live:
                return
            rows = [(ticket, j) for ticket in live for j in range(ticket.rows)]
            loaded = base.loaded
            settings = dataclasses.replace(live[0].request.settings,
                                           max_new_tokens=max(t.request.settings.max_new_tokens for t in live))
            stops = RowStops(loaded, [t.request.settings.max_new_tokens for t, _ in rows], settings.stop,
                             live=any(t.request.stream for t in live))
            width = max(len(t.prompt_ids) for t in live)
            pad = int(loaded.tokenizer.pad_token_id)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, (ticket, _) in enumerate(rows):
                input_ids[r, width - len(ticket.prompt_ids):] = torch.tensor(ticket.prompt_ids)
                mask[r, width - len(ticket.prompt_ids):] = 1
            kwargs: dict[str, Any] = {}
            model = loaded.model
            scope: Any = contextlib.nullcontext()
            if base.peft is not None:
                model = base.peft
                names = {t.adapter for t, _ in rows}
                # peft's mixed-batch path loops over the adapters in every LoRA layer: measured
                # 232 ms a step for base rows and 319 ms for one adapter vs 122 ms for the bare base
                # (batch 16). A batch of one kind takes the plain path.
                if names == {None}:
                    scope = base.peft.disable_adapter()
                elif len(names) == 1:
                    base.peft.set_adapter(next(iter(names)))
                else:
                    kwargs["adapter_names"] = [t.adapter or BASE_ROW for t, _ in rows]
            if settings.temperature > 0 and settings.seed is not None:
                torch.manual_seed(settings.seed)
            self.generate_calls += 1
            self.rows_generated += len(rows)
            with torch.inference_mode(), scope:
                model.generate(
                    input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                    generation_config=generation_config(loaded, settings),
                    logits_processor=completion_processors(settings, input_ids.shape[1]),
                    stopping_criteria=stops.stopping_criteria(), streamer=_streamer(stops, rows),
                    **kwargs,
                )
            stops.finish()
            _deliver(stops, rows)


def _deliver(stops: RowStops, rows: Sequence[tuple[Ticket, int]]) -> None:
    """Hand out the text and finishes that are ready (all of it once `stops` is finished)."""
    for r, (ticket, index) in enumerate(rows):
        if ticket.cancelled:
            stops.cancelled.add(r)
        if ticket.request.stream:
            ticket._delta(index, stops.take_text(r))
        row = stops.rows[r]
        if row.done and ticket.choices[index] is None:
            ticket._finish(Choice(index, row.text, row.finish_reason, len(row.tokens)))


def _streamer(stops: RowStops, rows: Sequence[tuple[Ticket, int]]) -> Any:
    """A transformers streamer: after each step (the stopping criterion has fed
    `stops` that step's tokens) it hands each row's new text to its request."""
    from transformers.generation.streamers import BaseStreamer

    class _Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompts
                self.prompt_seen = True
            elif stops.live:  # without live decoding the text is only known at the end
                _deliver(stops, rows)

        def end(self) -> None:
            pass

    return _Streamer()
