"""The root's CRL: signed where the root key is (init-ca, rotate-issuing, sign-crl --root),
carried along unchanged in crl.pem, re-signed when due while its key is in the CA home, and
otherwise announced by status and doctor before it expires."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.clock import FixedClock
from pkictl.crl import build_crl, crl_number, load_crls
from pkictl.diagnosis.doctor import diagnose_ca
from pkictl.errors import PKIError, SettingsError
from pkictl.profile import generate_key
from pkictl.root_crl import root_crl_path, root_key_path
from pkictl.settings import CASettings

from doctor_support import only, problems

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts
SECOND = dt.timedelta(seconds=1)
YEAR = dt.timedelta(days=365)


@pytest.fixture
def clock():
    return FixedClock(NOW)


@pytest.fixture
def ca(tmp_path, clock):
    authority = CertificateAuthority.init(tmp_path / "ca", CASettings(), clock=clock)
    yield authority
    authority.close()


def published(ca) -> dict[str, x509.CertificateRevocationList]:
    """crl.pem's CRLs by role: ``root`` and ``issuing``."""
    crls = load_crls(ca.crl_path)
    return {"root" if c.issuer == ca.root.subject else "issuing": c for c in crls}


def offline(ca, tmp_path: Path) -> Path:
    """Move the root key out of the CA home (where an operator keeps it) and return where it went."""
    away = tmp_path / "offline-root-key.pem"
    os.rename(root_key_path(ca.home), away)
    return away


def test_init_ca_signs_a_root_crl_for_a_year(ca):
    """init-ca publishes the root's CRL #1 in crl.pem and root/crl.pem: empty, verifying with the
    root key, AKI = the root's SKI, nextUpdate = now + root_crl_lifetime (365 days)."""
    root = published(ca)["root"]
    assert root.is_signature_valid(ca.root.public_key()) and len(root) == 0 and crl_number(root) == 1
    aki = root.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert root.next_update_utc == NOW + YEAR
    assert root_crl_path(ca.home).read_bytes() == root.public_bytes(serialization.Encoding.PEM)


def test_sign_crl_carries_the_root_crl_along_unchanged(ca, tmp_path):
    """pkictl sign-crl without the root key re-signs the issuing CA's CRL (a higher number) and
    keeps the root's byte for byte, saying so and when it must be renewed."""
    offline(ca, tmp_path)
    before = published(ca)
    result = CliRunner().invoke(cli, ["--home", str(ca.home), "sign-crl"])
    assert result.exit_code == 0, result.output
    after = published(ca)
    assert after["root"].public_bytes(serialization.Encoding.DER) == before["root"].public_bytes(serialization.Encoding.DER)
    assert crl_number(after["issuing"]) == crl_number(before["issuing"]) + 1
    assert "kept the root's CRL: next update" in result.output and "pkictl sign-crl --root" in result.output


def test_sign_crl_root_needs_the_root_key_and_changes_nothing_without_it(ca, tmp_path):
    """sign-crl --root without root/key.pem exits 1 naming the path and leaves crl.pem as it was;
    with the key back it signs root CRL #2 (and a new issuing CRL) and says to move the key away."""
    away = offline(ca, tmp_path)
    before = ca.crl_path.read_bytes()
    refused = CliRunner().invoke(cli, ["--home", str(ca.home), "sign-crl", "--root"])
    assert refused.exit_code == 1
    assert f"sign-crl --root needs the root key at {root_key_path(ca.home)}" in refused.output
    assert "bring it back from offline storage" in refused.output
    assert ca.crl_path.read_bytes() == before
    os.rename(away, root_key_path(ca.home))
    done = CliRunner().invoke(cli, ["--home", str(ca.home), "sign-crl", "--root"])
    assert done.exit_code == 0, done.output
    assert crl_number(published(ca)["root"]) == 2 and crl_number(published(ca)["issuing"]) == 2
    assert "signed the root's CRL" in done.output and "offline again" in done.output


def test_rotate_issuing_renews_the_root_crl(ca, tmp_path):
    """rotate-issuing, which has the root key back, signs root CRL #2 beside both issuing CAs' CRLs."""
    old = ca.issuing
    ca.enroll("node", "TW", out=tmp_path / "TW")  # so that the old issuing CA keeps signing its CRL
    new = ca.rotate_issuing(activate_in=dt.timedelta(0))
    crls = load_crls(ca.crl_path)
    assert {c.issuer for c in crls} == {old.subject, new.subject, ca.root.subject}
    assert crl_number(published(ca)["root"]) == 2


def test_refresh_re_signs_the_root_crl_at_half_its_validity_when_its_key_is_here(ca, clock):
    """With root/key.pem in the home, refresh_crl re-signs the root's CRL at half its validity
    (not one second before)."""
    root = published(ca)["root"]
    half = root.last_update_utc + (root.next_update_utc - root.last_update_utc) / 2
    clock.set(half - SECOND)
    ca.refresh_crl()  # the issuing CA's CRL is long due by now: re-signed, the root's kept
    assert crl_number(published(ca)["root"]) == 1
    clock.set(half)
    assert ca.refresh_crl()
    assert crl_number(published(ca)["root"]) == 2 and published(ca)["root"].next_update_utc == half + YEAR


