"""Per-key rate limits of the query API: one token bucket per key.

A bucket holds up to ``burst`` tokens and refills at ``rate_per_second``; a request takes one
token. An empty bucket answers how long until the next token, which the API sends as
``Retry-After`` with its 429. Buckets live in the serving process: with several uvicorn
workers each has its own, so a key's limit is per worker (run one worker, or divide the rate).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """The outcome of one request against its key's bucket."""

    allowed: bool
    limit: float  # tokens per second
    burst: float
    remaining: int  # whole tokens left after this request
    retry_after_s: float  # 0 when allowed

    @property
    def retry_after_header(self) -> str:
        """Whole seconds (HTTP's delay-seconds), never 0 for a refused request."""
        return str(max(1, math.ceil(self.retry_after_s)))


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBucketLimiter:
    """Token buckets by key id; thread-safe; idle buckets are forgotten after ``idle_s``."""

    def __init__(
        self, rate_per_second: float, burst: float, clock: Callable[[], float] = time.monotonic, idle_s: float = 600.0
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError(f"rate_per_second ({rate_per_second}) must be > 0 and burst ({burst}) >= 1")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._clock = clock
        self._idle_s = idle_s
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def take(self, key_id: str, rate_per_second: float | None = None, burst: float | None = None) -> Decision:
        """Take one token from ``key_id``'s bucket (its own rate/burst when given, else the defaults)."""
        rate = rate_per_second or self.rate_per_second
        capacity = max(1.0, burst or self.burst)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(capacity, now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                decision = Decision(True, rate, capacity, int(bucket.tokens), 0.0)
            else:
                decision = Decision(False, rate, capacity, 0, (1.0 - bucket.tokens) / rate)
            if now - self._swept > self._idle_s:
                self._sweep(now)
        return decision

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key_id in [k for k, b in self._buckets.items() if now - b.updated > self._idle_s]:
            del self._buckets[key_id]
