"""``pkictl demo``: the main job on one machine, in a local directory, with nothing to set up.

A CA, a gateway and node TW with certificates that live for seconds, the real ``pki-agent`` as a
subprocess with its mTLS listener in front of a demo echo upstream, TW connecting through mTLS,
a refused client, a rotation with hot reload, and the status report.
"""

from __future__ import annotations

import queue
import re
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .authority import CertificateAuthority
from .bundle_config import render_agent_config
from .clock import SystemClock
from .errors import PKIError
from .files import atomic_write
from .settings import CASettings, parse_duration
from .status import read_status
from .store import CredentialStore
from .tls import client_context

__all__ = ["run_demo"]

_WAIT = 60.0  # seconds: bound of every wait in the demo


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _AgentLog:
    """Prints the agent's log lines as they come and waits for a pattern among them."""

    def __init__(self, stream, echo: Callable[[str], None]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._echo = echo
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + _WAIT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise PKIError("pki-agent exited early; its log is above")
            self._echo(f"    agent | {line}")
            if match := re.search(pattern, line):
                return match
        raise PKIError(f"pki-agent did not log {pattern!r} within {_WAIT:.0f} s")


def _connect(bundle: Path, port: int):
    import socket

    ctx, credential = client_context(CredentialStore(bundle))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=_WAIT), server_hostname="127.0.0.1")
    return sock, credential


def _round_trip(sock, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload) and (chunk := sock.recv(65536)):
        received += chunk
    return received


def _server_serial(sock) -> str:
    from cryptography import x509

    return f"{x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number:x}"


def _start_agent(bundle: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pki_agent", "run", "--config", str(bundle / "agent.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_demo(directory: Path, *, lifetime: str = "15s", echo: Callable[[str], None] = print) -> None:
    """Run the demo in ``directory`` (created; must not exist).

    Args:
        directory: where the CA home and the bundles go.
        lifetime: gateway and node certificate lifetime (``15s``): renewal comes at 2/3 of it.
        echo: where to print.

    Raises:
        PKIError: ``directory`` exists, or a step failed (the message says which).
    """
    directory = Path(directory)
    if directory.exists():
        raise PKIError(f"{directory} exists; the demo makes a fresh one: remove it or pass --dir NEW_DIR")
    seconds = parse_duration(lifetime, field="--lifetime")
    settings = CASettings(node_lifetime=seconds, gateway_lifetime=seconds)

    echo(f"1. pkictl init-ca: a root and an issuing CA in {directory / 'ca'}")
    ca = CertificateAuthority.init(directory / "ca", settings)
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_port = upstream.server_address[1]
    echo(f"2. a demo upstream (the real gateway, plain TCP echo) on 127.0.0.1:{up_port}")

    gw = ca.enroll("gateway", "gw", out=directory / "gw", ip_addresses=["127.0.0.1"])
    tw = ca.enroll("node", "TW", out=directory / "TW")
    for enrollment, kind, name, listener in (
        (gw, "gateway", "gw", {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{up_port}", "crl": ca.crl_path.resolve()}),
        (tw, "node", "TW", None),
    ):
        text = render_agent_config(name=name, kind=kind, trust_domain=settings.trust_domain, ca_home=ca.home.resolve(),
                                   check_interval="1s", listener=listener)
        atomic_write(enrollment.directory / "agent.yaml", text.encode())
    ca.close()
    echo(f"3. pkictl enroll-gateway gw --ip 127.0.0.1 -> {gw.directory} (serial {gw.certificate.serial_number:x})")
    echo(f"   pkictl enroll-node TW                -> {tw.directory} (serial {tw.certificate.serial_number:x})")
    echo(f"   certificates live {lifetime}, so the agent renews them at 2/3 of that")

    echo(f"4. pki-agent run --config {gw.directory / 'agent.yaml'}   (and the same for TW, which only renews)")
    agent = _start_agent(gw.directory)
    node_agent = _start_agent(tw.directory)
    try:
        log = _AgentLog(agent.stderr, echo)
        node_log = _AgentLog(node_agent.stderr, lambda line: echo(line.replace("agent |", "TW agent |")))
        port = int(log.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))

        sock, credential = _connect(tw.directory, port)
        first = _server_serial(sock)
        answer = _round_trip(sock, b"hello from TW")
        echo(f"5. TW connects with mTLS ({sock.version()}, client serial {credential.certificate.serial_number:x}), "
             f"gateway serial {first}: sent 'hello from TW', got back {answer.decode()!r}")
        log.wait_for(r"accepted .*node=tw")

        import socket

        bare = ssl.create_default_context(cafile=str(tw.directory / "ca.pem"))
        try:
            with bare.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=_WAIT), server_hostname="127.0.0.1") as s:
                s.sendall(b"no certificate")
                s.recv(10)
        except (ssl.SSLError, OSError):
            pass
        echo("6. a client without a certificate is refused, and the agent says why:")
        log.wait_for(r"refused .*reason=")

        echo("7. waiting for the renewals at 2/3 of the lifetime ...")
        renewed = log.wait_for(r"renewed gw: serial \S+ -> ([0-9a-f]+)")
        log.wait_for(rf"credential gw serial {renewed.group(1)}")
        node_log.wait_for(r"renewed TW: serial \S+ -> ([0-9a-f]+)")
        new_sock, new_credential = _connect(tw.directory, port)
        echo(f"8. a new connection, with TW's new certificate (serial {new_credential.certificate.serial_number:x}), "
             f"sees the new gateway serial {_server_serial(new_sock)} (was {first}); "
             f"{_round_trip(new_sock, b'after').decode()!r} echoed")
        echo(f"   the connection opened before the rotation still works: {_round_trip(sock, b'still here').decode()!r} echoed")
        echo("9. revocation reaches the running gateway through the CRL, without a restart:")
        new_sock.close()
        sock.close()

        ca = CertificateAuthority.load(directory / "ca")
        ex = ca.enroll("node", "EX", out=directory / "EX")
        ex_sock, _ = _connect(ex.directory, port)
        _round_trip(ex_sock, b"hi")
        ex_sock.close()
        ca.revoke("EX", reason="key-compromise")
        ca.close()
        echo(f"   pkictl enroll-node EX, EX connects; then pkictl revoke EX --reason key-compromise (serial {ex.certificate.serial_number:x}):")
        log.wait_for(r"CRL loaded: 1 revoked")
        try:
            ex_sock, _ = _connect(ex.directory, port)
            ex_sock.sendall(b"let me in")
            ex_sock.recv(10)
            ex_sock.close()
        except (ssl.SSLError, OSError):
            pass
        log.wait_for(r"refused .*reason='revoked'")
    finally:
        codes = []
        for process in (agent, node_agent):
            process.terminate()
            codes.append(process.wait(_WAIT))
        upstream.shutdown()
    echo(f"10. SIGTERM: the agents stopped with exit status {codes[0]} and {codes[1]}")

    echo("11. pkictl status:")
    table, _ = read_status(directory / "ca" / "inventory.sqlite3", SystemClock().now())
    for line in table.splitlines():
        echo(f"   {line}")
    echo(f"\nEverything is in {directory}; run 'pkictl --home {directory / 'ca'} status' to see it again.")
