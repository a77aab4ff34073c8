"""The PostgreSQL storage on a real throwaway server (tests/pg.py, one database per test): the
audit chain and the inventory's compare-and-set under concurrent writers, each with a connection
(and a pool) of its own as two replicas have; and `pkictl db migrate` / `db replica` /
`init-ca --db` with their refusals.

The races are made deterministic, not hoped for: the first writer stops inside its transaction
(in ``sign()``, holding the writers' lock and its claim) until the second writer is seen waiting
for a lock on the server (pg_stat_activity) -- or, were the lock missing, until the second writer
reaches ``sign()`` itself, and then both commit and the test fails.

Mutations run by hand (each caught by the test named):
- ``PostgresDatabase.begin`` without the advisory lock for AUDIT_LOCK:
  test_concurrent_appends_form_one_gapless_chain fails (DuplicateKey on seq, or an append that
  sees a record beyond the head it read).
- ``DatabaseAuditLog._append_bodies`` without the last-record-is-the-head check:
  test_append_refuses_when_the_last_record_is_gone fails.
- ``PostgresDatabase.begin`` without the advisory lock for INVENTORY_LOCK:
  test_first_enrollments_race_one_wins fails (two certificates for one name). The renewal race
  still passes then: the claim's UPDATE waits for the other's row lock and re-checks its
  condition, so the compare-and-set holds without the writers' lock.
- ``Inventory.record_signed``'s claim without ``AND superseded = 0 AND successor IS NULL``:
  test_renewals_of_one_certificate_race_one_wins fails (two successors).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from pkictl.audit import DatabaseAuditLog, VerifyResult, record_hash
from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.clock import FixedClock
from pkictl.errors import AlreadyEnrolledError, AuditError, SettingsError
from pkictl.inventory import Inventory, Superseded
from pkictl.profile import generate_key
from pkictl.schema import open_postgres_schema
from pkictl.status import read_status, status_source
from pkictl.storage import database as storage_database
from pkictl.storage.database import DatabaseUnavailable, PostgresDatabase, close_pools
from pkictl.storage.location import SQLITE_FILE, check_url, redact

from pg import free_port
from support import DEADLINE, command

NOW = dt.datetime(2025, 11, 21, 14, 9, tzinfo=dt.timezone.utc)


@pytest.fixture(autouse=True)
def no_ambient_password(monkeypatch, tmp_path: Path) -> None:
    """Only the URL's passfile may supply a password (as in tests/test_pg_fixture.py)."""
    for name in ("PGPASSWORD", "PGPASSFILE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))


@pytest.fixture(autouse=True)
def own_pools():
    """Each test's pools go with it (one per replica URL; the database is the test's own)."""
    yield
    close_pools()


def _replica(url: str, name: str) -> PostgresDatabase:
    """A connection pool of its own, as another replica (process) has: the same database, told
    apart on the server by its application_name."""
    return PostgresDatabase(f"{url}&application_name={name}", where=f"{url} ({name})")


def _query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def run(home: Path, *args: str):
    """``pkictl --home HOME ARGS`` in-process (PKICTL_HOME removed)."""
    return CliRunner().invoke(cli, ["--home", str(home), *args], env={"PKICTL_HOME": None})


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _refused(result) -> str:
    """A refusal as the CLI should give one: exit 1, one message, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory); an SQLite database by its
    dump, through its WAL: a checkpoint (which any writer's lock may run) moves pages between the
    -wal file and the database without changing a record, so their bytes are not compared."""
    def content(p: Path) -> bytes | None:
        if p.is_dir():
            return None
        return "\n".join(_sqlite_dump(p)).encode() if p.name == SQLITE_FILE else p.read_bytes()

    return {str(p.relative_to(root)): content(p) for p in sorted(root.rglob("*")) if not p.name.endswith(("-shm", "-wal"))}


# -- the audit chain ------------------------------------------------------------------------------

WRITERS, APPENDS = 4, 25


def test_concurrent_appends_form_one_gapless_chain(pg_url):
    """Four writers, each with its own pool, released together, append 25 records each: 100
    records with seq 1..100, each writer's in its order, the head on the last, and verify()
    passes from a fifth connection."""
    clock = FixedClock(NOW)
    open_postgres_schema(_replica(pg_url, "setup"))
    logs = [DatabaseAuditLog(_replica(pg_url, f"w{i}"), clock=clock) for i in range(WRITERS)]
    start = threading.Barrier(WRITERS)

    def write(i: int) -> None:
        start.wait(DEADLINE)
        for j in range(APPENDS):
            logs[i].append("issued", name=f"w{i}-{j}", serial=j)

    with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        for future in [pool.submit(write, i) for i in range(WRITERS)]:
            future.result(DEADLINE)

    total = WRITERS * APPENDS
    reader = DatabaseAuditLog(_replica(pg_url, "reader"), clock=clock)
    assert reader.verify() == VerifyResult(ok=True, records=total)
    rows = _query(pg_url, "SELECT seq, line FROM audit_records ORDER BY seq")
    assert [seq for seq, _ in rows] == list(range(1, total + 1))
    records = [json.loads(line) for _, line in rows]
    assert all(r["seq"] == seq for r, (seq, _) in zip(records, rows, strict=True))
    for i in range(WRITERS):
        assert [r["name"] for r in records if r["name"].startswith(f"w{i}-")] == [f"w{i}-{j}" for j in range(APPENDS)]
    assert reader.head() == (total, records[-1]["hash"])
    # the writers really overlapped: one after the other would switch writers only WRITERS - 1 times
    writers = [r["name"].split("-")[0] for r in records]
    assert sum(1 for x, y in zip(writers, writers[1:], strict=False) if x != y) > WRITERS - 1


@pytest.fixture(scope="module")
def audit_url(postgres_cluster) -> str:
    """One database for the tampering tests (each starts the chain anew): fewer databases for the
    server to make and to checkpoint at its end."""
    url = postgres_cluster.create_database("pg_storage_audit")
    open_postgres_schema(_replica(url, "setup"))
    return url


def _five_records(url: str) -> DatabaseAuditLog:
    _query(url, "TRUNCATE audit_records, audit_head")
    log = DatabaseAuditLog(_replica(url, "log"), clock=FixedClock(NOW))
    for i in range(5):
        log.append("issued", name=f"n{i}", serial=i)
    assert log.verify() == VerifyResult(ok=True, records=5)  # the control: intact before the tampering
    return log


def _edit_line(url: str, seq: int, old: str, new: str, *, rehash: bool = False) -> None:
    line = _query(url, "SELECT line FROM audit_records WHERE seq = %s", seq)[0][0]
    assert old in line
    record = json.loads(line.replace(old, new))
    if rehash:
        record["hash"] = record_hash(record)
    _query(url, "UPDATE audit_records SET line = %s WHERE seq = %s",
           json.dumps(record, separators=(",", ":")) if rehash else line.replace(old, new), seq)


@pytest.mark.parametrize("tamper, records, problem", [
    (lambda url: _edit_line(url, 3, '"name":"n2"', '"name":"evil"'), 2, "line 3: hash does not match its content (edited?)"),
    (lambda url: _edit_line(url, 3, '"name":"n2"', '"name":"evil"', rehash=True), 3,
     "line 4: prev does not match the hash of line 3 (a record deleted, inserted, moved or forged?)"),
    (lambda url: _query(url, "DELETE FROM audit_records WHERE seq = 3"), 2,
     "line 3: seq is 4, expected 3 (a record deleted, inserted or moved?)"),
    (lambda url: _query(url, "DELETE FROM audit_records WHERE seq = 5"), 4, "log ends at seq 4 but the head says 5 (truncated)"),
    (lambda url: _query(url, "UPDATE audit_head SET hash = repeat('a', 64)"), 5,
     "line 5: the last record's hash differs from the head's (the log or the head was replaced)"),
    (lambda url: _query(url, "DELETE FROM audit_head"), 5, "log holds 5 records but the head (table audit_head) is missing (removed?)"),
], ids=["edited", "edited-rehashed", "deleted-middle", "deleted-last", "head-replaced", "head-deleted"])
def test_a_tampered_chain_fails_verify_naming_the_record(audit_url, tamper, records, problem):
    log = _five_records(audit_url)
    tamper(audit_url)
    assert log.verify() == VerifyResult(ok=False, records=records, problem=problem)


def test_append_refuses_when_the_last_record_is_gone(audit_url):
    """An append after the last record was deleted would hide the deletion: refused, nothing
    written; the head still tells verify(). (The control: _five_records appended five.)"""
    log = _five_records(audit_url)
    _query(audit_url, "DELETE FROM audit_records WHERE seq = 5")
    with pytest.raises(AuditError, match="the last record is seq 4 but the head says 5"):
        log.append("issued", name="late")
    assert _query(audit_url, "SELECT max(seq), count(*) FROM audit_records") == [(4, 4)]
    assert _query(audit_url, "SELECT seq FROM audit_head") == [(5,)]


# -- the inventory's races ------------------------------------------------------------------------


def _certificate(serial: int, not_before: dt.datetime, name: str = "TW") -> x509.Certificate:
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_before + dt.timedelta(days=90))
            .sign(key, hashes.SHA256()))


