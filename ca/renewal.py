"""When a certificate is due for renewal, and what state it is in: pure functions of time.

The rule (docs/design.md, "Renewal"): renew at notBefore + fraction x lifetime, with the
lifetime read from the certificate itself, up to ``jitter`` x lifetime earlier so that a fleet
issued at once does not renew at once.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from .clock import utc

if TYPE_CHECKING:  # only for the annotation: pkictl status imports this module and must start fast
    import random

__all__ = [
    "renewal_time",
    "is_due",
    "draw_jitter",
    "certificate_state",
    "STATES",
    "MAX_JITTER",
    "EXPIRING_FRACTION",
]

MAX_JITTER = 0.05
# "expiring": less than 1/6 of the lifetime left, i.e. half of the window after a 2/3 renewal.
EXPIRING_FRACTION = 1 / 6
STATES = ("ok", "renewal due", "expiring", "expired", "not yet valid")


def renewal_time(
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    fraction: float = 2 / 3,
    jitter: float = 0.0,
) -> dt.datetime:
    """The moment renewal becomes due.

    Args:
        not_before, not_after: the certificate's validity (aware datetimes).
        fraction: share of the lifetime after which to renew, in (0, 1).
        jitter: share of the lifetime to renew earlier by, in [0, fraction).

    Returns:
        ``not_before + (fraction - jitter) x (not_after - not_before)``, aware UTC.

    Raises:
        ValueError: fraction or jitter out of range, or not_after <= not_before.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: got {fraction}, want 0 < fraction < 1")
    if not 0 <= jitter < fraction:
        raise ValueError(f"jitter: got {jitter}, want 0 <= jitter < fraction ({fraction})")
    not_before, not_after = utc(not_before), utc(not_after)
    lifetime = not_after - not_before
    if lifetime <= dt.timedelta(0):
        raise ValueError(f"not_after {not_after.isoformat()} is not after not_before {not_before.isoformat()}")
    return not_before + lifetime * (fraction - jitter)


def is_due(now: dt.datetime, not_before: dt.datetime, not_after: dt.datetime, *, fraction: float = 2 / 3, jitter: float = 0.0) -> bool:
    """True from the renewal time on (inclusive); see :func:`renewal_time`."""
    return utc(now) >= renewal_time(not_before, not_after, fraction=fraction, jitter=jitter)


def draw_jitter(rng: "random.Random", maximum: float = MAX_JITTER) -> float:
    """A jitter share in [0, maximum), drawn from ``rng`` (pass a seeded Random to reproduce)."""
    return rng.uniform(0.0, maximum)


def certificate_state(now: dt.datetime, not_before: dt.datetime, not_after: dt.datetime, *, fraction: float = 2 / 3) -> str:
    """One of :data:`STATES` for a certificate at ``now`` (revocation is the inventory's to add).

    ``expiring`` wins over ``renewal due`` once less than 1/6 of the lifetime is left.
    """
    now, not_before, not_after = utc(now), utc(not_before), utc(not_after)
    if now >= not_after:
        return "expired"
    if now < not_before:
        return "not yet valid"
    if not_after - now < (not_after - not_before) * EXPIRING_FRACTION:
        return "expiring"
    if is_due(now, not_before, not_after, fraction=fraction):
        return "renewal due"
    return "ok"
