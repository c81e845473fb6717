"""A response cache for generation: each answer stored in SQLite the moment
it arrives, keyed by everything that decides it, so a rerun or a resumed job
asks a (paid, slow) teacher only for what it does not have yet.

The key is a hash of the generator's identity (the endpoint and model, or
the local model), the system prompt, the conversation, the generation
settings that change an answer (not the batch size), the opening and the
sample index (the i-th of N best-of-N samples). Plain Python: stdlib sqlite3
in WAL mode, one connection per process shared by the remote thread pool
under a lock; several processes (two jobs of one project) may share a file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engines.chat import Message
from engines.inference import Completion, FinishReason, GenerationSettings

# Settings that do not change the answer (how many run at once), left out of the key.
NOT_IN_KEY = ("batch_size",)
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL
)
"""


def cache_key(
    identity: str,
    system_prompt: str | None,
    messages: Sequence[Message],
    settings: GenerationSettings,
    opening: str | None,
    sample: int,
) -> str:
    """The sha256 of a canonical JSON of what decides the answer."""
    decided = {k: v for k, v in settings.to_dict().items() if k not in NOT_IN_KEY}
    payload = [identity, system_prompt, list(messages), decided, opening, sample]
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Completions by key in one SQLite file. `put` commits at once (a job
    killed a moment later keeps the answer); `get_many` reads many keys."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit; the pool's threads share the connection under the lock.
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
        self._db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):  # under SQLite's bound-parameter limit
                part = wanted[start : start + 500]
                rows = self._db.execute(
                    "SELECT key, text, prompt_tokens, completion_tokens, finish_reason, seconds FROM answers "
                    f"WHERE key IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                for key, text, prompt_tokens, completion_tokens, finish, seconds in rows:
                    reason: FinishReason = "stop" if finish == "stop" else "length"
                    found[key] = Completion(text, prompt_tokens, completion_tokens, reason, seconds)
        return found

    def put(self, key: str, completion: Completion) -> None:
        row: tuple[Any, ...] = (
            key,
            completion.text,
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.finish_reason,
            completion.seconds,
            time.time(),
        )
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", row)
