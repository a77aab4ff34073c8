"""pki_agent.gateway.GatewayTLS inside a small asyncio server of its own (no forwarder): the
current context through asyncio.start_server(ssl=...), the listener's authorization, reloads."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
import trustme
from cryptography import x509

from pki_agent.errors import ConfigError, PeerRejected
from pki_agent.gateway import GatewayTLS
from support import DEADLINE, bundle_context, client_context


class Greeter:
    """An asyncio TLS server that greets each authorized node by name and then echoes."""

    def __init__(self, tls: GatewayTLS) -> None:
        self.tls = tls
        self.refusals: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            node = self.tls.authorize(writer.get_extra_info("ssl_object"))
        except PeerRejected as exc:
            self.refusals.append(exc.reason)
            writer.close()
            return
        writer.write(f"hello {node.name}\n".encode())
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    async def __aenter__(self) -> "Greeter":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.tls.server_context,
                                                 ssl_handshake_timeout=5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def _talk(port: int, ctx: ssl.SSLContext, keep: bool = False):
    """Blocking client: connect, read the greeting line; returns (greeting or None, server serial, socket if kept)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionError):
        raw.close()
        return None, None, None
    serial = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
    line = b""
    try:
        while not line.endswith(b"\n") and (chunk := sock.recv(100)):
            line += chunk
    except (ssl.SSLError, ConnectionError):
        line = b""
    if not keep:
        sock.close()
        sock = None
    return (line.decode().strip() or None), serial, sock


def _echo(sock, payload: bytes) -> bytes:
    sock.sendall(payload)
    return sock.recv(len(payload))


def test_asyncio_server_admits_allowed_nodes_and_refuses_the_rest(pki, tmp_path):
    """Through GatewayTLS, TW is greeted by name; a node outside allow, a client without a
    certificate, a foreign CA's client and the gateway's own certificate are not."""
    other = pki.ca.enroll("node", "EX", out=tmp_path / "EX").directory
    foreign = trustme.CA().issue_cert("tw.example")
    foreign.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "foreign.pem"))
    tls = GatewayTLS(pki.gateway, allow=["TW"], crl=pki.ca.crl_path)

    async def main():
        async with Greeter(tls) as server:
            talk = lambda ctx: asyncio.to_thread(_talk, server.port, ctx)  # noqa: E731
            assert (await talk(bundle_context(pki.node)))[0] == "hello tw"
            assert (await talk(bundle_context(other)))[0] is None
            assert (await talk(client_context(pki.node / "ca.pem")))[0] is None
            foreign_ctx = client_context(pki.node / "ca.pem", fullchain=tmp_path / "foreign.pem", key=tmp_path / "foreign.pem")
            assert (await talk(foreign_ctx))[0] is None
            assert (await talk(bundle_context(pki.gateway)))[0] is None
            return server.refusals

    # The gateway's certificate finishes the handshake (clientAuth, to renew) and has no node
    # identity; the other two never finish it.
    assert asyncio.run(main()) == ["not allowed", "no node identity"]


def test_reload_reaches_new_connections_of_the_asyncio_server(pki):
    """After a new gateway certificate and a CRL revoking TW are installed and the watcher
    reloads, new handshakes get the new certificate and TW is refused, while TW's connection
    opened before keeps working; a broken CRL then changes nothing."""
    tls = GatewayTLS(pki.gateway, allow=["*"], crl=pki.ca.crl_path)
    old_serial = tls.current.credential.certificate.serial_number

    async def main():
        async with Greeter(tls) as server:
            greeting, serial, before = await asyncio.to_thread(_talk, server.port, bundle_context(pki.node), True)
            assert (greeting, serial) == ("hello tw", old_serial)
            stop = asyncio.Event()
            watcher = asyncio.create_task(tls.watch(stop))
            await asyncio.sleep(0)  # the watcher's first step sets its watches up (agent/rotation/watch.py)
            new = pki.ca.enroll("gateway", "gw", out=pki.gateway, ip_addresses=["127.0.0.1"], replace=True).certificate
            pki.ca.revoke("TW")
            async with asyncio.timeout(DEADLINE):
                while tls.current.credential.certificate.serial_number != new.serial_number or not tls.current.revoked:  # noqa: ASYNC110 - no event to wait for
                    await asyncio.sleep(0.01)  # the watcher reloads on its own; bounded by DEADLINE
            assert (await asyncio.to_thread(_talk, server.port, bundle_context(pki.node)))[0] is None
            ex = pki.ca.enroll("node", "EX", out=pki.home.parent / "EX").directory
            assert await asyncio.to_thread(_talk, server.port, bundle_context(ex)) == ("hello ex", new.serial_number, None)
            assert await asyncio.to_thread(_echo, before, b"opened before") == b"opened before"
            before.close()
            pki.ca.crl_path.write_text("not a CRL\n")
            assert tls.reload() is False
            assert tls.current.credential.certificate.serial_number == new.serial_number
            stop.set()
            await watcher

    asyncio.run(main())


def test_authorize_checks_the_revoked_set_for_a_session_openssl_did_not_verify(pki):
    """authorize() refuses a revoked serial itself (what a resumed TLS session relies on), even
    though the certificate verified when the session began."""
    tls = GatewayTLS(pki.gateway, allow=["*"], crl=pki.ca.crl_path)
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(DEADLINE)
    client_sock.settimeout(DEADLINE)
    client = bundle_context(pki.node).wrap_socket(client_sock, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    served = tls.context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
    handshake = threading.Thread(target=client.do_handshake)
    handshake.start()
    served.do_handshake()
    handshake.join(DEADLINE)
    assert tls.authorize(served).name == "tw"
    pki.ca.revoke("TW")
    assert tls.reload() is True
    with pytest.raises(PeerRejected) as refused:
        tls.authorize(served)
    assert refused.value.reason == "revoked" and refused.value.node == "tw"
    client.close()
    served.close()


@pytest.mark.parametrize("allow", [[], ["*", "tw"], ["not a name"], "tw"])
def test_allow_list_must_be_explicit_and_valid(pki, allow):
    """An empty allow list, '*' mixed with names, an invalid name or a bare string is a ConfigError."""
    with pytest.raises(ConfigError):
        GatewayTLS(pki.gateway, allow=allow)
