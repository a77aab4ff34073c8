"""A token bucket per client, so that one client cannot keep the EST service busy alone."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second, bursts up to ``burst``.

    Args:
        rate: sustained requests per second.
        burst: how many may come at once.
        clock: monotonic seconds (injectable).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> float:
        """0 if a request of ``key`` may pass now, else the seconds to wait."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget idle clients rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
