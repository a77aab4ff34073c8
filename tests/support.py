"""Test support: a real TCP echo upstream, a watcher of a real process's log, real TLS clients,
bounded waits, free loopback ports and the tools a test needs."""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

BIN = Path(sys.executable).parent
DEADLINE = 30.0  # seconds: the bound of every wait in these tests
REQUIRE_ENV = "PKICTL_REQUIRE_NETNS"  # "1" (CI): a test that cannot run fails instead of skipping


def require_tool(name: str, package: str) -> str:
    """The path of the program ``name``; without it the calling test is skipped with the reason,
    or fails when ``PKICTL_REQUIRE_NETNS=1`` (CI, which installs ``package``): a missing tool
    must never let a check pass without running."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian package {package})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback port nothing listens on: bound to port 0 to be given a free one, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(name: str) -> str:
    """The installed console script ``name`` of this virtualenv (pkictl, pki-agent)."""
    path = BIN / name
    assert path.exists(), f"{path} is missing: install the project (pip install -e '.[test]')"
    return str(path)


class EchoServer:
    """A plain TCP echo server on 127.0.0.1, port 0: the stand-in for the real gateway."""

    def __init__(self) -> None:
        self.connections = 0  # how many connections reached it (the fuzz tests count them)
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                try:
                    while data := self.request.recv(65536):
                        self.request.sendall(data)
                except ConnectionResetError:
                    pass  # the listener aborted the connection (a revoked node, a stop): not an echo failure

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # serve_forever's default 0.5 s poll would make every shutdown() take up to 0.5 s
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "EchoServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class LogWatcher:
    """Collects the lines a subprocess writes to one stream and waits for patterns in them."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.stamps: list[float] = []  # time.monotonic() when each line arrived, beside ``lines``
        self.ended = False  # the stream reached EOF (the process closed it or ended)
        self.last_index = -1  # the index of the line the last wait_for matched
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        # The pump owns the stream: it closes it at EOF (the process ended or closed it), so that
        # no pipe is left for the garbage collector (a ResourceWarning: an error in this suite).
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((time.monotonic(), line.rstrip("\n")))
        except (OSError, ValueError):  # closed under it by close_pipes: the end of the stream too
            pass
        finally:
            try:
                stream.close()
            except (OSError, ValueError):
                pass
            self._queue.put(None)

    def _take(self, item: tuple[float, str] | None) -> bool:
        """Append one queued line; False at the end of the stream."""
        if item is None:
            self.ended = True
            return False
        self.stamps.append(item[0])
        self.lines.append(item[1])
        return True

    def wait_for(self, pattern: str, timeout: float = DEADLINE, start: int = 0) -> re.Match:
        """Wait until a line at index >= ``start`` matches ``pattern``; fail after ``timeout`` s.
        The matching line's index is left in ``last_index`` (its arrival time: ``stamps[last_index]``)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.lines):
                if match := regex.search(self.lines[index]):
                    self.last_index = index
                    return match
                index += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; log:\n" + "\n".join(self.lines))
            if self.ended:
                raise AssertionError(f"process ended before a line matched {pattern!r}; log:\n" + "\n".join(self.lines))
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self._take(item)

    def mark(self) -> int:
        """The index the next line will get: pass it as ``start`` to wait only for newer lines."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return len(self.lines)
            self._take(item)

    def text(self) -> str:
        self.mark()
        return "\n".join(self.lines)


