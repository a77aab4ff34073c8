"""The demo's machinery: the installed commands as subprocesses with their logs shown and kept,
bounded waits on log lines, loopback addresses and free ports, a line-based demo upstream.

Nothing here imports the agent: the demo drives ``pki-agent`` as a program, as an operator does.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import PKIError

__all__ = [
    "WAIT",
    "DemoStepFailed",
    "Session",
    "Process",
    "LineUpstream",
    "LineClient",
    "find_command",
    "loopback_hosts",
    "pick_ports",
]

WAIT = 60.0  # seconds: the bound of every wait in the demo
_TAIL = 15  # log lines quoted when a step fails


class DemoStepFailed(PKIError):
    """A demo step did not do what it should; the message names the step, why, and the log lines."""


def find_command(name: str) -> str:
    """The installed console script ``name``: next to this Python (its virtualenv), else on PATH.

    Raises:
        DemoStepFailed: found in neither place.
    """
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoStepFailed(f"{name} is neither in {beside.parent} nor on PATH: install the project "
                             "(pip install .) into the environment that runs pkictl")
    return found


def _bindable(host: str, port: int = 0) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def loopback_hosts() -> tuple[str, str, str | None]:
    """``(ca_host, gateway_host, note)``: 127.0.0.2 and 127.0.0.3 where they can be bound (Linux
    routes all of 127/8 to lo), else 127.0.0.1 for both and a note saying so (macOS has only
    127.0.0.1 without an alias)."""
    if _bindable("127.0.0.2") and _bindable("127.0.0.3"):
        return "127.0.0.2", "127.0.0.3", None
    return "127.0.0.1", "127.0.0.1", ("127.0.0.2 or 127.0.0.3 cannot be bound on this host (on macOS only 127.0.0.1 exists "
                                      "until you add aliases: sudo ifconfig lo0 alias 127.0.0.2 up, the same for 127.0.0.3), "
                                      "so everything runs on 127.0.0.1, on distinct ports")


def pick_ports(hosts: list[str], base: int | None = None) -> list[int]:
    """One port per entry of ``hosts``: ``base``, ``base + 1``, ... when given, else free ports
    drawn below the ephemeral range (20000-32767), so that other programs' port-0 listeners and
    outgoing connections cannot take them between this check and the demo's bind."""
    if base is not None:
        return [base + i for i in range(len(hosts))]
    ports: list[int] = []
    rng = random.SystemRandom()
    for host in hosts:
        for _ in range(200):
            port = rng.randrange(20000, 32768)
            if port not in ports and _bindable(host, port):
                ports.append(port)
                break
        else:
            raise DemoStepFailed(f"no free port on {host} between 20000 and 32767; pass --port BASE")
    return ports


