"""The PostgreSQL databases of bench/renewal_herd.py and bench/est_reenroll.py: empty databases
from a throwaway PostgreSQL server (tests/pg.py's PostgresCluster: initdb in a temporary
directory, run as the postgres user when we are root, fsync and synchronous_commit on, removed
afterwards; its watchdog removes it too if the bench is killed), or the one database of an
operator's ``--db URL``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKICTL = str(Path(sys.executable).parent / "pkictl")


class Databases:
    """Empty PostgreSQL databases, one per CA: from a throwaway server (started at the first
    :meth:`new`, stopped and removed by :meth:`close`), or ``url``, the one database of an
    operator's server (one CA only: ``pkictl init-ca --db`` wants it empty)."""

    def __init__(self, url: str | None = None) -> None:
        self._url = url
        self.cluster = None
        self._count = 0

    def new(self, prefix: str = "bench") -> str:
        """A URL (password in a passfile) of an empty database."""
        self._count += 1
        if self._url is not None:
            if self._count > 1:
                raise SystemExit("--db URL holds one CA: run one PostgreSQL round per run with it")
            return self._url
        if self.cluster is None:
            sys.path.insert(0, str(REPO / "tests"))  # tests/ is no package
            from pg import PostgresCluster

            self.cluster = PostgresCluster().start()
            print(f"PostgreSQL {self.cluster.psql('SHOW server_version')} on 127.0.0.1:{self.cluster.port} in {self.cluster.dir} "
                  f"(fsync {self.cluster.psql('SHOW fsync')}, synchronous_commit {self.cluster.psql('SHOW synchronous_commit')})",
                  flush=True)
        return self.cluster.create_database(f"{prefix}_{self._count}")

    def server_pid(self) -> int | None:
        """The throwaway server's postmaster (its backends are its children); None for an
        operator's server, or before the first :meth:`new`."""
        if self.cluster is None:
            return None
        from pg import postmaster_pid

        return postmaster_pid(self.cluster.data)

    def close(self) -> None:
        """Close this process's connections, stop the throwaway server and remove its files."""
        from pkictl.storage.database import close_pools

        close_pools()  # this process's (the fleet's set-up, the integrity check)
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def init_ca(home: Path, url: str) -> None:
    """``pkictl init-ca --db URL`` in ``home``."""
    pkictl(home, "init-ca", "--db", url)


def pkictl(home: Path, *args: str) -> None:
    result = subprocess.run([PKICTL, "--home", str(home), *args], capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pkictl {' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
