"""``pkictl db migrate`` and ``pkictl db replica``: moving the CA's records to PostgreSQL, and the
CA home of another ``pkictl serve`` replica."""

from __future__ import annotations

from pathlib import Path

import click

from .common import Home

__all__ = ["db"]


@click.group("db")
def db() -> None:
    """Where the CA keeps its records: SQLite in its home, or PostgreSQL shared by replicas."""


@db.command("migrate")
@click.argument("url")
@click.pass_obj
def db_migrate(obj: Home, url: str) -> None:
    """Move the records from SQLite to the empty PostgreSQL database URL and switch the CA to it.

    URL is postgresql://USER@HOST[:PORT]/DBNAME, with the password in a file
    (?passfile=PATH, or PGPASSFILE), never in the URL. Stop pkictl serve first: an issuance it
    made after the copy would stay in the SQLite file. The audit chain is carried over record
    for record; inventory.sqlite3 and audit.log are kept as *.migrated.
    """
    from ..storage.migrate import migrate_to_postgres

    home = obj.require_ca()
    copied = migrate_to_postgres(home, url)
    click.echo(f"records of the CA in {home} moved to {url}:")
    for table, count in copied.items():
        click.echo(f"  {table:16} {count}")
    click.echo(f"every pkictl command on this host now uses it ({home / 'database.yaml'}); "
               "make a replica's CA home with: pkictl db replica DIR")


@db.command("replica")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
def db_replica(obj: Home, directory: Path) -> None:
    """Write the CA home of another pkictl serve replica into DIRECTORY (new): the CA's
    certificates, its issuing key, settings, CRLs and database URL; never the root key.

    Copy DIRECTORY to the replica host (keeping its 0600/0700 modes), give that host the
    password file the URL names, and run pkictl serve --replica NAME there.
    """
    from ..storage.location import database_url
    from ..storage.migrate import write_replica_home

    home = obj.require_ca()
    written = write_replica_home(home, directory)
    click.echo(f"replica CA home written to {directory} ({len(written)} files, without the root key)")
    url = database_url(home) or ""
    if "passfile=" in url:
        click.echo("  the replica host needs the password file the URL names: " + url.split("passfile=", 1)[1].split("&", 1)[0])
    click.echo("  on that host: pkictl --home DIR serve --replica NAME --dns ... (NAME: its own, e.g. the host's name)")
