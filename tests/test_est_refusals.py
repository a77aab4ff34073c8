"""Every client ``pkictl serve`` refuses is logged, as the gateway listener logs them: real TLS
clients refused in their handshake (peer address and exact reason), EST requests refused by the
CA (peer, claimed identity, status, reason), and nothing from the peer can forge a log line."""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.files import write_new_file
from pkictl.pem import certificates_to_pem, private_key_to_pem
from pkictl.profile import generate_key, node_identity

from est_support import EST, ServeProcess, curl, est_body, make_csr, pkictl
from support import DEADLINE, live_files

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def _write(directory: Path, name: str, chain: list[x509.Certificate], key) -> tuple[Path, Path]:
    write_new_file(directory / f"{name}.pem", certificates_to_pem(chain))
    write_new_file(directory / f"{name}.key", private_key_to_pem(key), 0o600)
    return directory / f"{name}.pem", directory / f"{name}.key"


def _ours(pki, tmp_path: Path, name: str, when: dt.datetime) -> tuple[Path, Path]:
    """A node certificate of our CA, issued by it with its clock at ``when``, sent with its chain."""
    ca = CertificateAuthority.load(pki.home, clock=FixedClock(when))
    try:
        key = generate_key()
        certificate = ca.issue("node", name, key.public_key())
        return _write(tmp_path, name, [certificate, *ca.chain], key)
    finally:
        ca.close()


def _server_auth_only(pki, tmp_path: Path) -> tuple[Path, Path]:
    """A node-like certificate signed by our issuing CA for serverAuth only (OpenSSL's sslclient purpose fails)."""
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    key = generate_key()
    certificate = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "srv")]))
        .issuer_name(pki.ca.issuing.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(node_identity("pkictl.internal", "srv"))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.issuing.public_key()), critical=False)
        .sign(issuing_key, hashes.SHA256()))
    return _write(tmp_path, "srv", [certificate, pki.ca.issuing], key)


def _foreign(tmp_path: Path) -> tuple[Path, Path]:
    """A trustme leaf sent with its whole chain, its foreign root included."""
    authority = trustme.CA()
    leaf = authority.issue_cert("tw.example", common_name="TW")
    pem = tmp_path / "foreign.pem"
    pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + authority.cert_pem.bytes())
    key = tmp_path / "foreign.key"
    leaf.private_key_pem.write_to_path(str(key))
    return pem, key


def _leaf_alone(pki) -> tuple[Path, Path]:
    """TW's own certificate without chain.pem (what 'openssl s_client -cert cert.pem' sends)."""
    files = live_files(pki.node)
    return files["cert"], files["privkey"]


def tls_client(port: int, ca_pem: Path, credential: tuple[Path, Path] | None) -> tuple[int, str]:
    """Connect with Python ssl (TLS 1.2, so that a refusal fails the client's own handshake) and
    GET /cacerts; return the local port and how it ended."""
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if credential is not None:
        ctx.load_cert_chain(str(credential[0]), str(credential[1]))
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    local = raw.getsockname()[1]
    try:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET {EST}/cacerts HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return local, tls.recv(12).decode(errors="replace")
    except (ssl.SSLError, ConnectionError) as exc:
        return local, f"refused: {exc}"


def refusal_line(serve: ServeProcess, port: int, start: int) -> str:
    """The serve log's refusal line for the client that connected from ``port`` (bounded wait)."""
    return serve.log.wait_for(rf"WARNING pkictl\.serve: refused peer=127\.0\.0\.1:{port} .*", start=start).group(0)


# case -> (how to make the client's credential, reason logged, words the detail must hold)
TLS_CASES = {
    "expired": (lambda pki, tmp: _ours(pki, tmp, "old", NOW - dt.timedelta(days=200)), "expired", "certificate has expired"),
    "not yet valid": (lambda pki, tmp: _ours(pki, tmp, "early", NOW + dt.timedelta(days=30)), "not yet valid", "not yet valid"),
    "foreign CA": (lambda pki, tmp: _foreign(tmp), "unknown CA", "another CA"),
    "leaf without chain": (lambda pki, tmp: _leaf_alone(pki), "unknown CA", "sent without its chain"),
    "serverAuth only": (_server_auth_only, "wrong purpose", "unsuitable certificate purpose"),
}


@pytest.fixture(params=["asyncio", "uvloop"])
def serve(request, pki):
    """A real 'pkictl serve' on ``pki``'s CA (issuing in-process), on each event loop."""
    process = ServeProcess(pki.home, "--loop", request.param, "--workers", "0", "--handshake-timeout", "0.5")
    yield process
    assert process.stop() == 0


def test_clients_refused_in_the_tls_handshake_are_logged_with_peer_and_reason(pki, serve, tmp_path):
    """Real TLS clients refused by 'pkictl serve' (expired, not yet valid, foreign CA, leaf without
    its chain, serverAuth-only) are each logged once as 'refused peer=127.0.0.1:PORT reason=...'
    with the exact reason and what it means; TW with its full chain is served and not refused."""
    ca_pem = pki.home / "ca.pem"
    for case, (make, reason, words) in TLS_CASES.items():
        start = serve.log.mark()
        port, ended = tls_client(serve.port, ca_pem, make(pki, tmp_path))
        assert ended.startswith("refused"), f"{case}: the service answered a client it must refuse: {ended!r}"
        line = refusal_line(serve, port, start)
        assert f"reason={reason!r}" in line and words in line, f"{case}: {line}"

    # negative control: TW's full chain gets its answer, and its line is no refusal
    files = live_files(pki.node)
    start = serve.log.mark()
    port, ended = tls_client(serve.port, ca_pem, (files["fullchain"], files["privkey"]))
    assert ended.startswith("HTTP/1.1 200"), ended
    serve.log.wait_for(rf"INFO pkictl\.serve: answered peer=127\.0\.0\.1:{port} method=GET path='{EST}/cacerts' status=200", start=start)
    assert f"refused peer=127.0.0.1:{port} " not in serve.log.text()