class Race:
    """Writer ``a`` runs first and stops in its ``sign()``; writer ``b`` starts then. ``a``
    finishes once ``b`` waits for a lock on the server (the correct case) or once ``b`` reaches
    its own ``sign()`` (nothing held it back: both then commit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.a_signing, self.b_signing = threading.Event(), threading.Event()
        self.b_waited = False

    def _b_waits_for_a_lock(self) -> bool:
        return _query(self.url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name = 'b' AND wait_event_type = 'Lock'")[0][0] > 0

    def sign_a(self, certificate: x509.Certificate):
        def sign():
            self.a_signing.set()
            deadline = threading.Event()
            timer = threading.Timer(DEADLINE, deadline.set)
            timer.start()
            try:
                while not deadline.is_set():
                    if self.b_signing.is_set():
                        return certificate
                    if self._b_waits_for_a_lock():
                        self.b_waited = True
                        return certificate
                    self.b_signing.wait(0.01)  # the poll interval: b may get there meanwhile
                raise AssertionError("writer b neither waited for a lock nor signed")
            finally:
                timer.cancel()
        return sign

    def sign_b(self, certificate: x509.Certificate):
        def sign():
            self.b_signing.set()
            return certificate
        return sign

    def run(self, a, b) -> tuple[object, object]:
        """Outcomes (a result or the exception) of ``a()`` and ``b()``."""
        def outcome(call):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - the outcome under test
                return exc

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(outcome, a)
            assert self.a_signing.wait(DEADLINE), first.result(DEADLINE)
            second = pool.submit(outcome, b)
            return first.result(DEADLINE), second.result(DEADLINE)


@pytest.fixture
def two_replicas(pg_url):
    """Two Inventory objects on one database, each with its own pool (application_name a and b)."""
    a, b = Inventory(_replica(pg_url, "a")), Inventory(_replica(pg_url, "b"))
    yield a, b
    a.close()
    b.close()


def _signed(inv: Inventory, serial: int, name: str, sign, *, predecessor: int | None = None, now: dt.datetime = NOW):
    return inv.record_signed(serial=serial, name=name, kind="node", sans=(), now=now, exclusive=predecessor is None,
                             issuer=None, sign=sign, predecessor=predecessor)


def _issued(url: str, name: str) -> list[str]:
    return [r[0] for r in _query(url, "SELECT serial FROM certificates WHERE kind = 'node' AND name_key = %s "
                                      "AND status = 'issued' ORDER BY serial", name.lower())]


def test_renewals_of_one_certificate_race_one_wins(pg_url, two_replicas):
    """Two replicas renew one certificate at once: the first claims it as predecessor, the other,
    held on the writers' lock meanwhile, gets Superseded and records nothing."""
    a, b = two_replicas
    _signed(a, 0x100, "TW", lambda: _certificate(0x100, NOW))
    later = NOW + dt.timedelta(days=60)
    race = Race(pg_url)
    won, lost = race.run(
        lambda: _signed(a, 0x101, "TW", race.sign_a(_certificate(0x101, later)), predecessor=0x100, now=later),
        lambda: _signed(b, 0x102, "TW", race.sign_b(_certificate(0x102, later)), predecessor=0x100, now=later))
    assert isinstance(won, x509.Certificate) and won.serial_number == 0x101, won
    assert isinstance(lost, Superseded) and lost.predecessor == 0x100, lost
    assert str(lost) == "certificate serial 100 was renewed or replaced meanwhile"
    assert race.b_waited and not race.b_signing.is_set()
    assert a.get(0x100).successor == 0x101 and b.get(0x102) is None
    assert _issued(pg_url, "TW") == ["100", "101"] and b.current("node", "TW").serial == 0x101


