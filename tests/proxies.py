"""A recording proxy in front of an OpenAI-compatible engine, for tests of
the remote path (retries, n per request, the response cache, a dying engine)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass(frozen=True)
class Sent:
    """One request the proxy took: its JSON body (and the body's sha256), what
    came of it (a status, or "dropped" when the engine could not be reached)
    and, for a 200, the answer's usage."""

    body: dict[str, Any]
    digest: str
    outcome: int | str
    usage: dict[str, Any] | None = None


class Proxy:
    """Forwards POSTs to `upstream` (settable: a restarted engine has a new
    address) and records each request in `log`, in order, with its
    Authorization header in `headers`. The next requests are answered from
    `fail_next` ((status, headers)) without forwarding; after the
    `kill_after`-th answer it calls `on_kill` (the answer still goes back).
    When the engine cannot be reached it drops the connection, as a dead server does."""

    def __init__(self, upstream: str = "") -> None:
        self.upstream = upstream
        self.log: list[Sent] = []
        self.headers: list[str | None] = []
        self.fail_next: list[tuple[int, dict[str, str]]] = []
        self.kill_after: int | None = None
        self.on_kill: Callable[[], None] | None = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body, digest = json.loads(raw), hashlib.sha256(raw).hexdigest()
                with proxy.lock:
                    proxy.headers.append(self.headers.get("Authorization"))
                    failure = proxy.fail_next.pop(0) if proxy.fail_next else None
                if failure is not None:
                    status, extra = failure
                    with proxy.lock:
                        proxy.log.append(Sent(body, digest, status))
                    self._send(
                        status, json.dumps({"error": {"message": f"proxy says {status}"}}).encode(), extra
                    )
                    return
                try:
                    reply = httpx.post(
                        proxy.upstream + self.path,
                        content=raw,
                        timeout=120,
                        headers={"Content-Type": "application/json"},
                    )
                except httpx.HTTPError:
                    with proxy.lock:
                        proxy.log.append(Sent(body, digest, "dropped"))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                usage = reply.json().get("usage") if reply.status_code == 200 else None
                with proxy.lock:
                    proxy.log.append(Sent(body, digest, reply.status_code, usage))
                    answered = sum(1 for s in proxy.log if s.outcome == 200)
                    kill = reply.status_code == 200 and answered == proxy.kill_after
                if kill and proxy.on_kill is not None:
                    proxy.on_kill()
                self._send(reply.status_code, reply.content, {})

            def _send(self, status: int, content: bytes, extra: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(content)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.http = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def sent(self) -> int:
        with self.lock:
            return len(self.log)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [s.body for s in self.log]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
