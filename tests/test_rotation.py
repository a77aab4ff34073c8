"""Rotating the issuing CA without an outage: old and new certificates both admitted, both
revocable, renewal moving nodes to the new issuing CA; and the root key asked for only here."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
from click.testing import CliRunner
from cryptography import x509

from pki_agent.rotation.rotate import LocalCA, rotate
from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.clock import SystemClock
from pkictl.errors import PKIError
from pkictl.revocation import load_crls
from pkictl.store import CredentialStore

from support import TLSClient, bundle_context, refused, wait_until


def test_rotation_needs_the_root_key_and_says_so(pki, tmp_path):
    """With the root key offline, rotate-issuing refuses naming the key's path; nothing changes."""
    shutil.move(pki.home / "root" / "key.pem", tmp_path / "offline.pem")
    before = pki.ca.issuing.serial_number
    with pytest.raises(PKIError, match="needs the root key"):
        pki.ca.rotate_issuing(activate_in=dt.timedelta(0))
    assert CertificateAuthority.load(pki.home).issuing.serial_number == before
    assert not (pki.home / "retired").exists()


def test_rotation_keeps_old_certificates_working_and_revocable(pki, gateway_agent, tmp_path, caplog):
    """After rotate-issuing: a distinct issuing CA signs new nodes; crl.pem holds a CRL per
    issuer; the gateway admits TW (old issuer) and a new node; revoking TW uses the old issuer's
    CRL; renewal moves a node to the new issuer; status and the audit log show it all."""
    old = pki.ca.issuing
    new = pki.ca.rotate_issuing(activate_in=dt.timedelta(0))
    assert new.subject != old.subject and new.issuer == pki.ca.root.subject
    assert (pki.home / "retired" / f"{old.serial_number:x}" / "key.pem").exists()
    assert CertificateAuthority.load(pki.home).issuing.serial_number == new.serial_number

    fresh = pki.ca.enroll("node", "fresh", out=tmp_path / "fresh")
    assert fresh.certificate.issuer == new.subject
    assert {crl.issuer for crl in load_crls(pki.ca.crl_path)} == {old.subject, new.subject, pki.ca.root.subject}

    gateway_agent.call(gateway_agent.agent.maintain())  # the CRL file changed: reload
    for bundle in (pki.node, fresh.directory):  # TW's chain: old issuer; fresh's: new issuer
        client = TLSClient(gateway_agent.port, bundle_context(bundle))
        assert client.echo(b"hello") == b"hello"
        client.close()

    mover = pki.ca.enroll("node", "mover", out=tmp_path / "mover")  # issued by the new CA ...
    store = CredentialStore(pki.node)
    renewed = rotate(store, store.load(), LocalCA(pki.home, SystemClock()), SystemClock())
    assert renewed.certificate.issuer == new.subject and renewed.chain[0].subject == new.subject
    assert mover.certificate.issuer == new.subject

    old_tw = CredentialStore(pki.node).load(pki.node / "archive" / "1").certificate
    pki.ca.revoke(f"{old_tw.serial_number:x}", reason="superseded")
    by_issuer = {crl.issuer: crl for crl in load_crls(pki.ca.crl_path)}
    assert by_issuer[old.subject].get_revoked_certificate_by_serial_number(old_tw.serial_number) is not None
    assert by_issuer[new.subject].get_revoked_certificate_by_serial_number(old_tw.serial_number) is None

    gateway_agent.call(gateway_agent.agent.maintain())
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))  # renewed TW: new issuer
    assert client.echo(b"renewed") == b"renewed"
    client.close()

    status = CliRunner().invoke(cli, ["--home", str(pki.home), "status", "--json"])
    rows = json.loads(status.output)
    assert sorted(r["serial"] for r in rows if r["kind"] == "issuing") == sorted([f"{old.serial_number:x}", f"{new.serial_number:x}"])
    assert len([r for r in rows if r["kind"] == "crl"]) == 3  # both issuing CAs' and the root's
    assert CliRunner().invoke(cli, ["--home", str(pki.home), "audit", "verify"]).exit_code == 0


def test_revoked_old_issuer_certificate_is_refused_by_the_gateway(pki, gateway_agent, caplog):
    """A certificate of the retired issuing CA revoked after the rotation is refused as 'revoked'."""
    pki.ca.rotate_issuing(activate_in=dt.timedelta(0))
    pki.ca.revoke("TW", reason="key-compromise")
    gateway_agent.call(gateway_agent.agent.maintain())
    refused(gateway_agent.port, bundle_context(pki.node))
    wait_until(lambda: any("reason='revoked'" in r.getMessage() for r in list(caplog.records)), what="a refusal logged with reason 'revoked'")


def test_interrupted_rotation_is_finished_on_load(pki):
    """If rotate-issuing stopped after retiring the old issuing CA, the next load installs the
    complete new one that was waiting in .issuing-new/."""
    new = pki.ca.rotate_issuing(activate_in=dt.timedelta(0))
    (pki.home / "issuing").rename(pki.home / ".issuing-new")  # as if the last rename never happened
    assert CertificateAuthority.load(pki.home).issuing.serial_number == new.serial_number
    assert (pki.home / "issuing" / "cert.pem").exists() and not (pki.home / ".issuing-new").exists()


def test_cli_rotate_issuing_reports_both_generations(pki):
    """pkictl rotate-issuing installs an issuing CA with another subject, prints the retired and
    the new one, and reminds to move the root key offline."""
    before = pki.ca.issuing
    result = CliRunner().invoke(cli, ["--home", str(pki.home), "rotate-issuing", "--activate-in", "0s"])
    assert result.exit_code == 0, result.output
    assert "retired:" in result.output and "issuing:" in result.output and "offline" in result.output
    after = x509.load_pem_x509_certificate((pki.home / "issuing" / "cert.pem").read_bytes())
    assert after.subject != before.subject and after.serial_number != before.serial_number
    assert f"serial {after.serial_number:x}" in result.output
