"""The inventory's SQLite schema and its version (kept apart so that `pkictl status` can check
the version without importing the inventory module)."""

__all__ = ["SCHEMA", "SCHEMA_VERSION", "MIGRATIONS"]

SCHEMA_VERSION = 5
# Changes from one version to the next, applied in order to an older inventory (the CREATE TABLE
# statements below already hold them for a new one).
MIGRATIONS = {
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
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial       TEXT PRIMARY KEY,          -- lower-case hex, RFC 5280 4.1.2.2
    name         TEXT NOT NULL,             -- as the operator wrote it
    name_key     TEXT NOT NULL,             -- lower case: names compare without case
    kind         TEXT NOT NULL CHECK (kind IN ('root', 'issuing', 'gateway', 'node', 'service')),
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
);
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
    next_update INTEGER
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
