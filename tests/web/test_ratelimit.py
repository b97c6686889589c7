"""The per-key token bucket: a burst passes, then 429 with the wait until the next token;
keys are independent; 0 turns limits off; never more than burst + rate x time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from master_controller.errors import RateLimited
from master_controller.web.ratelimit import RateLimiter


def test_burst_then_refusal_with_retry_after() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    for _ in range(3):
        limiter.check("k1", now=100.0)
    with pytest.raises(RateLimited) as refused:
        limiter.check("k1", now=100.0)
    assert refused.value.status == 429 and refused.value.retry_after == 1
    assert "60 requests a minute" in refused.value.reason
    limiter.check("k2", now=100.0)  # another key has its own bucket
    limiter.check("k1", now=101.0)  # one token back after a second


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(per_minute=0, burst=1)
    for _ in range(1000):
        limiter.check("k", now=0.0)


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=300))
def test_never_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    limiter = RateLimiter(per_minute=120, burst=10)
    now, accepted = 0.0, 0
    for gap in gaps:
        now += gap
        try:
            limiter.check("k", now=now)
            accepted += 1
        except RateLimited as exc:
            assert exc.retry_after is not None and exc.retry_after >= 1
    assert accepted <= 10 + 2 * now + 1e-6
