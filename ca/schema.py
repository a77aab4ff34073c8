"""The inventory's schema and its version, for SQLite and for PostgreSQL (kept apart so that
`pkictl status` can check the version without importing the inventory module).

One schema for both engines: the PostgreSQL one is the SQLite one with 64-bit integers and
double-precision reals (:func:`postgres_schema`), plus the audit chain's two tables, which on
SQLite is a file in the CA home (:mod:`pkictl.audit`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .storage.database import Database

__all__ = ["SCHEMA", "SCHEMA_VERSION", "MIGRATIONS", "POSTGRES_MIGRATIONS", "postgres_schema", "open_postgres_schema"]

SCHEMA_VERSION = 7
_CERTIFICATES = """CREATE TABLE IF NOT EXISTS {name} (
    serial       TEXT PRIMARY KEY,          -- lower-case hex, RFC 5280 4.1.2.2
    name         TEXT NOT NULL,             -- as the operator wrote it
    name_key     TEXT NOT NULL,             -- lower case: names compare without case
    kind         TEXT NOT NULL CHECK (kind IN ('root', 'issuing', 'gateway', 'node', 'service', 'operator')),
    status       TEXT NOT NULL CHECK (status IN ('pending', 'issued', 'failed', 'revoked')),
    sans         TEXT NOT NULL,             -- JSON list of subject alternative names
    requested_at INTEGER NOT NULL,          -- UTC epoch seconds
    issuer       TEXT,                      -- serial (hex) of the issuing certificate
    not_before   INTEGER,
    not_after    INTEGER,
    spki_sha256  TEXT,                      -- hex SHA-256 of the SubjectPublicKeyInfo DER
    renewal_due  REAL,                      -- notBefore + renewal fraction x lifetime (policy at issuance)
    superseded   INTEGER NOT NULL DEFAULT 0, -- 1 once a newer certificate of the same (kind, name) is signed
    successor    TEXT,                      -- serial (hex) of the certificate that renewed this one: one at most
    revoked_at   INTEGER,
    revocation_reason TEXT,                 -- RFC 5280 5.3.1 CRLReason name
    pem          TEXT
);"""
_COLUMNS = ("serial, name, name_key, kind, status, sans, requested_at, issuer, not_before, not_after, spki_sha256, "
            "renewal_due, superseded, successor, revoked_at, revocation_reason, pem")
# Changes from one version to the next, applied in order to an older inventory (the CREATE TABLE
# statements below already hold them for a new one).
MIGRATIONS: dict[int, str | tuple[str, ...]] = {
    2: "ALTER TABLE tokens ADD COLUMN replaces INTEGER NOT NULL DEFAULT 0",
    3: "ALTER TABLE certificates ADD COLUMN successor TEXT",
    4: """CREATE TABLE IF NOT EXISTS gateway_reports (
    gateway      TEXT PRIMARY KEY,          -- the gateway's name (lower case), from its certificate
    serial       TEXT NOT NULL,             -- serial (hex) of the certificate it reported with
    received_at  REAL NOT NULL,             -- UTC epoch seconds, by the CA's clock
    interval     REAL NOT NULL,             -- seconds between its heartbeats (it is stale after 3 of them)
    report       TEXT NOT NULL              -- the latest report, JSON (pkictl.fleet_report.GatewayReport)
)""",
    5: """CREATE TABLE IF NOT EXISTS issuance_peers (
    serial       TEXT PRIMARY KEY,          -- serial (hex) of a certificate issued over EST
    peer         TEXT NOT NULL              -- the address its request came from
)""",
    # A CHECK constraint cannot be altered in SQLite: the table is rebuilt with the operator kind
    # (https://www.sqlite.org/lang_altertable.html#otheralter); its indexes come back with SCHEMA.
    6: (_CERTIFICATES.format(name="certificates_v6"),
        f"INSERT INTO certificates_v6 ({_COLUMNS}) SELECT {_COLUMNS} FROM certificates",
        "DROP TABLE certificates",
        "ALTER TABLE certificates_v6 RENAME TO certificates"),
    # The CRLs themselves, so that every replica of a CA on one database serves the newest.
    7: "ALTER TABLE crls ADD COLUMN pem TEXT",
}
SCHEMA = _CERTIFICATES.format(name="certificates") + """
CREATE INDEX IF NOT EXISTS certificates_by_name ON certificates (kind, name_key, not_before);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (status, not_after);
-- one key, one identity: every issuance looks its key up (Inventory.check_key_unused); created by
-- CREATE ... IF NOT EXISTS on open, so an existing inventory gets it without a schema change
CREATE INDEX IF NOT EXISTS certificates_by_spki ON certificates (spki_sha256, kind, name_key);
-- cover pkictl status: the report reads these indexes only, never the wide rows with their PEM
CREATE INDEX IF NOT EXISTS certificates_current
    ON certificates (superseded, kind, name_key, not_before, status, not_after, renewal_due, serial, name);
