"""The throwaway PostgreSQL server of the tests (tests/pg.py, fixtures postgres_cluster and pg_url)
works as pkictl will use it: psycopg 3 connects with the URL alone, libpq reading the password
from the passfile; and it is not trust in disguise: without the passfile, or with a wrong
password in it, the connection is refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
import pytest

from pg import PostgresCluster

CONNECT_TIMEOUT = 10  # seconds: libpq's connect_timeout, the bound of every connection attempt


@pytest.fixture(autouse=True)
def no_ambient_password(monkeypatch, tmp_path: Path) -> None:
    """Only the URL may supply the password: not PGPASSWORD, not ~/.pgpass, not PG* settings of
    the environment the tests run in."""
    for name in ("PGPASSWORD", "PGPASSFILE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))


def passfile_of(url: str) -> Path:
    return Path(unquote(parse_qs(urlsplit(url).query)["passfile"][0]))


def test_url_carries_no_password(pg_url: str, postgres_cluster: PostgresCluster) -> None:
    """The URL names the role and a 0600 passfile; the password is only in that file."""
    parts = urlsplit(pg_url)
    assert parts.scheme == "postgresql" and parts.hostname == "127.0.0.1"
    assert parts.port == postgres_cluster.port and parts.password is None
    passfile = passfile_of(pg_url)
    assert passfile.stat().st_mode & 0o777 == 0o600
    host, port, db, user, password = passfile.read_text().strip().split(":")
    assert (host, int(port), db, user) == ("127.0.0.1", parts.port, parts.path.lstrip("/"), parts.username)
    assert password and password not in pg_url


def test_round_trip(pg_url: str, postgres_cluster: PostgresCluster) -> None:
    """Connect with the URL, create a table, insert, read back; the superuser sees the row too."""
    with psycopg.connect(pg_url, connect_timeout=CONNECT_TIMEOUT) as conn:
        conn.execute("CREATE TABLE certs (serial bigint PRIMARY KEY, subject text NOT NULL)")
        conn.execute("INSERT INTO certs VALUES (%s, %s), (%s, %s)", (1, "CN=gw", 2, "CN=TW"))
        conn.commit()
        rows = conn.execute("SELECT serial, subject FROM certs ORDER BY serial").fetchall()
        assert rows == [(1, "CN=gw"), (2, "CN=TW")]
        assert conn.info.server_version // 10000 == 15
        assert conn.execute("SELECT current_user").fetchone() == (urlsplit(pg_url).username,)
    db = urlsplit(pg_url).path.lstrip("/")
    assert postgres_cluster.psql("SELECT subject FROM certs ORDER BY serial", db=db) == "CN=gw\nCN=TW"


def test_server_settings(postgres_cluster: PostgresCluster) -> None:
    """The settings the brief asks for are the ones in force (a later line of postgresql.conf, or
    a typo, would silently change them): durable commits, loopback only, room for 200 clients."""
    settings = postgres_cluster.psql(
        "SELECT name || '=' || current_setting(name) FROM pg_settings WHERE name IN "
        "('fsync', 'synchronous_commit', 'listen_addresses', 'max_connections', 'shared_buffers', 'port') "
        "ORDER BY name")
    assert settings.splitlines() == [
        "fsync=on", "listen_addresses=127.0.0.1", "max_connections=200", f"port={postgres_cluster.port}",
        "shared_buffers=128MB", "synchronous_commit=on",
    ]
    hba = postgres_cluster.psql("SELECT DISTINCT type || ' ' || auth_method FROM pg_hba_file_rules ORDER BY 1")
    assert hba.splitlines() == ["host scram-sha-256", "local trust"]


def test_without_passfile_fails(pg_url: str) -> None:
    """Negative control: the same URL without ``passfile`` has no password, and TCP asks for one."""
    parts = urlsplit(pg_url)
    bare = parts._replace(query="").geturl()
    assert "passfile" not in bare
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(bare, connect_timeout=CONNECT_TIMEOUT).close()


def test_wrong_password_fails(pg_url: str, postgres_cluster: PostgresCluster) -> None:
    """Negative control: a passfile with a wrong password for the same host, port, db and role."""
    parts = urlsplit(pg_url)
    db = parts.path.lstrip("/")
    wrong = postgres_cluster.write_passfile(db, parts.username, "not-the-password")
    url = parts._replace(query=f"passfile={wrong}").geturl()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT).close()


def server_processes(cluster_dir: Path) -> list[int]:
    """The pids of the server's processes: the postmaster's command line names its data directory
    (the watchdog's names only ``cluster_dir``, and outlives a kill() by design)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(cluster_dir / "data").encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return found


def test_kill_restart_close(postgres_bindir: Path) -> None:
    """A commit survives SIGKILL of the whole server (fsync=on, crash recovery on restart), and
    close() then leaves no directory and no process. A cluster of its own: the session's must
    keep its port."""
    cluster = PostgresCluster()
    with cluster:
        url = cluster.create_database("durable")
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (42)")
        directory = cluster.dir
        assert directory is not None and server_processes(directory)
        cluster.kill()
        assert cluster.port is None and not server_processes(directory)
        cluster.start()
        assert cluster.psql("SELECT v FROM t", db="durable") == "42"
    assert cluster.dir is None and not directory.exists() and not server_processes(directory)
    cluster.close()  # twice is fine


def test_failed_start_cleans_up(monkeypatch, postgres_bindir: Path) -> None:
    """A start that fails after initdb removes what it created."""
    created: list[Path] = []

    def broken(self: PostgresCluster) -> None:
        created.extend([self.dir, self.secrets])
        raise RuntimeError("simulated start-up failure")

    monkeypatch.setattr(PostgresCluster, "_start_server", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        PostgresCluster().start()
    assert len(created) == 2 and not any(path.exists() for path in created)


def test_aborted_run_leaves_nothing(postgres_bindir: Path) -> None:
    """A test process that dies without close() (os._exit: no finally, no atexit) leaves no server
    and no directory: the watchdog sees its pipe close and cleans up."""
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); from pg import PostgresCluster\n"
              "c = PostgresCluster().start(); print(c.dir, c.secrets, flush=True); os._exit(1)\n")
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    cluster_dir, secrets_dir = (Path(p) for p in result.stdout.split())
    deadline = time.monotonic() + 30
    while (cluster_dir.exists() or secrets_dir.exists() or server_processes(cluster_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster_dir.exists() and not secrets_dir.exists() and not server_processes(cluster_dir)