class Process:
    """One of the demo's long-running commands: its output (stdout and stderr) shown with a
    prefix, kept in memory and written to ``log_path``.

    Args:
        label: the prefix, e.g. ``gw``.
        argv: the command.
        log_path: where its whole output goes.
        say: prints one line of the demo's output (thread-safe).
        show: whether a line of its output is printed (all are kept).
    """

    def __init__(self, label: str, argv: list[str], log_path: Path, say: Callable[[str], None],
                 show: Callable[[str], bool] = lambda line: True) -> None:
        self.label, self.argv, self.log_path = label, argv, log_path
        self.lines: list[str] = []
        self._say, self._show = say, show
        self._changed = threading.Condition()
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._ended = False
        self.matched_at = -1  # index of the line the last wait_for matched
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, ""):
            line = raw.rstrip("\n")
            self._log.write(line + "\n")
            self._log.flush()
            if self._show(line):
                self._say(f"  [{self.label}] {line}")
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()
        self._log.close()

    def mark(self) -> int:
        """The index the next line will get: pass it as ``start`` to wait only for newer lines."""
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, what: str, *, start: int = 0, timeout: float = WAIT) -> re.Match:
        """The first line at index >= ``start`` that matches ``pattern`` (its index: ``matched_at``).

        Args:
            what: the awaited event in words, for the error message.

        Raises:
            DemoStepFailed: no such line within ``timeout`` seconds, or the process ended first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    if match := regex.search(self.lines[index]):
                        self.matched_at = index
                        return match
                    index += 1
                if self._ended:
                    status = self.proc.wait(WAIT)
                    raise DemoStepFailed(f"{self.label} ({self.command}) exited with status {status} before {what}\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoStepFailed(f"{self.label} did not log {what} within {timeout:.0f} s "
                                         f"(expected a line matching {pattern!r})\n{self.tail()}")
                self._changed.wait(remaining)

    def wait_exit(self, what: str, timeout: float = WAIT) -> int:
        """Wait (bounded) for the process to end by itself and all its output to be read; its exit status.

        Raises:
            DemoStepFailed: it is still running after ``timeout`` seconds.
        """
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DemoStepFailed(f"{self.label} did not {what} within {timeout:.0f} s\n{self.tail()}") from None
        self._pump_thread.join(WAIT)
        return status

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not ended within ``WAIT`` seconds; its exit status
        (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._pump_thread.join(WAIT)
        return self.proc.returncode

    @property
    def command(self) -> str:
        return shlex.join([Path(self.argv[0]).name, *self.argv[1:]])

    def tail(self) -> str:
        with self._changed:
            lines = self.lines[-_TAIL:]
        return f"last lines of {self.label}'s log ({self.log_path}):\n" + "\n".join(f"    {line}" for line in lines)


class Session:
    """The demo's run: numbered steps, the commands it runs (printed as an operator types them),
    the processes it started (all stopped by :meth:`stop_all`), one place to fail.

    Args:
        logs: the directory of the processes' log files.
        echo: prints one line.
    """

    def __init__(self, logs: Path, echo: Callable[[str], None]) -> None:
        self.logs = logs
        self.processes: dict[str, Process] = {}
        self.upstream: LineUpstream | None = None
        self.step = "starting"
        self._echo = echo
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        with self._lock:
            self._echo(line)

    def section(self, number: int, title: str) -> None:
        self.step = f"{number} ({title})"
        self.say(f"\n{number}. {title}")

    def show(self, argv: list[str]) -> None:
        self.say(f"  $ {shlex.join([Path(argv[0]).name, *argv[1:]])}")

    def run(self, argv: list[str], *, ok: tuple[int, ...] = (0,), timeout: float = WAIT) -> subprocess.CompletedProcess:
        """Run a command to its end (bounded), print it and its output; its result.

        Raises:
            DemoStepFailed: it exited with a status not in ``ok``, or ran longer than ``timeout``.
        """
        self.show(argv)
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DemoStepFailed(f"{Path(argv[0]).name} {argv[1:]} did not finish within {timeout:.0f} s") from None
        output = (result.stdout + result.stderr).rstrip("\n")
        for line in output.splitlines():
            self.say(f"    {line}")
        if result.returncode not in ok:
            raise DemoStepFailed(f"{shlex.join([Path(argv[0]).name, *argv[1:]])} exited with status {result.returncode} "
                                 f"(expected {' or '.join(map(str, ok))}); it said:\n" + "\n".join(f"    {x}" for x in output.splitlines()))
        return result

    def start(self, label: str, argv: list[str], show: Callable[[str], bool] = lambda line: True) -> Process:
        """Start a long-running command, print it and its PID; its output is shown prefixed ``[label]``."""
        self.show(argv)
        process = Process(label, argv, self.logs / f"{label.replace(' ', '-')}.log", self.say, show)
        self.processes[label] = process
        self.say(f"    (pid {process.pid}, log {process.log_path})")
        return process

    def check_running(self) -> None:
        """Raises DemoStepFailed if a long-running process (not an enroll) has ended."""
        for label, process in self.processes.items():
            if "enroll" not in label and process.proc.poll() is not None:
                raise DemoStepFailed(f"{label} ({process.command}) ended on its own with status {process.proc.returncode}\n{process.tail()}")

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every process still running, newest first, and close the upstream; the exit
        statuses of the processes signalled, by label."""
        running = [(label, p) for label, p in reversed(list(self.processes.items())) if p.proc.poll() is None]
        statuses = {label: process.stop() for label, process in running}
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        return statuses


class LineUpstream:
    """The demo's "real gateway": plain TCP on ``host:port``, answering each line with
    ``upstream #N: LINE`` (N numbers the connections), and saying what it got."""

    def __init__(self, host: str, port: int, say: Callable[[str], None]) -> None:
        counter = iter(range(1, 1_000_000))
        lock = threading.Lock()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with lock:
                    number = next(counter)
                peer = "%s:%d" % self.client_address[:2]
                for raw in self.rfile:
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    say(f"  [upstream] connection #{number} from {peer} (plain TCP): {line!r}")
                    self.wfile.write(f"upstream #{number}: {line}\n".encode())

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        try:
            self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        except OSError as exc:
            raise DemoStepFailed(f"the demo upstream cannot listen on {host}:{port}: {exc}; pass another --port") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class LineClient:
    """A plain TCP client (it knows nothing of TLS) that sends a line and reads one back."""

    def __init__(self, host: str, port: int) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=WAIT)
        except OSError as exc:
            raise DemoStepFailed(f"cannot connect to {host}:{port}: {exc}") from None
        self._file = self.sock.makefile("rb")

    def exchange(self, line: str) -> str:
        """Send ``line``; the line that comes back, or '' if the other end closed first."""
        try:
            self.sock.sendall(line.encode() + b"\n")
            return self._file.readline().decode(errors="replace").rstrip("\n")
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise DemoStepFailed(f"no answer to {line!r} within {WAIT:.0f} s") from None
            return ""

    def close(self) -> None:
        self._file.close()
        self.sock.close()
