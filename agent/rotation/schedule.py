"""Retry timing and log levels of failed renewals: pure functions of (failures, time left, lifetime).

The rules (docs/design.md, "Renewal"):

- Backoff: exponential with full jitter between ``retry_initial`` and ``retry_max``
  (:func:`backoff_delay`), then capped so that a retry never lands later than a quarter of the
  time left before notAfter (:func:`retry_delay`); the agent never gives up before expiry, and
  the attempts close in on notAfter geometrically (each wait is at most 1/4 of what is left).
- No retry comes sooner than :data:`RETRY_FLOOR` after a failure, whatever the cap says, so a
  bug cannot turn the last minutes before expiry into a loop against the CA.
- The floor between two renewals (:func:`renewal_floor`): ``renewal.min_interval``, but at most
  a tenth of the certificate's lifetime, so that short-lived certificates (tests, the demo)
  still renew in time.
- Loudness (:func:`failure_log_level`): a failed attempt logs WARNING before 80 % of the
  lifetime has passed, ERROR from 80 % on (that includes the last 1/6 of the lifetime, the
  ``expiring`` state of ``pkictl status``), CRITICAL once the certificate has expired.
"""

from __future__ import annotations

import datetime as dt
import logging
import random

from pkictl.clock import utc

__all__ = ["backoff_delay", "retry_delay", "renewal_floor", "failure_log_level", "RETRY_FLOOR", "ERROR_FROM", "EXPIRY_MARGIN",
           "FLOOR_SHARE"]

RETRY_FLOOR = dt.timedelta(seconds=1)
"""The shortest wait after a failed attempt, even in the last seconds before expiry."""

ERROR_FROM = 0.8
"""Share of the lifetime from which a failed renewal is logged as ERROR (WARNING before)."""

EXPIRY_MARGIN = 4
"""A retry waits at most (time left before notAfter) / EXPIRY_MARGIN."""

FLOOR_SHARE = 0.1
"""The floor between renewals is at most this share of the certificate's lifetime."""


def backoff_delay(failures: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failed renewals (>= 1): exponential with
    full jitter in [initial, ...], capped at ``maximum``."""
    ceiling = min(maximum, initial * 2 ** (failures - 1))
    return rng.uniform(min(initial, ceiling), ceiling)


def retry_delay(failures: int, *, left: dt.timedelta, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures (>= 1).

    Args:
        failures: consecutive failed attempts so far, >= 1.
        left: time from now to the current certificate's notAfter (negative once expired).
        initial, maximum: the backoff's first wait and cap, in seconds.
        rng: randomness for the jitter.

    Returns:
        ``max(min(backoff, left / 4), 1 s)`` while the certificate is valid; the plain backoff
        once it has expired (the agent still tries: the CA may accept it again after a clock
        correction, and an operator reading the CRITICAL log line re-enrolls).
    """
    delay = backoff_delay(failures, initial=initial, maximum=maximum, rng=rng)
    floor = RETRY_FLOOR.total_seconds()
    if left <= dt.timedelta(0):
        return max(delay, floor)
    return max(min(delay, left.total_seconds() / EXPIRY_MARGIN), floor)


def renewal_floor(min_interval: dt.timedelta, certificate) -> dt.timedelta:
    """The shortest time from one renewal to the next for ``certificate`` (an x509.Certificate,
    the one just taken into service): ``min(min_interval, lifetime x FLOOR_SHARE)``."""
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return min(min_interval, lifetime * FLOOR_SHARE)


def failure_log_level(now: dt.datetime, not_before: dt.datetime, not_after: dt.datetime) -> int:
    """The :mod:`logging` level of a failed renewal attempt at ``now``.

    Returns:
        ``logging.WARNING`` before 80 % of the lifetime, ``logging.ERROR`` from 80 % (inclusive),
        ``logging.CRITICAL`` from notAfter (inclusive: the certificate in service has expired).
    """
    now, not_before, not_after = utc(now), utc(not_before), utc(not_after)
    if now >= not_after:
        return logging.CRITICAL
    if now - not_before >= (not_after - not_before) * ERROR_FROM:
        return logging.ERROR
    return logging.WARNING
