"""The status report: one row per current certificate and per CRL, its state, and the exit code.

``pkictl status`` must answer over 10,000 certificates about as fast as the CLI starts
(bench/status_speed.py). So SQLite renders the report in one pass over a covering index,
text or JSON included, and this module imports neither cryptography nor yaml: each row's renewal
time is stored at issuance. :func:`pkictl.renewal.certificate_state` stays the reference, and
the tests check the SQL below against it.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InventoryError

if TYPE_CHECKING:
    from .storage.database import Database
from .schema import SCHEMA_VERSION
from .renewal import certificate_state

__all__ = ["read_status", "EXIT_OK", "EXIT_WARNING", "EXIT_CRITICAL"]

EXIT_OK = 0  # nothing needs attention ("renewal due" is the agent's business, not a failure)
EXIT_WARNING = 3  # something is expiring, or within --warn-days, or a CRL is overdue for re-signing
EXIT_CRITICAL = 4  # a current certificate or a CRL has expired: connections fail now

# The certificates of one kind in name order, straight from a covering index (no grouping, no
# sort), with the states of certificate_state over epoch seconds ("expiring": less than 1/6 of the
# lifetime left) and the attention level of each.
_ROWS = """
SELECT *, CASE WHEN state = 'expired' THEN 4
               WHEN state = 'expiring' THEN 3
               WHEN :warn IS NOT NULL AND state != 'revoked' AND not_after - :now < :warn * 86400 THEN 3
               ELSE 0 END AS attention
