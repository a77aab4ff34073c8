"""Revocation and the CRL: what revoke records, the CRL's profile, re-signing before nextUpdate,
--replace, and what status reports about all of it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519

from pki_agent.rotation.rotate import build_reenroll_csr
from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.clock import FixedClock
from pkictl.errors import NotEnrolledError, PolicyError
from pkictl.profile import generate_key
from pkictl.revocation import load_crls, parse_reason, signed_by
from pkictl.settings import CASettings
from pkictl.store import CredentialStore

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


@pytest.fixture
def clock():
    return FixedClock(NOW)


@pytest.fixture
def ca(tmp_path, clock):
    authority = CertificateAuthority.init(tmp_path / "ca", CASettings(crl_lifetime=dt.timedelta(hours=2)), clock=clock)
    yield authority
    authority.close()


def _crl(ca) -> x509.CertificateRevocationList:
    (crl,) = [c for c in load_crls(ca.crl_path) if c.issuer == ca.issuing.subject]  # the root's follows it
    return crl


def test_init_publishes_an_empty_crl_with_aki_and_number(ca):
    """init-ca signs CRL number 1, empty, by the issuing CA, with an AKI and a nextUpdate of crl_lifetime."""
    crl = _crl(ca)
    assert crl.issuer == ca.issuing.subject
    assert crl.is_signature_valid(ca.issuing.public_key())
    assert len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert crl.next_update_utc == NOW + dt.timedelta(hours=2)
    assert crl.last_update_utc <= NOW


def test_revoke_by_name_records_and_publishes(ca, tmp_path):
    """revoke TW marks its certificate revoked with time and reason and puts its serial, date and
    reasonCode in a new CRL with a higher number."""
    cert = ca.enroll("node", "TW", out=tmp_path / "TW").certificate
    (record,) = ca.revoke("tw", reason="keyCompromise")
    assert record.serial == cert.serial_number
    stored = ca.inventory.get(cert.serial_number)
    assert (stored.status, stored.revoked_at, stored.revocation_reason) == ("revoked", NOW, "key-compromise")
    crl = _crl(ca)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None and entry.revocation_date_utc == NOW
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.is_signature_valid(ca.issuing.public_key())


def test_revoke_by_serial_and_unspecified_reason_has_no_reason_code(ca, tmp_path):
    """revoke SERIAL (hex with colons) revokes that certificate; the unspecified reason is left out
    of the entry (RFC 5280 5.3.1)."""
    cert = ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"]).certificate
    hex_serial = f"{cert.serial_number:x}"
    ca.revoke(":".join(hex_serial[i:i + 2] for i in range(0, len(hex_serial), 2)))
    entry = _crl(ca).get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None and len(entry.extensions) == 0


@pytest.mark.parametrize("target", ["nobody", "deadbeef", "../x"])
def test_revoking_nothing_is_an_error_and_changes_nothing(ca, target):
    """An unknown name or serial raises NotEnrolledError and the CRL stays as it was."""
    before = ca.crl_path.read_bytes()
    with pytest.raises(NotEnrolledError):
        ca.revoke(target)
    assert ca.crl_path.read_bytes() == before


def test_ca_certificates_and_bad_reasons_are_refused(ca, tmp_path):
    """The issuing CA's serial cannot be revoked here, and an unknown reason is refused by name."""
    with pytest.raises(PolicyError, match="issuing CA"):
        ca.revoke(f"{ca.issuing.serial_number:x}")
    with pytest.raises(PolicyError, match="key-compromise"):
        parse_reason("stolen")


def test_revoked_certificate_cannot_renew(ca, tmp_path):
    """simple_reenroll refuses a revoked certificate (RFC 7030 4.2.2) and says it is revoked."""
    store = CredentialStore(ca.enroll("node", "TW", out=tmp_path / "TW").directory)
    current = store.load()
    ca.revoke("TW", reason="privilege-withdrawn")
    with pytest.raises(PolicyError, match="revoked"):
        ca.simple_reenroll(build_reenroll_csr(current.certificate, generate_key()), current.certificate)


def test_revoked_entries_leave_the_crl_after_they_expire(ca, tmp_path, clock):
    """A revoked certificate is listed until its notAfter and dropped from CRLs signed later."""
    cert = ca.enroll("node", "TW", out=tmp_path / "TW").certificate
    ca.revoke("TW")
    assert _crl(ca).get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    clock.set(cert.not_valid_after_utc + dt.timedelta(seconds=1))
    ca.sign_crl()
    assert _crl(ca).get_revoked_certificate_by_serial_number(cert.serial_number) is None


