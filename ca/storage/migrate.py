"""Moving a CA's records from SQLite to PostgreSQL (``pkictl db migrate``), and the CA home of
a replica host (``pkictl db replica``).

A migration copies every table row for row and the audit chain line for line (the same bytes,
so the same hashes: ``pkictl audit verify`` checks the chain on both sides of the move), in one
PostgreSQL transaction, while it holds the SQLite write lock and the audit log's lock: no
issuance can slip in between the copy and the switch. Then ``database.yaml`` names the database,
and the SQLite file and the audit log are renamed ``*.migrated`` (kept, never read again).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import secrets
from pathlib import Path

from ..audit import AuditLog
from ..clock import SystemClock
from ..errors import AuditError, CAExistsError, InventoryError, PKIError
from .location import DATABASE_FILE, SQLITE_FILE, check_url, database_url, open_database, write_database_url

__all__ = ["TABLES", "MigrationResult", "migrate_to_postgres", "write_replica_home", "REPLICA_FILES"]

# Every inventory table, with its columns as both schemas have them.
TABLES: dict[str, tuple[str, ...]] = {
    "certificates": ("serial", "name", "name_key", "kind", "status", "sans", "requested_at", "issuer", "not_before", "not_after",
                     "spki_sha256", "renewal_due", "superseded", "successor", "revoked_at", "revocation_reason", "pem"),
    "crls": ("issuer", "issuer_name", "number", "this_update", "next_update", "pem"),
    "tokens": ("token_sha256", "name", "name_key", "created_at", "expires_at", "used_at", "replaces"),
    "requests": ("spki_sha256", "name", "name_key", "code", "peer", "requested_at", "status", "decided_at", "serial"),
    "gateway_reports": ("gateway", "serial", "received_at", "interval", "report"),
    "issuance_peers": ("serial", "peer"),
}


class MigrationResult(dict):
    """Rows copied per table, and ``audit_records``."""


def migrate_to_postgres(home: Path, url: str) -> MigrationResult:
    """Copy the records of the SQLite CA in ``home`` into the empty PostgreSQL database at
    ``url`` and switch the CA to it.

    Args:
        home: the CA home (its ``inventory.sqlite3`` and ``audit.log``).
        url: a ``postgresql://`` URL without a password (:func:`pkictl.storage.location.check_url`).

    Returns:
        Rows copied, by table (and ``audit_records``).

    Raises:
        SettingsError: the URL is refused.
        InventoryError: the CA uses PostgreSQL already, or has no SQLite inventory.
        CAExistsError: the database holds a CA already (nothing is written).
        AuditError: the audit log does not verify (a broken chain is not carried over).
        DatabaseError: the database cannot be reached, or the copy failed (rolled back: the CA
            keeps using SQLite).
    """
    from ..inventory import Inventory

    home = Path(home)
    url = check_url(url)
    if database_url(home) is not None:
        raise InventoryError(f"the CA in {home} keeps its records in PostgreSQL already ({home / DATABASE_FILE})")
    sqlite_path = home / SQLITE_FILE
    if not sqlite_path.is_file():
        raise InventoryError(f"no inventory at {sqlite_path}: nothing to migrate")
    source = Inventory(sqlite_path)  # migrates an older SQLite schema to the current one first
    target = Inventory(open_database(home, url=url))
    log = AuditLog(home / "audit.log", clock=SystemClock())
    copied = MigrationResult()
    audit_fd = os.open(log.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(audit_fd, fcntl.LOCK_EX)  # no append between the check and the copy
        src, dst = source.database, target.database
        src.begin()  # the SQLite write lock: no issuance between the copy and the switch
        try:
            dst.begin()
            try:
                found = dst.execute("SELECT serial, name FROM certificates WHERE kind = 'root' LIMIT 1").fetchone()
                if found is not None or dst.execute("SELECT 1 FROM audit_records LIMIT 1").fetchone():
                    raise CAExistsError(f"the database {url} holds a CA already{f' (root {found[1]})' if found else ''}: "
                                        "pkictl never merges two CAs; migrate into an empty database")
                for table, columns in TABLES.items():
                    names = ", ".join(f'"{c}"' for c in columns)
                    rows = [tuple(r) for r in src.execute(f"SELECT {names} FROM {table}")]
                    if rows:
                        dst.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})", rows)
                    copied[table] = len(rows)
                copied["audit_records"] = _copy_audit(log, dst)
                _fill_crl_pems(home, dst)
            except BaseException:
                dst.rollback()
                raise
            dst.commit()
            write_database_url(home, url)
        finally:
            src.rollback()
        for name in (SQLITE_FILE, f"{SQLITE_FILE}-wal", f"{SQLITE_FILE}-shm", "audit.log", "audit.log.head"):
            if (home / name).exists():
                os.replace(home / name, home / f"{name}.migrated")
    finally:
        os.close(audit_fd)
        source.close()
        target.close()
    return copied


def _copy_audit(log: AuditLog, db) -> int:
    """Insert the file's records as rows, unchanged, and its head; refuse a chain that does not verify."""
    raw = log.path.read_bytes() if log.path.exists() else b""
    # The caller holds the log's lock already, so the chain is checked here without taking it again.
    result = log._verify_stream(iter(raw.splitlines(keepends=True)), None, missing=not log.path.exists())
    if not result.ok:
        raise AuditError(f"{log.path} does not verify ({result.problem}): pkictl carries over only an intact chain; "
                         "run pkictl audit verify and settle that first")
    lines = [line.decode("ascii") for line in raw.splitlines() if line]
    if raw and not raw.endswith(b"\n"):
        lines = lines[:-1]  # a torn last record (verify accepted it after the head): not a record
    if lines:
        import json

        db.executemany("INSERT INTO audit_records (seq, line) VALUES (?, ?)", [(n, line) for n, line in enumerate(lines, start=1)])
        last = json.loads(lines[-1])
        db.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", (last["seq"], last["hash"]))
    return len(lines)