def test_renewals_of_two_certificates_both_win(pg_url, two_replicas):
    """The control: renewals of two different certificates, raced the same way, both succeed
    (the loser above lost to the other renewal, not to the race harness)."""
    a, b = two_replicas
    _signed(a, 0x200, "n1", lambda: _certificate(0x200, NOW, "n1"))
    _signed(a, 0x300, "n2", lambda: _certificate(0x300, NOW, "n2"))
    later = NOW + dt.timedelta(days=60)
    race = Race(pg_url)
    first, second = race.run(
        lambda: _signed(a, 0x201, "n1", race.sign_a(_certificate(0x201, later, "n1")), predecessor=0x200, now=later),
        lambda: _signed(b, 0x301, "n2", race.sign_b(_certificate(0x301, later, "n2")), predecessor=0x300, now=later))
    assert isinstance(first, x509.Certificate) and isinstance(second, x509.Certificate), (first, second)
    assert race.b_waited  # it waited for the writers' lock, then went on
    assert a.get(0x200).successor == 0x201 and a.get(0x300).successor == 0x301


def test_first_enrollments_race_one_wins(pg_url, two_replicas):
    """Two replicas enroll one new name at once: one certificate; the other is refused as
    already enrolled (naming the winner's serial) and records nothing."""
    a, b = two_replicas
    race = Race(pg_url)
    won, lost = race.run(lambda: _signed(a, 0x400, "Fresh", race.sign_a(_certificate(0x400, NOW, "Fresh"))),
                         lambda: _signed(b, 0x401, "fresh", race.sign_b(_certificate(0x401, NOW, "fresh"))))
    assert isinstance(won, x509.Certificate) and won.serial_number == 0x400, won
    assert isinstance(lost, AlreadyEnrolledError), lost
    assert str(lost).startswith("node Fresh is already enrolled (serial 400, valid until 2026-02-19T14:09:00+00:00)")
    assert race.b_waited and not race.b_signing.is_set()
    assert _issued(pg_url, "fresh") == ["400"] and b.get(0x401) is None


