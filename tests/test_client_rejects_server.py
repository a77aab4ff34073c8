"""A client that refuses the server's certificate (a TLS alert it sends in the handshake) is
logged as 'rejected by client' with reason 'client rejected our certificate', by the gateway
listener and by 'pkictl serve', and never as a refusal of the client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from support import DEADLINE, client_context, refusal_record, refused, wait_record
from est_support import EST, ServeProcess

REJECTED = "client rejected our certificate"


def _other_ca(tmp_path: Path) -> Path:
    """The root of a CA that is not ours, as a ca.pem a misconfigured client would hold."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def _rejection(caplog):
    return wait_record(caplog, lambda r: getattr(r, "pki_event", {}).get("event") == "rejected by client",
                       "a 'rejected by client' record")


def _openssl_s_client(port: int, ca_file: Path) -> subprocess.CompletedProcess:
    """openssl s_client trusting only ``ca_file``, aborting (with its alert) on a failed verify."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is required for the interop tests"
    return subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_file),
                           "-verify_return_error", "-verify_ip", "127.0.0.1"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DEADLINE)


def test_openssl_client_with_another_cas_anchor_is_logged_as_rejecting_our_certificate(pki, start_gateway_agent, caplog, tmp_path):
    """openssl s_client with another CA's ca.pem aborts with 'alert unknown ca'; the gateway logs
    'rejected by client' (WARNING) saying so, and no refusal of the client."""
    running = start_gateway_agent()
    done = _openssl_s_client(running.port, _other_ca(tmp_path))
    assert done.returncode != 0, done.stdout
    record = _rejection(caplog)
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert message.startswith("rejected by client peer=127.0.0.1:") and f"reason={REJECTED!r}" in message
    assert "the client rejected our certificate (alert unknown ca)" in message and "ca.pem" in message
    assert record.pki_event["reason"] == REJECTED
    assert not [r for r in caplog.records if getattr(r, "pki_event", {}).get("event") == "refused"]


def test_python_client_with_a_foreign_anchor_is_logged_as_rejecting_our_certificate(pki, start_gateway_agent, caplog, tmp_path):
    """Python ssl, with TW's own certificate but a foreign trust anchor, fails to verify the
    gateway and sends its alert before its certificate: logged as 'client rejected our
    certificate', not as 'unknown CA' or 'no client certificate'."""
    running = start_gateway_agent()
    ctx = ssl.create_default_context(cafile=str(_other_ca(tmp_path)))
    ctx.load_cert_chain(str(pki.node / "fullchain.pem"), str(pki.node / "privkey.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE) as raw:
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    record = _rejection(caplog)
    assert record.pki_event["reason"] == REJECTED and "alert unknown ca" in record.pki_event["detail"]
    assert not [r for r in caplog.records if getattr(r, "pki_event", {}).get("event") == "refused"]


def _foreign_client(pki, tmp_path: Path) -> ssl.SSLContext:
    leaf = trustme.CA().issue_cert("tw.example")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "foreign.pem"))
    return client_context(pki.node / "ca.pem", fullchain=tmp_path / "foreign.pem", key=tmp_path / "foreign.pem")


@pytest.mark.parametrize("make,reason", [
    (lambda pki, tmp: client_context(pki.node / "ca.pem"), "no client certificate"),
    (_foreign_client, "unknown CA"),
], ids=["no certificate", "foreign certificate"])
def test_clients_that_trust_us_are_still_refused_with_our_reasons(make, reason, pki, start_gateway_agent, caplog, tmp_path):
    """The negative controls: a client that trusts our CA but sends no certificate, or one of
    another CA, is refused by us with our reason, and nothing says it rejected our certificate."""
    running = start_gateway_agent()
    refused(running.port, make(pki, tmp_path))
    record = refusal_record(caplog, reason)
    assert record.getMessage().startswith("refused peer=")
    assert not [r for r in caplog.records if REJECTED in r.getMessage()]


def test_est_service_logs_a_client_that_rejects_its_certificate(pki, tmp_path):
    """'pkictl serve' logs openssl s_client with another CA's anchor as 'rejected by client'
    (alert unknown ca); a client that trusts it is answered and logs no such line."""
    serve = ServeProcess(pki.home, "--workers", "0")
    try:
        start = serve.log.mark()
        _openssl_s_client(serve.port, _other_ca(tmp_path))
        line = serve.log.wait_for(r"WARNING pkictl\.serve: rejected by client peer=127\.0\.0\.1:\d+ .*", start=start).group(0)
        assert f"reason={REJECTED!r}" in line and "alert unknown ca" in line, line
        assert "refused peer=" not in serve.log.text()

        start = serve.log.mark()
        ctx = ssl.create_default_context(cafile=str(pki.home / "ca.pem"))
        with socket.create_connection(("127.0.0.1", serve.port), timeout=DEADLINE) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(f"GET {EST}/cacerts HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                assert tls.recv(12) == b"HTTP/1.1 200"
        serve.log.wait_for(r"answered peer=127\.0\.0\.1:\d+ method=GET", start=start)
        assert serve.log.text().count("rejected by client") == 1
    finally:
        assert serve.stop() == 0
