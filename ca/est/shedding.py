"""Load shedding for the EST service: beyond the enrollments it can answer in time, a request is
told at once to come back later (503 with a Retry-After spread with jitter, RFC 7030 4.2.3, RFC
9110 10.2.3) instead of waiting in a queue until it times out.

The bound is derived from what the service achieves: a request admitted last waits for every one
admitted before it, so with ``rate`` issuances per second, at most ``rate x max_delay`` requests
are admitted at once (``max_delay`` well inside the clients' 30 s timeouts), never fewer than
``min_pending``; an operator may fix the bound instead (``max_pending``). A client shed is told
when its turn comes: after every request admitted now and every client told to come back before
it, at that rate, times a random factor in ``[1 - jitter, 1 + jitter]`` so that a herd comes back
spread out rather than on the same second (docs/design.md, "Group commit and load shedding").

``rate`` is the highest measured since ``prior_rate``, not the latest, and is lowered only while
the service sheds (saturated): in a herd's first seconds the service handshakes every node only
to shed it and completes few, and while the herd waits out its Retry-After few completions mean
little demand, not little capacity; promising returns at either rate left the service idle while
clients slept minutes (bench/renewal_herd.py).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import random
import time
from typing import Callable

__all__ = ["LoadShedder", "SheddingPolicy"]


@dataclasses.dataclass(frozen=True)
class SheddingPolicy:
    """When the EST service sheds ``simple_enroll`` / ``simple_reenroll`` requests.

    Attributes:
        max_pending: a fixed bound on requests admitted at once (in a handler, queued for a
            signing worker or in one); None derives it from the measured rate.
        max_delay: seconds the request admitted last may wait for its answer (derived bound =
            measured issuances/s x this).
        min_pending: the derived bound is never below this.
        prior_rate: issuances/s assumed until a higher rate is measured, and the least ever
            assumed (a herd's storm of handshakes measures less than the service absorbs).
        window: seconds of completions the rate is measured over.
        peak_memory: seconds a peak rate is kept before a lower rate measured while shedding replaces it.
        jitter: Retry-After is the estimated wait times a uniform factor in ``[1 - jitter, 1 + jitter]``.
        max_retry_after: seconds; no client is told to wait longer.

    Raises:
        ValueError: a value out of its range (the message names it and the range).
    """

    max_pending: int | None = None
    max_delay: float = 5.0
    min_pending: int = 32
    prior_rate: float = 100.0
    window: float = 5.0
    peak_memory: float = 60.0
    jitter: float = 0.1
    max_retry_after: int = 600

    def __post_init__(self) -> None:
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"max_pending: got {self.max_pending}, want at least 1 (or None: derived from the measured rate)")
        for name in ("max_delay", "prior_rate", "window", "peak_memory"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, want more than 0")
        if self.min_pending < 1:
            raise ValueError(f"min_pending: got {self.min_pending}, want at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: got {self.jitter}, want 0 to less than 1")
        if self.max_retry_after < 1:
            raise ValueError(f"max_retry_after: got {self.max_retry_after}, want at least 1 second")


class LoadShedder:
    """Counts the enrollment requests admitted and measures how fast they complete.

    Args:
        policy: the bound and the spread (:class:`SheddingPolicy`).
        clock: monotonic seconds (injectable; tests pass their own).
        rng: the jitter's random source (injectable, e.g. ``random.Random(seed)``).
    """

    def __init__(self, policy: SheddingPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or SheddingPolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self.pending = 0
        self.shed = 0  # requests told to come back later, since start
        self._completed: collections.deque[float] = collections.deque()  # completion times within the window
        self._promised: list[float] = []  # heap: when the clients shed are due back
        # The prior counts as a first peak: the first rate measured in a herd is the service's
        # pace while it handshakes every node only to shed it (5/s where it absorbs 90/s after),
        # and promising returns at that pace put them up to the 600 s cap away.
        self._peak: tuple[float, float] = (self.policy.prior_rate, clock())  # (rate, when measured)
        self._last_shed: float | None = None

    def rate(self) -> float:
        """Issuances per second the service absorbs: the highest measured, each measurement over
        the completions of the last ``window`` seconds (over their span, at least a second, so
        that a burst just begun counts at its pace), starting from ``prior_rate``, never below it.

        A lower measurement replaces the peak only while the service sheds (it is saturated,
        so what it completes is what it can) and the peak is older than ``peak_memory``: when
        clients are away waiting out their Retry-After, few completions mean little demand, not
        little capacity, and taking them for the rate stretched the next promises into minutes.
        """
        now = self._clock()
        self._forget(now)
        span = now - self._completed[0] if self._completed else 0.0
        if len(self._completed) >= self.policy.min_pending and span >= 1.0:
            measured = len(self._completed) / span
            saturated = self._last_shed is not None and now - self._last_shed <= self.policy.window
            if measured >= self._peak[0] or (saturated and now - self._peak[1] > self.policy.peak_memory):
                self._peak = (max(measured, self.policy.prior_rate), now)  # the prior is a floor
        return self._peak[0]

    def bound(self) -> int:
        """Requests admitted at once at most: ``max_pending``, or ``rate x max_delay`` (at least ``min_pending``)."""
        if self.policy.max_pending is not None:
            return self.policy.max_pending
        return max(self.policy.min_pending, math.floor(self.rate() * self.policy.max_delay))

    def accept_budget(self, handshaking: int) -> tuple[float, int]:
        """How the TLS front accepts now: ``(seconds to pause after this round, connections to
        accept in it)``. Below the bound, as many as there is room for (the bound less the
        requests in hand and the connections still handshaking, at most 128) and no pause; at
        it, one per four issuances the service completes (at most 0.25 s apart), so that
        shedding costs the event loop a fraction of its handshakes, not one per client of a
        herd; the others wait in the kernel's backlog. Accepting 128 whenever a group of
        issuances left room let ~300 clients a second in only to be shed.

        Args:
            handshaking: connections accepted whose TLS handshake is not done yet.
        """
        room = self.bound() - self.pending - handshaking
        if room > 0:
            return 0.0, min(128, room)
        return min(0.25, 4.0 / self.rate()), 1

    def admit(self) -> int | None:
        """Admit one request (None: go on, and call :meth:`done` when it is answered) or shed it.

        Returns:
            None when admitted; else the Retry-After in whole seconds (at least 1): the time the
            requests admitted now and the clients told to come back before this one take at the
            measured rate, times the jitter factor.
        """
        if self.pending < self.bound():
            self.pending += 1
            return None
        now = self._clock()
        while self._promised and self._promised[0] <= now:
            heapq.heappop(self._promised)
        ahead = self.pending + len(self._promised)
        wait = ahead / self.rate() * self._rng.uniform(1.0 - self.policy.jitter, 1.0 + self.policy.jitter)
        retry_after = min(self.policy.max_retry_after, max(1, math.ceil(wait)))
        heapq.heappush(self._promised, now + retry_after)
        self.shed += 1
        self._last_shed = now
        return retry_after

    def done(self, *, completed: bool = True) -> None:
        """One admitted request is answered; ``completed``: it was an issuance (or a refusal by
        policy) that counts towards the measured rate, not a failure before the CA saw it."""
        self.pending -= 1
        if completed:
            now = self._clock()
            self._completed.append(now)
            self._forget(now)

    def _forget(self, now: float) -> None:
        cutoff = now - self.policy.window
        while self._completed and self._completed[0] < cutoff:
            self._completed.popleft()