def test_first_enrollments_of_two_names_both_win(pg_url, two_replicas):
    """The control: two new names raced the same way are both enrolled."""
    a, b = two_replicas
    race = Race(pg_url)
    first, second = race.run(lambda: _signed(a, 0x500, "left", race.sign_a(_certificate(0x500, NOW, "left"))),
                             lambda: _signed(b, 0x501, "right", race.sign_b(_certificate(0x501, NOW, "right"))))
    assert isinstance(first, x509.Certificate) and isinstance(second, x509.Certificate), (first, second)
    assert _issued(pg_url, "left") == ["500"] and _issued(pg_url, "right") == ["501"]


# -- db migrate: the same CA, the same report, the same chain -------------------------------------


def _sqlite_ca(home: Path, clock: FixedClock) -> None:
    """A SQLite CA with a gateway, three nodes (n2 revoked) and the CRL signed after it."""
    ca = CertificateAuthority.init(home, clock=clock)
    try:
        ca.enroll("gateway", "gw", out=home.parent / "gw", ip_addresses=["127.0.0.1"])
        for name in ("n1", "n2", "n3"):
            clock.advance(60)
            ca.enroll("node", name, out=home.parent / name)
        clock.advance(60)
        ca.revoke("n2", reason="key-compromise")
        ca.sign_crl()
    finally:
        ca.close()


@pytest.fixture
def migrated(tmp_path, pg_url):
    """A SQLite CA in ``sqlite/ca`` and a copy of it moved to PostgreSQL by `pkictl db migrate`
    in ``pg/ca``."""
    clock = FixedClock(NOW)
    source = tmp_path / "sqlite" / "ca"
    _sqlite_ca(source, clock)
    copy = tmp_path / "pg" / "ca"
    shutil.copytree(source, copy, symlinks=True)
    output = _ok(run(copy, "db", "migrate", pg_url))
    assert output.startswith(f"records of the CA in {copy} moved to {pg_url}:"), output
    return source, copy, clock


REPORT_TIMES = (NOW + dt.timedelta(minutes=10), NOW + dt.timedelta(days=65), NOW + dt.timedelta(days=80),
                NOW + dt.timedelta(days=100))


def _reports(source) -> list[tuple[str, int]]:
    """Every report of ``source()`` (a fresh source each: read_status closes a database)."""
    return [read_status(source(), now, latest_only=latest_only, warn_days=warn_days, as_json=as_json)
            for now in REPORT_TIMES for latest_only in (True, False) for warn_days in (None, 30) for as_json in (False, True)]