def test_crl_is_re_signed_after_half_its_lifetime(ca, clock):
    """refresh_crl does nothing one second before half of the CRL's validity and re-signs at it."""
    first = _crl(ca)
    half = first.last_update_utc + (first.next_update_utc - first.last_update_utc) / 2
    clock.set(half - dt.timedelta(seconds=1))
    assert ca.refresh_crl() is False
    assert _crl(ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    clock.set(half)
    assert ca.refresh_crl() is True
    assert _crl(ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2


def test_replace_issues_anew_in_the_same_bundle_and_supersedes_the_old(ca, tmp_path):
    """enroll --replace installs a new version in the existing bundle and revokes the old
    certificate as superseded; without --replace the second enrollment is refused."""
    from pkictl.errors import AlreadyEnrolledError

    first = ca.enroll("node", "TW", out=tmp_path / "TW")
    with pytest.raises(AlreadyEnrolledError, match="already enrolled"):
        ca.enroll("node", "TW", out=tmp_path / "TW")
    second = ca.enroll("node", "TW", out=tmp_path / "TW", replace=True)
    store = CredentialStore(tmp_path / "TW")
    assert store.load().certificate.serial_number == second.certificate.serial_number
    assert store.versions() == [1, 2]
    assert ca.inventory.get(first.certificate.serial_number).revocation_reason == "superseded"
    assert _crl(ca).get_revoked_certificate_by_serial_number(first.certificate.serial_number) is not None
    assert ca.inventory.get(second.certificate.serial_number).status == "issued"


def _status(home: Path, *args: str):
    result = CliRunner().invoke(cli, ["--home", str(home), "status", "--json", *args])
    return result.exit_code, {(r["kind"], r["name"]): r for r in json.loads(result.output)}


def test_status_reports_revoked_without_failing(ca, tmp_path):
    """A revoked node shows state 'revoked' and does not make status fail (exit 0)."""
    ca.enroll("node", "TW", out=tmp_path / "TW")
    ca.revoke("TW", reason="cessation-of-operation")
    code, rows = _status(ca.home)
    assert rows[("node", "TW")]["state"] == "revoked"
    assert code == 0


def test_status_exit_codes_for_warn_days_expiring_and_expired(tmp_path):
    """--warn-days beyond the lifetime exits 3; a current certificate past 5/6 of its life exits
    3 ('expiring'); an expired one exits 4 ('expired')."""
    now = dt.datetime.now(dt.timezone.utc)
    code, rows = _status(_ca_with_node_at(tmp_path / "fresh", now))
    assert code == 0
    code, _ = _status(tmp_path / "fresh", "--warn-days", "100")
    assert code == 3
    code, rows = _status(_ca_with_node_at(tmp_path / "old", now - dt.timedelta(days=80)))
    assert rows[("node", "TW")]["state"] == "expiring" and code == 3
    code, rows = _status(_ca_with_node_at(tmp_path / "dead", now - dt.timedelta(days=91)))
    assert rows[("node", "TW")]["state"] == "expired" and code == 4


def test_status_flags_a_stale_and_an_expired_crl(tmp_path):
    """A CRL past half its validity (nobody re-signed it) exits 3; past nextUpdate exits 4 (the root's CRL, 365 days, is fine)."""
    now = dt.datetime.now(dt.timezone.utc)
    stale = CertificateAuthority.init(tmp_path / "stale", CASettings(crl_lifetime=dt.timedelta(hours=2)), clock=FixedClock(now - dt.timedelta(hours=1, minutes=30)))
    stale.close()
    code, rows = _status(tmp_path / "stale")
    assert [r["state"] for k, r in rows.items() if k[0] == "crl"] == ["renewal due", "ok"] and code == 3
    dead = CertificateAuthority.init(tmp_path / "dead", CASettings(crl_lifetime=dt.timedelta(hours=2)), clock=FixedClock(now - dt.timedelta(hours=3)))
    dead.close()
    code, rows = _status(tmp_path / "dead")
    assert [r["state"] for k, r in rows.items() if k[0] == "crl"] == ["expired", "ok"] and code == 4


def _ca_with_node_at(home: Path, when: dt.datetime) -> Path:
    ca = CertificateAuthority.init(home, CASettings(), clock=FixedClock(when))
    ca.enroll("node", "TW", out=home.parent / f"{home.name}-TW")
    ca.clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    ca.sign_crl()  # a fresh CRL, so only the certificate decides the exit code
    ca.close()
    return home


def test_revoke_cli_validates_the_reason_before_loading_the_ca(tmp_path):
    """pkictl revoke with an unknown reason fails with the list of reasons, even with no CA."""
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "none"), "revoke", "TW", "--reason", "stolen"])
    assert result.exit_code == 1
    assert "key-compromise" in result.output and not (tmp_path / "none").exists()


def test_revoke_cli_revokes_and_reports(ca, tmp_path):
    """pkictl revoke TW prints what it revoked and the CRL path, and the CRL lists the serial."""
    cert = ca.enroll("node", "TW", out=tmp_path / "TW").certificate
    result = CliRunner().invoke(cli, ["--home", str(ca.home), "revoke", "TW", "--reason", "key-compromise"])
    assert result.exit_code == 0, result.output
    assert f"serial {cert.serial_number:x}" in result.output and "crl.pem" in result.output
    assert _crl(ca).get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_crl_signature_uses_sha256_with_the_issuing_key(ca):
    """The CRL is signed with ECDSA-SHA256 by the issuing CA, and a foreign key does not verify it."""
    crl = _crl(ca)
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)
    assert not crl.is_signature_valid(generate_key().public_key())


def test_signed_by_is_false_for_an_issuer_key_that_cannot_sign(ca):
    """signed_by checks a CRL against its issuer's key; a certificate of the same name whose key is X25519 verifies nothing (no TypeError)."""
    crl = _crl(ca)
    assert signed_by(crl, ca.issuing)
    x25519_key = x25519.X25519PrivateKey.generate().public_key()
    impostor = (x509.CertificateBuilder().subject_name(ca.issuing.subject).issuer_name(ca.root.subject)
                .public_key(x25519_key).serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
                .sign(generate_key(), hashes.SHA256()))
    assert not signed_by(crl, impostor)
