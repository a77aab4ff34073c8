"""The one seam through which pkictl and pki-agent read the time."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

__all__ = ["Clock", "SystemClock", "FixedClock", "utc"]


def utc(value: dt.datetime) -> dt.datetime:
    """Return ``value`` as an aware UTC datetime.

    Raises:
        ValueError: ``value`` is naive; pkictl never guesses a time zone.
    """
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()}: pass an aware UTC datetime")
    return value.astimezone(dt.timezone.utc)


class Clock(Protocol):
    """Anything with ``now() -> aware UTC datetime``."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The real wall clock, in UTC."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class FixedClock:
    """A clock that only moves when told to, for tests and simulations.

    Args:
        start: the initial time, an aware datetime.
    """

    def __init__(self, start: dt.datetime) -> None:
        self._now = utc(start)

    def now(self) -> dt.datetime:
        return self._now

    def set(self, value: dt.datetime) -> None:
        """Jump to ``value`` (aware datetime), forwards or backwards."""
        self._now = utc(value)

    def advance(self, seconds: float) -> None:
        """Move forwards by ``seconds`` (negative moves backwards)."""
        self._now += dt.timedelta(seconds=seconds)
