"""A replayed older CRL cannot let a revoked client back in (RFC 5280 5.2.3: CRL numbers only
grow): the listener refuses to reload a crl.pem whose CRL of some issuer is older than the one in
service, and the agent's fetch of /crl.pem never installs one. Real handshakes, a real pkictl serve."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from cryptography.hazmat.primitives import serialization

from est_support import RunningService
from pki_agent.est_client import ESTClient, refresh_crl
from pkictl.crl import build_crl, crl_number, load_crls
from pkictl.crl_numbers import held_crls, refuse_older
from pkictl.errors import CRLRollbackError
from pkictl.files import atomic_write
from pkictl.store import CredentialStore

from support import TLSClient, bundle_context, refused


def admitted(port: int, bundle) -> bool:
    client = TLSClient(port, bundle_context(bundle))
    try:
        return client.echo(b"ping") == b"ping"
    finally:
        client.close()


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("reload refused")]


@pytest.fixture
def revoked_gone(pki, tmp_path):
    """crl.pem before node ``gone`` was revoked, and ``gone``'s bundle (revoked since)."""
    bundle = pki.ca.enroll("node", "gone", out=tmp_path / "gone").directory
    before = pki.ca.crl_path.read_bytes()
    pki.ca.revoke("gone", reason="key-compromise")
    return before, bundle


def test_listener_refuses_a_replayed_older_crl_and_keeps_refusing_the_revoked_node(pki, start_gateway_agent, revoked_gone, caplog):
    """The listener holds CRL #2 (gone revoked); crl.pem put back to #1 and reloaded: the reload is
    refused with one log line naming the file, the issuer and both numbers, gone is still refused
    and TW still admitted, and the next check does not log it again. A newer CRL (#3) is taken."""
    before, gone = revoked_gone
    running = start_gateway_agent()
    assert refused(running.port, bundle_context(gone)) and admitted(running.port, pki.node)

    atomic_write(pki.ca.crl_path, before)
    assert running.call(running.agent.reload) is False
    [line] = refusals(caplog)
    message = line.getMessage()
    assert str(pki.ca.crl_path) in message and pki.ca.issuing.subject.rfc4514_string() in message
    assert "has CRL number 1, lower than 2 in service" in message and line.levelno == logging.ERROR
    assert refused(running.port, bundle_context(gone)), "a replayed CRL let the revoked node back in"
    assert admitted(running.port, pki.node)
    running.call(running.agent.reload_if_changed)
    assert len(refusals(caplog)) == 1, "the refusal was logged again without a change on disk"

    pki.ca.sign_crl()  # issuing CRL #3, the root's #1 carried along byte for byte
    running.call(running.agent.reload_if_changed)
    assert running.agent.current_tls().crl_numbers  # in service now
    assert max(h.number for h in running.agent.current_tls().crl_numbers.values()) == 3
    assert refused(running.port, bundle_context(gone)) and admitted(running.port, pki.node)
    assert len(refusals(caplog)) == 1


def test_listener_refuses_another_crl_under_the_number_in_service(pki, start_gateway_agent, revoked_gone, caplog):
    """A CRL signed by the issuing CA under the number in service (#2) but without gone's entry
    (what a restored inventory could sign) is refused too; gone stays refused."""
    _, gone = revoked_gone
    running = start_gateway_agent()
    root = [c for c in load_crls(pki.ca.crl_path) if c.issuer == pki.ca.root.subject]
    twin = build_crl(issuer=pki.ca.issuing, issuer_key=pki.ca._issuing_key, revoked=[], number=2, now=pki.ca.clock.now(),
                     lifetime=dt.timedelta(days=7))
    atomic_write(pki.ca.crl_path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [twin, *root]))
    assert running.call(running.agent.reload) is False
    [line] = refusals(caplog)
    assert "has CRL number 2 like the one in service but other content" in line.getMessage()
    assert refused(running.port, bundle_context(gone))


def test_refuse_older_accepts_the_same_crl_and_higher_numbers(pki, revoked_gone):
    """The rule itself: an identical CRL, a higher number and a new issuer pass; an issuer missing
    from the newer file keeps its number; lower or same-number-other-content raise."""
    before, _ = revoked_gone
    from pkictl.revocation import crls_from_pem

    old, new = crls_from_pem(before, source="before"), load_crls(pki.ca.crl_path)
    held = held_crls(new)
    assert refuse_older(held, new, source="same") == held
    assert refuse_older(held_crls(old), new, source="newer") == held
    only_root = [c for c in new if c.issuer == pki.ca.root.subject]
    assert refuse_older(held, only_root, source="fewer") == held  # the issuing CA's number stays held
    with pytest.raises(CRLRollbackError, match="older: the CRL of .* has CRL number 1, lower than 2"):
        refuse_older(held, old, source="older")
    assert [crl_number(c) for c in new] == [2, 1]


@pytest.fixture
def served(pki):
    service = RunningService(pki.home).start()
    yield service
    service.stop()


def test_agent_fetch_never_installs_an_older_crl(pki, served, revoked_gone, tmp_path):
    """The agent has fetched CRL #2 from pkictl serve; the server's crl.pem is then rolled back to
    #1: the fetch raises naming both numbers and the installed file is unchanged; once the server
    publishes #3 the fetch installs it."""
    before, _ = revoked_gone
    store = CredentialStore(pki.node)
    client = ESTClient(served.url, anchors_path=store.trust_anchors_path, store=store)
    installed = tmp_path / "listener-crl.pem"
    changed, _ = refresh_crl(client, installed)
    assert changed and installed.read_bytes() == pki.ca.crl_path.read_bytes()
    fetched = installed.read_bytes()

    atomic_write(pki.ca.crl_path, before)  # a rolled-back or replaying server
    with pytest.raises(CRLRollbackError, match=r"/crl.pem \(installed: .*\): the CRL of .* has CRL number 1, lower than 2"):
        refresh_crl(client, installed)
    assert installed.read_bytes() == fetched

    pki.ca.sign_crl()
    changed, _ = refresh_crl(client, installed)
    assert changed and installed.read_bytes() == pki.ca.crl_path.read_bytes()
