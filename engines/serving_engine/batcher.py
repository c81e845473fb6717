"""ServingEngine: the request queue and the one batcher thread that runs
every `generate`, over the models of a ModelRegistry."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.chat import Message
from engines.inference import (
    GenerationSettings,
    LoadedModel,
    RowSampler,
    RowStops,
    TokenLogprob,
    encode,
    generation_config,
    grammar_constraints,
    left_pad,
    row_sampler,
    row_seed,
)
from engines.protocol import OpenAIError
from engines.serving_engine.errors import bad_request, model_not_found, unavailable
from engines.serving_engine.registry import ModelRegistry, resolve_dtype
from engines.serving_engine.requests import ChatRequest
from engines.serving_engine.tickets import Choice, Ticket

log = logging.getLogger(__name__)

# An idle engine waits for more requests while they keep coming, at most this many batch windows.
WINDOW_CAP = 10


class ServingEngine:
    """Base models with their adapters, a request queue and the batcher thread."""

    def __init__(
        self,
        *,
        max_batch: int = 16,
        batch_window_ms: float = 25.0,
        max_queue: int = 256,
        max_queue_per_project: int | None = None,
        dtype: str | None = "auto",
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.batch_window = batch_window_ms / 1000
        # After a call too, wait (a window, extended per arrival) for the clients it just answered.
        self.rejoin = True
        self.max_queue = max_queue
        # Half the queue by default: one project's flood leaves room for everyone else's requests.
        self.max_queue_per_project = max_queue_per_project or max(max_queue // 2, max_batch)
        self.threads = threads
        self.models = ModelRegistry(resolve_dtype(dtype), device)
        self.generate_calls = 0  # generate calls made (tests and benchmarks read it)
        self.rows_generated = 0
        self._queue: list[Ticket] = []
        self._served: list[str | None] = []  # projects, least recently served first
        self._cond = threading.Condition()
        self._model_lock = self.models.lock  # held while a generate runs or an adapter (un)loads
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

    # -- models (see ModelRegistry)

    def load_base(self, name: str, path: str | Path, merge: str | Path | None = None) -> bool:
        return self.models.load_base(name, path, merge)

    def unload_base(self, name: str) -> None:
        self.models.unload_base(name)

    def load_adapter(self, name: str, path: str | Path, base_name: str | None = None) -> bool:
        return self.models.load_adapter(name, path, base_name)

    def unload_adapter(self, name: str) -> None:
        self.models.unload_adapter(name)

    def list_models(self) -> list[dict[str, Any]]:
        return self.models.list_models()

    def loaded(self, model: str) -> LoadedModel:
        return self.models.loaded(model)

    def tokenize(self, model: str, messages: Sequence[Message]) -> tuple[list[int], int]:
        return self.models.tokenize(model, messages)

    # -- requests

    def submit(self, request: ChatRequest) -> Ticket:
        """Queue a request; raises OpenAIError (404 unknown model, 400 too long,
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
                raise OpenAIError(
                    429,
                    f"the engine is saturated ({waiting} rows waiting, at most "
                    f"{self.max_queue}): retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            for project in {t.request.project for t in tickets}:
                mine = sum(t.rows for t in self._queue if t.request.project == project)
                asked = sum(t.rows for t in tickets if t.request.project == project)
                if mine + asked > self.max_queue_per_project:
                    raise OpenAIError(
                        429,
                        f"this project has {mine} rows waiting, at most "
                        f"{self.max_queue_per_project}: retry later",
                        "rate_limit_error",
                        code="project_queue_full",
                    )
            self._queue.extend(tickets)
            self._cond.notify_all()
        return tickets

    def _ticket(self, request: ChatRequest) -> Ticket:
        base, adapter = self.models.resolve(request.model)
        tokenizer = base.loaded.tokenizer
        if request.prompt is not None:  # /v1/completions: the text as given, special tokens as vLLM adds them
            ids = [int(t) for t in tokenizer(request.prompt)["input_ids"]]
        else:
            ids = encode(
                tokenizer,
                request.messages,
                request.system_prompt,
                request.opening,
                generation_prompt=request.add_generation_prompt,
            )
        if request.grammar is not None:
            # Compiled now (and cached) so a grammar this tokenizer cannot take fails its own request only.
            grammar_constraints(base.loaded, [request.grammar])
        for token, _ in request.settings.logit_bias:
            if token >= len(tokenizer):
                raise bad_request(
                    f"logit_bias names token {token}; this model's tokens are 0 to {len(tokenizer) - 1}",
                    "logit_bias",
                )
        limit = base.max_model_len
        if len(ids) + request.settings.max_new_tokens > limit:
            too_long = len(ids) >= limit
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the messages take {len(ids)} "
                f"and max_tokens asks for {request.settings.max_new_tokens} more",
                "messages" if too_long else "max_tokens",
            )
        return Ticket(request, base.name, adapter, ids)

    def queued_rows(self) -> int:
        """Rows waiting for a generate call (the fairness tests watch the queue fill)."""
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
            except OpenAIError as exc:
                for ticket in group:
                    ticket.fail(exc)
            except Exception:  # never kill the batcher: fail this batch, serve the next
                log.exception("generate failed for %d request(s)", len(group))
                for ticket in group:
                    ticket.fail(OpenAIError(500, "generation failed (see the engine's log)", "server_error"))

    def _next_group(self) -> list[Ticket] | None:
        with self._cond:
            idle = not self._queue
            if idle:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
            if idle or self.rejoin:
                self._gather()
            self._queue = [t for t in self._queue if not t.cancelled]
            if not self._queue:
                return []
            group = self._fair_group()
            taken = set(map(id, group))
            self._queue = [t for t in self._queue if id(t) not in taken]
            return group

    def _gather(self) -> None:
        """Give clients a moment to join the next call: those that start together
        reach the queue a few ms apart, and so do those whose answers the last
        call just handed out. Each arrival extends the window, up to WINDOW_CAP
        windows in all. Without it after a call, the clients whose rows ended
        early (queued while the call ran) went alone, the rest made the next
        call: two half batches in turn. Holds `_cond`."""
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
        key = by_project[order[0]][0].batch_key
        pending = [[t for t in by_project[p] if t.batch_key == key] for p in order]
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
            live = []
            for ticket in group:
                if self.models.serving(ticket.base, ticket.adapter) is None:  # unloaded while it waited
                    ticket.fail(model_not_found(ticket.request.model))
                else:
                    live.append(ticket)
            base = self.models.serving(group[0].base, None)
            if base is None or not live:
                return
            rows = [(ticket, j) for ticket in live for j in range(ticket.rows)]
            loaded = base.loaded
            row_settings = [t.request.settings for t, _ in rows]
            # One call for every row: its longest max_tokens; RowStops ends each row at its own.
            settings = GenerationSettings(
                max_new_tokens=max(s.max_new_tokens for s in row_settings),
                ignore_eos=any(s.ignore_eos for s in row_settings),
            )
            stops = RowStops(
                loaded,
                [s.max_new_tokens for s in row_settings],
                live=any(t.request.stream for t in live),
                row_stop=[s.stop for s in row_settings],
                ignore_eos=[s.ignore_eos for s in row_settings],
            )
            input_ids, mask = left_pad([t.prompt_ids for t, _ in rows], int(loaded.tokenizer.pad_token_id))
            processors, sampler = row_sampler(
                loaded,
                row_settings,
                input_ids.shape[1],
                [row_seed(t.request.settings.seed, j) for t, j in rows],
                logprobs=[t.request.logprobs for t, _ in rows],
                finished=lambda r: stops.rows[r].done,
                **grammar_constraints(loaded, [t.request.grammar for t, _ in rows]),
            )
            # A batch of bare-base rows runs the plain base; one adapter, its own two matmuls a
            # module; a mix, stacked weights gathered by row (engines/serving_engine/lora.py).
            scope: Any = (
                base.lora.route([t.adapter for t, _ in rows])
                if base.lora is not None
                else contextlib.nullcontext()
            )
            self.generate_calls += 1
            self.rows_generated += len(rows)
            with torch.inference_mode(), scope:
                loaded.model.generate(
                    input_ids=input_ids.to(loaded.device),
                    attention_mask=mask.to(loaded.device),
                    generation_config=generation_config(loaded, settings),
                    logits_processor=processors,
                    stopping_criteria=stops.stopping_criteria(),
                    streamer=_streamer(stops, rows, sampler),
                )
            stops.finish()
            for ticket in live:
                if ticket.request.prompt_logprobs is not None:
                    ticket.prompt_logprobs = _prompt_logprobs(base, ticket)
            _deliver(stops, rows, sampler)


# Prompt positions scored per lm_head call: bounds the logits held at once (positions x vocabulary).
LOGPROB_CHUNK = 256


def _prompt_logprobs(base: Any, ticket: Ticket) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it, and the top k
    there: one forward pass, the vocabulary projected a chunk of positions at a time."""
    import torch

    k = ticket.request.prompt_logprobs or 0
    loaded = base.loaded
    scope: Any = base.lora.route([ticket.adapter]) if base.lora is not None else contextlib.nullcontext()
    ids = torch.tensor([ticket.prompt_ids], device=loaded.device)
    with torch.inference_mode(), scope:
        out = loaded.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][0, :-1]
        head = loaded.model.get_output_embeddings()
        entries: list[TokenLogprob | None] = [None]
        for start in range(0, hidden.shape[0], LOGPROB_CHUNK):
            logprobs = torch.log_softmax(head(hidden[start : start + LOGPROB_CHUNK]).float(), dim=-1)
            targets = ticket.prompt_ids[start + 1 : start + 1 + logprobs.shape[0]]
            chosen = logprobs[torch.arange(len(targets)), torch.tensor(targets)].tolist()
            tops = logprobs.topk(k) if k else None
            for i, token in enumerate(targets):
                top = (
                    ()
                    if tops is None
                    else tuple(zip(tops.indices[i].tolist(), tops.values[i].tolist(), strict=True))
                )
                entries.append(TokenLogprob(token, chosen[i], top))
    return entries


def _deliver(stops: RowStops, rows: Sequence[tuple[Ticket, int]], sampler: RowSampler) -> None:
    """Hand out the text, logprobs and finishes that are ready (all of it once `stops` is finished)."""
    for r, (ticket, index) in enumerate(rows):
        if ticket.cancelled:
            stops.cancelled.add(r)
        row = stops.rows[r]
        wanted = ticket.request.logprobs is not None
        # The end token is not part of the text: neither is its logprob.
        kept = len(row.tokens) - (1 if row.done and stops.ends_with_stop_token(r) else 0)
        if ticket.request.stream:
            text = stops.take_text(r)
            entries = None
            if wanted and (text or row.done) and kept > row.emitted_tokens:
                entries = sampler.recorded[r][row.emitted_tokens : kept]
                row.emitted_tokens = kept
            ticket.delta(index, text, entries)
        if row.done and ticket.choices[index] is None:
            ticket.finish(
                Choice(
                    index,
                    row.text,
                    row.finish_reason,
                    len(row.tokens),
                    logprobs=sampler.recorded[r][:kept] if wanted else None,
                    stop_reason=row.stop_reason,
                )
            )


def _streamer(stops: RowStops, rows: Sequence[tuple[Ticket, int]], sampler: RowSampler) -> Any:
    """A transformers streamer: after each step (the stopping criterion has fed
    `stops` that step's tokens) it hands each row's new text to its request."""
    from transformers.generation.streamers import BaseStreamer

    class _Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompts
                self.prompt_seen = True
            elif stops.live:  # without live decoding the text is only known at the end
                _deliver(stops, rows, sampler)

        def end(self) -> None:
            pass

    return _Streamer()