def _fill_crl_pems(home: Path, db) -> None:
    """An inventory older than schema 7 did not keep its CRLs: take them from crl.pem, by issuer
    name and number, so that every replica can publish them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from ..crl import crl_number, crls_from_pem

    path = home / "crl.pem"
    if not path.exists():
        return
    for crl in crls_from_pem(path.read_bytes(), source=str(path)):
        names = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        if names:
            db.execute("UPDATE crls SET pem = ? WHERE issuer_name = ? AND number = ? AND pem IS NULL",
                       (crl.public_bytes(serialization.Encoding.PEM).decode("ascii"), str(names[0].value), crl_number(crl)))


# What a replica host's CA home holds: the CA's certificates, its issuing keys (the replica signs),
# its settings, the database's URL and the CRLs. Never the root key (docs/design.md, "CA replicas").
REPLICA_FILES = ("ca.yaml", "ca.pem", "crl.pem", DATABASE_FILE, "root/cert.pem", "root/crl.pem")
REPLICA_DIRS = ("issuing", "pending-issuing", "retired")


def write_replica_home(home: Path, destination: Path) -> list[str]:
    """Write into ``destination`` (which must not exist) the CA home another ``pkictl serve``
    replica of the CA in ``home`` runs from, through a staging directory renamed at the end.

    Returns:
        The paths written, relative to ``destination``.

    Raises:
        InventoryError: the CA keeps its records in SQLite (a replica shares PostgreSQL:
            ``pkictl db migrate`` first).
        CAExistsError: ``destination`` exists.
    """
    home, destination = Path(home), Path(destination)
    if database_url(home) is None:
        raise InventoryError(f"the CA in {home} keeps its records in SQLite, which only one host can use: "
                             "move them to PostgreSQL first (pkictl db migrate URL), then make replicas")
    if destination.exists() or destination.is_symlink():
        raise CAExistsError(f"{destination} exists; give a new directory for the replica's CA home")
    from ..files import make_private_dir

    make_private_dir(destination.parent) if not destination.parent.exists() else None
    staging = destination.parent / f".replica-{secrets.token_hex(4)}"
    make_private_dir(staging)
    written: list[str] = []
    try:
        for name in REPLICA_FILES:
            if (home / name).is_file():
                (staging / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.copy2(home / name, staging / name)
                written.append(name)
        for name in REPLICA_DIRS:
            if (home / name).is_dir():
                (staging / name).mkdir(mode=0o700)  # not as a parent below: mkdir(parents=True) makes those 0777 & ~umask
                for path in sorted((home / name).rglob("*")):
                    relative = path.relative_to(home)
                    if path.is_dir():
                        (staging / relative).mkdir(mode=0o700, parents=True, exist_ok=True)
                    elif path.is_file() and not path.name.startswith("."):
                        (staging / relative).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        shutil.copy2(path, staging / relative)
                        written.append(str(relative))
        if (staging / "root" / "key.pem").exists():  # pragma: no cover - REPLICA_FILES never names it
            raise PKIError("refusing to copy the root key into a replica's home")
        os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
