"""The status report: one row per current certificate and per CRL, its state, and the exit code.

Kept free of cryptography imports: ``pkictl status`` reads only the inventory, so it answers as
fast as the CLI starts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Sequence

from .inventory import Record
from .renewal import certificate_state, renewal_time

__all__ = ["StatusRow", "status_rows", "format_table", "exit_code", "EXIT_OK", "EXIT_WARNING", "EXIT_CRITICAL"]

EXIT_OK = 0  # nothing needs attention ("renewal due" is the agent's business, not a failure)
EXIT_WARNING = 3  # something is expiring, or within --warn-days, or a CRL is overdue for re-signing
EXIT_CRITICAL = 4  # a current certificate or a CRL has expired: connections fail now


@dataclasses.dataclass(frozen=True)
class StatusRow:
    """One certificate (or CRL) as ``pkictl status`` shows it.

    Attributes:
        name, kind: whom and what (``root``, ``issuing``, ``gateway``, ``node``, ``crl``).
        serial: serial number as lower-case hex (for a CRL: its CRL number, ``#N``).
        not_after: end of validity (a CRL's nextUpdate), aware UTC.
        days_left: (not_after - now) in days, negative once expired.
        renewal_due: when it should be renewed (a CRL: re-signed), aware UTC, without jitter.
        state: ``ok``, ``renewal due``, ``expiring``, ``expired``, ``not yet valid`` or ``revoked``.
        attention: EXIT_OK, EXIT_WARNING or EXIT_CRITICAL for this row.
    """

    name: str
    kind: str
    serial: str
    not_after: dt.datetime
    days_left: float
    renewal_due: dt.datetime
    state: str
    attention: int

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["not_after"] = self.not_after.isoformat()
        out["renewal_due"] = self.renewal_due.isoformat()
        out["days_left"] = round(self.days_left, 3)
        return out


def _attention(state: str, days_left: float, warn_days: float | None) -> int:
    if state == "expired":
        return EXIT_CRITICAL
    if state == "expiring" or (warn_days is not None and state != "revoked" and days_left < warn_days):
        return EXIT_WARNING
    return EXIT_OK


def status_rows(
    records: Sequence[Record],
    now: dt.datetime,
    *,
    fraction: float,
    crls: Sequence[tuple[str, int, dt.datetime, dt.datetime]] = (),
    warn_days: float | None = None,
) -> list[StatusRow]:
    """Turn inventory records and CRL metadata into status rows at ``now`` (aware UTC).

    Args:
        records: the current certificates (:meth:`pkictl.inventory.Inventory.records`).
        fraction: the CA's renewal fraction.
        crls: ``(issuer name, number, this_update, next_update)`` per CRL.
        warn_days: rows with fewer days left need attention (EXIT_WARNING); revoked ones never do.
    """
    rows = []
    for record in records:
        assert record.not_before is not None and record.not_after is not None
        days_left = (record.not_after - now).total_seconds() / 86400
        if record.status == "revoked":
            state = "revoked"
        else:
            state = certificate_state(now, record.not_before, record.not_after, fraction=fraction)
        rows.append(StatusRow(
            name=record.name, kind=record.kind, serial=f"{record.serial:x}", not_after=record.not_after,
            days_left=days_left, renewal_due=renewal_time(record.not_before, record.not_after, fraction=fraction),
            state=state, attention=_attention(state, days_left, warn_days),
        ))
    for issuer, number, this_update, next_update in crls:
        days_left = (next_update - now).total_seconds() / 86400
        # A CRL is re-signed at half its validity; past that, whoever re-signs it is not running.
        state = certificate_state(now, this_update, next_update, fraction=0.5)
        attention = _attention(state, days_left, warn_days)
        if state == "renewal due":
            attention = max(attention, EXIT_WARNING)
        rows.append(StatusRow(
            name=issuer, kind="crl", serial=f"#{number}", not_after=next_update, days_left=days_left,
            renewal_due=renewal_time(this_update, next_update, fraction=0.5), state=state, attention=attention,
        ))
    return rows


def exit_code(rows: Sequence[StatusRow]) -> int:
    """The worst attention level of ``rows`` (EXIT_OK when there are none)."""
    return max((row.attention for row in rows), default=EXIT_OK)


def format_table(rows: Sequence[StatusRow]) -> list[str]:
    """The rows as aligned text lines under a header, times in UTC."""
    table = [("NAME", "KIND", "SERIAL", "NOT AFTER (UTC)", "DAYS LEFT", "RENEWAL DUE (UTC)", "STATE")]
    for r in rows:
        table.append((r.name, r.kind, r.serial[:16], f"{r.not_after:%Y-%m-%d %H:%M:%S}", f"{r.days_left:.1f}",
                      f"{r.renewal_due:%Y-%m-%d %H:%M:%S}", r.state))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
