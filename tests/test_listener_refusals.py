"""The bad-client matrix: every class of client the gateway must refuse is refused, its reason is
logged in the text and in the JSON format, and a legitimate node is served right after."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import struct

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki_agent.listener.connlog import JSONFormatter, TextFormatter
from pkictl.clock import FixedClock
from pkictl.files import write_new_file
from pkictl.pem import certificates_to_pem, private_key_to_pem
from pkictl.profile import generate_key, node_identity

from support import DEADLINE, TLSClient, bundle_context, client_context, refusal_record, refused, wait_until

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def _files(tmp_path, name: str, cert: x509.Certificate, key, chain) -> tuple:
    write_new_file(tmp_path / f"{name}.pem", certificates_to_pem([cert, *chain]))
    write_new_file(tmp_path / f"{name}.key", private_key_to_pem(key), 0o600)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.key"


def _issued_by_us(pki, tmp_path, name: str, *, not_before=None, not_after=None):
    """A node certificate of our CA issued as if the CA's clock said ``not_before``."""
    if not_before is not None:
        pki.ca.clock = FixedClock(not_before)
    key = generate_key()
    cert = pki.ca.issue("node", name, key.public_key())
    fullchain, keyfile = _files(tmp_path, name, cert, key, pki.ca.chain)
    return client_context(pki.node / "ca.pem", fullchain=fullchain, key=keyfile)


def _crafted(pki, tmp_path, name: str, *, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), ca=False, uris=None):
    """A certificate signed by our issuing CA outside its profile (what OpenSSL alone would accept)."""
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    key = generate_key()
    uris = [node_identity("pkictl.internal", name)] if uris is None else uris
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(pki.ca.issuing.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(NOW + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.issuing.public_key()), critical=False))
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    cert = builder.sign(issuing_key, hashes.SHA256())
    fullchain, keyfile = _files(tmp_path, name, cert, key, pki.ca.chain)
    return client_context(pki.node / "ca.pem", fullchain=fullchain, key=keyfile)


def _foreign(pki, tmp_path):
    leaf = trustme.CA().issue_cert("tw.example")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "foreign.pem"))
    return client_context(pki.node / "ca.pem", fullchain=tmp_path / "foreign.pem", key=tmp_path / "foreign.pem")


def _revoked(pki, tmp_path, running):
    pki.ca.revoke("TW", reason="key-compromise")
    running.call(running.agent.maintain())
    return bundle_context(pki.node)


def _outside_allow(pki, tmp_path):
    return bundle_context(pki.ca.enroll("node", "EX", out=tmp_path / "EX").directory)


# (reason logged, claimed identity logged, how to make the client); identity None = not known
# (OpenSSL refused in the handshake, before the application sees a certificate).
TLS_CASES = {
    "no certificate": ("no client certificate", None, lambda pki, tmp, run: client_context(pki.node / "ca.pem")),
    "foreign CA": ("unknown CA", None, lambda pki, tmp, run: _foreign(pki, tmp)),
    "expired": ("expired", None, lambda pki, tmp, run: _issued_by_us(pki, tmp, "old", not_before=NOW - dt.timedelta(days=200))),
    "not yet valid": ("not yet valid", None, lambda pki, tmp, run: _issued_by_us(pki, tmp, "early", not_before=NOW + dt.timedelta(days=30))),
    "revoked": ("revoked", None, _revoked),
    "serverAuth only": ("wrong purpose", None, lambda pki, tmp, run: _crafted(pki, tmp, "srv", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))),
    "gateway certificate": ("no node identity", "gw2", lambda pki, tmp, run: bundle_context(
        pki.ca.enroll("gateway", "gw2", out=tmp / "gw2", ip_addresses=["127.0.0.1"]).directory)),
    "no EKU": ("wrong purpose", "noeku", lambda pki, tmp, run: _crafted(pki, tmp, "noeku", eku=())),
    "CA as client": ("CA certificate as client", "rogue", lambda pki, tmp, run: _crafted(pki, tmp, "rogue", ca=True)),
    "no node identity": ("no node identity", "anon", lambda pki, tmp, run: _crafted(pki, tmp, "anon", uris=[])),
    "two identities": ("no node identity", "twin", lambda pki, tmp, run: _crafted(
        pki, tmp, "twin", uris=[node_identity("pkictl.internal", "a"), node_identity("pkictl.internal", "b")])),
    "not allowed": ("not allowed", "ex", lambda pki, tmp, run: _outside_allow(pki, tmp)),
}


