"""Per-key limits on /v1: concurrent requests, requested tokens in flight
(n x max_tokens summed over the key's open requests) and requests per minute.

The counts live in Django's cache, so every gunicorn process sees the same
ones when the cache is shared (Redis via CACHE_URL; local memory counts per
process). Each step is atomic (`cache.add` then `cache.incr`) and every
counter expires: an open request is counted in the time bucket it began in
(buckets of `lease` seconds; the current and the previous bucket count) and
gives back what it took from that bucket, so the share of a process that
crashed mid-request is forgotten at most two leases later.

Settings: V1_MAX_CONCURRENT_PER_KEY, V1_MAX_TOKENS_IN_FLIGHT_PER_KEY,
V1_REQUESTS_PER_MINUTE_PER_KEY, V1_MAX_N_TIMES_TOKENS, V1_LEASE_SECONDS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache

# A slot retries this soon: nothing says when another request of the key ends.
BUSY_RETRY_AFTER = 1


def max_concurrent() -> int:
    return settings.V1_MAX_CONCURRENT_PER_KEY


def max_tokens_in_flight() -> int:
    return settings.V1_MAX_TOKENS_IN_FLIGHT_PER_KEY


def max_per_minute() -> int:
    return settings.V1_REQUESTS_PER_MINUTE_PER_KEY


def max_n_times_tokens() -> int:
    """The most tokens one request may ask for (never more than a key may hold in flight,
    or the request could never be served)."""
    return min(settings.V1_MAX_N_TIMES_TOKENS, max_tokens_in_flight())


def lease_seconds() -> int:
    """How long an open request is surely counted (it is forgotten 1-2 leases
    after it began): by default the longest a request waits on the engine,
    plus a margin for the relay."""
    return settings.V1_LEASE_SECONDS


@dataclass
class RateLimited(Exception):
    message: str
    retry_after: int
    code: str


def _add(key: str, amount: int, timeout: int) -> int:
    """Atomically add `amount` to a counter that expires `timeout` s after it was made; the new value."""
    for _ in range(3):
        cache.add(key, 0, timeout)
        try:
            return int(cache.incr(key, amount))
        except ValueError:  # it expired between add and incr
            continue
    return amount


def _take_back(key: str, amount: int) -> None:
    try:
        cache.decr(key, amount)
    except ValueError:  # the bucket expired: there is nothing left to give back
        pass


@dataclass
class Lease:
    """What one request holds; `release()` gives it back (once)."""

    held: list[tuple[str, int]] = field(default_factory=list)

    def release(self) -> None:
        held, self.held = self.held, []
        for key, amount in held:
            _take_back(key, amount)


def in_flight(key_id: int) -> tuple[int, int]:
    """(open requests, tokens asked for) of an API key, as the limits count them."""
    bucket = int(time.time() // lease_seconds())
    return tuple(  # type: ignore[return-value]  # two names, so two ints
        sum(int(cache.get(f"v1:{name}:{key_id}:{b}") or 0) for b in (bucket, bucket - 1))
        for name in ("open", "tokens")
    )


def _in_flight(name: str, key_id: int | str, amount: int, limit: int, lease: Lease) -> bool:
    """Count `amount` more of `name` for the key unless that passes `limit`."""
    span = lease_seconds()
    bucket = int(time.time() // span)
    counter = f"v1:{name}:{key_id}:{bucket}"
    total = _add(counter, amount, 2 * span + 5) + int(cache.get(f"v1:{name}:{key_id}:{bucket - 1}") or 0)
    if total > limit:
        _take_back(counter, amount)
        return False
    lease.held.append((counter, amount))
    return True


def acquire(key_id: int | str, tokens: int) -> Lease:
    """Admit one request of API key `key_id` (or of another holder named by a
    string: a playground user) asking for `tokens` (n x max_tokens), or raise
    RateLimited. The caller releases the lease when the request ends."""
    now = time.time()
    per_minute = max_per_minute()
    if _add(f"v1:rpm:{key_id}:{int(now // 60)}", 1, 120) > per_minute:
        raise RateLimited(
            f"Rate limit reached for this API key: at most {per_minute} requests per minute.",
            max(1, math.ceil(60 - now % 60)),
            "requests_per_minute_exceeded",
        )
    lease = Lease()
    concurrent = max_concurrent()
    if not _in_flight("open", key_id, 1, concurrent, lease):
        raise RateLimited(
            f"Too many concurrent requests for this API key: at most {concurrent} at a time. "
            "Retry when one of them has finished.",
            BUSY_RETRY_AFTER,
            "concurrency_limit_exceeded",
        )
    budget = max_tokens_in_flight()
    if not _in_flight("tokens", key_id, tokens, budget, lease):
        lease.release()
        raise RateLimited(
            f"Too many tokens requested at once for this API key: its open requests may ask for "
            f"at most {budget} tokens (n x max_tokens) in all, and this one asks for {tokens}. "
            "Retry when one of them has finished.",
            BUSY_RETRY_AFTER,
            "tokens_limit_exceeded",
        )
    return lease
