"""The gateway listener in process: real TLS handshakes on 127.0.0.1, refusals with their
logged reasons, hot reload on renewal, a broken reload that changes nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import ssl

import pytest
import trustme

from pkictl.tls import client_context as agent_client_context
from pkictl.clock import FixedClock
from pkictl.files import write_new_file
from pkictl.pem import certificates_to_pem, private_key_to_pem
from pkictl.profile import generate_key
from pkictl.store import CredentialStore

from support import DEADLINE, TLSClient, bundle_context, client_context, refusal_record, refused, wait_record, wait_until


def test_node_with_our_certificate_reaches_the_upstream(pki, gateway_agent, caplog):
    """TW's certificate and chain open an mTLS connection whose bytes reach the upstream and come back."""
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"hello through mTLS") == b"hello through mTLS"
    assert client.sock.version() == "TLSv1.3"
    client.close()
    # Accepted and closed lines reach logging in batches, within 0.1 s of their event.
    wait_until(lambda: any("accepted" in r.getMessage() and "node=tw" in r.getMessage() for r in caplog.records),
               what="the accepted line of TW")


def test_node_with_agent_client_context_verifies_the_gateway_by_ip(pki, gateway_agent):
    """pki-agent's own client context sends the chain and verifies the gateway's IP SAN; a name
    the certificate does not carry is refused by the client."""
    ctx, _ = agent_client_context(CredentialStore(pki.node))
    client = TLSClient(gateway_agent.port, ctx)
    assert client.echo(b"x") == b"x"
    client.close()
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):  # "Hostname mismatch" / "doesn't match"
        TLSClient(gateway_agent.port, ctx, server_hostname="gateway.example.lan")


def test_client_without_certificate_is_refused_and_logged(pki, gateway_agent, caplog):
    """No client certificate: refused, and logged with the peer address and reason."""
    refused(gateway_agent.port, client_context(pki.node / "ca.pem"))
    assert "peer=127.0.0.1:" in refusal_record(caplog, "no client certificate").getMessage()


def test_client_from_another_ca_is_refused(pki, gateway_agent, caplog, tmp_path):
    """A client certificate from a foreign CA (trustme) is refused as 'unknown CA'."""
    foreign = trustme.CA()
    leaf = foreign.issue_cert("tw.example")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "foreign.pem"))
    ctx = client_context(pki.node / "ca.pem", fullchain=tmp_path / "foreign.pem", key=tmp_path / "foreign.pem")
    refused(gateway_agent.port, ctx)
    refusal_record(caplog, "unknown CA")


def test_gateway_server_certificate_used_as_client_is_refused(pki, gateway_agent, caplog, tmp_path):
    """A gateway certificate of our CA completes the handshake (it has clientAuth, to renew over
    EST) and is refused all the same: it carries no node identity. The listener's own
    certificate is not forwarded either: it is closed as pki-agent doctor's probe (INFO)."""
    other = pki.ca.enroll("gateway", "gw2", out=tmp_path / "gw2", ip_addresses=["127.0.0.1"]).directory
    refused(gateway_agent.port, bundle_context(other))
    refusal_record(caplog, "no node identity")
    assert "a gateway's certificate does not authenticate a node" in caplog.text
    refused(gateway_agent.port, bundle_context(pki.gateway))
    wait_record(caplog, lambda r: getattr(r, "pki_event", {}).get("reason") == "doctor probe", "the doctor probe record")


def test_expired_client_certificate_is_refused(pki, gateway_agent, caplog, tmp_path):
    """A node certificate of ours whose validity has ended is refused as 'expired'."""
    pki.ca.clock = FixedClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=200))
    key = generate_key()
    cert = pki.ca.issue("node", "old", key.public_key())
    write_new_file(tmp_path / "old.pem", certificates_to_pem([cert, *pki.ca.chain]))
    write_new_file(tmp_path / "old.key", private_key_to_pem(key), 0o600)
    refused(gateway_agent.port, client_context(pki.node / "ca.pem", fullchain=tmp_path / "old.pem", key=tmp_path / "old.key"))
    refusal_record(caplog, "expired")


def test_plain_http_and_silent_clients_do_not_disturb_a_real_node(pki, gateway_agent, caplog):
    """Plain HTTP is refused as 'not TLS', a client that never sends a ClientHello is dropped after
    the handshake timeout, and TW is served meanwhile."""
    silent = socket.create_connection(("127.0.0.1", gateway_agent.port), timeout=DEADLINE)
    with socket.create_connection(("127.0.0.1", gateway_agent.port), timeout=DEADLINE) as http:
        http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert http.recv(1024) == b""
    refusal_record(caplog, "not TLS")
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"still served") == b"still served"
    client.close()
    assert silent.recv(1024) == b""  # dropped by the 2 s handshake timeout, bounded by DEADLINE
    silent.close()
    refusal_record(caplog, "handshake timeout")


def test_renewal_hot_reloads_new_connections_and_keeps_established_ones(pki, gateway_agent):
    """After a renewal new connections see the new server serial; a connection opened before
    keeps working."""
    before = TLSClient(gateway_agent.port, bundle_context(pki.node))
    old_serial = before.server_serial()
    assert before.echo(b"before") == b"before"

    assert gateway_agent.call(gateway_agent.agent.renew()) is True
    new_serial = CredentialStore(pki.gateway).load().certificate.serial_number
    assert new_serial != old_serial

    after = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert after.server_serial() == new_serial
    assert after.echo(b"after") == b"after"
    assert before.echo(b"still open") == b"still open"
    before.close()
    after.close()


