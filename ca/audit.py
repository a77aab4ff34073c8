"""The audit log: an append-only, hash-chained JSON-lines record of issuance, refusal and revocation.

Record format (one JSON object per line, ASCII, compact, in this key order)::

    {"seq":3,"time":"2025-11-21T14:09:00.000000Z","event":"issued","name":"TW","serial":"5f3a...",
     "prev":"<hash of record 2>","hash":"<sha256 hex>"}

- ``seq`` counts from 1 with no gaps; ``prev`` is the ``hash`` of the record before, or
  :data:`GENESIS` (64 zeros) for record 1.
- ``hash`` is SHA-256 (lower-case hex) over the *canonical* JSON of the record without ``hash``:
  ``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` encoded as ASCII.
- Next to the log, ``<log>.head`` (for example ``audit.log.head``) holds ``{"seq": n, "hash": h}``
  of the last record, replaced atomically after every append. The chain cannot show that records
  were cut off the end; the head can.

What this protects against, and what it does not:

- Detected by :meth:`AuditLog.verify`: a record edited, deleted, inserted, duplicated or moved; a
  line cut off the end or cut mid-line (the head says more than the log holds); a log deleted
  while its head remains; a forged record whose ``prev`` does not continue the chain.
- Not detected: anyone able to write the log *and* the head can rewrite history consistently:
  drop the last records and rewrite the head, or rebuild the whole chain from any point (the hash
  is unkeyed, so computing a valid one needs no secret). The same is true of an attacker who
  deletes both files. The chain makes a consistent forgery more work, not impossible.
- One record correctly chained onto the end by hand, without touching the head, looks exactly like
  an append interrupted before its head update; ``verify`` reports it as ``ok`` with a ``note``,
  not as a problem (two or more such records are a problem).
- The remedy is to keep a copy of the head somewhere the attacker cannot write: print
  :meth:`AuditLog.head` (for example in ``pkictl status``), ship it to a remote log or write it
  down, then check the log against that copy with ``verify(anchor=(seq, hash))``. Every record up
  to the anchored one is then as trustworthy as the place the anchor was kept.
- Completeness is only as good as the callers: an event that happened but was never appended
  (a crash between signing and appending) leaves no trace here.

Concurrency and durability: every append takes an exclusive ``flock`` on the log file, reads the
last record and the head, writes the new record with one ``write()`` on an ``O_APPEND`` descriptor,
fsyncs it, then replaces the head (:func:`pkictl.files.atomic_write`), all under the lock. Earlier
bytes are never rewritten. A crash between the record's fsync and the head's replacement leaves the
head one record behind; :meth:`AuditLog.verify` accepts exactly that (with a note) and the next
append repairs it. A group commit (:mod:`pkictl.est.group_commit`) holds the records of several
issuances (:meth:`AuditLog.hold`) and appends them with one ``write()``, one fsync and one head
update (:meth:`AuditLog.flush`), chained exactly as one append each would chain them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Concatenate, ParamSpec, Protocol, TypeVar

from .clock import Clock, utc
from .errors import AuditError, KeyReused, PKIError
from .file_errors import is_write_failure, write_error
from .files import PRIVATE_FILE_MODE, atomic_write

__all__ = ["audits_refusals", "AuditLog", "DatabaseAuditLog", "open_audit_log", "VerifyResult", "GENESIS", "record_hash"]

GENESIS = "0" * 64
"""The ``prev`` of record 1: no record hashes to it."""

_RESERVED = ("seq", "time", "event", "prev", "hash")
_EVENT_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
_HASH_RE = re.compile(r"[0-9a-f]{64}\Z")
_TAIL_BLOCK = 4096
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _iso(value: dt.datetime) -> str:
    """An aware datetime as ISO-8601 UTC with microseconds and a ``Z`` (naive: ValueError)."""
    return utc(value).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _iso(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serialisable; pass str, int, float, bool, None, list or dict")


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _line(record: dict) -> bytes:
    """The exact bytes pkictl writes for ``record``: key order kept, compact, ASCII, newline."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