def test_plain_http_a_silent_client_and_a_client_that_hangs_up_are_logged(pki, serve):
    """Plain HTTP on the TLS port is 'not TLS', a client that sends nothing is cut off after
    --handshake-timeout as 'handshake timeout', one that hangs up is 'closed during handshake'."""
    start = serve.log.mark()
    with socket.create_connection(("127.0.0.1", serve.port), timeout=DEADLINE) as plain:
        port = plain.getsockname()[1]
        plain.sendall(b"GET /crl.pem HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        plain.recv(100)
    assert "reason='not TLS'" in refusal_line(serve, port, start)

    with socket.create_connection(("127.0.0.1", serve.port), timeout=DEADLINE) as silent:
        port = silent.getsockname()[1]
        assert silent.recv(100) == b""  # the service gives up after 0.5 s and closes
    assert "reason='handshake timeout'" in refusal_line(serve, port, start)

    hangs_up = socket.create_connection(("127.0.0.1", serve.port), timeout=DEADLINE)
    port = hangs_up.getsockname()[1]
    hangs_up.close()
    assert "reason='closed during handshake'" in refusal_line(serve, port, start)


def test_est_refusals_are_logged_with_the_claimed_identity_and_reason(pki, serve, tmp_path):
    """A revoked TW renewing gets 403 and the line names TW, its serial and 'revoked'; a wrong token
    gets 401 logged with the Basic name, the CSR's CN and 'bad token'; the right token's
    answer is logged as answered, not refused (control)."""
    files = live_files(pki.node)
    current = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    tls = ["--cert", str(files["fullchain"]), "--key", str(files["privkey"])]
    csr, _ = make_csr(tmp_path / "tw", subject="/CN=TW", san=f"URI:{node_identity('pkictl.internal', 'tw')}")
    pkictl(pki.home, "revoke", "TW")
    start = serve.log.mark()
    revoked = curl(serve.url + EST + "/simplereenroll", *tls, cacert=pki.home / "ca.pem", data=est_body(csr),
                   content_type="application/pkcs10")
    assert revoked.status == 403, revoked
    line = refusal_line(serve, revoked.local_port, start)
    assert f"path='{EST}/simplereenroll' status=403 reason='revoked' node=TW serial={current.serial_number:x} csr=TW detail=" in line, line

    token = pkictl(pki.home, "enroll-node", "n2", "--token").stdout.splitlines()[1].strip()
    body = est_body(make_csr(tmp_path / "n2", subject="/CN=n2")[0])
    wrong = curl(serve.url + EST + "/simpleenroll", "-u", f"n2:{token}x", cacert=pki.home / "ca.pem", data=body,
                 content_type="application/pkcs10")
    assert wrong.status == 401, wrong
    line = refusal_line(serve, wrong.local_port, start)
    assert "status=401 reason='bad token' node=n2 csr=n2 detail='the enrollment token for n2 is wrong" in line, line

    right = curl(serve.url + EST + "/simpleenroll", "-u", f"n2:{token}", cacert=pki.home / "ca.pem", data=body,
                 content_type="application/pkcs10")
    assert right.status == 200, right
    serve.log.wait_for(rf"INFO pkictl\.serve: answered peer=127\.0\.0\.1:{right.local_port} method=POST "
                       rf"path='{EST}/simpleenroll' status=200 node=n2 csr=n2 ", start=start)
    assert f"refused peer=127.0.0.1:{right.local_port} " not in serve.log.text()


def test_nothing_from_the_peer_forges_a_log_line(pki, serve, tmp_path):
    """A %0A in the path and a newline in the Basic-auth name are logged escaped on the request's
    one line, and garbage after the handshake is one 'bad HTTP request' line without a traceback."""
    start = serve.log.mark()
    forged = "refused peer=6.6.6.6:1 reason='forged'"
    reply = curl(serve.url + "/x%0A" + forged.replace(" ", "%20"), cacert=pki.home / "ca.pem")
    assert reply.status == 404, reply
    line = refusal_line(serve, reply.local_port, start)
    assert f"path={'/x' + chr(10) + forged!r} status=404 reason='not found'" in line, line

    body = est_body(make_csr(tmp_path, subject="/CN=n3")[0])
    claimed = "n3\nrefused peer=6.6.6.6 reason='forged'"  # no colon: HTTP Basic ends the name there
    name = curl(serve.url + EST + "/simpleenroll", "-u", f"{claimed}:token", cacert=pki.home / "ca.pem", data=body,
                content_type="application/pkcs10")
    assert name.status == 400, name
    line = refusal_line(serve, name.local_port, start)
    assert f"status=400 reason='invalid name' node={claimed!r} csr=n3" in line, line

    ctx = ssl.create_default_context(cafile=str(pki.home / "ca.pem"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", serve.port), timeout=DEADLINE), server_hostname="127.0.0.1") as tls:
        port = tls.getsockname()[1]
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon in this header\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 400", tls.recv(12))
    line = refusal_line(serve, port, start)
    assert "status=400 reason='bad HTTP request'" in line, line

    text = serve.log.text()
    assert not re.search(r"pkictl\.serve: refused peer=6\.6\.6\.6", text)
    assert not any(line.startswith("refused peer=6.6.6.6") for line in serve.log.lines), text
    assert "Traceback" not in text, text
