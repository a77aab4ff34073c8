"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, start on a free
loopback port, hand out one database (and role) per test, and remove everything afterwards.

The tests need a real server, not a mock: what pkictl will rely on (SCRAM authentication, a
passfile read by libpq, durable commits with ``fsync=on``) only exists in the real thing.

PostgreSQL refuses to run as root, so as root ``initdb``, ``pg_ctl`` and the server run as the
unprivileged ``postgres`` user (the temporary directory is chowned to it); otherwise they run as
the current user. The unix socket lives inside that 0700 directory, which is what makes the
``--auth-local=trust`` safe: only its owner (and root) can reach the socket. TCP on 127.0.0.1
always asks for a SCRAM password.

Nothing is left behind: :meth:`PostgresCluster.close` stops the server (fast, then immediate,
then SIGKILL) and removes the directories, also after a failed start; and a small watchdog
process does the same if the test process dies without calling it (killed, or a crash).
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

PG_VERSION = "15"
DEBIAN_BINDIR = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")
SERVER_USER = "postgres"  # the unprivileged account the server runs as when the tests run as root
SUPERUSER = "postgres"  # the cluster's superuser role (initdb -U)
START_TIMEOUT = 60  # seconds: pg_ctl -w -t; the subprocess gets a margin above it
STOP_TIMEOUT = 30
PORT_ATTEMPTS = 5  # a port picked free can be taken by someone else before the server binds it
REQUIRED = ("initdb", "pg_ctl", "postgres", "psql")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or the account to run them as) are not installed."""


def find_bindir() -> Path:
    """The directory with initdb, pg_ctl, postgres and psql: Debian's PostgreSQL 15 first, then
    what ``pg_config --bindir`` says, then the directory of ``initdb`` on PATH. The binaries must
    come from one directory: a psql or pg_ctl of another major version may not work with it."""
    candidates = [DEBIAN_BINDIR]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass  # a broken pg_config is only one of the places to look
        else:
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in REQUIRED):
            return bindir
    raise PostgresUnavailable(
        f"PostgreSQL server binaries ({', '.join(REQUIRED)}) not found in "
        f"{', '.join(str(c) for c in dict.fromkeys(candidates))} (Debian package postgresql)")


def free_port() -> int:
    """A loopback port nothing listens on right now: bound to port 0, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie counts as gone: the server is not our child (pg_ctl's
    is), and this VM's init does not necessarily reap orphans."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the server's backends and auxiliary processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if int(stat.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def postmaster_pid(data: Path) -> int | None:
    """The running server's pid from ``postmaster.pid``, only if that process is really the
    server of ``data`` (its command line names the directory): a stale file's pid may by now
    belong to some other process, which must not be killed."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if str(data).encode() in cmdline.read() and _alive(pid):
                return pid
    except (OSError, ValueError):
        pass  # no file, half-written, or no such process: no server to stop
    return None


def kill_server(data: Path, timeout: float = 10.0) -> None:
    """SIGKILL the server of ``data`` and its children, and wait (bounded) until they are gone,
    so that the shared memory is released and a new server can start on the same directory."""
    pid = postmaster_pid(data)
    if pid is None:
        return
    victims = [pid, *_children(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
    deadline = time.monotonic() + timeout
    while any(_alive(v) for v in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not any(_alive(v) for v in victims):
        # Dead, but maybe not reaped yet: the server is an orphan (pg_ctl exited), and this VM's
        # init reaps late. A new server would take the zombie for a running one ("Is another
        # postmaster running?") and refuse to start, so the interlock files go: they are stale.
        # The socket's lock file (beside the socket, in the data directory's parent here) names
        # the same zombie, and the restart on the old port would stop on it.
        (data / "postmaster.pid").unlink(missing_ok=True)
        for lock in data.parent.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
            lock.with_suffix("").unlink(missing_ok=True)  # the socket itself


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory, started on 127.0.0.1 and a free port.

    Use as a context manager, or call :meth:`start` and then :meth:`close` (always safe: after a
    failed start, after :meth:`kill`, twice). ``base_dir`` chooses where the directory goes:
    durability measurements want a real disk, not a tmpfs (here /tmp is ext4).

    ``netns`` and ``address``: the server runs in that network namespace (a host of
    tests/netns.py, root only) and listens on ``address`` there, accepting password logins from
    the hosts on its /24; the URLs name ``address``.
    """

    def __init__(self, base_dir: str | Path | None = None, *, netns: str | None = None, address: str = "127.0.0.1") -> None:
        self.netns, self.address = netns, address
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(f"running as root, but there is no {SERVER_USER!r} user to run "
                                          "the server as (Debian package postgresql creates it)") from None
            self._uid, self._gid = account.pw_uid, account.pw_gid
        self.base_dir = base_dir
        self.dir: Path | None = None  # the server's: data/, the unix socket, the log; owned by its user
        self.secrets: Path | None = None  # the test process's: the passfiles (never the server's user)
        self.port: int | None = None
        self._last_port: int | None = None  # of the last stop or kill: a restart tries it first
        self.superuser_password: str | None = None
        self._watchdog: subprocess.Popen | None = None
        self._names = itertools.count(1)

    # -- paths -----------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "postgres.log"

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "PostgresCluster":
        """initdb (the first time) and start the server; on any failure everything is removed
        before the exception propagates. Calling it again after :meth:`stop` or :meth:`kill`
        restarts the same cluster, on its old port if it is still free (crash-recovery, durability
        and outage tests)."""
        try:
            if self.dir is None:
                self._create()
            self._start_server()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pkictl-pg-", dir=self.base_dir))
        self.secrets = Path(tempfile.mkdtemp(prefix="pkictl-pgpass-", dir=self.base_dir))
        self._start_watchdog()
        if self.as_root:
            os.chown(self.dir, self._uid, self._gid)
        self.superuser_password = secrets.token_urlsafe(24)
        pwfile = self.dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            f.write(self.superuser_password + "\n")
        if self.as_root:
            os.chown(pwfile, self._uid, self._gid)
        try:
            self._run([self.bindir / "initdb", "-D", self.data, "-U", SUPERUSER, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                       "--no-instructions"], timeout=120, what="initdb")
        finally:
            pwfile.unlink()
        # Appended after initdb's defaults: the last setting of a parameter wins.
        settings = {
            "listen_addresses": f"'{self.address}'",  # never another interface
            "unix_socket_directories": f"'{self.socket_dir}'",  # in the 0700 directory: trust is safe there
            "fsync": "on",  # kept on on purpose: the tests measure durability
            "synchronous_commit": "on",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "lc_messages": "'C'",  # the port-clash detection below reads the English message
            "log_min_messages": "warning",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# pkictl tests (tests/pg.py)\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        if self.address != "127.0.0.1":  # initdb's host lines name the loopback addresses only
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.address}/24 scram-sha-256\n")

    def _start_server(self) -> None:
        """``pg_ctl -w -t 60 start`` on a free port, another one if the chosen port was taken
        meanwhile (the log says "Address already in use"): bounded by PORT_ATTEMPTS."""
        for attempt in range(PORT_ATTEMPTS):
            # A restart tries its old port first, so that the URLs handed out stay valid.
            port = self._last_port if attempt == 0 and self._last_port is not None else free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            start = [self.bindir / "pg_ctl", "-D", self.data, "-l", self.log_path, "-o", f"-p {port}", "-w", "-t", str(START_TIMEOUT),
                     "start"]
            if self.netns is not None:  # setns needs root: enter the namespace, then become the server's user
                start = [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", self.netns,
                         "setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups", *start]
            result = self._run(start, timeout=START_TIMEOUT + 30, what="pg_ctl start", check=False, as_server=self.netns is None)
            if result.returncode == 0:
                self.port = port
                return
            new_log = self.log()[offset:]
            kill_server(self.data)  # a server that did not come up in time must not linger
            if "Address already in use" not in new_log:
                raise RuntimeError(f"pg_ctl start failed ({result.returncode}): {result.stdout}{result.stderr}"
                                   f"\n--- {self.log_path}:\n{new_log}")
        raise RuntimeError(f"PostgreSQL found no free port in {PORT_ATTEMPTS} attempts:\n{self.log()}")

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m fast stop``, bounded), keeping the cluster's files, so
        :meth:`start` can start it again; falls back to an immediate stop, then to SIGKILL."""
        if self.dir is None or postmaster_pid(self.data) is None:
            return
        for mode in ("fast", "immediate"):
            try:
                result = self._run([self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w",
                                    "-t", str(STOP_TIMEOUT), "stop"],
                                   timeout=STOP_TIMEOUT + 15, what="pg_ctl stop", check=False)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                break
        kill_server(self.data)  # no-op when stopped; the last resort otherwise
        self._last_port, self.port = self.port, None

    def kill(self) -> None:
        """SIGKILL the server and all its processes, as a crash would: what was committed must
        survive a :meth:`start` after this (the data directory stays)."""
        if self.dir is not None:
            kill_server(self.data)
        self._last_port, self.port = self.port, None

    def close(self) -> None:
        """Stop the server and remove both directories. Safe in any state: never started, half
        started, killed, already closed."""
        try:
            if self.dir is not None:
                self.stop()
        finally:
            for path in (self.dir, self.secrets):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            self.dir = self.secrets = None
            self.port = None
            self._stop_watchdog()

    # -- the watchdog ----------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        """A process that waits for EOF on its stdin, which it gets when :meth:`close` runs or
        when the test process dies (killed, crashed, os._exit: the kernel closes the pipe), and
        then kills the server and removes the directories. Its own session keeps a Ctrl-C to
        pytest from killing it before it has cleaned up."""
        assert self.dir is not None and self.secrets is not None
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, "--watchdog", str(self.dir), str(self.secrets)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # EOF: it finds nothing left to clean and exits
        try:
            watchdog.wait(15)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(5)

    # -- running things ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        """The environment for PostgreSQL's programs: without the caller's PG* variables
        (PGDATA, PGPORT, PGPASSWORD, ... would redirect or change them), in the C locale."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _run(self, argv: list, *, timeout: float, what: str, check: bool = True,
             input: str | None = None, as_server: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` (bounded by ``timeout``), as the server's user when we are root."""
        kwargs: dict = {}
        if self.as_root and as_server:
            kwargs.update(user=self._uid, group=self._gid, extra_groups=[])
        result = subprocess.run([str(a) for a in argv], input=input, capture_output=True, text=True,
                                timeout=timeout, env=self._env(), cwd=self.dir, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def psql(self, sql: str, db: str = "postgres", timeout: float = 30) -> str:
        """Run ``sql`` as the superuser over the unix socket and return psql's unaligned, tuples-only
        output (fields separated by ``|``), stripped. The SQL goes on stdin, not the command line,
        so that passwords in it are not visible in the process list. Errors raise."""
        assert self.port is not None, "the server is not running"
        result = self._run([self.bindir / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-h", self.socket_dir, "-p", self.port, "-U", SUPERUSER, "-d", db, "-f", "-"],
                           input=sql, timeout=timeout, what="psql")
        return result.stdout.strip()

    # -- databases -------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create the role ``pkictl_<n>`` with a random password and the database ``name`` owned by
        it, and return its libpq URL ``postgresql://ROLE@ADDRESS:PORT/NAME?passfile=PATH``. The
        password is only in the 0600 passfile PATH, never in the URL (URLs end up in logs and
        error messages), so a connection proves that libpq read the passfile."""
        if not (name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit() and len(name) < 64):
            raise ValueError(f"database name {name!r}: letters, digits and _ only, not starting with a digit")
        assert self.port is not None and self.secrets is not None, "the server is not running"
        role = f"pkictl_{next(self._names)}"
        password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: nothing to escape in SQL or a passfile
        self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}';")
        self.psql(f'CREATE DATABASE "{name}" OWNER {role};')
        passfile = self.write_passfile(name, role, password)
        return f"postgresql://{role}@{self.address}:{self.port}/{name}?passfile={quote(str(passfile), safe='/')}"

    def write_passfile(self, db: str, role: str, password: str) -> Path:
        """Write a 0600 pgpass file (``host:port:db:user:password``) for one database into the test
        process's own directory; libpq ignores a passfile that others can read. Tests write
        wrong ones with it too."""
        assert self.port is not None and self.secrets is not None, "the server is not running"
        fd, path = tempfile.mkstemp(prefix=f"{db}-", suffix=".pgpass", dir=self.secrets)  # mode 0600
        with open(fd, "w") as f:
            f.write(f"{self.address}:{self.port}:{db}:{role}:{password}\n")
        return Path(path)


def _watchdog_main(directories: list[str]) -> None:
    """See PostgresCluster._start_watchdog: on EOF, kill the server of ``directories[0]`` and
    remove all of them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()
    kill_server(Path(directories[0]) / "data")
    for path in directories:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watchdog_main(sys.argv[2:])