def test_broken_credential_on_disk_keeps_the_old_context_serving(pki, gateway_agent, caplog):
    """A reload from a version whose key does not match its certificate fails, is logged, and
    the previous certificate keeps being served."""
    store = CredentialStore(pki.gateway)
    serving = store.load()
    broken = store.archive / "99"
    broken.mkdir(mode=0o700)
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        write_new_file(broken / name, (store.current_version_dir() / name).read_bytes())
    write_new_file(broken / "privkey.pem", private_key_to_pem(generate_key()), 0o600)  # wrong key
    os.symlink("archive/99", pki.gateway / ".live.tmp")
    os.replace(pki.gateway / ".live.tmp", pki.gateway / "live")

    assert gateway_agent.call(gateway_agent.agent.reload) is False
    assert any("reload failed" in r.getMessage() for r in caplog.records)
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.server_serial() == serving.certificate.serial_number
    assert client.echo(b"ok") == b"ok"
    client.close()


def _tls12(ctx):
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def test_revoked_client_is_refused_after_the_crl_changes_without_restart(pki, gateway_agent, caplog):
    """TW is served; after 'revoke TW' re-signs the CRL, the agent's periodic check reloads the
    listener and TW's next connection is refused as 'revoked'."""
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"before") == b"before"
    client.close()
    pki.ca.revoke("TW", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    assert len(gateway_agent.agent.current_tls().revoked) == 1
    refused(gateway_agent.port, bundle_context(pki.node))
    refusal_record(caplog, "revoked")


def _resume(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> ssl.SSLSocket:
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                           server_hostname="127.0.0.1", session=session)


def test_revoked_client_cannot_resume_an_earlier_tls12_session(pki, gateway_agent, caplog):
    """A TLS 1.2 session of TW that the server resumes after the revocation (its session cache
    kept) is refused as 'revoked' by the listener's own check of the resumed peer certificate.

    A reload builds a fresh context with an empty session cache, so after 'revoke TW' OpenSSL
    never resumes and refuses TW in a full handshake against the CRL. The application's check is
    what stands when a session is resumed: the test serves the pre-revocation context (its cache
    holding TW's session) with the new CRL's revoked set, and shows that the handshake did resume.
    Mutation: ``authorize_client`` without its revoked-serial check lets the resumed session
    through (the echo comes back) and this test fails.
    """
    ctx = _tls12(bundle_context(pki.node))
    first = TLSClient(gateway_agent.port, ctx)
    assert first.echo(b"one") == b"one"
    session = first.sock.session
    # A clean TLS close: OpenSSL drops a TLS 1.2 session from the server's cache when its
    # connection ends without close_notify, and resumption below would then fail by chance.
    first.sock.unwrap().close()
    resumed = _resume(gateway_agent.port, ctx, session)
    resumed.sendall(b"two")
    assert resumed.recv(10) == b"two"
    assert resumed.session_reused  # resumption works, so the refusal below is meaningful
    resumed.unwrap().close()
    before = gateway_agent.agent.current_tls()

    pki.ca.revoke("TW")
    gateway_agent.call(gateway_agent.agent.maintain())
    after = gateway_agent.agent.current_tls()
    assert after.context is not before.context and len(after.revoked) == 1

    # The product's path: a fresh context, no resumption, OpenSSL refuses the full handshake.
    refused(gateway_agent.port, ctx)
    refusal_record(caplog, "revoked")
    caplog.clear()

    # The session cache kept: resumption happens, and only the revoked set refuses TW.
    gateway_agent.call(lambda: setattr(gateway_agent.agent, "_tls", dataclasses.replace(after, context=before.context)))
    again = _resume(gateway_agent.port, ctx, session)
    try:
        assert again.session_reused, "the server did not resume the session: the check below would prove nothing"
        try:
            again.sendall(b"three")
            answer = again.recv(10)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert answer == b"", f"a revoked node's resumed session was forwarded (echo {answer!r})"
    finally:
        again.close()
    refusal_record(caplog, "revoked")


def test_broken_crl_keeps_the_previous_context_serving(pki, gateway_agent, caplog, tmp_path):
    """A CRL file replaced by garbage makes the reload fail and be logged; the CRL loaded before
    stays in force: TW is still served and the node it revoked is still refused as 'revoked'.

    Mutation: ``Agent.reload`` installing a context without the CRL when the reload fails
    (``self._tls = server_context(self.store, None)`` before ``return False``) keeps the log line
    and TW served, but lets the revoked node in, and this test fails.
    """
    gone = pki.ca.enroll("node", "gone", out=tmp_path / "gone").directory
    pki.ca.revoke("gone", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    refused(gateway_agent.port, bundle_context(gone))
    refusal_record(caplog, "revoked")
    caplog.clear()

    pki.ca.crl_path.write_text("not a CRL\n")
    gateway_agent.call(gateway_agent.agent.maintain())
    assert any("reload failed" in r.getMessage() and "CRL" in r.getMessage() for r in caplog.records)
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"still served") == b"still served"
    client.close()
    refused(gateway_agent.port, bundle_context(gone))
    refusal_record(caplog, "revoked")


def test_replace_installed_on_disk_is_picked_up_by_the_periodic_check(pki, gateway_agent):
    """enroll-gateway --replace moves the bundle's live link; the next periodic check reloads and
    new connections see the new serial."""
    new = pki.ca.enroll("gateway", "gw", out=pki.gateway, ip_addresses=["127.0.0.1"], replace=True).certificate
    gateway_agent.call(gateway_agent.agent.maintain())
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.server_serial() == new.serial_number
    client.close()
