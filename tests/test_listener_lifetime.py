"""How connections end: idle timeout, maximum age, a revocation that reaches an open connection,
the closing log line; and reloads triggered by the file watcher alone (no SIGHUP, no check)."""

from __future__ import annotations

import json
import subprocess
import time

from pki_agent.listener.connlog import JSONFormatter
from pkictl.store import CredentialStore

from support import DEADLINE, TLSClient, bundle_context, closed_record, command, refusal_record, refused, wait_until


def _message_logged(caplog, text: str) -> None:
    wait_until(lambda: any(text in r.getMessage() for r in caplog.records), what=f"a log line with {text!r}")


def test_idle_connection_is_closed_and_a_busy_one_is_not(pki, start_gateway_agent, caplog):
    """With idle_timeout 1s, a connection that keeps talking every 0.3 s outlives the timeout;
    one that goes quiet is closed and logged as 'idle timeout' with its byte counts."""
    running = start_gateway_agent(idle_timeout=1)
    quiet = TLSClient(running.port, bundle_context(pki.node))
    busy = TLSClient(running.port, bundle_context(pki.node))
    assert quiet.echo(b"hello") == b"hello"
    for _ in range(8):  # 2.4 s of traffic, never 1 s without a byte
        assert busy.echo(b"tick") == b"tick"
        time.sleep(0.3)
    assert quiet.sock.recv(10) == b""  # closed by the listener; the socket timeout bounds the wait
    entry = json.loads(JSONFormatter().format(closed_record(caplog, "idle timeout")))
    assert (entry["node"], entry["bytes_in"], entry["bytes_out"]) == ("tw", 5, 5) and entry["duration"] >= 1
    assert busy.echo(b"still here") == b"still here"
    busy.close()
    quiet.close()


def test_connection_is_closed_at_its_maximum_age(pki, start_gateway_agent, caplog):
    """With max_connection_age 1s, an open connection is closed about a second after its
    handshake and logged as 'max connection age'; a new connection is then served."""
    running = start_gateway_agent(max_connection_age=1)
    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"x") == b"x"
    assert client.sock.recv(10) == b""
    assert closed_record(caplog, "max connection age").pki_event["duration"] >= 1
    client.close()
    again = TLSClient(running.port, bundle_context(pki.node))
    assert again.echo(b"y") == b"y"
    again.close()


def test_crl_reload_closes_the_open_connection_of_a_revoked_node_only(pki, gateway_agent, caplog, tmp_path):
    """TW and EX are connected; after TW is revoked and the CRL reloaded, TW's open connection
    is closed (reason 'revoked') while EX's keeps working."""
    other = pki.ca.enroll("node", "EX", out=tmp_path / "EX").directory
    tw = TLSClient(gateway_agent.port, bundle_context(pki.node))
    ex = TLSClient(gateway_agent.port, bundle_context(other))
    assert tw.echo(b"tw") == b"tw" and ex.echo(b"ex") == b"ex"
    pki.ca.revoke("TW", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    assert tw.sock.recv(10) == b""
    assert closed_record(caplog, "revoked").pki_event["node"] == "tw"
    assert ex.echo(b"ex again") == b"ex again"
    tw.close()
    ex.close()


def test_a_revocation_closes_every_connection_of_that_node_and_superseded_closes_none(pki, gateway_agent, caplog, tmp_path):
    """TW holds a connection opened with its first certificate A and one with its renewed B;
    revoking A as superseded closes neither (a long-lived connection survives rotation); revoking
    B closes both, A's too (its certificate is no longer the revoked one, but it is TW's); EX's
    connection is untouched. TW then enrolls anew (certificate C) and connects; a later reload
    (EX revoked) closes EX's connection and leaves C's open, though B is still on the CRL."""
    from pki_agent.rotation.rotate import LocalCA, rotate
    from pkictl.clock import SystemClock

    other = pki.ca.enroll("node", "EX", out=tmp_path / "EX").directory
    store = CredentialStore(pki.node)
    first = store.load()
    on_a = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert on_a.echo(b"a") == b"a"
    second = rotate(store, first, LocalCA(pki.home, SystemClock()), SystemClock())
    on_b = TLSClient(gateway_agent.port, bundle_context(pki.node))
    ex = TLSClient(gateway_agent.port, bundle_context(other))
    assert on_b.echo(b"b") == b"b" and ex.echo(b"ex") == b"ex"

    pki.ca.revoke(f"{first.certificate.serial_number:x}", reason="superseded")
    gateway_agent.call(gateway_agent.agent.maintain())
    _message_logged(caplog, "CRL loaded: 1 revoked")
    assert on_a.echo(b"still a") == b"still a" and on_b.echo(b"still b") == b"still b"

    pki.ca.revoke(f"{second.certificate.serial_number:x}", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    assert on_b.sock.recv(10) == b"" and on_a.sock.recv(10) == b""
    _message_logged(caplog, f"serial={first.certificate.serial_number:x} reason='revoked' detail='another certificate of node tw is on the new CRL'")
    assert ex.echo(b"ex again") == b"ex again"

    again = pki.ca.enroll("node", "TW", out=tmp_path / "TW-again").directory
    on_c = TLSClient(gateway_agent.port, bundle_context(again))
    assert on_c.echo(b"c") == b"c"
    pki.ca.revoke("EX", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    assert ex.sock.recv(10) == b""
    assert on_c.echo(b"still c") == b"still c"
    for client in (on_a, on_b, on_c, ex):
        client.close()


def test_watcher_reloads_a_gateway_certificate_replaced_by_another_process(pki, start_gateway_agent, caplog):
    """'pkictl enroll-gateway --replace' run as its own process swaps the bundle's live link; the
    file watcher reloads without SIGHUP or periodic check, new connections get the new serial and
    a connection opened before keeps working."""
    running = start_gateway_agent(watch=True)
    before = TLSClient(running.port, bundle_context(pki.node))
    old_serial = before.server_serial()
    result = subprocess.run([command("pkictl"), "--home", str(pki.home), "enroll-gateway", "gw", "--ip", "127.0.0.1",
                             "--out", str(pki.gateway), "--replace"], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    new_serial = CredentialStore(pki.gateway).load().certificate.serial_number
    assert new_serial != old_serial
    _message_logged(caplog, f"credential gw serial {new_serial:x}")
    after = TLSClient(running.port, bundle_context(pki.node))
    assert after.server_serial() == new_serial
    assert before.echo(b"opened before") == b"opened before"
    before.close()
    after.close()


def test_watcher_reloads_the_crl_after_pkictl_revoke(pki, start_gateway_agent, caplog):
    """'pkictl revoke TW' in another process rewrites the CRL; the watcher reloads it and TW's
    next connection is refused as 'revoked', with no periodic check in between."""
    running = start_gateway_agent(watch=True)
    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"before") == b"before"
    client.close()
    result = subprocess.run([command("pkictl"), "--home", str(pki.home), "revoke", "TW"], capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    _message_logged(caplog, "CRL loaded: 1 revoked")
    refused(running.port, bundle_context(pki.node))
    refusal_record(caplog, "revoked")


def test_watcher_keeps_serving_when_the_crl_on_disk_breaks(pki, start_gateway_agent, caplog):
    """A CRL overwritten with garbage is seen by the watcher, the reload fails and says why, and
    TW is still served with the CRL loaded before."""
    running = start_gateway_agent(watch=True)
    pki.ca.crl_path.write_text("not a CRL\n")
    _message_logged(caplog, "reload failed")
    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"still served") == b"still served"
    client.close()
