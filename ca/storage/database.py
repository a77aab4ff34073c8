"""One interface over the two engines the inventory and the audit chain are kept in.

SQLite (:class:`SQLiteDatabase`) is the embedded default: one file in the CA home, one writer at a
time (``BEGIN IMMEDIATE``). PostgreSQL (:class:`PostgresDatabase`, psycopg 3 with a connection
pool) is how several ``pkictl serve`` replicas share one CA. Every write transaction there takes
one transaction-scoped advisory lock first, so writers run one at a time across all replicas,
exactly as SQLite's writers do on one host: each check-then-write of the inventory (a name still
free, a key nobody else's, a predecessor not yet renewed, a token unspent) keeps the guarantee it
has on SQLite without a retry loop. Reads take no lock.

The SQL is written once, in SQLite's parameter style (``?`` and ``:name``); the PostgreSQL side
rewrites the markers to psycopg's (``%s``, ``%(name)s``) outside string literals. Rows answer
``row["column"]``, ``row[0]`` and ``row.keys()`` on both.

Errors come out as :class:`pkictl.errors.InventoryError` subclasses on both engines: a violated
unique key is :class:`DuplicateKey`, anything else :class:`DatabaseError`.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence

from ..errors import InventoryError

if TYPE_CHECKING:
    import psycopg

__all__ = ["Database", "DatabaseError", "DatabaseUnavailable", "DuplicateKey", "Row", "SQLiteDatabase", "PostgresDatabase", "to_pyformat",
           "INVENTORY_LOCK", "AUDIT_LOCK"]

log = logging.getLogger("pkictl.storage")

# Keys of the transaction-scoped advisory locks (pg_advisory_xact_lock takes a bigint): one for
# the inventory's writers, one for the audit chain's appends.
INVENTORY_LOCK = 0x706B6963746C0001
AUDIT_LOCK = 0x706B6963746C0002


class DatabaseError(InventoryError):
    """The database refused or failed a statement (locked too long, connection lost, disk full)."""


class DuplicateKey(DatabaseError):
    """A row with this primary or unique key exists already (a serial number drawn twice)."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached now (refused, down, restarting, the connection lost):
    the request may succeed later (``pkictl serve`` answers 503 with a Retry-After)."""


class Row(Protocol):
    """A result row: by column name, by position, and its column names."""

    def __getitem__(self, key: str | int) -> Any: ...

    def keys(self) -> list[str]: ...


class Result(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """What the inventory and the audit chain use of an engine."""

    engine: str  # "sqlite" or "postgresql"
    where: str  # for messages: the file, or the server and database name (never a password)

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Result: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def begin(self, lock: int = INVENTORY_LOCK) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class SQLiteDatabase:
    """The SQLite file at ``path`` in WAL mode, autocommit outside explicit transactions.

    Args:
        path: the database file (created on first use unless ``readonly``).
        timeout: seconds to wait for another writer's lock before failing.
        readonly: open with ``mode=ro`` (status and doctor: never create or migrate).
    """

    engine = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 30.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
            else:
                self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open the inventory {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row

    @property
    def connection(self) -> sqlite3.Connection:
        """The sqlite3 connection itself (the status report runs SQLite-only SQL on it)."""
        return self._db

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise (DuplicateKey if "UNIQUE" in str(exc) else DatabaseError)(f"{self.where}: {exc}") from exc
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.where}: {exc}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise (DuplicateKey if "UNIQUE" in str(exc) else DatabaseError)(f"{self.where}: {exc}") from exc
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.where}: {exc}") from exc

    def begin(self, lock: int = INVENTORY_LOCK) -> None:
        self.execute("BEGIN IMMEDIATE")  # the write lock up front: one writer, checks and writes together

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def user_version(self) -> int:
        return int(self.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|--[^\n]*|%|\?|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``sql`` with SQLite's ``?`` and ``:name`` markers as psycopg's ``%s`` and ``%(name)s``,
    and a literal ``%`` doubled; string literals, quoted names and comments are left as they are
    (``'DNS:x'`` holds no marker). A ``::`` cast is not a marker.

    Cached: the inventory's statements are a few dozen constant strings, each run for every
    issuance, and the rewrite was a regex pass each time (a signing worker's CPU on PostgreSQL)."""

    def replace(match: re.Match) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        if match.group(1):
            return f"%({match.group(1)})s"
        return text

    return _TOKEN.sub(replace, sql)


class _PgRow(tuple):
    """A PostgreSQL row that reads like an ``sqlite3.Row``."""

    _names: tuple[str, ...] = ()

    def __new__(cls, names: tuple[str, ...], values: Sequence[Any]) -> "_PgRow":
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._names.index(key))
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor):
    names = tuple(c.name for c in cursor.description or ())
    return lambda values: _PgRow(names, values)


