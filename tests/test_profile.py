"""The RFC 5280 certificate profile of docs/design.md ("Certificate profile"), read back from real
certificates issued by a real CA, and the chains verified with cryptography's verifier together
with their rejected twins (wrong EKU, foreign trust anchor, expired)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.profile import generate_key
from pkictl.settings import CASettings

# Microseconds on purpose: X.509 times have whole seconds, the CA must truncate, not round up.
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.timezone.utc)
LEAF_LIFETIME = dt.timedelta(days=90)


@dataclasses.dataclass(frozen=True)
class Issued:
    ca: CertificateAuthority
    root: x509.Certificate
    issuing: x509.Certificate
    node: x509.Certificate
    gateway: x509.Certificate
    node_dir: Path
    gateway_dir: Path


@pytest.fixture(scope="module")
def issued(tmp_path_factory) -> Issued:
    base = tmp_path_factory.mktemp("profile")
    ca = CertificateAuthority.init(base / "ca", CASettings(), clock=FixedClock(NOW))
    node = ca.enroll("node", "TW", out=base / "tw")
    gateway = ca.enroll("gateway", "gw", out=base / "gw", dns_names=["gw.example.lan"], ip_addresses=["127.0.0.1"])
    yield Issued(ca, ca.root, ca.issuing, node.certificate, gateway.certificate, node.directory, gateway.directory)
    ca.close()


def _cert(issued: Issued, kind: str) -> x509.Certificate:
    return getattr(issued, kind)


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def _client_verifier(roots, when):
    return PolicyBuilder().store(Store(roots)).time(when).build_client_verifier()


def _server_verifier(roots, when, name):
    return PolicyBuilder().store(Store(roots)).time(when).build_server_verifier(name)


# -- basicConstraints, keyUsage, extKeyUsage -------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ca", "path_length"),
    [("root", True, None), ("issuing", True, 0), ("gateway", False, None), ("node", False, None)],
)
def test_basic_constraints(issued, kind, ca, path_length):
    """basicConstraints is critical on every certificate, CA:TRUE only on root and issuing CA, pathLen 0 on the issuing CA."""
    ext = _ext(_cert(issued, kind), x509.BasicConstraints)
    assert ext.critical is True
    assert ext.value.ca is ca
    assert ext.value.path_length == path_length


@pytest.mark.parametrize("kind", ["root", "issuing"])
def test_ca_key_usage_is_cert_and_crl_signing_only(issued, kind):
    """A CA's keyUsage is critical and exactly keyCertSign + cRLSign."""
    ext = _ext(_cert(issued, kind), x509.KeyUsage)
    assert ext.critical is True
    usage = ext.value
    assert usage.key_cert_sign and usage.crl_sign
    assert not any(
        (usage.digital_signature, usage.content_commitment, usage.key_encipherment, usage.data_encipherment, usage.key_agreement)
    )


@pytest.mark.parametrize("kind", ["gateway", "node"])
def test_end_entity_key_usage_is_digital_signature_only(issued, kind):
    """An end entity's keyUsage is critical and exactly digitalSignature (no certificate or CRL signing)."""
    ext = _ext(_cert(issued, kind), x509.KeyUsage)
    assert ext.critical is True
    usage = ext.value
    assert usage.digital_signature
    assert not any(
        (usage.key_cert_sign, usage.crl_sign, usage.content_commitment, usage.key_encipherment, usage.data_encipherment, usage.key_agreement)
    )


@pytest.mark.parametrize("kind", ["root", "issuing"])
def test_ca_certificates_have_no_extended_key_usage(issued, kind):
    """Root and issuing CA carry no extKeyUsage (a serverAuth-only CA would break client chains)."""
    with pytest.raises(x509.ExtensionNotFound):
        _ext(_cert(issued, kind), x509.ExtendedKeyUsage)