def _check_both_formats(record, reason: str, node: str | None) -> None:
    text = TextFormatter().format(record)
    assert "refused peer=127.0.0.1:" in text and f"reason={reason!r}" in text
    assert (f"node={node}" in text) if node else ("node=" not in text)
    entry = json.loads(JSONFormatter().format(record))
    assert entry["event"] == "refused" and entry["reason"] == reason and entry["peer"].startswith("127.0.0.1:")
    assert entry["detail"] and dt.datetime.fromisoformat(entry["time"]).tzinfo is not None
    assert entry.get("node") == node


@pytest.mark.parametrize("case", list(TLS_CASES))
def test_bad_tls_client_is_refused_with_its_reason_in_text_and_json(case, pki, start_gateway_agent, tmp_path, caplog):
    """Each bad TLS client is refused, the refusal is logged with peer, reason (and claimed
    identity once the certificate was verified) in both formats, and TW is served right after."""
    reason, node, make = TLS_CASES[case]
    running = start_gateway_agent(allow=["TW"])
    ctx = make(pki, tmp_path, running)
    refused(running.port, ctx)
    _check_both_formats(refusal_record(caplog, reason), reason, node)
    if case != "revoked":  # the control: our node, unchanged, still gets through
        client = TLSClient(running.port, bundle_context(pki.node))
        assert client.echo(b"still served") == b"still served"
        client.close()


def _plain_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        return sock.recv(1024)


def _garbage(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(os.urandom(4096))
        try:
            return sock.recv(1024)
        except ConnectionResetError:
            return b""


def _tls_1_1(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)) as sock:
            return sock.recv(10)
    except (ssl.SSLError, ConnectionError):
        return b""


def _reset(port: int) -> bytes:
    """Connect, then reset the connection (SO_LINGER 0) before saying anything."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return b""


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("reason,speak", [("not TLS", _plain_http), ("not TLS", _garbage), ("protocol version", _tls_1_1),
                                          ("closed during handshake", _reset)],
                         ids=["plain HTTP", "garbage bytes", "TLS 1.1", "reset before a ClientHello"])
def test_non_tls_client_is_refused_with_its_reason(reason, speak, pki, gateway_agent, caplog):
    """Plain HTTP, random bytes and a TLS 1.1 ClientHello get no answer but a close, each is
    logged with its reason in both formats, and TW is served right after."""
    assert speak(gateway_agent.port) == b""
    _check_both_formats(refusal_record(caplog, reason), reason, None)
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"ok") == b"ok"
    client.close()


def test_connection_limit_refuses_the_connection_beyond_it(pki, start_gateway_agent, caplog):
    """With max_connections 1 and TW connected, a second client is closed at once and logged as
    'connection limit'; once TW leaves, a new connection is served."""
    running = start_gateway_agent(max_connections=1)
    first = TLSClient(running.port, bundle_context(pki.node))
    assert first.echo(b"one") == b"one"
    with socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE) as extra:
        assert extra.recv(10) == b""
    _check_both_formats(refusal_record(caplog, "connection limit"), "connection limit", None)
    first.close()
    wait_until(lambda: running.call(lambda: running.agent.listener.active_connections) == 0)
    again = TLSClient(running.port, bundle_context(pki.node))
    assert again.echo(b"two") == b"two"
    again.close()