CREATE INDEX IF NOT EXISTS certificates_history
    ON certificates (kind, name_key, not_before, status, not_after, renewal_due, serial, name);
CREATE TABLE IF NOT EXISTS crls (
    issuer      TEXT PRIMARY KEY,           -- serial (hex) of the CA certificate that signs it
    issuer_name TEXT NOT NULL,
    number      INTEGER NOT NULL,           -- the last CRL number used (RFC 5280 5.2.3)
    this_update INTEGER,                    -- of the last CRL written, UTC epoch seconds
    next_update INTEGER,
    pem         TEXT                        -- that CRL (every replica publishes it: Revocation.publish)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY,          -- only the hash is stored: the token is shown once
    name         TEXT NOT NULL,
    name_key     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    used_at      INTEGER,                   -- single use: set by the enrollment that spends it
    replaces     INTEGER NOT NULL DEFAULT 0 -- 1: its certificate may replace a current one (enroll-node --token --replace)
);
CREATE TABLE IF NOT EXISTS requests (
    spki_sha256  TEXT PRIMARY KEY,          -- one request per key
    name         TEXT NOT NULL,
    name_key     TEXT NOT NULL,
    code         TEXT NOT NULL,             -- pkictl.est.wire.approval_code of the key
    peer         TEXT,                      -- address the request came from
    requested_at INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'issued')),
    decided_at   INTEGER,
    serial       TEXT                       -- the certificate issued for it
);
CREATE TABLE IF NOT EXISTS gateway_reports (
    gateway      TEXT PRIMARY KEY,          -- the gateway's name (lower case), from its certificate
    serial       TEXT NOT NULL,             -- serial (hex) of the certificate it reported with
    received_at  REAL NOT NULL,             -- UTC epoch seconds, by the CA's clock
    interval     REAL NOT NULL,             -- seconds between its heartbeats (it is stale after 3 of them)
    report       TEXT NOT NULL              -- the latest report, JSON (pkictl.fleet_report.GatewayReport)
);
CREATE TABLE IF NOT EXISTS issuance_peers (
    serial       TEXT PRIMARY KEY,          -- serial (hex) of a certificate issued over EST
    peer         TEXT NOT NULL              -- the address its request came from
);
"""

# The audit chain on PostgreSQL: each record exactly as the file holds it, and the head, moved in
# the same transaction as the records (pkictl.audit.DatabaseAuditLog).
_AUDIT = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq          BIGINT PRIMARY KEY,        -- 1, 2, 3... with no gaps
    line         TEXT NOT NULL              -- the record's JSON line, without its newline
);
CREATE TABLE IF NOT EXISTS audit_head (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    seq          BIGINT NOT NULL,
    hash         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_version (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    version      INTEGER NOT NULL
);
"""
# Changes to a PostgreSQL inventory from one version to the next (the first is version 7).
POSTGRES_MIGRATIONS: dict[int, str | tuple[str, ...]] = {}


def postgres_schema() -> str:
    """The schema as PostgreSQL DDL: epoch seconds need 64 bits there (INTEGER is 32)."""
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", SCHEMA)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl) + _AUDIT


def open_postgres_schema(db: "Database") -> None:
    """Create the schema in an empty PostgreSQL database, or check and migrate an existing one,
    under the writers' lock (two replicas starting at once do it once).

    Raises:
        InventoryError: the database has a newer schema than this pkictl's.
    """
    from .errors import InventoryError

    db.begin()
    try:
        found = db.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        version = db.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()[0] if found else None
        if version is not None and version > SCHEMA_VERSION:
            raise InventoryError(f"{db.where} has inventory schema {version}, newer than this pkictl understands "
                                 f"({SCHEMA_VERSION}); upgrade pkictl on every replica")
        if version is None:
            db.execute(postgres_schema())
            db.execute("INSERT INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                migration = POSTGRES_MIGRATIONS[step]
                for statement in (migration,) if isinstance(migration, str) else migration:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ? WHERE id = 1", (SCHEMA_VERSION,))
    except BaseException:
        db.rollback()
        raise
    db.commit()