class AgentProcess:
    """``pki-agent run --config FILE`` as a real subprocess, its stderr watched."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [command("pki-agent"), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log = LogWatcher(self.proc.stderr)

    def wait_ready(self) -> tuple[str, int] | None:
        match = self.log.wait_for(r"ready: \w+ \S+, (?:listening on (\S+):(\d+)|no listener)")
        return (match.group(1), int(match.group(2))) if match.group(1) else None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise AssertionError(f"pki-agent did not stop within {timeout:g} s of SIGTERM") from None
        finally:
            close_pipes(self.proc)


def close_pipes(proc: subprocess.Popen) -> None:
    """Close the pipes of an ended ``proc`` once a LogWatcher has read what it wants: the pump
    thread sees EOF or an error and ends, and no file is left for the garbage collector (a
    ResourceWarning, an error under pytest's ``filterwarnings = error``)."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except (OSError, ValueError):  # a reader thread in readline() holds the lock: it ends at EOF
                pass


def live_files(bundle: Path) -> dict[str, Path]:
    """The current version's files, resolving ``live`` once so that a rotation in between
    cannot hand out a certificate and a key of different versions."""
    version = bundle / os.readlink(bundle / "live")
    return {name: version / f"{name}.pem" for name in ("cert", "chain", "fullchain", "privkey")}


def client_context(ca_pem: Path, *, fullchain: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    if fullchain is not None:
        ctx.load_cert_chain(str(fullchain), str(key))
    return ctx


def bundle_context(bundle: Path) -> ssl.SSLContext:
    files = live_files(bundle)
    return client_context(bundle / "ca.pem", fullchain=files["fullchain"], key=files["privkey"])


class TLSClient:
    """A blocking Python ssl client connection to 127.0.0.1:port."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_hostname)

    def server_serial(self) -> int:
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True)).serial_number

    def echo(self, payload: bytes) -> bytes:
        """Send ``payload`` and read back as many bytes (b'' if the server closed)."""
        self.sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate, timeout: float = DEADLINE, what: str = "the condition", interval: float = 0.01):
    """Poll ``predicate()`` every ``interval`` s until it returns a true value, and return that
    value; fail after ``timeout`` s. ``what`` names the condition in the failure."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(interval)
    return value


def holds_within(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` s passed; return whether it held
    (for a caller that reports the failure itself)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def refusal_record(caplog, reason: str, timeout: float = DEADLINE):
    """Wait (bounded) for the listener's log record of a refusal with ``reason``; fail if none comes."""
    def found():
        return next((r for r in list(caplog.records) if (event := getattr(r, "pki_event", None))
                     and event.get("event") == "refused" and event.get("reason") == reason), None)

    try:
        return wait_until(found, timeout, f"a refusal with reason {reason!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n" + "\n".join(r.getMessage() for r in caplog.records)) from None


def wait_record(caplog, matches, what: str = "the log record", timeout: float = DEADLINE):
    """Wait (bounded) for the first captured record for which ``matches(record)`` holds."""
    found = []

    def seen() -> bool:
        found[:] = [r for r in list(caplog.records) if matches(r)]
        return bool(found)

    wait_until(seen, timeout, what)
    return found[0]


def closed_record(caplog, reason: str | None = None):
    """The listener's 'closed' record (with ``reason`` if given); the lines come in batches within 0.1 s."""
    return wait_record(caplog, lambda r: getattr(r, "pki_event", {}).get("event") == "closed"
                       and reason in (None, r.pki_event["reason"]), f"a 'closed' record with reason {reason!r}")


def refused(port: int, ctx: ssl.SSLContext) -> str:
    """Connect, try one echo, and return how it failed; raise if the gateway let it through.

    With TLS 1.3 a rejected client certificate shows up on the client after its handshake
    "succeeded": as an alert or EOF on the first read (docs/design.md).
    """
    try:
        client = TLSClient(port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        return f"handshake: {exc}"
    try:
        answer = client.echo(b"ping")
    except (ssl.SSLError, ConnectionError) as exc:
        return f"first read: {exc}"
    finally:
        client.close()
    if answer == b"":
        return "first read: EOF"
    raise AssertionError(f"the gateway forwarded for a client it should refuse (echo {answer!r})")


def openssl_echo(port: int, bundle: Path, payload: str = "hello-over-mtls") -> str:
    """Run ``openssl s_client`` with the bundle's key, certificate and chain; return its stdout
    once the echo of ``payload`` came back (or whatever it printed before it ended)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is required for the interop tests"
    files = live_files(bundle)
    proc = subprocess.Popen(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(files["cert"]), "-key", str(files["privkey"]),
         "-cert_chain", str(files["chain"]), "-CAfile", str(bundle / "ca.pem"), "-verify_return_error",
         "-verify_ip", "127.0.0.1", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(payload + "\n")
    proc.stdin.flush()
    watcher = LogWatcher(proc.stdout)
    try:
        watcher.wait_for(re.escape(payload), timeout=DEADLINE)
    except AssertionError:
        pass
    finally:
        proc.kill()
        proc.wait(DEADLINE)
    text = watcher.text()
    close_pipes(proc)
    return text