def test_status_is_the_same_before_and_after_migrate(migrated):
    """read_status of the SQLite CA and of its copy on PostgreSQL agree, text and JSON, current
    and all, at four times (ok, renewal due, expiring, expired); and the report is not empty."""
    source, copy, _ = migrated
    assert not (copy / SQLITE_FILE).exists() and (copy / f"{SQLITE_FILE}.migrated").is_file()
    before = _reports(lambda: source / SQLITE_FILE)
    after = _reports(lambda: status_source(copy))
    assert after == before
    text, code = before[0]
    assert code == 0 and "n2" in text and "revoked" in text and "crl" in text and "gw" in text, text
    assert {c for _, c in before} == {0, 3, 4}


def test_status_after_migrate_sees_a_change_on_postgres(migrated):
    """The control: a revocation on the PostgreSQL copy shows in its report, and only there."""
    source, copy, clock = migrated
    ca = CertificateAuthority.load(copy, clock=clock)
    try:
        ca.revoke("n3", reason="superseded")
    finally:
        ca.close()
    before = read_status(source / SQLITE_FILE, REPORT_TIMES[0])[0].splitlines()
    after = read_status(status_source(copy), REPORT_TIMES[0])[0].splitlines()
    changed = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert len(changed) >= 1 and all(b.startswith("n3 ") or " crl " in b for b, _ in changed), changed
    assert any(a.startswith("n3 ") and a.endswith("revoked") for _, a in changed), changed


def test_audit_chain_is_carried_over_and_continues(migrated, pg_url):
    """`pkictl audit verify` passes on both sides with the same count, the rows are the file's
    lines byte for byte, and the next issuance on PostgreSQL chains onto the file's last record."""
    source, copy, clock = migrated
    lines = (source / "audit.log").read_text().splitlines()
    assert len(lines) >= 6
    assert _ok(run(source, "audit", "verify")) == f"audit log ok: {len(lines)} records\n"
    assert _ok(run(copy, "audit", "verify")) == f"audit log ok: {len(lines)} records\n"
    assert [r[0] for r in _query(pg_url, "SELECT line FROM audit_records ORDER BY seq")] == lines
    assert (copy / "audit.log.migrated").read_text().splitlines() == lines and not (copy / "audit.log").exists()
    ca = CertificateAuthority.load(copy, clock=clock)
    try:
        ca.enroll("node", "n4", out=copy.parent / "n4")
    finally:
        ca.close()
    rows = [json.loads(r[0]) for r in _query(pg_url, "SELECT line FROM audit_records WHERE seq > %s ORDER BY seq", len(lines))]
    assert rows and rows[0]["prev"] == json.loads(lines[-1])["hash"] and rows[-1]["name"] == "n4"
    assert _ok(run(copy, "audit", "verify")) == f"audit log ok: {len(lines) + len(rows)} records\n"


def test_audit_verify_after_migrate_fails_on_an_edited_row(migrated, pg_url):
    """The control: `pkictl audit verify` on the migrated CA names an edited row."""
    _, copy, _ = migrated
    line = _query(pg_url, "SELECT line FROM audit_records WHERE seq = 2")[0][0]
    _query(pg_url, "UPDATE audit_records SET line = %s WHERE seq = 2", line.replace('"time":"2025', '"time":"2024'))
    output = _refused(run(copy, "audit", "verify"))
    assert "line 2: hash does not match its content (edited?)" in output, output


# -- db migrate and init-ca --db: refusals --------------------------------------------------------


