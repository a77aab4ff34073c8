"""The status report: one row per current certificate with its expiry, renewal time and state."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from .inventory import Record
from .renewal import certificate_state, renewal_time

__all__ = ["StatusRow", "status_rows", "format_table"]


@dataclasses.dataclass(frozen=True)
class StatusRow:
    """One certificate as ``pkictl status`` shows it.

    Attributes:
        name, kind, serial: whom and what (serial as lower-case hex).
        not_after: end of validity, aware UTC.
        days_left: (not_after - now) in days, negative once expired.
        renewal_due: notBefore + renewal fraction x lifetime, aware UTC (no jitter).
        state: one of :data:`pkictl.renewal.STATES`.
    """

    name: str
    kind: str
    serial: str
    not_after: dt.datetime
    days_left: float
    renewal_due: dt.datetime
    state: str

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["not_after"] = self.not_after.isoformat()
        out["renewal_due"] = self.renewal_due.isoformat()
        out["days_left"] = round(self.days_left, 3)
        return out


def status_rows(records: list[Record], now: dt.datetime, *, fraction: float) -> list[StatusRow]:
    """Turn inventory records into status rows at ``now`` (aware UTC)."""
    rows = []
    for record in records:
        assert record.not_before is not None and record.not_after is not None
        rows.append(
            StatusRow(
                name=record.name,
                kind=record.kind,
                serial=f"{record.serial:x}",
                not_after=record.not_after,
                days_left=(record.not_after - now).total_seconds() / 86400,
                renewal_due=renewal_time(record.not_before, record.not_after, fraction=fraction),
                state=certificate_state(now, record.not_before, record.not_after, fraction=fraction),
            )
        )
    return rows


def format_table(rows: list[StatusRow]) -> list[str]:
    """The rows as aligned text lines under a header, times in UTC."""
    table = [("NAME", "KIND", "SERIAL", "NOT AFTER (UTC)", "DAYS LEFT", "RENEWAL DUE (UTC)", "STATE")]
    for r in rows:
        table.append((r.name, r.kind, r.serial[:16], f"{r.not_after:%Y-%m-%d %H:%M:%S}", f"{r.days_left:.1f}",
                      f"{r.renewal_due:%Y-%m-%d %H:%M:%S}", r.state))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
