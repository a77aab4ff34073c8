"""The inventory of issued certificates: SQLite, one row per serial number, intent before signing.

A JSON index lost records under two concurrent writers; SQLite with ``BEGIN IMMEDIATE`` kept all
of them (docs/design.md, "Files on disk").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import AlreadyEnrolledError, InventoryError, KeyReused, RequestLimitError
from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION, open_postgres_schema
from .storage.database import SQLiteDatabase
from .storage.location import open_database

if TYPE_CHECKING:
    from cryptography import x509

    from .storage.database import Database, Row

__all__ = ["Inventory", "Record", "Superseded", "PENDING_TIMEOUT", "SCHEMA_VERSION"]

# Seconds after which a 'pending' row (intent recorded, never signed) is taken for a crash's remains.
PENDING_TIMEOUT = 300



class Superseded(InventoryError):
    """A renewal lost the race: its predecessor was renewed (or replaced) meanwhile.

    Attributes:
        predecessor: the serial number that may no longer renew.
    """

    def __init__(self, predecessor: int) -> None:
        super().__init__(f"certificate serial {predecessor:x} was renewed or replaced meanwhile")
        self.predecessor = predecessor


def _epoch(value: dt.datetime) -> int:
    return int(value.timestamp())


def _utc(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def _from_epoch(value: int | None) -> dt.datetime | None:
    return None if value is None else _utc(value)


@dataclasses.dataclass(frozen=True)
class Record:
    """One inventory row.

    Attributes:
        serial: the certificate's serial number.
        name, kind: whom it was issued to and its profile (root, issuing, gateway, node).
        status: ``pending`` (intent recorded, not signed), ``issued`` or ``failed``.
        sans: subject alternative names as strings (``DNS:``, ``IP:``, ``URI:`` prefixed).
        issuer: serial number of the CA certificate that signed it (None for the root).
        not_before, not_after: validity, aware UTC (None while pending).
        spki_sha256: hex SHA-256 of the subject public key info ("" while pending).
        revoked_at, revocation_reason: set once revoked (RFC 5280 5.3.1 reason name).
        pem: the certificate (empty while pending).
        superseded: a newer certificate of the same (kind, name) has been signed.
        successor: the serial number of the certificate that renewed this one, or None.
    """

    serial: int
    name: str
    kind: str
    status: str
    sans: tuple[str, ...]
    issuer: int | None
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    spki_sha256: str
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    pem: str
    superseded: bool = False
    successor: int | None = None

    @classmethod
    def from_row(cls, row: "Row") -> "Record":
        return cls(
            serial=int(row["serial"], 16),
            name=row["name"],
            kind=row["kind"],
            status=row["status"],
            sans=tuple(json.loads(row["sans"])),
            issuer=int(row["issuer"], 16) if row["issuer"] else None,
            not_before=_from_epoch(row["not_before"]),
            not_after=_from_epoch(row["not_after"]),
            spki_sha256=row["spki_sha256"] or "",
            revoked_at=_from_epoch(row["revoked_at"]),
            revocation_reason=row["revocation_reason"],
            pem=row["pem"] or "",
            superseded=bool(row["superseded"]) if "superseded" in row.keys() else False,
            successor=int(row["successor"], 16) if "successor" in row.keys() and row["successor"] else None,
        )


class Inventory:
    """The inventory: ``<home>/inventory.sqlite3`` (created on first use), or a PostgreSQL
    database several CA replicas share (:mod:`pkictl.storage.database`).

    Args:
        where: the SQLite file, or an open :class:`pkictl.storage.database.Database`.
        timeout: SQLite: seconds to wait for another writer's lock before failing.

    Raises:
        InventoryError: the schema is newer than this pkictl's, or the database cannot be reached.
    """

    def __init__(self, where: "Path | Database", *, timeout: float = 30.0) -> None:
        if isinstance(where, (str, Path)):
            self._db: Database = SQLiteDatabase(Path(where), timeout=timeout)
        else:
            self._db = where
        self.path = Path(self._db.where) if self._db.engine == "sqlite" else None
        self.where = self._db.where
        try:
            if self._db.engine == "sqlite":
                self._open_sqlite()
            else:
                open_postgres_schema(self._db)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, home: Path, *, wait: float | None = None) -> "Inventory":
        """The inventory of the CA in ``home`` (:func:`pkictl.storage.location.open_database`;
        ``wait``: seconds a statement waits for a PostgreSQL connection, default POOL_WAIT)."""
        return cls(open_database(home, wait=wait))

    @property
    def engine(self) -> str:
        """``"sqlite"`` or ``"postgresql"``: shared by replicas when PostgreSQL."""
        return self._db.engine

    @property
    def database(self) -> "Database":
        return self._db

    def _open_sqlite(self) -> None:
        assert isinstance(self._db, SQLiteDatabase)
        version = self._db.user_version()
        if version > SCHEMA_VERSION:
            raise InventoryError(
                f"{self.where} has inventory schema {version}, newer than this pkictl understands "
                f"({SCHEMA_VERSION}); upgrade pkictl"
            )
        fresh = not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'certificates'").fetchone()
        if version < SCHEMA_VERSION and not fresh:
            with self._transaction():  # every step or none: a failed migration leaves the old schema
                # Read again under the write lock: another process may have migrated meanwhile.
                version = self._db.user_version()
                for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    migration = MIGRATIONS[step]
                    for statement in (migration,) if isinstance(migration, str) else migration:
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.connection.executescript(SCHEMA)
        if fresh:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        issuer: int | None = None,
    ) -> None:
        """Record that ``serial`` is about to be signed for ``name`` (before any signature exists).

        Args:
            exclusive: refuse when ``name`` already holds an unexpired certificate of ``kind``
                (a first enrollment); False for renewals.

        Raises:
            AlreadyEnrolledError: ``exclusive`` and the name is taken.
            DuplicateKey: the serial number exists already (never reuse one).
        """
        with self._transaction():
            if exclusive:
                self.check_available(kind, name, now)
            self._insert_pending(serial=serial, name=name, kind=kind, sans=sans, now=now, issuer=issuer)

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
            raise AlreadyEnrolledError(f"{kind} {row['name']} is being enrolled by another pkictl process right now (serial {row['serial']})",
                                       serial=row["serial"])
        until = _utc(row["not_after"]).isoformat()  # an issued row has its validity
        raise AlreadyEnrolledError(
            f"{kind} {row['name']} is already enrolled (serial {row['serial']}, valid until {until}); its agent renews it",
            serial=row["serial"],
        )

    def check_key_unused(self, spki_sha256: str, *, kind: str, name: str) -> None:
        """Refuse a key that belongs to anyone but (``kind``, ``name``): one key, one identity.

        A key is taken by every signed certificate ever recorded for it (issued or revoked,
        expired or not: the root and every issuing CA are recorded too) and by a pairing request
        waiting for approval or approved. The same identity with its own key is a renewal
        (renew, not rekey) and passes. Two indexed lookups (``certificates_by_spki``, the
        ``requests`` primary key).

        Args:
            spki_sha256: hex SHA-256 of the key's SubjectPublicKeyInfo DER.
            kind, name: the identity the key is to be certified for (names compare without case).

        Raises:
            KeyReused: ``str()`` says only that the key is taken (safe for an EST client);
                ``operator_message`` names by whom (kind, name, serial or approval code).
        """
        row = self._db.execute(
            "SELECT serial, kind, name FROM certificates WHERE spki_sha256 = ? AND status IN ('issued', 'revoked') "
            "AND NOT (kind = ? AND name_key = ?) ORDER BY kind IN ('root', 'issuing') DESC LIMIT 1",
            (spki_sha256, kind, name.lower()),
        ).fetchone()
        fix = f"make a new key for {kind} {name}"
        if row is not None and row["kind"] in ("root", "issuing"):
            # Public knowledge (/cacerts serves every CA certificate), so the client may read it.
            message = f"the key is the {row['kind']} CA's ({row['name']}, serial {row['serial']}): a CA key never certifies an end entity; {fix}"
            raise KeyReused(message, operator_message=message)
        if row is not None:
            raise KeyReused(f"the key is already certified for another identity: a key belongs to one identity; {fix}",
                            operator_message=f"the key is already certified for {row['kind']} {row['name']} (serial {row['serial']}): "
                                             f"a key belongs to one identity; {fix}")
        request = self._db.execute(
            "SELECT name, code FROM requests WHERE spki_sha256 = ? AND status IN ('pending', 'approved') AND NOT (? = 'node' AND name_key = ?)",
            (spki_sha256, kind, name.lower()),
        ).fetchone()
        if request is not None:
            raise KeyReused(f"the key already waits for approval as another identity's: a key belongs to one identity; {fix}",
                            operator_message=f"the key already waits for approval as node {request['name']}'s (code {request['code']}, "
                                             f"see 'pkictl requests'): a key belongs to one identity; {fix}")

    def record_issued(self, certificate, *, renewal_fraction: float = 2 / 3) -> None:
        """Complete the intent row of ``certificate`` (an ``x509.Certificate``) once it is signed.

        Args:
            renewal_fraction: the CA's policy, stored as the certificate's renewal time so that
                ``pkictl status`` needs nothing but this database.
        """
        with self._transaction():
            self._mark_issued(certificate, renewal_fraction)

    def record_signed(
        self,
        *,
        serial: int,
        name: str,
        kind: str,
        sans: Sequence[str],
        now: dt.datetime,
        exclusive: bool,
        issuer: int | None,
        sign: Callable[[], "x509.Certificate"],
        renewal_fraction: float = 2 / 3,
        predecessor: int | None = None,
        spki_sha256: str | None = None,
    ):
        """Record ``serial`` for ``name``, call ``sign()`` and record the certificate it returns,
        all in one transaction, and return the certificate.

        The row is inserted (under the serial's UNIQUE constraint, and after the availability
        check of a first enrollment) before ``sign`` runs, and the certificate exists only in
        memory until the transaction commits: a crash at any point leaves either no certificate
        and no row, or both. One commit (one WAL fsync) instead of the two of
        :meth:`record_intent` + :meth:`record_issued`; the write lock is held while ``sign`` runs
        (one signature, well under a millisecond), so nothing else can take the name meanwhile.

        Args: as :meth:`record_intent`, plus ``sign`` (makes the certificate for ``serial``),
            ``renewal_fraction`` (as :meth:`record_issued`), ``predecessor``: for a renewal,
            the serial it renews, which must still be its identity's current certificate, and
            ``spki_sha256``: the subject key's hex SHA-256, checked with
            :meth:`check_key_unused` in this transaction (two concurrent requests cannot both
            take one key for two identities).

        Raises:
            AlreadyEnrolledError: ``exclusive`` and the name is taken.
            KeyReused: the key is a CA key or another identity's; nothing is recorded then.
            Superseded: ``predecessor`` was renewed already, or is no longer current (checked and
                claimed in this transaction: of concurrent renewals of one certificate exactly one
                gets a successor); nothing is recorded then.
            DuplicateKey: the serial number exists already (never reuse one).
            Whatever ``sign`` raises; nothing is recorded then.
        """
        with self._transaction():
            if exclusive:
                self.check_available(kind, name, now)
            if spki_sha256 is not None:
                self.check_key_unused(spki_sha256, kind=kind, name=name)
            if predecessor is not None:
                # Compare-and-set: the successor is claimed before anything is signed.
                claimed = self._db.execute(
                    "UPDATE certificates SET successor = ? WHERE serial = ? AND status = 'issued' AND superseded = 0 "
                    "AND successor IS NULL", (f"{serial:x}", f"{predecessor:x}"),
                ).rowcount
                if claimed != 1:
                    raise Superseded(predecessor)
            self._insert_pending(serial=serial, name=name, kind=kind, sans=sans, now=now, issuer=issuer)
            certificate = sign()
            if certificate.serial_number != serial:
                raise InventoryError(f"signed serial {certificate.serial_number:x}, recorded {serial:x}")
            self._mark_issued(certificate, renewal_fraction)
        return certificate

    def _insert_pending(self, *, serial: int, name: str, kind: str, sans: Sequence[str], now: dt.datetime, issuer: int | None) -> None:
        self._db.execute(
            "INSERT INTO certificates (serial, name, name_key, kind, status, sans, requested_at, issuer) "
            "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            (f"{serial:x}", name, name.lower(), kind, json.dumps(list(sans)), _epoch(now),
             None if issuer is None else f"{issuer:x}"),
        )

    def _mark_issued(self, certificate, renewal_fraction: float) -> None:
        import hashlib

        from cryptography.hazmat.primitives import serialization

        spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        not_before, not_after = _epoch(certificate.not_valid_before_utc), _epoch(certificate.not_valid_after_utc)
        serial = f"{certificate.serial_number:x}"
        self._db.execute(
            "UPDATE certificates SET status = 'issued', not_before = ?, not_after = ?, spki_sha256 = ?, "
            "renewal_due = ?, pem = ? WHERE serial = ?",
            (not_before, not_after, hashlib.sha256(spki).hexdigest(),
             not_before + renewal_fraction * (not_after - not_before), pem, serial),
        )
        # The newest signed certificate of a (kind, name) is its current one.
        self._db.execute(
            "UPDATE certificates SET superseded = CASE WHEN serial = :serial THEN 0 ELSE 1 END WHERE (kind, name_key) = "
            "(SELECT kind, name_key FROM certificates WHERE serial = :serial) AND status IN ('issued', 'revoked') "
            "AND (serial = :serial OR not_before <= :not_before)",
            {"serial": serial, "not_before": not_before},
        )

    def revoke(self, serials: Sequence[int], *, at: dt.datetime, reason: str) -> None:
        """Mark ``serials`` revoked at ``at`` for ``reason`` (RFC 5280 5.3.1 name); already
        revoked ones keep their first revocation time and reason."""
        with self._transaction():
            self._db.executemany(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                "WHERE serial = ? AND status = 'issued'",
                [(_epoch(at), reason, f"{s:x}") for s in serials],
            )

    def current(self, kind: str, name: str) -> Record | None:
        """The current certificate of (``kind``, ``name``): the newest signed one, or None."""
        row = self._db.execute(
            "SELECT * FROM certificates WHERE kind = ? AND name_key = ? AND superseded = 0 AND status IN ('issued', 'revoked') "
            "ORDER BY not_before DESC LIMIT 1", (kind, name.lower()),
        ).fetchone()
        return Record.from_row(row) if row else None

    def superseded_due(self, now: dt.datetime, grace: dt.timedelta) -> list[Record]:
        """Unexpired, unrevoked end-entity certificates superseded by a newer one of the same
        (kind, name) that was signed at least ``grace`` before ``now``: due for revocation with
        reason superseded."""
        rows = self._db.execute(
            "SELECT p.* FROM certificates p WHERE p.status = 'issued' AND p.superseded = 1 AND p.not_after > :now "
            "AND p.kind IN ('node', 'gateway', 'service') AND EXISTS (SELECT 1 FROM certificates s WHERE s.kind = p.kind "
            "AND s.name_key = p.name_key AND s.superseded = 0 AND s.status IN ('issued', 'revoked') AND s.requested_at <= :cutoff)",
            {"now": _epoch(now), "cutoff": _epoch(now - grace)},
        )
        return [Record.from_row(r) for r in rows]

    def unexpired(self, name: str, kinds: Sequence[str], now: dt.datetime) -> list[Record]:
        """Issued (not revoked) certificates of ``name`` still valid at ``now``, newest first."""
        marks = ",".join("?" * len(kinds))
        rows = self._db.execute(
            f"SELECT * FROM certificates WHERE name_key = ? AND kind IN ({marks}) AND status = 'issued' "
            "AND not_after > ? ORDER BY not_before DESC",
            (name.lower(), *kinds, _epoch(now)),
        )
        return [Record.from_row(r) for r in rows]

    def revoked(self, issuer: int, now: dt.datetime) -> list[Record]:
        """Revoked certificates signed by ``issuer`` that have not expired at ``now`` (an expired
        certificate may leave the CRL: RFC 5280 section 3.3)."""
        rows = self._db.execute(
            "SELECT * FROM certificates WHERE status = 'revoked' AND issuer = ? AND not_after > ? ORDER BY revoked_at",
            (f"{issuer:x}", _epoch(now)),
        )
        return [Record.from_row(r) for r in rows]

    def next_crl_number(self, issuer: int, issuer_name: str) -> int:
        """Reserve the next CRL number of ``issuer`` (1 the first time; RFC 5280 5.2.3: it only grows)."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO crls (issuer, issuer_name, number) VALUES (?, ?, 1) "
                "ON CONFLICT (issuer) DO UPDATE SET number = crls.number + 1",
                (f"{issuer:x}", issuer_name),
            )
            return self._db.execute("SELECT number FROM crls WHERE issuer = ?", (f"{issuer:x}",)).fetchone()[0]

    def record_crl(self, issuer: int, *, number: int, this_update: dt.datetime, next_update: dt.datetime, pem: str | None = None) -> bool:
        """Remember the CRL just written (its validity for status and for re-signing in time, and
        the CRL itself, which every replica publishes: :meth:`published_crls`).

        Only the newest number reserved for ``issuer`` is recorded: when two replicas sign at
        once, the CRL with the lower number (signed from an older view) is not published.

        Returns:
            False if a higher CRL number was reserved meanwhile (nothing recorded).
        """
        with self._transaction():
            return self._db.execute(
                "UPDATE crls SET this_update = ?, next_update = ?, pem = COALESCE(?, pem) WHERE issuer = ? AND number = ?",
                (_epoch(this_update), _epoch(next_update), pem, f"{issuer:x}", number),
            ).rowcount == 1

    def published_crls(self) -> list[tuple[int, int, str]]:
        """``(issuer serial, CRL number, PEM)`` of the newest CRL of each issuer still published:
        the issuing CAs' by name, then the root's."""
        rows = self._db.execute(
            "SELECT issuer, number, pem FROM crls c WHERE next_update IS NOT NULL AND pem IS NOT NULL ORDER BY "
            "CASE WHEN EXISTS (SELECT 1 FROM certificates WHERE serial = c.issuer AND kind = 'root') THEN 1 ELSE 0 END, issuer_name")
        return [(int(r[0], 16), int(r[1]), str(r[2])) for r in rows]

    def forget_crl(self, issuer: int) -> None:
        """Stop reporting the CRL of ``issuer`` (a retired issuing CA with nothing left to revoke)."""
        with self._transaction():
            self._db.execute("UPDATE crls SET next_update = NULL WHERE issuer = ?", (f"{issuer:x}",))

    def has_unexpired(self, issuer: int, now: dt.datetime) -> bool:
        """True while a certificate signed by ``issuer`` is unexpired at ``now``."""
        row = self._db.execute(
            "SELECT 1 FROM certificates WHERE issuer = ? AND status IN ('issued', 'revoked') AND not_after > ? LIMIT 1",
            (f"{issuer:x}", _epoch(now)),
        ).fetchone()
        return row is not None

    def crls(self) -> list[tuple[int, str, int, dt.datetime, dt.datetime]]:
        """``(issuer serial, issuer name, number, this_update, next_update)`` of each CRL written
        (the issuing CAs' and the root's)."""
        rows = self._db.execute("SELECT * FROM crls WHERE next_update IS NOT NULL ORDER BY issuer_name")
        return [(int(r["issuer"], 16), r["issuer_name"], r["number"], _utc(r["this_update"]), _utc(r["next_update"]))
                for r in rows]  # set together

    # -- bootstrap: one-time tokens and approval requests ---------------------------------------

    def add_token(self, name: str, token_sha256: str, *, now: dt.datetime, expires_at: dt.datetime, replaces: bool = False) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO tokens (token_sha256, name, name_key, created_at, expires_at, replaces) VALUES (?, ?, ?, ?, ?, ?)",
                (token_sha256, name, name.lower(), _epoch(now), _epoch(expires_at), int(replaces)),
            )

    def token_replaces(self, name: str, token_sha256: str, now: dt.datetime) -> bool | None:
        """Whether an unexpired, unused token of ``name`` may replace a current certificate; None
        if there is no such token (wrong, expired or spent). Nothing is spent."""
        row = self._db.execute(
            "SELECT replaces FROM tokens WHERE token_sha256 = ? AND name_key = ? AND used_at IS NULL AND expires_at > ?",
            (token_sha256, name.lower(), _epoch(now)),
        ).fetchone()
        return None if row is None else bool(row["replaces"])

    def consume_token(self, name: str, token_sha256: str, now: dt.datetime) -> bool:
        """Spend a token: True once for an unexpired, unused token issued for ``name``."""
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE tokens SET used_at = ? WHERE token_sha256 = ? AND name_key = ? AND used_at IS NULL AND expires_at > ?",
                (_epoch(now), token_sha256, name.lower(), _epoch(now)),
            )
            return cursor.rowcount == 1

    def request_approval(self, *, name: str, spki_sha256: str, code: str, peer: str, now: dt.datetime,
                         per_name: int, total: int, ttl: dt.timedelta) -> tuple[Row, bool, list[Row]]:
        """Record a request for ``name``'s key (once; later polls find the same row), after
        dropping the pending requests older than ``ttl``; in one transaction.

        Args:
            per_name, total: how many requests may be pending at once for ``name`` and in all.
            ttl: how long a request stays pending before it expires.

        Returns:
            ``(row, created, expired)``: created is True for the first request of this key;
            expired lists the requests dropped now.

        Raises:
            RequestLimitError: a new key, and ``per_name`` requests of ``name`` (or ``total``
                requests) wait already; nothing is recorded.
        """
        with self._transaction():
            cutoff = _epoch(now - ttl)
            expired = self._db.execute("SELECT * FROM requests WHERE status = 'pending' AND requested_at <= ?", (cutoff,)).fetchall()
            if expired:
                self._db.execute("DELETE FROM requests WHERE status = 'pending' AND requested_at <= ?", (cutoff,))
            row = self._db.execute("SELECT * FROM requests WHERE spki_sha256 = ?", (spki_sha256,)).fetchone()
            if row is not None:
                return row, False, expired
            waiting = self._db.execute("SELECT COUNT(*) FROM requests WHERE status = 'pending' AND name_key = ?",
                                       (name.lower(),)).fetchone()[0]
            if waiting >= per_name:
                raise RequestLimitError(
                    f"{waiting} requests for {name} wait for approval already (at most {per_name}): this one is not recorded; "
                    f"the operator approves the right one by its code or denies them all (pkictl requests, pkictl deny {name})")
            if self._db.execute("SELECT COUNT(*) FROM requests WHERE status = 'pending'").fetchone()[0] >= total:
                raise RequestLimitError(
                    f"{total} requests wait for approval already, the most the CA keeps: this one is not recorded; "
                    "retry later, or enroll with a token (pkictl enroll-node NAME --token)")
            self._db.execute(
                "INSERT INTO requests (spki_sha256, name, name_key, code, peer, requested_at, status) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (spki_sha256, name, name.lower(), code, peer, _epoch(now)),
            )
            return self._db.execute("SELECT * FROM requests WHERE spki_sha256 = ?", (spki_sha256,)).fetchone(), True, expired

    def decide_request(self, name: str, *, code: str | None, status: str, now: dt.datetime) -> int:
        """Approve (with ``code``) or deny (any code) the pending requests of ``name``; return how many."""
        query = "UPDATE requests SET status = ?, decided_at = ? WHERE name_key = ? AND status = 'pending'"
        args: list = [status, _epoch(now), name.lower()]
        if code is not None:
            query += " AND code = ?"
            args.append(code.upper())
        with self._transaction():
            return self._db.execute(query, args).rowcount

    def request_issued(self, spki_sha256: str, serial: int) -> None:
        with self._transaction():
            self._db.execute("UPDATE requests SET status = 'issued', serial = ? WHERE spki_sha256 = ?", (f"{serial:x}", spki_sha256))

    def pending_requests(self, *, now: dt.datetime | None = None, ttl: dt.timedelta | None = None) -> list[Row]:
        """The requests waiting for approval, oldest first; with ``now`` and ``ttl``, not those
        older than ``ttl`` (expired: the next request drops them)."""
        if now is None or ttl is None:
            return self._db.execute("SELECT * FROM requests WHERE status = 'pending' ORDER BY requested_at").fetchall()
        return self._db.execute("SELECT * FROM requests WHERE status = 'pending' AND requested_at > ? ORDER BY requested_at",
                                (_epoch(now - ttl),)).fetchall()

    def get(self, serial: int) -> Record | None:
        row = self._db.execute("SELECT * FROM certificates WHERE serial = ?", (f"{serial:x}",)).fetchone()
        return Record.from_row(row) if row else None

    def records(self, *, latest_only: bool = True) -> list[Record]:
        """Signed certificates (issued or revoked), CA certificates first, then gateways and nodes by name.

        Args:
            latest_only: keep only the newest certificate of each (kind, name); False lists the
                whole history.
        """
        order = "ORDER BY CASE kind WHEN 'root' THEN 0 WHEN 'issuing' THEN 1 WHEN 'gateway' THEN 2 ELSE 3 END, name_key, not_before"
        signed = "status IN ('issued', 'revoked')"
        if latest_only:
            query = (
                f"SELECT * FROM certificates c WHERE {signed} AND not_before = ("
                f" SELECT MAX(not_before) FROM certificates d WHERE d.kind = c.kind AND d.name_key = c.name_key"
                f" AND d.{signed}) " + order
            )
        else:
            query = f"SELECT * FROM certificates WHERE {signed} " + order
        rows = [Record.from_row(r) for r in self._db.execute(query)]
        if latest_only:
            # Two certificates issued within the same second share not_before: keep the last row.
            unique: dict[tuple[str, str], Record] = {}
            for record in rows:
                unique[(record.kind, record.name.lower())] = record
            rows = list(unique.values())
        return rows

    # -- the fleet view: the gateways' reports and where EST issued to ----------------------------

    def record_gateway_report(self, gateway: str, *, serial: int, received_at: dt.datetime, interval: float, report: str) -> None:
        """Keep ``report`` (JSON) as the latest of ``gateway`` (one row per gateway, replaced).

        Args:
            serial: the certificate the gateway reported with.
            received_at: when it arrived, by the CA's clock (staleness is judged on it).
            interval: seconds between the gateway's heartbeats.
        """
        with self._transaction():
            self._db.execute(
                "INSERT INTO gateway_reports (gateway, serial, received_at, \"interval\", report) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway) DO UPDATE SET serial = excluded.serial, received_at = excluded.received_at, "
                "\"interval\" = excluded.\"interval\", report = excluded.report",
                (gateway.lower(), f"{serial:x}", received_at.timestamp(), interval, report),
            )

    def gateway_reports(self) -> list[tuple[str, int, dt.datetime, float, str]]:
        """``(gateway, serial, received_at, interval seconds, report JSON)`` of every gateway, by name."""
        rows = self._db.execute("SELECT gateway, serial, received_at, \"interval\", report FROM gateway_reports ORDER BY gateway")
        return [(r[0], int(r[1], 16), dt.datetime.fromtimestamp(r[2], dt.timezone.utc), r[3], r[4]) for r in rows]

    def record_issuance_peer(self, serial: int, peer: str) -> None:
        """Remember the address the EST request for certificate ``serial`` came from."""
        with self._transaction():
            self._db.execute("INSERT INTO issuance_peers (serial, peer) VALUES (?, ?) ON CONFLICT (serial) DO UPDATE SET peer = excluded.peer", (f"{serial:x}", peer))

    def issuance_peers(self) -> dict[int, str]:
        """``{serial: peer address}`` of the certificates issued over EST."""
        return {int(r[0], 16): r[1] for r in self._db.execute("SELECT serial, peer FROM issuance_peers")}

    def _transaction(self) -> "_Tx":
        return _Tx(self._db)

    def group(self) -> "_Tx":
        """One transaction around several operations (``with inventory.group(): ...``): each
        operation's own transaction becomes a savepoint in it, so that they share one commit and
        one fsync (:mod:`pkictl.est.group_commit`); none of them is durable before it ends.

        Raises:
            InventoryError: a transaction is open already.
        """
        if self._db.in_transaction:
            raise InventoryError(f"{self.where}: a transaction is open already (a group inside another)")
        return _Tx(self._db)


class _Tx:
    """A write transaction: ``BEGIN IMMEDIATE`` on SQLite, ``BEGIN`` and the writers' advisory
    lock on PostgreSQL (:mod:`pkictl.storage.database`), then ``COMMIT`` (or ``ROLLBACK`` on
    error). Either way the write lock is taken up front, before any check.

    Inside a transaction already open (a group commit, :meth:`Inventory.group`) it is a
    ``SAVEPOINT`` instead: an error rolls back this step only, and nothing is durable before the
    outer ``COMMIT``."""

    def __init__(self, db: "Database") -> None:
        self._db = db
        self._savepoint: str | None = None

    def __enter__(self) -> None:
        if self._db.in_transaction:
            self._savepoint = f"step{id(self):x}"
            self._db.execute(f"SAVEPOINT {self._savepoint}")
        else:
            self._db.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._savepoint is None:
            if exc_type is None:
                self._db.commit()
            else:
                self._db.rollback()
            return
        if exc_type is not None:
            self._db.execute(f"ROLLBACK TO SAVEPOINT {self._savepoint}")
        self._db.execute(f"RELEASE SAVEPOINT {self._savepoint}")