def record_hash(record: dict) -> str:
    """SHA-256 (lower-case hex) of ``record`` without its ``hash`` key, in canonical JSON.

    Args:
        record: a parsed audit record (with or without ``hash``).
    """
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _body(event: str, fields: dict) -> dict:
    """The checked, converted fields of a record of ``event`` (see :meth:`AuditLog.append`)."""
    if not isinstance(event, str) or not _EVENT_RE.match(event):
        raise ValueError(f"event {event!r}: want a lower-case word such as 'issued' or 'revoked'")
    clash = sorted(set(fields) & set(_RESERVED))
    if clash:
        raise ValueError(f"field name(s) {', '.join(clash)} are reserved for the chain")
    if isinstance(fields.get("serial"), int) and not isinstance(fields["serial"], bool):
        fields["serial"] = f"{fields['serial']:x}"
    if isinstance(fields.get("serials"), (list, tuple)):
        fields["serials"] = [f"{s:x}" if isinstance(s, int) and not isinstance(s, bool) else s for s in fields["serials"]]
    # Round-trip through JSON so the record hashed here equals the record verify() parses back.
    return json.loads(json.dumps(fields, default=_json_default, allow_nan=False))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse(line: bytes) -> dict:
    """Parse one record line (without its newline) into a dict with well-typed chain fields.

    Raises:
        ValueError: not a JSON object, a duplicate key, or a missing or malformed chain field.
    """
    try:
        record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    seq = record.get("seq")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"field 'seq' is {seq!r}, want a positive integer")
    for key in ("time", "event"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"field {key!r} is {record.get(key)!r}, want a string")
    for key in ("prev", "hash"):
        if not isinstance(record.get(key), str) or not _HASH_RE.match(record[key]):
            raise ValueError(f"field {key!r} is {record.get(key)!r}, want 64 lower-case hex digits")
    return record


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The outcome of :meth:`AuditLog.verify`.

    Attributes:
        ok: True if the log is intact (as far as the log and its head can tell).
        records: the number of records checked and found good before the first problem (all of
            them when ``ok``).
        problem: what is wrong and where, e.g. ``"line 7: hash does not match its content
            (edited?)"``; None when ``ok``.
        note: something harmless worth reporting when ``ok`` (the head one record behind after
            an interrupted append); None otherwise.
    """

    ok: bool
    records: int
    problem: str | None = None
    note: str | None = None


class AuditLog:
    """An append-only, hash-chained JSON-lines audit log at ``path``, with its head at
    ``<path>.head``. Cheap to construct: nothing is opened until :meth:`append` or :meth:`verify`.

    Args:
        path: the log file (e.g. ``<home>/audit.log``); its directory must exist. The log and the
            head are created with mode 0600 (records hold names and serial numbers).
        clock: the time source for each record's ``time`` (:class:`pkictl.clock.Clock`).
    """

    def __init__(self, path: Path, *, clock: Clock) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.clock = clock
        self._held: list[tuple[str, dict]] | None = None  # records of a group commit, until flush()

    # -- writing ------------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict:
        """Append one record and return it (as written, with ``seq``, ``time``, ``prev``, ``hash``).

        Safe to call from several processes at once: the read of the last record, the write and
        the head update happen under an exclusive ``flock`` on the log file.

        Args:
            event: what happened, a short lower-case word such as ``"issued"``, ``"refused"``,
                ``"revoked"`` (``[a-z][a-z0-9_.-]*``, at most 64 characters).
            **fields: the event's details, JSON-serialisable. Conversions: an ``int`` passed as
                ``serial=`` (or a list of ints as ``serials=``) becomes lower-case hex without
                ``0x`` (as ``pkictl status`` prints serials); an aware ``datetime`` anywhere becomes
                ISO-8601 UTC. Tuples become lists.

        Returns:
            The record as a dict, in the order written.

        Raises:
            ValueError: ``event`` is malformed, a field uses a reserved name (``seq``, ``time``,
                ``prev``, ``hash``), a float is NaN or infinite, or a datetime is naive.
            TypeError: a field value is not JSON-serialisable.
            AuditError: the log or its directory cannot be opened (missing directory, a symlink);
                the log's last line is incomplete or unreadable; the log and its head disagree
                (truncated, or head replaced) -- appending would hide that, so nothing is written;
                or the write came up short (disk full: the log now ends in a torn line).
            OSError: other I/O failures (fsync, permissions). One raised while replacing the head
                comes after the record's fsync: the record is in the log and the head one behind,
                which :meth:`verify` accepts and the next append repairs.
        """
        body = _body(event, fields)
        if self._held is not None:  # a group commit: written by flush(), with the others
            self._held.append((event, body))
            return {"event": event, **body}
        return self._append_bodies([(event, body)])[0]

    def hold(self) -> None:
        """Keep the records appended from now on in memory until :meth:`flush` (a group commit,
        :mod:`pkictl.est.group_commit`): the records of several issuances then share one write, one
        fsync and one head update. Until then :meth:`append` returns each record without its
        chain fields (``seq``, ``time``, ``prev``, ``hash``).

        Raises:
            AuditError: already held (a group commit inside another).
        """
        if self._held is not None:
            raise AuditError(f"{self.path}: records are held already (a group commit inside another)")
        self._held = []

    def flush(self) -> list[dict]:
        """Append the records held since :meth:`hold`, in order, chained as one :meth:`append`
        each would chain them but with one ``write()``, one fsync and one head update, and stop
        holding. Returns them as written.

        Raises:
            AuditError, OSError: as :meth:`append`; none of the held records is in the log then
                (a write that came up short leaves a torn tail, which the next append drops).
        """
        held, self._held = self._held or [], None
        return self._append_bodies(held) if held else []

    def discard(self) -> int:
        """Stop holding and drop the held records (their issuances were rolled back); how many."""
        held, self._held = self._held or [], None
        return len(held)

    def _append_bodies(self, bodies: list[tuple[str, dict]]) -> list[dict]:
        fd = self._open_for_append()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev, torn = self._last_checked(fd)
            if torn is not None:  # the dropped bytes stay accounted for in the chain
                dropped = self._write(fd, seq, prev, [("torn-record-dropped", {"bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()})])
                seq, prev = dropped[-1]["seq"], dropped[-1]["hash"]
            return self._write(fd, seq, prev, bodies)
        finally:
            os.close(fd)  # releases the lock

    def _write(self, fd: int, seq: int, prev: str, bodies: list[tuple[str, dict]]) -> list[dict]:
        """Append records ``seq + 1``... after ``prev`` in one write(), fsync them, then move the head to the last."""
        records = self._chain(seq, prev, bodies)  # the clock read under the lock: time follows seq
        seq, prev = records[-1]["seq"], records[-1]["hash"]
        line = b"".join(_line(r) for r in records)
        try:
            written = os.write(fd, line)  # one write(): O_APPEND puts it at the end
        except OSError as exc:  # nothing written: the log is as it was
            if is_write_failure(exc):
                raise write_error(self.path, exc, then="run the command again") from None
            raise
        if written != len(line):
            raise AuditError(
                f"{self.path}: wrote {written} of {len(line)} bytes of record {records[0]['seq']} (disk full?); the log now "
                "ends in a torn line, which the next append drops and records (event torn-record-dropped)"
            )
        os.fsync(fd)
        atomic_write(self.head_path, _head_bytes(seq, prev), PRIVATE_FILE_MODE)
        return records

    def _chain(self, seq: int, prev: str, bodies: list[tuple[str, dict]]) -> list[dict]:
        """The records ``seq + 1``... chained after ``prev``, each with its hash."""
        time = _iso(self.clock.now())
        records = []
        for event, body in bodies:
            record = {"seq": seq + 1, "time": time, "event": event, **body, "prev": prev}
            record["hash"] = record_hash(record)
            records.append(record)
            seq, prev = record["seq"], record["hash"]
        return records

    def _open_for_append(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, PRIVATE_FILE_MODE)
        except FileNotFoundError:
            raise AuditError(f"cannot create the audit log {self.path}: directory {self.path.parent} does not exist") from None
        except OSError as exc:
            if self.path.is_symlink():
                raise AuditError(f"the audit log {self.path} is a symlink; pkictl appends only to a regular file") from None
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}") from None

    def _last_checked(self, fd: int) -> tuple[int, str, bytes | None]:
        """(seq, hash) of the log's last record, after checking it agrees with the head, and the
        torn tail cut off the log (None if there was none).

        A log that ends in an incomplete line after a complete record the head names (or one
        after it) holds the start of an append that died in its write(): a write() of one line
        is not atomic when the process is killed. That record was never acknowledged (the head
        never named it), so it is cut off and its bytes' hash recorded by the caller; a torn line
        anywhere else (after a record the head does not know) is refused as before.

        ``(0, GENESIS, None)`` for an empty log. Called under the lock.
        """
        size = os.fstat(fd).st_size
        head = self._read_head()
        torn = None
        if size and os.pread(fd, 1, size - 1) != b"\n":
            complete = _complete_size(fd, size)
            torn, size = os.pread(fd, size - complete, complete), complete
        if size == 0:
            if head is not None:
                raise AuditError(f"{self.path} is empty but {self.head_path.name} says seq {head[0]}: the log was truncated; refusing to append")
            return 0, GENESIS, self._cut(fd, size, torn)
        last = _last_line(fd, size)
        if last is None:  # pragma: no cover - size ends at a newline by construction
            raise AuditError(f"{self.path} ends in an incomplete line (a torn write?); refusing to append: run pkictl audit verify")
        try:
            record = _parse(last)
        except ValueError as exc:
            raise AuditError(f"{self.path}: the last record is unreadable ({exc}); refusing to append: run pkictl audit verify") from None
        seq, digest = record["seq"], record["hash"]
        head_seq, head_hash = head if head is not None else (0, GENESIS)
        if (head_seq, head_hash) == (seq, digest):
            return seq, digest, self._cut(fd, size, torn)
        if (head_seq, head_hash) == (seq - 1, record["prev"]):
            # An append died after its fsync, before the head. Repair the head before this append
            # writes: if this one dies in the same window too, the head stays one behind, never
            # two (which would read as records appended by hand).
            atomic_write(self.head_path, _head_bytes(seq, digest), PRIVATE_FILE_MODE)
            return seq, digest, self._cut(fd, size, torn)
        if head is None:
            found = f"{self.head_path.name} is missing"
        elif head_seq == seq:
            found = f"{self.head_path.name} has a different hash for it"
        else:
            found = f"{self.head_path.name} says seq {head_seq}"
        raise AuditError(
            f"{self.path} ends at seq {seq} but {found}: truncated, or a file replaced; refusing to "
            "append (that would hide it): run pkictl audit verify"
        )

    def _cut(self, fd: int, size: int, torn: bytes | None) -> bytes | None:
        """Truncate the log to ``size`` when it had a torn tail; return that tail."""
        if torn is not None:
            os.ftruncate(fd, size)
            os.fsync(fd)
        return torn

    # -- reading ------------------------------------------------------------------------------

    def head(self) -> tuple[int, str] | None:
        """The head: (seq, hash) of the last record as the head file records it; None if there is none.

        Print or ship this value to anchor the log somewhere its writer cannot reach (see the
        module docstring), then pass it to :meth:`verify` as ``anchor``.

        Raises:
            AuditError: the head file exists but is malformed.
        """
        return self._read_head()

    def _read_head(self) -> tuple[int, str] | None:
        try:
            data = self.head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            head = json.loads(data)
            seq, digest = head["seq"], head["hash"]
            if type(seq) is not int or seq < 1 or not isinstance(digest, str) or not _HASH_RE.match(digest):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise AuditError(f"{self.head_path} is not a valid audit head (want {{\"seq\": N, \"hash\": \"<64 hex>\"}})") from None
        return seq, digest

    def _head_name(self) -> str:
        """The head, as messages name it."""
        return f"the head file {self.head_path.name}"

    def verify(self, *, anchor: tuple[int, str] | None = None) -> VerifyResult:
        """Check the whole log against its chain and its head (under a shared lock, so an append
        in progress is not seen half-done).

        Checks, line by line: each line is complete and is a JSON object with the chain fields;
        ``seq`` runs 1, 2, 3...; ``prev`` equals the previous record's ``hash`` (``GENESIS`` for
        line 1); ``hash`` recomputes; the line is byte-for-byte what :meth:`append` writes. Then
        the last record must match the head: head ahead of the log, a log emptied or deleted under
        a head, a head missing under a log of two or more records, or a different hash are
        problems. A head exactly one record behind (an append interrupted before the head update)
        is ``ok`` with a ``note``.

        Args:
            anchor: optional (seq, hash) kept elsewhere (from :meth:`head` at some earlier time);
                the log must hold that record with that hash.

        Returns:
            A :class:`VerifyResult`; the first problem found stops the check. A non-existent log
            with no head is ok with 0 records.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return self._verify_stream(iter(()), anchor, missing=True)
        except OSError as exc:
            return VerifyResult(False, 0, f"cannot open {self.path}: {exc.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            with os.fdopen(os.dup(fd), "rb") as stream:
                return self._verify_stream(stream, anchor, missing=False)
        finally:
            os.close(fd)

    def _verify_stream(self, stream, anchor: tuple[int, str] | None, *, missing: bool,
                       read_head: Callable[[], tuple[int, str] | None] | None = None) -> VerifyResult:
        prev, prev_prev, count = GENESIS, GENESIS, 0
        anchor_seen = False
        torn = 0  # the line number of an incomplete last line
        for number, raw in enumerate(stream, start=1):
            if not raw.endswith(b"\n"):
                torn = number  # the last line: nothing follows a line without its newline
                break
            try:
                record = _parse(raw[:-1])
            except ValueError as exc:
                return VerifyResult(False, count, f"line {number}: {exc}")
            if record["seq"] != number:
                return VerifyResult(False, count, f"line {number}: seq is {record['seq']}, expected {number} (a record deleted, inserted or moved?)")
            if record["prev"] != prev:
                what = "the genesis value" if number == 1 else f"the hash of line {number - 1}"
                return VerifyResult(False, count, f"line {number}: prev does not match {what} (a record deleted, inserted, moved or forged?)")
            if record_hash(record) != record["hash"]:
                return VerifyResult(False, count, f"line {number}: hash does not match its content (edited?)")
            if _line(record) != raw:
                return VerifyResult(False, count, f"line {number}: not byte-for-byte as pkictl writes it (edited?)")
            if anchor is not None and number == anchor[0]:
                if record["hash"] != anchor[1]:
                    return VerifyResult(False, count, f"line {number}: hash differs from the anchor's (the log was rewritten up to here)")
                anchor_seen = True
            prev_prev, prev, count = prev, record["hash"], number

        try:
            head = (read_head or self._read_head)()
        except AuditError as exc:
            return VerifyResult(False, count, str(exc))
        if torn:
            if head is not None and head == (count, prev) and (anchor is None or anchor_seen):
                return VerifyResult(True, count, note=f"line {torn} is an incomplete record after the head's: an append was "
                                    "killed in its write (the next append drops it and records that), or it was added by hand")
            return VerifyResult(False, count, f"line {torn}: incomplete record, no end of line (cut mid-line or a torn write)")
        if anchor is not None and not anchor_seen:
            return VerifyResult(False, count, f"log ends at seq {count} but the anchor says {anchor[0]} (truncated)")
        if count == 0:
            if head is not None:
                state = "is missing" if missing else "is empty"
                return VerifyResult(False, 0, f"log {state} but the head says {head[0]} (truncated or deleted)")
            return VerifyResult(True, 0)
        if head == (count, prev):
            return VerifyResult(True, count)
        if head is None and count == 1:
            return VerifyResult(True, count, note="no head file yet: either the first append was interrupted before writing it "
                                "(the next append writes it) or line 1 was not written by pkictl")
        if head is None:
            return VerifyResult(False, count, f"log holds {count} records but {self._head_name()} is missing (removed?)")
        if head[0] > count:
            return VerifyResult(False, count, f"log ends at seq {count} but the head says {head[0]} (truncated)")
        if head == (count - 1, prev_prev):
            return VerifyResult(True, count, note=f"the head is one record behind (seq {head[0]}): either an append was "
                                f"interrupted before updating it (the next append repairs it) or line {count} was not written by pkictl")
        if head[0] == count:
            return VerifyResult(False, count, f"line {count}: the last record's hash differs from the head's (the log or the head was replaced)")
        return VerifyResult(False, count, f"log ends at seq {count} but the head says {head[0]}: records after the head were not appended by pkictl, or the head was replaced")


class DatabaseAuditLog(AuditLog):
    """The audit chain of a CA whose records are in PostgreSQL (its replicas share one chain).

    The same records, chained and hashed byte for byte as in the file (:class:`AuditLog`): each
    is one row of ``audit_records`` holding its JSON line, and ``audit_head`` holds the last
    record's (seq, hash). An append takes the audit chain's advisory lock, reads the head, checks
    that the last record is the head's, inserts the new records and moves the head, all in one
    transaction: concurrent appends from every replica form one gap-free chain, and the head is
    never behind (a crash rolls the whole append back).

    Args:
        db: the CA's PostgreSQL database (:class:`pkictl.storage.database.PostgresDatabase`),
            its schema made (:func:`pkictl.schema.open_postgres_schema`).
        clock: the time source for each record's ``time``.
    """

    def __init__(self, db, *, clock: Clock) -> None:
        super().__init__(Path(f"{db.where}#audit_records"), clock=clock)
        self._db = db

    def _append_bodies(self, bodies: list[tuple[str, dict]]) -> list[dict]:
        from .storage.database import AUDIT_LOCK

        self._db.begin(AUDIT_LOCK)
        try:
            head = self._db_head()
            last = self._db.execute("SELECT seq, line FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = head if head is not None else (0, GENESIS)
            found = (0, GENESIS) if last is None else (last[0], record_hash(_parse(last[1].encode("ascii"))))
            if found != (seq, prev):
                raise AuditError(f"{self.path}: the last record is seq {found[0]} but the head says {seq}: records deleted or "
                                 "the head replaced; refusing to append (that would hide it): run pkictl audit verify")
            records = self._chain(seq, prev, bodies)
            self._db.executemany("INSERT INTO audit_records (seq, line) VALUES (?, ?)",
                                 [(r["seq"], _line(r)[:-1].decode("ascii")) for r in records])
            self._db.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
                             "SET seq = excluded.seq, hash = excluded.hash", (records[-1]["seq"], records[-1]["hash"]))
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()
        return records

    def _db_head(self) -> tuple[int, str] | None:
        row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _read_head(self) -> tuple[int, str] | None:
        return self._db_head()

    def _head_name(self) -> str:
        return "the head (table audit_head)"  # not a file named after the URL's last path segment

    def verify(self, *, anchor: tuple[int, str] | None = None) -> VerifyResult:
        """As :meth:`AuditLog.verify`, over the rows in seq order (read in one snapshot with the head)."""
        from .storage.database import AUDIT_LOCK

        self._db.begin(AUDIT_LOCK)  # no append between the rows and the head
        try:
            lines = [(row[0], row[1]) for row in self._db.execute("SELECT seq, line FROM audit_records ORDER BY seq")]
            head = self._db_head()
        finally:
            self._db.rollback()
        return self._verify_stream(((line + "\n").encode("ascii", "replace") for _, line in lines), anchor,
                                   missing=not lines, read_head=lambda: head)


def open_audit_log(home: Path, *, clock: Clock, db=None) -> AuditLog:
    """The audit chain of the CA in ``home``: ``<home>/audit.log`` when its records are in SQLite,
    the database's when they are in PostgreSQL (``db``, or the one ``<home>/database.yaml`` names).

    Raises:
        SettingsError: ``database.yaml`` is malformed.
        DatabaseError: the database cannot be reached.
    """
    from .storage.location import database_url, open_database

    if db is None and database_url(home) is None:
        return AuditLog(Path(home) / "audit.log", clock=clock)
    if db is None:
        from .schema import open_postgres_schema

        db = open_database(home)
        open_postgres_schema(db)  # made by init-ca --db or db migrate; checked for its version here
    if db.engine == "sqlite":
        return AuditLog(Path(home) / "audit.log", clock=clock)
    return DatabaseAuditLog(db, clock=clock)


def _head_bytes(seq: int, digest: str) -> bytes:
    return json.dumps({"seq": seq, "hash": digest}, separators=(",", ":")).encode("ascii") + b"\n"


def _complete_size(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline (0 if it has none)."""
    block = _TAIL_BLOCK
    while True:
        start = max(0, size - block)
        cut = os.pread(fd, size - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        if start == 0:
            return 0
        block *= 4


def _last_line(fd: int, size: int) -> bytes | None:
    """The last line of the file (without its newline), or None if the file does not end in one.

    Reads backwards in growing blocks, so the cost does not depend on the log's length.
    """
    if os.pread(fd, 1, size - 1) != b"\n":
        return None
    block = _TAIL_BLOCK
    while True:
        start = max(0, size - 1 - block)
        data = os.pread(fd, size - 1 - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1:]
        if start == 0:
            return data
        block *= 4


class _Audited(Protocol):
    @property
    def audit(self) -> AuditLog: ...


_Self = TypeVar("_Self", bound=_Audited)
_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def audits_refusals(operation: str) -> Callable[[Callable[Concatenate[_Self, _Params], _Result]], Callable[Concatenate[_Self, _Params], _Result]]:
    """Record every refusal (a PKIError) of a CertificateAuthority operation in its audit log,
    then re-raise. The first positional argument after ``self`` (the second for ``enroll``, after
    the kind) names what was asked for: a name, a target, or a CSR."""

    def decorate(method: Callable[Concatenate[_Self, _Params], _Result]) -> Callable[Concatenate[_Self, _Params], _Result]:
        @functools.wraps(method)
        def wrapper(self: _Self, /, *args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
            try:
                return method(self, *args, **kwargs)
            except PKIError as exc:
                asked: object = args[1] if operation in ("enroll",) and len(args) > 1 else (args[0] if args else None)
                if hasattr(asked, "subject") and hasattr(asked, "public_key"):  # a CSR
                    subject = asked.subject.rfc4514_string()
                elif isinstance(asked, bytes):
                    subject = f"{len(asked)} bytes"
                else:
                    subject = str(asked)
                # The operator's own log names whose a reused key is; the client's answer does not.
                reason = exc.operator_message if isinstance(exc, KeyReused) else str(exc)
                by = kwargs.get("by")  # the admin page's operator, when one asked
                self.audit.append("refused", operation=operation, subject=subject, error=type(exc).__name__, reason=reason,
                                  **({"operator": by} if by else {}))
                raise

        return wrapper

    return decorate