class _Fetched:
    """A statement's rows, fetched before its connection went back to the pool."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows, self.rowcount = rows, rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


POOL_WAIT = 10.0  # seconds
POOL_SIZE = 4  # connections per process and server
_pools: dict[str, Any] = {}
_pools_lock = threading.Lock()


def _pool(conninfo: str, max_size: int):
    """One pool per server and process (opened at first use: a forked or spawned signing worker
    opens its own), closed at interpreter exit."""
    import atexit

    import psycopg
    from psycopg_pool import ConnectionPool

    with _pools_lock:
        pool = _pools.get(conninfo)
        if pool is None:
            # One connection of its own first: a server that is away or refuses the login fails
            # here at once with libpq's reason, where the pool retries for POOL_WAIT seconds and
            # then names only its own timeout.
            psycopg.connect(conninfo, connect_timeout=5).close()
            # Bounded waits: a request waits at most POOL_WAIT s for a connection, and a process
            # starting while the server is away fails in as long instead of hanging.
            # A connection is checked (one empty query) as it is lent: one the server dropped (a
            # restart, a fail-over) is replaced instead of failing the request it was lent to.
            pool = ConnectionPool(conninfo, min_size=1, max_size=max_size, open=False, name="pkictl",
                                  kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": 5},
                                  timeout=POOL_WAIT, check=ConnectionPool.check_connection)
            pool.open(wait=True, timeout=POOL_WAIT)
            if not _pools:
                atexit.register(close_pools)
            _pools[conninfo] = pool
        return pool


def close_pools() -> None:
    """Close every pool this process opened (at exit; tests call it between servers)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close(timeout=5.0)


class PostgresDatabase:
    """A PostgreSQL database, through a psycopg 3 connection pool.

    A transaction holds one pooled connection from :meth:`begin` to :meth:`commit` or
    :meth:`rollback`; a statement outside a transaction borrows one for itself (autocommit) and
    fetches its rows before giving it back.

    Args:
        conninfo: a libpq URL, ``postgresql://USER@HOST[:PORT]/DBNAME[?passfile=PATH]``
            (:func:`pkictl.storage.location.check_url` has refused one with a password in it).
        where: how messages name it (the URL).
        pool_size: connections this process may hold at once.

    Raises:
        DatabaseError: the server cannot be reached or refuses the login.
    """

    engine = "postgresql"

    def __init__(self, conninfo: str, *, where: str, pool_size: int = POOL_SIZE, wait: float | None = None) -> None:
        self.where = where
        self.wait = POOL_WAIT if wait is None else wait  # seconds a borrow waits for a connection
        self._conninfo = conninfo
        import psycopg
        import psycopg_pool

        try:
            self._pool = _pool(conninfo, pool_size)
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            raise DatabaseUnavailable(f"cannot connect to the CA database {where}: {_pg_message(exc)}; check that the server runs, "
                                "and the user, database and password file (passfile= in the URL, or PGPASSFILE)") from None
        self._conn: psycopg.Connection | None = None  # the transaction's

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None

    def _run(self, conn, sql: str, params, many: bool = False):
        import psycopg

        try:
            cursor = conn.cursor()
            if many:
                cursor.executemany(to_pyformat(sql), params)
                return _Fetched([], cursor.rowcount)
            # Without parameters psycopg reads no markers (a DDL script may hold a literal %).
            cursor.execute(to_pyformat(sql) if params else sql, params or None)
            rows = cursor.fetchall() if cursor.description is not None else []
            return _Fetched(rows, cursor.rowcount)
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateKey(f"{self.where}: {_pg_message(exc)}") from exc
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"the CA database {self.where} is unavailable: {_pg_message(exc)}") from exc
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.where}: {_pg_message(exc)}") from exc

    def _borrow(self):
        """A connection from the pool, or DatabaseUnavailable after ``self.wait`` seconds."""
        import psycopg_pool

        try:
            return self._pool.getconn(timeout=self.wait)
        except psycopg_pool.PoolTimeout as exc:
            raise DatabaseUnavailable(f"the CA database {self.where} is unavailable: no connection within {self.wait:g} s "
                                      f"({_pg_message(exc)})") from exc
        except psycopg_pool.PoolClosed as exc:  # close_pools() ran: the process is stopping
            raise DatabaseUnavailable(f"the CA database {self.where} is unavailable: this process is stopping") from exc

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> _Fetched:
        if self._conn is not None:
            return self._run(self._conn, sql, params)
        conn = self._borrow()
        try:
            return self._run(conn, sql, params)
        finally:
            self._pool.putconn(conn)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self._conn is not None:
            self._run(self._conn, sql, list(rows), many=True)
            return
        conn = self._borrow()
        try:
            self._run(conn, sql, list(rows), many=True)
        finally:
            self._pool.putconn(conn)

    def begin(self, lock: int = INVENTORY_LOCK) -> None:
        """Open a write transaction and wait for the writers' advisory lock (held to its end)."""
        conn = self._borrow()
        self._conn = conn
        try:
            self._run(conn, "BEGIN", ())
            self._run(conn, "SELECT pg_advisory_xact_lock(?)", (_signed64(lock),))
        except BaseException:
            self._release(rollback=True)
            raise

    def commit(self) -> None:
        assert self._conn is not None, "begin() first"
        try:
            self._run(self._conn, "COMMIT", ())
        finally:
            self._release(rollback=False)

    def rollback(self) -> None:
        self._release(rollback=True)

    def _release(self, *, rollback: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if rollback and not conn.closed:
            import psycopg

            try:
                conn.execute("ROLLBACK")
            except psycopg.Error as exc:  # a lost connection: the pool drops it on return
                log.debug("rollback on %s failed: %s", self.where, _pg_message(exc))
        self._pool.putconn(conn)

    def close(self) -> None:
        self._release(rollback=True)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _pg_message(exc: BaseException) -> str:
    """One line of a psycopg error (the server's primary message), for an operator."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