def test_without_the_root_key_status_and_doctor_say_when_sign_crl_root_is_due(ca, clock, tmp_path):
    """Root key offline: refresh_crl keeps the root's CRL; from half its validity status exits 3
    with a fix naming pkictl sign-crl --root and the date, doctor warns the same; after its
    nextUpdate doctor reports an error (nginx and haproxy would refuse every client)."""
    offline(ca, tmp_path)
    root = published(ca)["root"]
    half = root.last_update_utc + (root.next_update_utc - root.last_update_utc) / 2
    clock.set(half + SECOND)
    ca.refresh_crl()
    assert published(ca)["root"].public_bytes(serialization.Encoding.DER) == root.public_bytes(serialization.Encoding.DER)

    from pkictl.status import read_status

    text, code = read_status(ca.home / "inventory.sqlite3", half + SECOND, as_json=True)
    [row] = [r for r in json.loads(text) if r["kind"] == "crl" and r["name"] == root.issuer.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value]
    assert code == 3 and row["state"] == "renewal due"
    assert "pkictl sign-crl --root" in row["fix"] and root.next_update_utc.isoformat() in row["fix"]
    table, _ = read_status(ca.home / "inventory.sqlite3", half + SECOND)
    assert "pkictl sign-crl --root" in table.splitlines()[-1]
    fresh, _ = read_status(ca.home / "inventory.sqlite3", half - SECOND, as_json=True)
    assert not any("fix" in r for r in json.loads(fresh))

    found = only(diagnose_ca(ca.home, clock=FixedClock(half + SECOND)), "crl")
    assert found.severity.label == "warning" and "the root's CRL" in found.problem
    assert root.next_update_utc.isoformat() in found.problem and "pkictl sign-crl --root" in found.fix
    assert [f for f in problems(diagnose_ca(ca.home, clock=FixedClock(half - SECOND))) if f[0] == "crl"] == []
    findings = [f for f in diagnose_ca(ca.home, clock=FixedClock(root.next_update_utc + SECOND)) if f.check == "crl"
                and "root's CRL" in f.problem]
    assert [f.severity.label for f in findings] == ["error"] and "expired at" in findings[0].problem
    assert "nginx" in findings[0].problem and "pkictl sign-crl --root" in findings[0].fix


def test_doctor_names_a_forged_or_missing_root_crl(ca, tmp_path):
    """A root CRL that does not verify with the root key is a crl error; a crl.pem without a root
    CRL (a CA made before pkictl signed one) is a crl warning whose fix is sign-crl --root."""
    issuing = published(ca)["issuing"].public_bytes(serialization.Encoding.PEM)
    forged = build_crl(issuer=ca.root, issuer_key=generate_key(), revoked=[], number=9, now=NOW, lifetime=YEAR)
    ca.crl_path.write_bytes(issuing + forged.public_bytes(serialization.Encoding.PEM))
    found = [f for f in diagnose_ca(ca.home, clock=FixedClock(NOW)) if f.check == "crl" and f.severity.label != "ok"]
    assert [f.severity.label for f in found] == ["error"] and "does not verify" in found[0].problem

    ca.crl_path.write_bytes(issuing)
    found = [f for f in diagnose_ca(ca.home, clock=FixedClock(NOW)) if f.check == "crl" and f.severity.label != "ok"]
    assert [f.severity.label for f in found] == ["warning"] and "holds no CRL of the root" in found[0].problem
    assert "pkictl sign-crl --root" in found[0].fix


def test_root_crl_lifetime_is_validated_like_the_other_settings():
    """root_crl_lifetime: 365 days by default, parsed from ca.yaml, positive, at most the root's lifetime."""
    assert CASettings().root_crl_lifetime == YEAR
    assert CASettings.from_dict({"root_crl_lifetime": "30d"}).root_crl_lifetime == dt.timedelta(days=30)
    assert CASettings.from_dict(CASettings(root_crl_lifetime=dt.timedelta(days=90)).to_dict()).root_crl_lifetime == dt.timedelta(days=90)
    with pytest.raises(SettingsError, match="root_crl_lifetime: got '0d', want a duration greater than zero"):
        CASettings.from_dict({"root_crl_lifetime": "0d"})
    with pytest.raises(SettingsError, match="root_crl_lifetime: got 11y, want at most the root_lifetime 10y"):
        CASettings(root_crl_lifetime=dt.timedelta(days=11 * 365))


def test_sign_root_crl_without_the_key_raises_a_pki_error(ca, tmp_path):
    """The library call names the missing key file too (what serve or an agent would log)."""
    offline(ca, tmp_path)
    with pytest.raises(PKIError, match="needs the root key at"):
        ca.sign_root_crl()
