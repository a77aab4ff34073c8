"""Multi-host tests: hosts as Linux network namespaces on one private bridge, processes in them
with watched logs, and a teardown that leaves nothing behind even when a test fails.

One :class:`Fleet` (prefix ``P`` = ``pkt`` + 6 random hex digits, new for every fleet):

- namespace ``P-br`` holds bridge ``br0`` and one veth end ``v-NAME`` per host; no address, no route;
- namespace ``P-NAME`` per host: ``lo`` up, ``eth0`` (the veth's other end) with ``10.A.B.N/24``
  and no default route, so a packet for any address outside the fleet's /24 fails with
  ENETUNREACH instead of leaving; the test machine's own namespace gets no interface at all;
- ``/etc/netns/P-NAME/hosts`` names every host (``ip netns exec`` bind-mounts it over
  ``/etc/hosts``; nothing else goes in that directory, since every file there is bind-mounted);
- ``/run/pkictl-test-netns/P-NAME`` holds the PID and start time of the test process that made
  the namespace, so that a later run tells a crashed run's leftovers (swept) from a run going on
  in parallel (left alone);
- a directory per host (``Host.root``) for the paths the README gives as absolute
  (``/var/lib/pkictl`` becomes ``ROOT/var/lib/pkictl``: :meth:`Host.path`).

Processes run as ``ip netns exec P-NAME ARGV`` (``ip`` execs ARGV, so the PID is ARGV's), in a
session of their own, stdout and stderr merged into one :class:`support.LogWatcher`. Teardown
sends SIGTERM, then SIGKILL to the process group, kills whatever still runs in the namespaces
(``ip netns pids``), deletes the namespaces (which deletes their veths) and their ``/etc/netns``
directories. When the ``with`` block ends by an exception, every process's log is printed, so
that a failing test shows what each host said; the logs are also written under ``DIR/logs``.

Where these tests cannot run (not root, no ``ip``, no websockets), :func:`require` skips with the
reason, or fails when ``PKICTL_REQUIRE_NETNS=1`` (``.ci/run`` sets it: CI never skips them).
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

from support import BIN, DEADLINE, LogWatcher

__all__ = ["Fleet", "Host", "Process", "require", "sweep_leftovers", "unavailable", "NETNS_DIR", "FAMILY"]

NETNS_DIR = Path("/etc/netns")
OWNERS_DIR = Path("/run/pkictl-test-netns")  # /run: gone after a reboot, like the namespaces
FAMILY = re.compile(r"^pkt[0-9a-f]{6}-")  # every namespace (and /etc/netns directory) made here
IP = shutil.which("ip") or "/usr/sbin/ip"
REQUIRE_ENV = "PKICTL_REQUIRE_NETNS"


# -- can these tests run here? ---------------------------------------------------------------------


@functools.cache
def unavailable() -> str | None:
    """Why multi-host tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, as .ci/run does"
    if not os.path.exists(IP):
        return "iproute2's ip is not installed (apt-get install iproute2; .ci/run does)"
    if importlib.util.find_spec("websockets") is None:
        return "the websockets package is missing: pip install -e '.[test]'"
    probe = f"pkt{secrets.token_hex(3)}-probe"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, timeout=DEADLINE)
    if made.returncode != 0:
        return f"ip netns add failed here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True, timeout=DEADLINE)
    shutil.rmtree(NETNS_DIR / probe, ignore_errors=True)
    return None