FROM (
    SELECT name, kind, serial, not_after, renewal_due,
           CASE WHEN status = 'revoked' THEN 'revoked'
                WHEN :now >= not_after THEN 'expired'
                WHEN :now < not_before THEN 'not yet valid'
                WHEN 6 * (not_after - :now) < (not_after - not_before) THEN 'expiring'
                WHEN :now >= renewal_due THEN 'renewal due'
                ELSE 'ok' END AS state
    FROM certificates INDEXED BY {index}
    WHERE {where} kind = :kind AND status IN ('issued', 'revoked')
)
"""
# The CRLs, the issuing CAs' first, then the root's (told apart by its issuer's kind).
_CRLS = ("SELECT issuer_name, number, this_update, next_update, "
         "EXISTS (SELECT 1 FROM certificates WHERE serial = crls.issuer AND kind = 'root') AS is_root "
         "FROM crls WHERE next_update IS NOT NULL ORDER BY is_root, issuer_name")
_KINDS = ("root", "issuing", "service", "gateway", "node", "operator")
_HEADER = ("NAME", "KIND", "SERIAL", "NOT AFTER (UTC)", "DAYS LEFT", "RENEWAL DUE (UTC)", "STATE")
_WIDTHS = (None, 8, 16, 19, 9, 19, 13)  # every column but the name has a known maximum width
_TIME = "datetime({}, 'unixepoch')"  # YYYY-MM-DD HH:MM:SS, cheaper than strftime
_ISO = "replace(datetime({}, 'unixepoch'), ' ', 'T') || '+00:00'"  # ISO 8601, cheaper than strftime


def read_status(
    db_path: "Path | Database", now: dt.datetime, *, latest_only: bool = True, warn_days: float | None = None, as_json: bool = False
) -> tuple[str, int]:
    """Render the status report of the inventory at ``db_path`` at ``now`` (aware UTC).

    Args:
        db_path: the SQLite inventory, or a PostgreSQL database (:func:`status_source`); the
            report reads the latter's rows (without their PEM) into an in-memory SQLite copy
            and renders from it with the same SQL, so that both print the same report.
        latest_only: only the newest certificate of each (kind, name); False adds superseded ones.
        warn_days: rows with fewer days left need attention (EXIT_WARNING); revoked ones never do.
        as_json: a JSON array of objects (name, kind, serial -- hex, or ``#<CRL number>`` --,
            not_after and renewal_due in ISO 8601 UTC, days_left, state, attention; and fix, on
            the root's CRL once it needs attention) instead of a table with times in UTC to the
            second (and a line with that fix after it).

    Returns:
        ``(text, exit code)``: the exit code is the worst attention level, EXIT_OK,
        EXIT_WARNING or EXIT_CRITICAL.
    """
    params = {"now": now.timestamp(), "warn": warn_days}
    if latest_only:
        rows = _ROWS.format(index="certificates_current", where="superseded = 0 AND")
    else:
        rows = _ROWS.format(index="certificates_history", where="")
    crls = []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) if isinstance(db_path, (str, Path)) else _snapshot(db_path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise InventoryError(f"{db_path} has inventory schema {version}, this pkictl reads {SCHEMA_VERSION}: "
                                 "use the pkictl version that created the CA")
        for issuer, number, this_update, next_update, is_root in db.execute(_CRLS):
            crls.append(_crl_row(issuer, number, this_update, next_update, now, warn_days, root=bool(is_root)))
        if as_json:
            obj = (f"json_object('name', name, 'kind', kind, 'serial', serial, 'not_after', {_ISO.format('not_after')}, "
                   "'days_left', round((not_after - :now) / 86400.0, 3), "
                   f"'renewal_due', {_ISO.format('CAST(renewal_due AS INTEGER)')}, 'state', state, 'attention', attention)")
            items, worst = _per_kind(db, f"SELECT group_concat({obj}, ',' || char(10) || ' '), max(attention) FROM ({rows})", params)
            if crls:
                import json

                items += [json.dumps(c, separators=(",", ":")) for c in crls]
            text = "[\n " + ",\n ".join(items) + "\n]"
        else:
            longest = db.execute("SELECT max(length(name)) FROM certificates INDEXED BY certificates_history").fetchone()[0] or 0
            widths = (max(longest, len(_HEADER[0]), *(len(c["name"]) for c in crls)), *_WIDTHS[1:])
            cells = ("name", "kind", "substr(serial, 1, 16)", _TIME.format("not_after"),
                     "printf('%.1f', (not_after - :now) / 86400.0)", _TIME.format("CAST(renewal_due AS INTEGER)"), "state")
            line = "rtrim(printf('" + "  ".join(["%-*s"] * len(cells)) + "', " + ", ".join(f"{w}, {c}" for w, c in zip(widths, cells, strict=True)) + "))"
            bodies, worst = _per_kind(db, f"SELECT group_concat({line}, char(10)), max(attention) FROM ({rows})", params)
            lines = [_line(_HEADER, widths)] + bodies + [_line(_crl_cells(c), widths) for c in crls]
            lines += [f"{c['name']}: {c['fix']}" for c in crls if "fix" in c]
            text = "\n".join(lines)
    finally:
        db.close()
    return text, max([worst] + [c["attention"] for c in crls])


def status_source(home: Path) -> "Path | Database":
    """What :func:`read_status` reads for the CA in ``home``: its SQLite file, or its PostgreSQL
    database when ``database.yaml`` names one.

    Raises:
        SettingsError, DatabaseError: as :func:`pkictl.storage.location.open_database`.
    """
    from .storage.location import SQLITE_FILE, database_url, open_database

    if database_url(home) is None:
        return Path(home) / SQLITE_FILE
    return open_database(home)


def _snapshot(source: "Database") -> sqlite3.Connection:
    """An in-memory SQLite copy of ``source``'s signed certificates (without PEM) and CRLs, with
    its schema version (which :func:`read_status` checks); ``source`` is closed."""
    from .schema import SCHEMA

    snapshot = sqlite3.connect(":memory:")
    snapshot.executescript(SCHEMA)
    columns = ("serial, name, name_key, kind, status, sans, requested_at, issuer, not_before, not_after, spki_sha256, "
               "renewal_due, superseded, successor, revoked_at, revocation_reason")
    version = source.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    snapshot.execute(f"PRAGMA user_version = {int(version[0]) if version else 0}")
    rows = source.execute(f"SELECT {columns} FROM certificates WHERE status IN ('issued', 'revoked')").fetchall()
    snapshot.executemany(f"INSERT INTO certificates ({columns}) VALUES ({', '.join('?' * 16)})", [tuple(r) for r in rows])
    crls = source.execute("SELECT issuer, issuer_name, number, this_update, next_update FROM crls").fetchall()
    snapshot.executemany("INSERT INTO crls (issuer, issuer_name, number, this_update, next_update) VALUES (?, ?, ?, ?, ?)",
                         [tuple(r) for r in crls])
    source.close()
    return snapshot


def _per_kind(db: sqlite3.Connection, query: str, params: dict) -> tuple[list[str], int]:
    """Run ``query`` (text, worst attention) once per kind, in display order."""
    texts, worst = [], EXIT_OK
    for kind in _KINDS:
        text, attention = db.execute(query, {**params, "kind": kind}).fetchone()
        if text:
            texts.append(text)
            worst = max(worst, attention)
    return texts, worst


def _line(cells, widths) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _crl_row(issuer: str, number: int, this_update: int, next_update: int, now: dt.datetime, warn_days: float | None,
             *, root: bool = False) -> dict:
    """A CRL as a report row. It is re-signed at half its validity, so past that whoever
    re-signs it is not running: unlike a certificate's, its 'renewal due' needs attention. The
    root's CRL is re-signed only where the root key is: from then on its row carries a ``fix``
    naming ``pkictl sign-crl --root`` and the date it must run by (docs/design.md, "CRLs for
    every level of the chain")."""
    utc = dt.timezone.utc
    state = certificate_state(now, dt.datetime.fromtimestamp(this_update, utc), dt.datetime.fromtimestamp(next_update, utc), fraction=0.5)
    days_left = (next_update - now.timestamp()) / 86400
    attention = {"expired": EXIT_CRITICAL, "expiring": EXIT_WARNING, "renewal due": EXIT_WARNING}.get(state, EXIT_OK)
    if warn_days is not None and days_left < warn_days:
        attention = max(attention, EXIT_WARNING)
    due = (this_update + next_update) // 2
    row = {"name": issuer, "kind": "crl", "serial": f"#{number}",
           "not_after": dt.datetime.fromtimestamp(next_update, utc).isoformat(), "days_left": round(days_left, 3),
           "renewal_due": dt.datetime.fromtimestamp(due, utc).isoformat(), "state": state, "attention": attention}
    if root and attention:
        what = ("has expired (servers that check every level of the chain refuse every client)" if state == "expired"
                else f"must be re-signed before {row['not_after']}")
        row["fix"] = f"the root's CRL {what}: bring the root key back and run pkictl sign-crl --root"
    return row


def _crl_cells(row: dict) -> tuple[str, ...]:
    def text(iso: str) -> str:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")

    return (row["name"], "crl", row["serial"], text(row["not_after"]), f"{row['days_left']:.1f}", text(row["renewal_due"]), row["state"])
