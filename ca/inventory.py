"""The inventory of issued certificates: SQLite, one row per serial number, intent before signing.

A JSON index lost records under two concurrent writers; SQLite with ``BEGIN IMMEDIATE`` kept all
of them (../shared/DESIGN.md, "Files on disk").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Sequence

from .errors import AlreadyEnrolledError

__all__ = ["Inventory", "Record", "PENDING_TIMEOUT"]

# Seconds after which a 'pending' row (intent recorded, never signed) is taken for a crash's remains.
PENDING_TIMEOUT = 300

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial       TEXT PRIMARY KEY,          -- lower-case hex, RFC 5280 4.1.2.2
    name         TEXT NOT NULL,             -- as the operator wrote it
    name_key     TEXT NOT NULL,             -- lower case: names compare without case
    kind         TEXT NOT NULL CHECK (kind IN ('root', 'issuing', 'gateway', 'node')),
    status       TEXT NOT NULL CHECK (status IN ('pending', 'issued', 'failed')),
    sans         TEXT NOT NULL,             -- JSON list of subject alternative names
    requested_at INTEGER NOT NULL,          -- UTC epoch seconds
    not_before   INTEGER,
    not_after    INTEGER,
    pem          TEXT
);
CREATE INDEX IF NOT EXISTS certificates_by_name ON certificates (kind, name_key, not_before);
"""


def _epoch(value: dt.datetime) -> int:
    return int(value.timestamp())


def _from_epoch(value: int | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Record:
    """One inventory row.

    Attributes:
        serial: the certificate's serial number.
        name, kind: whom it was issued to and its profile (root, issuing, gateway, node).
        status: ``pending`` (intent recorded, not signed), ``issued`` or ``failed``.
        sans: subject alternative names as strings (``DNS:``, ``IP:``, ``URI:`` prefixed).
        not_before, not_after: validity, aware UTC (None while pending).
        pem: the certificate (empty while pending).
    """

    serial: int
    name: str
    kind: str
    status: str
    sans: tuple[str, ...]
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    pem: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Record":
        return cls(
            serial=int(row["serial"], 16),
            name=row["name"],
            kind=row["kind"],
            status=row["status"],
            sans=tuple(json.loads(row["sans"])),
            not_before=_from_epoch(row["not_before"]),
            not_after=_from_epoch(row["not_after"]),
            pem=row["pem"] or "",
        )


class Inventory:
    """The SQLite inventory at ``path`` (created on first use).

    Args:
        path: the database file, ``<home>/inventory.sqlite3``.
        timeout: seconds to wait for another writer's lock before failing.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record_intent(
        self,
        *,
        serial: int,
        name: str,
        kind: str,
        sans: Sequence[str],
        now: dt.datetime,
        exclusive: bool,
    ) -> None:
        """Record that ``serial`` is about to be signed for ``name`` (before any signature exists).

        Args:
            exclusive: refuse when ``name`` already holds an unexpired certificate of ``kind``
                (a first enrollment); False for renewals.

        Raises:
            AlreadyEnrolledError: ``exclusive`` and the name is taken.
            sqlite3.IntegrityError: the serial number exists already (never reuse one).
        """
        with self._transaction():
            if exclusive:
                self.check_available(kind, name, now)
            self._db.execute(
                "INSERT INTO certificates (serial, name, name_key, kind, status, sans, requested_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (f"{serial:x}", name, name.lower(), kind, json.dumps(list(sans)), _epoch(now)),
            )

    def check_available(self, kind: str, name: str, now: dt.datetime) -> None:
        """Refuse a first enrollment of ``name`` while it holds an unexpired certificate of
        ``kind``, or while another enrollment of it is being signed (a ``pending`` row younger
        than :data:`PENDING_TIMEOUT` seconds; an older one is the remains of a crash).

        Raises:
            AlreadyEnrolledError: the name is taken; the message says by which serial.
        """
        row = self._db.execute(
            "SELECT serial, name, status, not_after FROM certificates WHERE kind = ? AND name_key = ? AND ("
            " (status = 'issued' AND not_after > ?) OR (status = 'pending' AND requested_at > ?))"
            " ORDER BY requested_at DESC LIMIT 1",
            (kind, name.lower(), _epoch(now), _epoch(now) - PENDING_TIMEOUT),
        ).fetchone()
        if row is None:
            return
        if row["status"] == "pending":
            raise AlreadyEnrolledError(f"{kind} {row['name']} is being enrolled by another pkictl process right now (serial {row['serial']})")
        until = _from_epoch(row["not_after"]).isoformat()  # type: ignore[union-attr]
        raise AlreadyEnrolledError(
            f"{kind} {row['name']} is already enrolled (serial {row['serial']}, valid until "
            f"{until}); its agent renews it. Choose another name, or wait until it expires"
        )

    def record_issued(self, serial: int, *, not_before: dt.datetime, not_after: dt.datetime, pem: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE certificates SET status = 'issued', not_before = ?, not_after = ?, pem = ? WHERE serial = ?",
                (_epoch(not_before), _epoch(not_after), pem, f"{serial:x}"),
            )

    def record_failed(self, serial: int) -> None:
        with self._transaction():
            self._db.execute("UPDATE certificates SET status = 'failed' WHERE serial = ?", (f"{serial:x}",))

    def get(self, serial: int) -> Record | None:
        row = self._db.execute("SELECT * FROM certificates WHERE serial = ?", (f"{serial:x}",)).fetchone()
        return Record.from_row(row) if row else None

    def records(self, *, latest_only: bool = True) -> list[Record]:
        """Issued certificates, CA certificates first, then gateways and nodes by name.

        Args:
            latest_only: keep only the newest certificate of each (kind, name); False lists the
                whole history.
        """
        order = "ORDER BY CASE kind WHEN 'root' THEN 0 WHEN 'issuing' THEN 1 WHEN 'gateway' THEN 2 ELSE 3 END, name_key, not_before"
        if latest_only:
            query = (
                "SELECT * FROM certificates c WHERE status = 'issued' AND not_before = ("
                " SELECT MAX(not_before) FROM certificates d WHERE d.kind = c.kind AND d.name_key = c.name_key"
                " AND d.status = 'issued') " + order
            )
        else:
            query = "SELECT * FROM certificates WHERE status = 'issued' " + order
        rows = [Record.from_row(r) for r in self._db.execute(query)]
        if latest_only:
            # Two certificates issued within the same second share not_before: keep the last row.
            unique: dict[tuple[str, str], Record] = {}
            for record in rows:
                unique[(record.kind, record.name.lower())] = record
            rows = list(unique.values())
        return rows

    def _transaction(self) -> "_Tx":
        return _Tx(self._db)


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error): take the write lock up front."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


