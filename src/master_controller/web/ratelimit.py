"""Per-API-key request rate limits: a token bucket per key, in the controller's memory.

``rate_limit_per_minute`` tokens flow in per minute up to ``rate_limit_burst``; each
request takes one. An empty bucket answers 429 with Retry-After (the seconds until a token
is there again). Buckets of keys not seen for a while are forgotten.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from master_controller.errors import RateLimited

FORGET_AFTER = 3600.0


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.buckets: dict[str, Bucket] = {}

    def check(self, key_id: str, now: float | None = None) -> None:
        """Take a token for ``key_id`` or raise RateLimited."""
        if self.rate <= 0:
            return  # limits off
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(key_id)
        if bucket is None:
            bucket = self.buckets[key_id] = Bucket(self.burst, now)
            self._forget_idle(now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / self.rate)
            raise RateLimited(
                f"this API key is over its limit of {self.rate * 60:.0f} requests a minute; "
                f"try again in {wait}s",
                retry_after=wait,
            )
        bucket.tokens -= 1.0

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, b in self.buckets.items() if now - b.updated > FORGET_AFTER]
        for key in idle:
            del self.buckets[key]