def _sqlite_dump(path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def _pg_state(url: str) -> list:
    return [_query(url, "SELECT serial, name, status FROM certificates ORDER BY serial"),
            _query(url, "SELECT seq, line FROM audit_records ORDER BY seq"),
            _query(url, "SELECT seq, hash FROM audit_head")]


@pytest.fixture
def sqlite_home(tmp_path) -> Path:
    home = tmp_path / "sqlite" / "ca"
    _ok(run(home, "init-ca"))
    _ok(run(home, "enroll-node", "n1"))
    return home


def test_migrate_into_a_database_holding_a_ca_changes_nothing(tmp_path, pg_url, sqlite_home):
    """A database made by `init-ca --db` holds a CA: migrating another CA into it is refused,
    and neither the SQLite home nor the database changes."""
    _ok(run(tmp_path / "other", "init-ca", "--db", pg_url))
    root = _query(pg_url, "SELECT name FROM certificates WHERE kind = 'root'")[0][0]
    home_before, dump_before, pg_before = _tree(sqlite_home), _sqlite_dump(sqlite_home / SQLITE_FILE), _pg_state(pg_url)
    output = _refused(run(sqlite_home, "db", "migrate", pg_url))
    assert f"the database {pg_url} holds a CA already (root {root}): pkictl never merges two CAs; " \
           "migrate into an empty database" in output, output
    assert _tree(sqlite_home) == home_before and not (sqlite_home / "database.yaml").exists()
    assert _sqlite_dump(sqlite_home / SQLITE_FILE) == dump_before and _pg_state(pg_url) == pg_before
    assert _ok(run(sqlite_home, "audit", "verify")).startswith("audit log ok")  # still the file's


def test_migrate_into_a_database_with_audit_records_only_is_refused(pg_url, sqlite_home):
    """Audit records without a root are another CA's too."""
    open_postgres_schema(_replica(pg_url, "setup"))
    _query(pg_url, "INSERT INTO audit_records (seq, line) VALUES (1, '{}')")
    home_before = _tree(sqlite_home)
    output = _refused(run(sqlite_home, "db", "migrate", pg_url))
    assert f"the database {pg_url} holds a CA already: pkictl never merges two CAs" in output, output
    assert _tree(sqlite_home) == home_before
    assert _query(pg_url, "SELECT count(*) FROM certificates") == [(0,)]


def test_migrate_a_ca_already_on_postgres_is_refused(tmp_path, pg_url):
    home = tmp_path / "ca"
    _ok(run(home, "init-ca", "--db", pg_url))
    output = _refused(run(home, "db", "migrate", pg_url))
    assert f"the CA in {home} keeps its records in PostgreSQL already ({home / 'database.yaml'})" in output, output


FIX = ("put the password in a file libpq reads instead: ?passfile=/etc/pkictl/pgpass in the URL "
       "(lines host:port:database:user:password, mode 0600) or PGPASSFILE")
BAD_URLS = [
    ("postgresql://ca:hunter2@db.example:5432/pki",
     f"database URL 'postgresql://ca:***@db.example:5432/pki' holds a password, which would end up in process listings "
     f"and in the CA home: {FIX}"),
    ("postgresql://ca@db.example/pki?sslmode=require&password=hunter2",
     f"database URL 'postgresql://ca@db.example/pki?sslmode=require&password=***' holds a password, which would end up in "
     f"process listings and in the CA home: {FIX}"),
    ("mysql://ca@db.example/pki",
     "database URL 'mysql://ca@db.example/pki': want postgresql://USER@HOST[:PORT]/DBNAME "
     "(without --db the CA keeps its inventory in SQLite in its home)"),
    ("host=db.example user=ca password=hunter2 dbname=pki",
     "database URL 'host=db.example user=ca password=*** dbname=pki': want postgresql://USER@HOST[:PORT]/DBNAME "
     "(without --db the CA keeps its inventory in SQLite in its home)"),
    ("postgresql://ca@db.example/",
     "database URL 'postgresql://ca@db.example/' names no database: want postgresql://USER@HOST[:PORT]/DBNAME"),
    ("postgresql://db.example/pki", "database URL 'postgresql://db.example/pki' names no user: want postgresql://USER@HOST[:PORT]/DBNAME"),
    ("postgresql://ca@db.example/pki?passfile=/nonexistent/pgpass",
     "database URL 'postgresql://ca@db.example/pki?passfile=/nonexistent/pgpass': the password file /nonexistent/pgpass "
     "does not exist; create it (host:port:database:user:password, mode 0600)"),
    ("postgresql://ca@[db.example/pki", "database URL '<unparseable URL>' is not a URL: want postgresql://USER@HOST[:PORT]/DBNAME"),
    ("postgresql://ca@db.example:pg/pki",
     "database URL 'postgresql://ca@db.example:pg/pki' is not a URL: want postgresql://USER@HOST[:PORT]/DBNAME"),
]
BAD_IDS = ["password", "password-param", "scheme", "keyword-form", "no-database", "no-user", "no-passfile", "unparseable",
           "bad-port"]


@pytest.mark.parametrize("url, message", BAD_URLS, ids=BAD_IDS)
def test_check_url_refuses_with_the_fix(url, message):
    with pytest.raises(SettingsError) as refused:
        check_url(url)
    assert str(refused.value) == message
    assert "hunter2" not in str(refused.value)


def test_check_url_accepts_a_good_url(pg_url):
    """The control: the test server's URL (with its passfile) passes unchanged, surrounding space dropped."""
    assert check_url(f"  {pg_url}\n") == pg_url
    assert check_url("postgres://ca@db.example:5433/pki?sslmode=verify-full") == "postgres://ca@db.example:5433/pki?sslmode=verify-full"


@pytest.mark.parametrize("url, shown", [
    ("postgresql://ca:hunter2@db/pki", "postgresql://ca:***@db/pki"),
    ("postgresql://ca:p%40ss@db/pki?password=hunter2&sslmode=require", "postgresql://ca:***@db/pki?password=***&sslmode=require"),
    ("host=db password=hunter2 dbname=pki", "host=db password=*** dbname=pki"),
    ("host=db password='hunter 2' dbname=pki", "host=db password=*** dbname=pki"),
    ("postgresql://ca@db:5432/pki?passfile=/etc/pkictl/pgpass", "postgresql://ca@db:5432/pki?passfile=/etc/pkictl/pgpass"),
    ("postgresql://ca:hunter2@[db/pki", "<unparseable URL>"),
])
def test_redact_hides_passwords_only(url, shown):
    assert redact(url) == shown


@pytest.mark.parametrize("url, message", BAD_URLS, ids=BAD_IDS)
def test_migrate_refuses_a_bad_url_before_touching_anything(sqlite_home, url, message):
    before = _tree(sqlite_home)
    output = _refused(run(sqlite_home, "db", "migrate", url))
    assert output == f"Error: {message}\n"
    assert _tree(sqlite_home) == before


@pytest.mark.parametrize("url, message", BAD_URLS, ids=BAD_IDS)
def test_init_ca_refuses_a_bad_url_before_making_a_key(tmp_path, url, message):
    """init-ca --db: refused before the home is even created (no key made)."""
    home = tmp_path / "new"
    assert _refused(run(home, "init-ca", "--db", url)) == f"Error: {message}\n" and not home.exists()


def test_init_ca_with_a_password_in_the_url_leaves_an_empty_home_empty(tmp_path):
    """The same as an operator runs it, in a process of its own: the password is not echoed,
    and the empty home stays empty."""
    home = tmp_path / "empty"
    home.mkdir()
    url, message = BAD_URLS[0]
    process = subprocess.run([command("pkictl"), "--home", str(home), "init-ca", "--db", url], capture_output=True, text=True,
                             timeout=DEADLINE, env={k: v for k, v in os.environ.items() if k != "PKICTL_HOME"})
    assert (process.returncode, process.stdout, process.stderr) == (1, "", f"Error: {message}\n")
    assert list(home.iterdir()) == []


def test_init_ca_into_a_database_holding_a_ca_makes_no_key(tmp_path, pg_url):
    _ok(run(tmp_path / "first", "init-ca", "--db", pg_url))
    output = _refused(run(tmp_path / "second", "init-ca", "--db", pg_url))
    assert f"the database {pg_url} holds a CA already (root pkictl Root CA" in output, output
    assert not (tmp_path / "second").exists()


def _unreachable(pg_url: str) -> str:
    parts = urlsplit(pg_url)
    return parts._replace(netloc=f"{parts.username}@127.0.0.1:{free_port()}").geturl()


def test_an_unreachable_server_is_database_unavailable(pg_url):
    """Nothing listens on the port: DatabaseUnavailable naming the server and libpq's reason
    (connection refused), at once rather than after POOL_WAIT; the same URL on the live port
    connects (the control)."""
    url = _unreachable(pg_url)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"cannot connect to the CA database .*127\.0\.0\.1:\d+.*[Cc]onnection refused"
                                                   r".*check that the server runs"):
        PostgresDatabase(url, where=url)
    assert time.monotonic() - started < storage_database.POOL_WAIT  # the pool's wait would be all of it
    assert PostgresDatabase(pg_url, where=pg_url).execute("SELECT 1").fetchone()[0] == 1


