"""Pre-issuance lint of renewals: a successor with its predecessor's profile keeps the
predecessor's clean pkilint verdict; any other difference is linted in full."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki_agent.rotation.rotate import build_reenroll_csr
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.lint import lint_certificate, profile_difference
from pkictl.profile import build_end_entity, generate_key, validity_window

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def ca(tmp_path: Path):
    authority = CertificateAuthority.init(tmp_path / "ca", clock=FixedClock(NOW))
    yield authority
    authority.close()


def _issued_records(ca: CertificateAuthority) -> list[dict]:
    lines = (ca.home / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "issued"]


def _renew(ca: CertificateAuthority, current: x509.Certificate) -> x509.Certificate:
    return ca.simple_reenroll(build_reenroll_csr(current, generate_key()), current)


@pytest.mark.parametrize("kind", ["node", "gateway"])
def test_renewal_with_the_same_profile_keeps_the_lint_verdict_and_says_so(ca, tmp_path, kind):
    """A first enrollment is linted by pkilint; its renewal, same profile, is not linted again,
    the audit record names the predecessor, and pkilint indeed finds nothing in the successor."""
    first = ca.enroll(kind, "tw" if kind == "node" else "gw", out=tmp_path / kind,
                      dns_names=["gw.example.lan"] if kind == "gateway" else (),
                      ip_addresses=["192.168.1.10"] if kind == "gateway" else ()).certificate
    successor = _renew(ca, first)
    records = _issued_records(ca)
    assert records[-2]["lint"] == "pkilint"
    assert records[-1]["lint"] == f"same profile as serial {first.serial_number:x}"
    assert profile_difference(successor, first) is None
    assert lint_certificate(successor.public_bytes(serialization.Encoding.DER)) == []


def test_renewal_after_a_change_of_lifetime_is_linted_in_full(ca, tmp_path):
    """When the CA's node lifetime changed since the predecessor was issued, the successor's
    profile differs, and pkilint runs on it."""
    first = ca.enroll("node", "tw", out=tmp_path / "tw").certificate
    ca.settings = dataclasses.replace(ca.settings, node_lifetime=dt.timedelta(days=30))
    successor = _renew(ca, first)
    assert profile_difference(successor, first) == "lifetime differs"
    assert _issued_records(ca)[-1]["lint"] == "pkilint"


def _builder(ca: CertificateAuthority, *, public_key=None, lifetime=dt.timedelta(days=90), start=NOW, name="tw"):
    not_before, not_after = validity_window(start, lifetime)
    return build_end_entity(
        "node", name=name, trust_domain=ca.settings.trust_domain, public_key=public_key or generate_key().public_key(),
        issuer=ca.issuing, not_before=not_before, not_after=not_after, serial=x509.random_serial_number(),
    )


def _sign(ca: CertificateAuthority, builder: x509.CertificateBuilder) -> x509.Certificate:
    return builder.sign(ca._issuing_key, hashes.SHA256())


def test_profile_difference_accepts_a_successor_and_names_every_other_difference(ca):
    """A successor with a new key, serial and dates is equivalent; another subject, lifetime, key
    type, an extension changed or added, a non-method-1 SKI, a date past 2049 each are not."""
    old = _sign(ca, _builder(ca))
    assert profile_difference(_sign(ca, _builder(ca, start=NOW + dt.timedelta(days=60))), old) is None

    assert profile_difference(_sign(ca, _builder(ca, name="other")), old) == "issuer or subject differ"
    assert profile_difference(_sign(ca, _builder(ca, lifetime=dt.timedelta(days=89))), old) == "lifetime differs"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert profile_difference(_sign(ca, _builder(ca, public_key=rsa_key)), old) == "public key algorithm or parameters differ"
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert profile_difference(_sign(ca, _builder(ca, public_key=p384)), old) == "public key algorithm or parameters differ"
    late = _builder(ca, start=dt.datetime(2049, 12, 1, tzinfo=dt.timezone.utc))
    assert profile_difference(_sign(ca, late), old) == "validity time encodings differ"

    extra = _builder(ca).add_extension(x509.OCSPNoCheck(), critical=False)
    assert profile_difference(_sign(ca, extra), old) == "extensions differ"
    critical_eku = _replace_extension(_builder(ca), x509.ExtendedKeyUsage, critical=True)
    assert profile_difference(_sign(ca, critical_eku), old) == "extensions differ"
    odd_ski = _replace_extension(_builder(ca), x509.SubjectKeyIdentifier, value=x509.SubjectKeyIdentifier(b"\x01" * 20))
    assert profile_difference(_sign(ca, odd_ski), old) == "subject key identifier is not RFC 5280 method 1"


def _replace_extension(builder: x509.CertificateBuilder, kind: type, *, value=None, critical=None) -> x509.CertificateBuilder:
    """A copy of ``builder`` with the extension of class ``kind`` given another value or criticality."""
    draft = builder.sign(generate_key(), hashes.SHA256())
    rebuilt = (x509.CertificateBuilder().subject_name(draft.subject).issuer_name(draft.issuer)
               .public_key(draft.public_key()).serial_number(draft.serial_number)
               .not_valid_before(draft.not_valid_before_utc).not_valid_after(draft.not_valid_after_utc))
    for extension in draft.extensions:
        if isinstance(extension.value, kind):
            rebuilt = rebuilt.add_extension(value or extension.value, critical=extension.critical if critical is None else critical)
        else:
            rebuilt = rebuilt.add_extension(extension.value, critical=extension.critical)
    return rebuilt
