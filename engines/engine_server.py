"""The `hf` engine server: an OpenAI-compatible HTTP server over the
in-process transformers engine (engines/serving_engine/), speaking the
subset of vLLM's server that the gateway uses:
/health, /v1/models, /v1/chat/completions (with SSE streaming),
/v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, /v1/load_model.

    python -m engines.engine_server --port 8001 --model SmolLM2=DIR --threads 1

HTTP handler threads only validate, enqueue and wait; one background thread
runs every `generate` (see ServingEngine). In-process (tests, benchmarks):

    with EngineServer({"tiny": DIR}, dtype="float32") as server:
        OpenAI(base_url=server.url + "/v1", api_key="-")...
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from engines import jsonguard
from engines.protocol import OpenAIError, parse_messages
from engines.serving_engine import (
    ServingEngine,
    Ticket,
    bad_request,
    parse_chat_request,
    parse_completion_request,
    unavailable,
)
from engines.serving_engine.logprobs import chat_logprobs, completion_logprobs
from engines.serving_engine.responses import ANSWER_TIMEOUT_S, chat_completion, text_completion, usage

log = logging.getLogger(__name__)

# Bodies past this size are refused unread; nesting past MAX_DEPTH before parsing (the stdlib recurses).
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 32
# The request's fairness bucket (the gateway sends the project); requests without one share a bucket.
PROJECT_HEADER = "X-Project"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients connect at once (that is the point of batching): the default backlog of 5 drops some.
    request_queue_size = 256
    app: EngineServer


class EngineServer:
    """The engine plus its HTTP server. `start()` loads the models given, then
    listens on a background thread; `stop()` refuses new requests (503),
    finishes the accepted ones and closes."""

    def __init__(
        self,
        models: Mapping[str, str | Path] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int | None = 1,
        max_batch: int = 16,
        batch_window_ms: float = 25.0,
        max_queue: int = 256,
        max_queue_per_project: int | None = None,
        dtype: str | None = "auto",
        device: str | None = None,
    ) -> None:
        self.models = dict(models or {})
        self.host = host
        self.port = port
        self.threads = threads
        self.engine = ServingEngine(
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
            max_queue=max_queue,
            max_queue_per_project=max_queue_per_project,
            dtype=dtype,
            device=device,
            threads=threads,
        )
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._active = 0
        self._active_lock = threading.Condition()

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the server is not started")
        host, port = self._http.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}"

    def start(self) -> EngineServer:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        for name, path in self.models.items():
            self.engine.load_base(name, path)
        self.engine.start()
        self._http = _HTTPServer((self.host, self.port), _Handler)
        self._http.app = self
        self._thread = threading.Thread(target=self._http.serve_forever, name="engine-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self.engine.stop(timeout)
        deadline = time.monotonic() + timeout
        with self._active_lock:  # let the handlers write the answers the engine just finished
            while self._active and time.monotonic() < deadline:
                self._active_lock.wait(0.05)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta
            self._active_lock.notify_all()


def _json_body(handler: _Handler) -> Any:
    try:
        return jsonguard.loads(handler.raw_body or b"null", MAX_DEPTH)
    except jsonguard.TooDeep as exc:
        raise bad_request(f"the request body is {exc.reason}") from exc
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc


def _field(body: Any, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name} is required (a non-empty string)", name)
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    raw_body = b""
    streaming = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, route: Any) -> None:
        app = self.server.app
        app._track(1)
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s %s: the client went away", self.command, self.path)
            self.close_connection = True
        except OpenAIError as exc:  # what the client caused or must hear (400, 404, 429, 503...)
            if self.streaming:  # the stream has begun: all that is left is to end it
                log.warning("%s %s: %s after the stream began", self.command, self.path, exc.message)
                self.close_connection = True
            else:
                self._send_json(exc.status, exc.body())
        except Exception:  # a bug, not bad input: a 500 in OpenAI's shape, the details in the log
            log.exception("%s %s failed", self.command, self.path)
            if self.streaming:
                self.close_connection = True
            else:
                self._send_json(
                    500, OpenAIError(500, "internal error (see the engine's log)", "server_error").body()
                )
        finally:
            app._track(-1)

    def do_GET(self) -> None:
        routes = {"/health": self._health, "/v1/models": self._models}
        self._serve(routes.get(self.path.split("?")[0], self._not_found))

    def do_POST(self) -> None:
        # Read the whole body first, whatever the route: on a kept-alive
        # connection unread bytes would be taken for the next request.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            error = (
                bad_request("bad Content-Length header")
                if length < 0
                else OpenAIError(413, f"the request body is {length} bytes, more than {MAX_BODY_BYTES}")
            )
            self._serve(lambda: self._send_json(error.status, error.body()))
            return
        self.raw_body = self.rfile.read(length) if length else b""
        routes = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/load_lora_adapter": self._load_adapter,
            "/v1/unload_lora_adapter": self._unload_adapter,
            "/v1/load_model": self._load_model,
            "/v1/unload_model": self._unload_model,
            "/tokenize": self._tokenize,
        }
        self._serve(routes.get(self.path.split("?")[0], self._not_found))

    def _not_found(self) -> None:
        raise OpenAIError(404, f"no route {self.command} {self.path}", code="not_found")

    @property
    def engine(self) -> ServingEngine:
        return self.server.app.engine

    # -- routes

    def _health(self) -> None:
        if self.engine.stopping:
            raise unavailable("the engine is shutting down")
        # The queue depth, for operators and the workbench's serving page.
        self._send_json(200, {"status": "ok", "queued_rows": self.engine.queued_rows()})

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": self.engine.list_models()})

    def _load_adapter(self) -> None:
        body = _json_body(self)
        base = body.get("base_model_name") if isinstance(body, dict) else None
        if base is not None and not isinstance(base, str):
            raise bad_request("base_model_name must be a string", "base_model_name")
        name, path = _field(body, "lora_name"), _field(body, "lora_path")
        loaded = self.engine.load_adapter(name, path, base)
        message = f"Success: LoRA adapter '{name}' " + (
            "added successfully." if loaded else "was already loaded."
        )
        self._send_json(200, {"status": "ok", "message": message})

    def _unload_adapter(self) -> None:
        name = _field(_json_body(self), "lora_name")
        self.engine.unload_adapter(name)
        self._send_json(
            200, {"status": "ok", "message": f"Success: LoRA adapter '{name}' removed successfully."}
        )

    def _load_model(self) -> None:
        """A base model by path; with "lora_path", that adapter merged into its weights."""
        body = _json_body(self)
        name, path = _field(body, "model"), _field(body, "path")
        merge = _field(body, "lora_path") if isinstance(body, dict) and "lora_path" in body else None
        if self.engine.stopping:
            raise unavailable("the engine is shutting down")
        loaded = self.engine.load_base(name, path, merge)
        self._send_json(200, {"status": "ok", "model": name, "loaded": loaded})

    def _unload_model(self) -> None:
        name = _field(_json_body(self), "model")
        self.engine.unload_base(name)
        self._send_json(200, {"status": "ok", "message": f"Success: model '{name}' removed."})

    def _tokenize(self) -> None:
        body = _json_body(self)
        model = _field(body, "model")
        ids, max_len = self.engine.tokenize(model, parse_messages(body.get("messages")))
        self._send_json(200, {"tokens": ids, "count": len(ids), "max_model_len": max_len})

    def _chat(self) -> None:
        project = (self.headers.get(PROJECT_HEADER) or "").strip()[:200] or None
        request = parse_chat_request(_json_body(self), project)
        ticket = self.engine.submit(request)
        try:
            if request.stream:
                self._stream(ticket)
            else:
                self._send_json(200, chat_completion(ticket, self.engine.loaded(ticket.base).tokenizer))
        except BaseException:
            ticket.cancel()
            raise

    def _completions(self) -> None:
        project = (self.headers.get(PROJECT_HEADER) or "").strip()[:200] or None
        body = _json_body(self)
        requests = parse_completion_request(body, project)
        echo = bool(body.get("echo"))
        tickets = self.engine.submit_many(requests)
        try:
            tokenizer = self.engine.loaded(tickets[0].base).tokenizer
            if requests[0].stream:
                self._stream_text(tickets, tokenizer, echo)
            else:
                self._send_json(200, text_completion(tickets, tokenizer, echo))
        except BaseException:
            for ticket in tickets:
                ticket.cancel()
            raise

    def _begin_stream(self, prefix: str, kind: str, model: str) -> Any:
        """Send the event-stream headers; return send(choices, usage=None), which writes one chunk."""
        chunk_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            chunk: dict[str, Any] = {"id": chunk_id, "object": kind, "created": created, "model": model}
            chunk["choices"] = choices
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        return send

    def _stream_text(self, tickets: list[Ticket], tokenizer: Any, echo: bool) -> None:
        send = self._begin_stream("cmpl", "text_completion", tickets[0].request.model)

        try:
            for p, ticket in enumerate(tickets):  # one prompt after another: each is its own stream of rows
                n = ticket.request.n
                offsets = {i: 0 for i in range(n)}
                if echo:
                    for i in range(n):
                        send(
                            [
                                {
                                    "index": p * n + i,
                                    "text": ticket.request.prompt,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                for kind, index, value in ticket.events(timeout=ANSWER_TIMEOUT_S):
                    assert index is not None
                    if kind == "delta":
                        text, entries = value
                        send(
                            [
                                {
                                    "index": p * n + index,
                                    "text": text,
                                    "logprobs": completion_logprobs(tokenizer, entries, offsets[index])
                                    if entries
                                    else None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                        offsets[index] += len(text)
                    else:
                        send(
                            [
                                {
                                    "index": p * n + index,
                                    "text": "",
                                    "logprobs": None,
                                    "finish_reason": value.finish_reason,
                                    "stop_reason": value.stop_reason,
                                }
                            ]
                        )
        except OpenAIError as exc:  # the headers are sent: report it in the stream
            self.wfile.write(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
        else:
            if tickets[0].request.include_usage:
                send([], usage(*tickets))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _stream(self, ticket: Ticket) -> None:
        request = ticket.request
        send = self._begin_stream("chatcmpl", "chat.completion.chunk", request.model)
        for n in range(request.n):
            send([{"index": n, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            for kind, index, value in ticket.events(timeout=ANSWER_TIMEOUT_S):
                if kind == "delta":
                    text, entries = value
                    choice: dict[str, Any] = {
                        "index": index,
                        "delta": {"content": text},
                        "finish_reason": None,
                    }
                    if entries:
                        choice["logprobs"] = chat_logprobs(self.engine.loaded(ticket.base).tokenizer, entries)
                    send([choice])
                else:
                    send(
                        [
                            {
                                "index": index,
                                "delta": {},
                                "finish_reason": value.finish_reason,
                                "stop_reason": value.stop_reason,
                            }
                        ]
                    )
        except OpenAIError as exc:  # the headers are sent: report it in the stream
            self.wfile.write(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
        else:
            if request.include_usage:
                send([], usage(ticket))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# --- command line -------------------------------------------------------------


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.engine_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        default=[],
        metavar="NAME=DIR",
        help="a base model to load before listening (repeatable)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: leave the other core to the worker)"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="most rows in one generate call")
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=25.0,
        help="how long an idle engine waits for more requests to batch (25 ms: 16 clients "
        "arrive spread over 35-50 ms; 5 ms split them into two calls, 5.6x vs 11.2x)",
    )
    parser.add_argument("--max-queue", type=int, default=256, help="waiting rows before answering 429")
    parser.add_argument(
        "--max-queue-per-project",
        type=int,
        default=None,
        help="waiting rows of one project before answering it 429 (default: half the queue)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best there is)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    server = EngineServer(
        dict(args.model),
        host=args.host,
        port=args.port,
        threads=args.threads,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        max_queue_per_project=args.max_queue_per_project,
        dtype=args.dtype,
        device=args.device,
    )
    try:
        server.start()
    except (OpenAIError, OSError, ValueError) as exc:
        print(f"engine failed to start: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"engine ready on http://{args.host}:{server.url.rsplit(':', 1)[1]}", flush=True)
    while not stop.wait(1):  # a timed wait lets the signal handler run
        pass
    log.info("stopping: finishing accepted requests")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