@pytest.mark.parametrize(("kind", "ekus"), [
    ("node", [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ("gateway", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
])
def test_end_entity_extended_key_usage(issued, kind, ekus):
    """A node's extKeyUsage is exactly clientAuth; a gateway's serverAuth for its listener and
    clientAuth to authenticate its own renewal over EST."""
    assert list(_ext(_cert(issued, kind), x509.ExtendedKeyUsage).value) == ekus


# -- key identifiers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["root", "issuing", "gateway", "node"])
def test_subject_key_identifier_matches_the_public_key(issued, kind):
    """Every certificate carries a non-critical SKI derived from its own public key."""
    cert = _cert(issued, kind)
    ext = _ext(cert, x509.SubjectKeyIdentifier)
    assert ext.critical is False
    assert ext.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def test_root_authority_key_identifier_is_its_own_key(issued):
    """The self-signed root's AKI (non-critical) names its own key: keyIdentifier = its SKI, and
    no issuer name or serial (RFC 5280 4.2.1.1; needed for pre-issuance lint)."""
    ext = _ext(issued.root, x509.AuthorityKeyIdentifier)
    assert ext.critical is False
    assert ext.value.key_identifier == _ext(issued.root, x509.SubjectKeyIdentifier).value.digest
    assert ext.value.authority_cert_issuer is None and ext.value.authority_cert_serial_number is None


@pytest.mark.parametrize(("kind", "issuer"), [("issuing", "root"), ("gateway", "issuing"), ("node", "issuing")])
def test_authority_key_identifier_is_the_issuers_ski(issued, kind, issuer):
    """Every non-root certificate's AKI keyIdentifier equals its issuer's SKI and not any other CA's."""
    aki = _ext(_cert(issued, kind), x509.AuthorityKeyIdentifier).value.key_identifier
    issuer_ski = _ext(_cert(issued, issuer), x509.SubjectKeyIdentifier).value.digest
    other = "issuing" if issuer == "root" else "root"
    assert aki == issuer_ski
    assert aki != _ext(_cert(issued, other), x509.SubjectKeyIdentifier).value.digest


@pytest.mark.parametrize(("kind", "issuer"), [("root", "root"), ("issuing", "root"), ("gateway", "issuing"), ("node", "issuing")])
def test_issuer_signatures(issued, kind, issuer):
    """Each certificate is signed (SHA-256) by its issuer's key and its issuer name is the issuer's subject."""
    cert = _cert(issued, kind)
    cert.verify_directly_issued_by(_cert(issued, issuer))
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    if kind != "root":
        with pytest.raises(ValueError):  # negative control: the other CA did not sign it
            cert.verify_directly_issued_by(_cert(issued, "issuing" if issuer == "root" else "root"))


# -- names -----------------------------------------------------------------------------------------


def test_node_identity(issued):
    """A node certificate's subject is exactly CN=TW and its only SAN is one URI spiffe://pkictl.internal/node/tw."""
    cert = issued.node
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TW")])
    sans = list(_ext(cert, x509.SubjectAlternativeName).value)
    assert sans == [x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/tw")]
    assert cert.issuer == issued.issuing.subject


def test_gateway_names(issued):
    """A gateway certificate's subject is CN=gw and its SANs are exactly the DNS name and IP address asked for."""
    cert = issued.gateway
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")])
    sans = _ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.example.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert len(list(sans)) == 2  # no URI identity, nothing else


def test_ca_generations_have_distinct_subjects(tmp_path):
    """Two CAs initialised at the same instant get different root and issuing subject names."""
    clock = FixedClock(NOW)
    first = CertificateAuthority.init(tmp_path / "a", clock=clock)
    second = CertificateAuthority.init(tmp_path / "b", clock=clock)
    assert first.root.subject != second.root.subject
    assert first.issuing.subject != second.issuing.subject
    assert first.root.subject != first.issuing.subject


# -- keys, validity, serial numbers ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["root", "issuing", "gateway", "node"])
def test_keys_are_p256(issued, kind):
    """Every certificate's public key is ECDSA P-256."""
    key = _cert(issued, kind).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"


@pytest.mark.parametrize(
    ("kind", "lifetime"),
    [("root", dt.timedelta(days=3650)), ("issuing", dt.timedelta(days=5 * 365)), ("gateway", LEAF_LIFETIME), ("node", LEAF_LIFETIME)],
)
def test_validity_is_exactly_the_lifetime_and_backdated(issued, kind, lifetime):
    """not_after - not_before equals the configured lifetime exactly, and notBefore lies at most 5 minutes before issuance."""
    cert = _cert(issued, kind)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert not_after - not_before == lifetime
    assert not_before <= NOW
    assert NOW - not_before <= dt.timedelta(minutes=5, seconds=1)
    assert not_before < NOW.replace(microsecond=0)  # really backdated, not just truncated


def test_issuing_ca_outlives_every_leaf_and_root_outlives_issuing(issued):
    """The issuing CA expires after both leaves and before (or with) the root."""
    assert issued.issuing.not_valid_after_utc > max(issued.node.not_valid_after_utc, issued.gateway.not_valid_after_utc)
    assert issued.root.not_valid_after_utc >= issued.issuing.not_valid_after_utc


def test_serial_numbers_are_positive_distinct_and_long(tmp_path):
    """Serial numbers are positive, distinct, at most 20 octets and carry more than 64 bits of entropy."""
    ca = CertificateAuthority.init(tmp_path / "ca", clock=FixedClock(NOW))
    serials = [ca.root.serial_number, ca.issuing.serial_number]
    # one key per node: a key certified for one identity is refused for another
    serials += [ca.issue("node", f"n{i}", generate_key().public_key()).serial_number for i in range(48)]
    ca.close()
    assert len(serials) == 50
    assert len(set(serials)) == 50
    assert all(0 < s < 2**159 for s in serials)
    assert sum(s.bit_length() > 64 for s in serials) >= 45


# -- chain verification ----------------------------------------------------------------------------


def test_node_chain_verifies_as_a_client(issued):
    """The node certificate plus the issuing CA verifies as a client certificate against our root and names the node's URI."""
    verified = _client_verifier([issued.root], NOW).verify(issued.node, [issued.issuing])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/tw")]
    assert verified.chain == [issued.node, issued.issuing, issued.root]


@pytest.mark.parametrize("name", [x509.DNSName("gw.example.lan"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
def test_gateway_chain_verifies_as_a_server(issued, name):
    """The gateway certificate plus the issuing CA verifies as a server certificate for its DNS name and IP address."""
    chain = _server_verifier([issued.root], NOW, name).verify(issued.gateway, [issued.issuing])
    assert chain == [issued.gateway, issued.issuing, issued.root]


def test_gateway_is_rejected_for_another_name(issued):
    """The gateway certificate does not verify for a DNS name or IP address it was not issued for."""
    for name in (x509.DNSName("other.example.lan"), x509.IPAddress(ipaddress.ip_address("127.0.0.2"))):
        with pytest.raises(VerificationError):
            _server_verifier([issued.root], NOW, name).verify(issued.gateway, [issued.issuing])


def test_node_is_rejected_as_a_server(issued):
    """A node (clientAuth) certificate fails server verification."""
    with pytest.raises(VerificationError):
        _server_verifier([issued.root], NOW, x509.DNSName("gw.example.lan")).verify(issued.node, [issued.issuing])


def test_gateway_verifies_as_a_client_but_carries_no_node_identity(issued):
    """A gateway certificate passes client path validation (it renews over mTLS) and holds no
    node URI SAN, the identity every node check authorizes by."""
    _client_verifier([issued.root], NOW).verify(issued.gateway, [issued.issuing])
    sans = _ext(issued.gateway, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []


def test_foreign_root_rejects_both(issued):
    """A store holding only a foreign (trustme) root rejects the node and the gateway chains."""
    foreign = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
    with pytest.raises(VerificationError):
        _client_verifier([foreign], NOW).verify(issued.node, [issued.issuing])
    with pytest.raises(VerificationError):
        _server_verifier([foreign], NOW, x509.DNSName("gw.example.lan")).verify(issued.gateway, [issued.issuing])


def test_leaf_without_its_issuing_ca_does_not_verify(issued):
    """A leaf sent without the issuing CA (cert.pem instead of fullchain.pem) does not verify against the root alone."""
    with pytest.raises(VerificationError):
        _client_verifier([issued.root], NOW).verify(issued.node, [])


@pytest.mark.parametrize("kind", ["node", "gateway"])
def test_verification_ends_at_not_after(issued, kind):
    """A leaf verifies one second before its notAfter and fails one second after it."""
    cert = _cert(issued, kind)
    last_valid = cert.not_valid_after_utc - dt.timedelta(seconds=1)
    expired = cert.not_valid_after_utc + dt.timedelta(seconds=1)

    def verify(when):
        if kind == "node":
            return _client_verifier([issued.root], when).verify(cert, [issued.issuing])
        return _server_verifier([issued.root], when, x509.DNSName("gw.example.lan")).verify(cert, [issued.issuing])

    verify(last_valid)
    with pytest.raises(VerificationError):
        verify(expired)


def test_verification_before_not_before_fails(issued):
    """A node certificate does not verify one second before its (backdated) notBefore."""
    early = issued.node.not_valid_before_utc - dt.timedelta(seconds=1)
    with pytest.raises(VerificationError):
        _client_verifier([issued.root], early).verify(issued.node, [issued.issuing])
    _client_verifier([issued.root], issued.node.not_valid_before_utc).verify(issued.node, [issued.issuing])


def test_bundle_files_hold_the_issued_certificates(issued):
    """The enrollment bundle's cert.pem is the issued leaf, fullchain.pem is leaf + issuing CA and ca.pem is the root."""
    for cert, directory in ((issued.node, issued.node_dir), (issued.gateway, issued.gateway_dir)):
        assert x509.load_pem_x509_certificates((directory / "cert.pem").read_bytes()) == [cert]
        assert x509.load_pem_x509_certificates((directory / "fullchain.pem").read_bytes()) == [cert, issued.issuing]
        assert x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes()) == [issued.issuing]
        assert x509.load_pem_x509_certificates((directory / "ca.pem").read_bytes()) == [issued.root]


def test_serial_generator_draws_at_least_128_random_bits():
    """The generator pkictl uses for every serial number gives distinct positive values below
    2^159 whose low 128 bit positions are each set in 35-65% of 2,000 draws: far more than the
    64 bits of entropy RFC 5280 asks for (a 64-bit source would leave bits 64..127 always 0)."""
    draws = [x509.random_serial_number() for _ in range(2000)]
    assert len(set(draws)) == len(draws)
    assert all(0 < d < 2**159 for d in draws)
    for bit in range(128):
        share = sum((d >> bit) & 1 for d in draws) / len(draws)
        assert 0.35 < share < 0.65, f"bit {bit} is set in {share:.0%} of the draws"