def require() -> None:
    """Skip the calling test with the reason when namespaces are unavailable; fail instead when
    ``PKICTL_REQUIRE_NETNS=1`` (CI), so that a skip can never pass for a green run."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the multi-host tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


# -- low-level helpers -------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=DEADLINE)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a live PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(name: str) -> bool:
    try:
        pid, started = (OWNERS_DIR / name).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == started


def _namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _kill_namespace_processes(name: str) -> list[int]:
    """SIGKILL every process still running in namespace ``name``; returns their PIDs."""
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _delete_namespace(name: str) -> None:
    _kill_namespace_processes(name)
    if name in _namespaces():
        _ip("netns", "del", name)
    shutil.rmtree(NETNS_DIR / name, ignore_errors=True)
    (OWNERS_DIR / name).unlink(missing_ok=True)


def sweep_leftovers() -> list[str]:
    """Delete the namespaces and /etc/netns directories of this family whose test process is
    gone (a crashed or killed run), killing what still runs in them. A fleet of a run going on
    in parallel (its owner alive) is left alone. Returns the names swept."""
    names = set(_namespaces())
    for directory in (NETNS_DIR, OWNERS_DIR):
        if directory.is_dir():
            names |= {p.name for p in directory.iterdir()}
    swept = []
    for name in sorted(n for n in names if FAMILY.match(n)):
        if not _owner_alive(name):
            _delete_namespace(name)
            swept.append(name)
    return swept


# -- processes and hosts -------------------------------------------------------------------------------


class Process:
    """One long-running command inside a host's namespace, its output (stdout and stderr
    merged) watched line by line.

    Args:
        host: where it runs.
        name: how the logs call it (``ca/serve``, ``gw/agent``, ...).
        argv: the command.
        env: its whole environment.
        cwd: its working directory.
        chatty: its routine lines (per-message JSON records) are left out of failure dumps.
    """

    def __init__(self, host: "Host", name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path | None,
                 chatty: bool = False) -> None:
        self.host, self.name, self.argv, self.chatty = host, name, list(argv), chatty
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [IP, "netns", "exec", host.ns, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", env=env, cwd=cwd, start_new_session=True,
        )
        self.log = LogWatcher(self.popen.stdout)

    @property
    def label(self) -> str:
        return f"{self.host.name}/{self.name}"

    def wait_for(self, pattern: str, timeout: float = DEADLINE, start: int = 0) -> re.Match:
        """Wait for a line matching ``pattern`` (see :meth:`LogWatcher.wait_for`); on failure name
        this process and show its last lines (the fleet's report has the whole log)."""
        try:
            return self.log.wait_for(pattern, timeout, start)
        except AssertionError as exc:
            first = str(exc).split("; log:", 1)[0].split(" log:", 1)[0]
            tail = "\n".join(self.log.lines[max(start, len(self.log.lines) - 12):])
            raise AssertionError(f"{self.label}: {first}; its last lines:\n{tail}") from None

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL to its whole process group after ``timeout`` s; returns the exit
        status (None if it had to be killed). Idempotent."""
        rc = None
        if self.running():
            self.popen.terminate()
            try:
                rc = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            rc = self.popen.returncode
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # it, or whatever it left in its session
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait(DEADLINE)
        self.log.mark()
        return rc

    def dump(self) -> str:
        """Its log for a failure report (routine lines of a chatty process counted, not shown)."""
        lines = self.log.text().splitlines()
        rc = self.popen.poll()
        head = f"===== {self.label}: {' '.join(self.argv)} (exit status {'running' if rc is None else rc})"
        if self.chatty:
            routine = re.compile(r'"event": "(sent|echo|recv)"')
            kept = [line for line in lines if not routine.search(line)]
            head += f" [{len(lines) - len(kept)} per-message lines left out]"
            lines = kept
        return "\n".join([head, *lines])


class Host:
    """One host of a fleet: a network namespace with an address, a hosts file and a directory.

    Attributes:
        name: the short name (``ca``, ``gw``, ``tw``).
        names: its DNS names (in every host's /etc/hosts).
        ns: the namespace's name.
        address: its IPv4 address on the fleet's bridge.
        root: the directory that stands for its file system root (:meth:`path`).
    """

    def __init__(self, fleet: "Fleet", name: str, names: Sequence[str], ns: str, address: str) -> None:
        self.fleet, self.name, self.names, self.ns, self.address = fleet, name, list(names), ns, address
        self.root = fleet.directory / "hosts" / name

    def path(self, absolute: str | Path) -> Path:
        """Where this host's ``absolute`` path lives on the test machine: ``/var/lib/pkictl`` ->
        ``ROOT/var/lib/pkictl``."""
        absolute = Path(absolute)
        assert absolute.is_absolute(), absolute
        return self.root / absolute.relative_to("/")

    def run(self, argv: Sequence[str], *, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None,
            input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host's namespace to its end (at most ``timeout`` s); with
        ``check``, fail the test on a non-zero exit status, naming host, command and output."""
        started = time.monotonic()
        try:
            result = subprocess.run([IP, "netns", "exec", self.ns, *argv], capture_output=True, text=True, errors="replace",
                                    timeout=timeout, env=env or self.fleet.env(), cwd=cwd, input=input,
                                    stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            self.fleet.record(self, argv, None, str(exc.stdout or ""), str(exc.stderr or ""), time.monotonic() - started)
            raise AssertionError(f"{self.name}: {' '.join(argv)} did not end within {timeout} s") from None
        self.fleet.record(self, argv, result.returncode, result.stdout, result.stderr, time.monotonic() - started)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} -> exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def pipe(self, argv: Sequence[str], other: "Host", other_argv: Sequence[str], *, timeout: float = 60,
             cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """``argv`` here piped into ``other_argv`` on ``other`` (what ``ARGV | ssh OTHER CMD`` does):
        returns the receiving end's result, its stderr following the sender's."""
        env = self.fleet.env()
        sender = subprocess.Popen([IP, "netns", "exec", self.ns, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, cwd=cwd)
        started = time.monotonic()
        try:
            received = subprocess.run([IP, "netns", "exec", other.ns, *other_argv], stdin=sender.stdout, capture_output=True,
                                      text=True, errors="replace", env=env, timeout=timeout)
        finally:
            sender.stdout.close()
            sender_err = sender.stderr.read().decode(errors="replace")
            sender.stderr.close()
            sender.wait(timeout)
        label = f"{' '.join(argv)} | {other.name}: {' '.join(other_argv)}"
        result = subprocess.CompletedProcess(label, received.returncode or sender.returncode, received.stdout,
                                             sender_err + received.stderr)
        self.fleet.record(self, [label], result.returncode, result.stdout, result.stderr, time.monotonic() - started)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {label} -> exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def sh(self, script: str, **options) -> subprocess.CompletedProcess:
        """Run a shell script (bash, ``set -euo pipefail``) in this host's namespace: see :meth:`run`."""
        return self.run(["bash", "-c", "set -euo pipefail\n" + script], **options)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              chatty: bool = False) -> Process:
        """Start ``argv`` in this host's namespace; the fleet stops it at teardown."""
        process = Process(self, name, argv, env=env or self.fleet.env(), cwd=cwd, chatty=chatty)
        self.fleet.processes.append(process)
        return process

    def python(self, name: str, script: Path, *args: str, **options) -> Process:
        """Start a Python script of the tests with this virtualenv's interpreter."""
        return self.start(name, [sys.executable, "-u", str(script), *args], **options)


class Fleet:
    """Hosts on one private bridge, as a context manager: ``with Fleet(dir, {"ca": [...]}) as f``.

    Args:
        directory: the test's scratch directory (host roots and logs go under it).
        hosts: short host name -> its DNS names, in address order (10.A.B.1, .2, ...).
    """

    def __init__(self, directory: Path, hosts: dict[str, Sequence[str]]) -> None:
        assert hosts and all(re.fullmatch(r"[a-z][a-z0-9]{0,9}", h) for h in hosts), hosts
        self.directory = Path(directory)
        self.prefix = f"pkt{secrets.token_hex(3)}"
        self.network = ipaddress.ip_network(f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24")
        self.bridge_ns = f"{self.prefix}-br"
        addresses = list(self.network.hosts())
        self.hosts = {name: Host(self, name, names, f"{self.prefix}-{name}", str(addresses[i])) for i, (name, names)
                      in enumerate(hosts.items())}
        self.processes: list[Process] = []
        self.commands: list[str] = []
        self.swept: list[str] = []
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of commands in the hosts: this one without any PKICTL_* setting, this
        virtualenv's commands first on PATH, unbuffered Python; plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PKICTL_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def record(self, host: Host, argv: Sequence[str], rc: int | None, stdout: str, stderr: str, seconds: float) -> None:
        status = "timed out" if rc is None else f"exit {rc}"
        text = f"----- {host.name}$ {' '.join(argv)}  ({status}, {seconds:.1f} s)"
        if stdout.strip():
            text += "\n" + stdout.rstrip()
        if stderr.strip():
            text += "\n[stderr]\n" + stderr.rstrip()
        self.commands.append(text)

    # -- building and tearing down ---------------------------------------------------------------

    def __enter__(self) -> "Fleet":
        self.swept = sweep_leftovers()
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def _own(self, ns: str) -> None:
        OWNERS_DIR.mkdir(parents=True, exist_ok=True)
        (OWNERS_DIR / ns).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")

    def _add_namespace(self, ns: str) -> None:
        self._own(ns)  # first, so that a crash right after leaves a sweepable namespace
        self._made.append(ns)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        hosts_file = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n" + "".join(
            f"{h.address}\t{' '.join(h.names)}\n" for h in self.hosts.values())
        self._add_namespace(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add_namespace(host.ns)
            (NETNS_DIR / host.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_DIR / host.ns / "hosts").write_text(hosts_file)
            # Both ends are born in the fleet's namespaces: nothing touches the machine's own.
            _ip("-n", self.bridge_ns, "link", "add", f"v-{host.name}", "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _ip("-n", self.bridge_ns, "link", "set", f"v-{host.name}", "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/{self.network.prefixlen}", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            host.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + DEADLINE
        for host in self.hosts.values():  # carrier on both ends: the link is usable
            while "state UP" not in _ip("-n", host.ns, "link", "show", "eth0").stdout:
                assert time.monotonic() < deadline, f"{host.ns}: eth0 did not come up"
                time.sleep(0.01)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                print(self.report())
        finally:
            problems = self._teardown()
        if problems and exc_type is None:
            raise AssertionError("teardown left something behind: " + "; ".join(problems))

    def _teardown(self) -> list[str]:
        problems = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as exc:  # noqa: BLE001 - go on tearing down, report at the end
                problems.append(f"{process.label}: {exc}")
        self._write_logs()
        for ns in reversed(self._made):
            try:
                if left := _kill_namespace_processes(ns):
                    problems.append(f"{ns}: processes {left} were still running")
                _delete_namespace(ns)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{ns}: {exc}")
        left = [ns for ns in self._made if ns in _namespaces() or (NETNS_DIR / ns).exists() or (OWNERS_DIR / ns).exists()]
        if left:
            problems.append(f"namespaces left: {left}")
        return problems

    # -- reports ---------------------------------------------------------------------------------

    def report(self) -> str:
        """Every command run and every process's log, for a failing test."""
        layout = ", ".join(f"{h.name}={h.address} ({h.ns})" for h in self.hosts.values())
        parts = [f"===== fleet {self.prefix} on {self.network}: {layout}"]
        parts += ["===== commands run", *self.commands]
        parts += [process.dump() for process in self.processes]
        return "\n".join(parts)

    def _write_logs(self) -> None:
        logs = self.directory / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "commands.log").write_text("\n".join(self.commands) + "\n")
            for i, process in enumerate(self.processes):
                (logs / f"{i:02d}-{process.host.name}-{process.name.replace('/', '-')}.log").write_text(process.log.text() + "\n")
        except OSError:
            pass
