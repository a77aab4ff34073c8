"""Where a CA home keeps its records: ``<home>/database.yaml`` names a PostgreSQL database;
without it the inventory is ``<home>/inventory.sqlite3`` (the embedded default).

The file holds one libpq URL and never a password: libpq reads the password from the file the
URL names (``?passfile=PATH``) or from ``PGPASSFILE`` / ``~/.pgpass``
(https://www.postgresql.org/docs/15/libpq-pgpass.html), so that it is on no command line, in no
unit file and in no process listing.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from ..errors import SettingsError

__all__ = ["DATABASE_FILE", "SQLITE_FILE", "check_url", "database_url", "write_database_url", "open_database", "redact"]

DATABASE_FILE = "database.yaml"
SQLITE_FILE = "inventory.sqlite3"
_FIX = ("put the password in a file libpq reads instead: ?passfile=/etc/pkictl/pgpass in the URL "
        "(lines host:port:database:user:password, mode 0600) or PGPASSFILE")
# A password in libpq's keyword form (host=db password=secret, quoted or not), which is no URL.
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&]+)")


def check_url(url: str) -> str:
    """Check a CA database URL before anything is written with it.

    Args:
        url: ``postgresql://USER@HOST[:PORT]/DBNAME[?passfile=PATH&sslmode=...]``.

    Returns:
        The URL, unchanged.

    Raises:
        SettingsError: not a URL (a malformed host or port), not a ``postgresql://`` URL, no
            database name, no user, a password in it (``user:password@`` or ``password=``), or a
            ``passfile`` that does not exist.
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise SettingsError(f"database URL {redact(url)!r} is not a URL: want postgresql://USER@HOST[:PORT]/DBNAME") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise SettingsError(f"database URL {redact(url)!r}: want postgresql://USER@HOST[:PORT]/DBNAME "
                            "(without --db the CA keeps its inventory in SQLite in its home)")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if parts.password is not None or "password" in query:
        raise SettingsError(f"database URL {redact(url)!r} holds a password, which would end up in process listings and "
                            f"in the CA home: {_FIX}")
    if not parts.path.strip("/"):
        raise SettingsError(f"database URL {redact(url)!r} names no database: want postgresql://USER@HOST[:PORT]/DBNAME")
    if not parts.username:
        raise SettingsError(f"database URL {redact(url)!r} names no user: want postgresql://USER@HOST[:PORT]/DBNAME")
    for passfile in query.get("passfile", []):
        if not Path(passfile).is_file():
            raise SettingsError(f"database URL {redact(url)!r}: the password file {passfile} does not exist; "
                                "create it (host:port:database:user:password, mode 0600)")
    return url.strip()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages about a URL that holds one)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.netloc:  # libpq's keyword form (host=... password=...), or no URL at all
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join(f"{k}=***" if k == "password" else f"{k}={v}" for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def database_url(home: Path) -> str | None:
    """The PostgreSQL URL of the CA in ``home``, or None when it keeps its records in SQLite.

    Raises:
        SettingsError: ``database.yaml`` is malformed or its URL is refused by :func:`check_url`.
    """
    path = Path(home) / DATABASE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML ({exc}); want one line: url: postgresql://USER@HOST/DBNAME") from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or set(data) != {"url"}:
        raise SettingsError(f"{path}: want exactly one key, url: postgresql://USER@HOST/DBNAME")
    return check_url(data["url"])


def write_database_url(home: Path, url: str) -> None:
    """Write ``<home>/database.yaml`` atomically (0600: it names the server and the user)."""
    import yaml

    from ..files import PRIVATE_FILE_MODE, atomic_write

    text = "# pkictl CA database: every replica of this CA uses it (docs/design.md, \"CA replicas\")\n"
    atomic_write(Path(home) / DATABASE_FILE, (text + yaml.safe_dump({"url": check_url(url)})).encode(), PRIVATE_FILE_MODE)


def open_database(home: Path, *, readonly: bool = False, url: str | None = None, wait: float | None = None):
    """The database of the CA in ``home``: PostgreSQL when ``database.yaml`` names one (or
    ``url`` is given), else ``<home>/inventory.sqlite3``.

    Args:
        readonly: SQLite only: open the file read-only and never create it (status, doctor).
        wait: PostgreSQL only: seconds a statement waits for a pooled connection (default
            :data:`pkictl.storage.database.POOL_WAIT`).

    Raises:
        SettingsError: as :func:`database_url`.
        DatabaseError: the database cannot be opened or reached.
    """
    from .database import PostgresDatabase, SQLiteDatabase

    url = url if url is not None else database_url(home)
    if url is None:
        return SQLiteDatabase(Path(home) / SQLITE_FILE, readonly=readonly)
    return PostgresDatabase(url, where=url, wait=wait)