def test_a_wrong_password_is_named_as_such(pg_url, tmp_path):
    """A passfile with another password: the server's own reason (password authentication
    failed), not a pool timeout."""
    passfile = Path(parse_qs(urlsplit(pg_url).query)["passfile"][0])
    wrong = tmp_path / "wrong.pgpass"
    host, port, db, user, _ = passfile.read_text().strip().split(":")
    wrong.write_text(f"{host}:{port}:{db}:{user}:not-the-password\n")
    wrong.chmod(0o600)
    url = pg_url.replace(str(passfile), str(wrong))
    with pytest.raises(DatabaseUnavailable, match=r"password authentication failed"):
        PostgresDatabase(url, where=url)


def test_an_unreachable_server_is_a_clear_cli_error(tmp_path, pg_url):
    """`pkictl status` and `pkictl audit verify` of a CA whose server is away: exit 1 with the
    message, no traceback."""
    home = tmp_path / "ca"
    _ok(run(home, "init-ca", "--db", pg_url))
    assert _ok(run(home, "audit", "verify")).startswith("audit log ok")  # the control
    url = _unreachable(pg_url)
    (home / "database.yaml").write_text(f"url: {url}\n")
    for args in (("status",), ("audit", "verify")):
        output = _refused(run(home, *args))
        assert output.startswith(f"Error: cannot connect to the CA database {url}:"), output


# -- db replica ----------------------------------------------------------------------------------


@pytest.fixture
def pg_home(tmp_path, pg_url) -> Path:
    """A CA made with init-ca --db, with a retired issuing CA (rotated, activated at once)."""
    home = tmp_path / "ca"
    _ok(run(home, "init-ca", "--db", pg_url))
    ca = CertificateAuthority.load(home)
    try:
        ca.rotate_issuing(activate_in=dt.timedelta(0))
    finally:
        ca.close()
    CertificateAuthority.load(home).close()  # promotes it: the old one goes to retired/
    assert list((home / "retired").iterdir())
    return home


def test_replica_home_has_the_issuing_key_not_the_root_key_and_private_modes(tmp_path, pg_home):
    replica = tmp_path / "replicas" / "b"
    output = _ok(run(pg_home, "db", "replica", str(replica)))
    assert output.startswith(f"replica CA home written to {replica} (")
    assert (pg_home / "root" / "key.pem").is_file()  # the control: the source has it
    assert not (replica / "root" / "key.pem").exists()
    keys = sorted(str(p.relative_to(replica)) for p in replica.rglob("key.pem"))
    assert "issuing/key.pem" in keys and any(k.startswith("retired/") for k in keys) and "root/key.pem" not in keys, keys
    assert (replica / "issuing" / "key.pem").read_bytes() == (pg_home / "issuing" / "key.pem").read_bytes()
    assert (replica / "database.yaml").read_bytes() == (pg_home / "database.yaml").read_bytes()
    for path in [replica, *replica.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        relative = path.relative_to(replica)
        if path.is_dir():
            assert mode == 0o700, (relative, oct(mode))
        else:
            assert mode == stat.S_IMODE((pg_home / relative).stat().st_mode), (relative, oct(mode))
            if path.name in ("key.pem", "database.yaml"):
                assert mode == 0o600, (relative, oct(mode))
    assert [p.name for p in replica.parent.iterdir()] == ["b"]  # no staging directory left
    assert _ok(run(replica, "audit", "verify")).startswith("audit log ok")  # it reaches the shared database


@pytest.mark.parametrize("contents", [["notes.txt"], []], ids=["non-empty", "empty"])
def test_replica_refuses_an_existing_directory(tmp_path, pg_home, contents):
    target = tmp_path / "target"
    target.mkdir()
    for name in contents:
        (target / name).write_text("keep me\n")
    before = _tree(target)
    output = _refused(run(pg_home, "db", "replica", str(target)))
    assert f"{target} exists; give a new directory for the replica's CA home" in output, output
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".replica-")) == []


def test_replica_of_a_sqlite_ca_is_refused(tmp_path, sqlite_home):
    output = _refused(run(sqlite_home, "db", "replica", str(tmp_path / "b")))
    assert "keeps its records in SQLite, which only one host can use" in output, output
    assert not (tmp_path / "b").exists()


def _passfile(url: str) -> Path:
    return Path(unquote(parse_qs(urlsplit(url).query)["passfile"][0]))


def test_database_yaml_names_no_password(tmp_path, pg_url):
    """init-ca --db writes the URL (0600), not the password the passfile holds."""
    home = tmp_path / "ca"
    _ok(run(home, "init-ca", "--db", pg_url))
    text = (home / "database.yaml").read_text()
    password = _passfile(pg_url).read_text().strip().rsplit(":", 1)[1]
    assert pg_url in text and password not in text
    assert stat.S_IMODE((home / "database.yaml").stat().st_mode) == 0o600
