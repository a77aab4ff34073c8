"""pkilint's RFC 5280 linter on every certificate kind of the profile, in process and through the real
``lint_pkix_cert`` console script, the one allow-listed SPIFFE false positive, and pre-issuance
lint (a throwaway-key signature) refusing deliberately broken profiles."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkictl.authority import CertificateAuthority
from pkictl.errors import LintError, PolicyError
from pkictl.lint import Finding, is_spiffe_id, lint_certificate, prelint
from pkictl.profile import build_end_entity, build_issuing, generate_key, validity_window

from support import DEADLINE, command

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
KINDS = ("root", "issuing", "gateway", "node")
GATEWAY_DNS = ["gw.example.lan"]
GATEWAY_IPS = ["192.168.1.10", "fd00::10"]
# What lint_pkix_cert prints for the one allow-listed finding: the validator and node, then the finding.
SPIFFE_HEADER = re.compile(
    r"GeneralNameUriSyntaxValidator @ "
    r"certificate\.tbsCertificate\.extensions\.\d+\.extnValue\.subjectAltName\.\d+\.uniformResourceIdentifier"
)
SPIFFE_FINDING = re.compile(r'pkix\.invalid_uri_syntax \(ERROR\): Invalid URI syntax: "(?P<uri>spiffe://[^"]+)"')


@dataclasses.dataclass(frozen=True)
class Issued:
    ca: CertificateAuthority
    certificates: dict[str, x509.Certificate]


@pytest.fixture(scope="module")
def issued(tmp_path_factory) -> Issued:
    base = tmp_path_factory.mktemp("lint")
    ca = CertificateAuthority.init(base / "ca")
    gateway = ca.enroll("gateway", "gw", out=base / "gw", dns_names=GATEWAY_DNS, ip_addresses=GATEWAY_IPS)
    node = ca.enroll("node", "TW", out=base / "tw")
    yield Issued(ca, {"root": ca.root, "issuing": ca.issuing, "gateway": gateway.certificate, "node": node.certificate})
    ca.close()


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _spiffe_sans(certificate: x509.Certificate) -> list[str]:
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def _lint_pkix_cert(certificate: x509.Certificate, path: Path) -> subprocess.CompletedProcess:
    """Run the installed ``lint_pkix_cert lint -s WARNING`` on ``certificate`` alone in ``path``."""
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        [command("lint_pkix_cert"), "lint", "-s", "WARNING", str(path)],
        capture_output=True, text=True, timeout=DEADLINE,
    )


def _end_entity(issuer: x509.Certificate, subject: x509.Name, public_key) -> x509.CertificateBuilder:
    """The start of a hand-made end-entity builder (names, key, serial, validity, SKI/AKI)."""
    not_before, not_after = validity_window(NOW, dt.timedelta(days=90))
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.subject).public_key(public_key)
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )


def _key_usage(**set_bits: bool) -> x509.KeyUsage:
    bits = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    return x509.KeyUsage(**(bits | set_bits))


def _named(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _uri_san_builder(issued: Issued, uri: str, *, issuer_alt_name: bool = False) -> x509.CertificateBuilder:
    """A node-like certificate whose only URI is ``uri``, as a SAN or else as an issuerAltName."""
    key = generate_key()
    builder = (
        _end_entity(issued.ca.issuing, _named("tw"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if issuer_alt_name:
        return (builder
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("tw.example.lan")]), critical=False)
                .add_extension(x509.IssuerAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False))
    return builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)


# -- the profile passes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_profile_has_no_findings(issued, kind):
    """Every certificate kind the CA issues has zero pkilint findings of severity WARNING or worse."""
    assert lint_certificate(_der(issued.certificates[kind])) == []


@pytest.mark.parametrize("kind", KINDS)
def test_lint_pkix_cert_reports_only_the_spiffe_false_positive(issued, kind, tmp_path):
    """The real lint_pkix_cert script exits with the number of SPIFFE URI SANs and prints only those findings."""
    certificate = issued.certificates[kind]
    spiffe = _spiffe_sans(certificate)
    assert len(spiffe) == (1 if kind == "node" else 0)  # the allow-list is exercised on the node
    done = _lint_pkix_cert(certificate, tmp_path / f"{kind}.pem")
    assert done.returncode == len(spiffe), done.stdout + done.stderr
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 * len(spiffe), done.stdout
    reported = []
    for header, finding in zip(lines[::2], lines[1::2], strict=True):
        assert SPIFFE_HEADER.fullmatch(header), header
        match = SPIFFE_FINDING.fullmatch(finding)
        assert match, finding
        reported.append(match["uri"])
    assert reported == spiffe
    assert done.stderr == ""


def _profile_builder(issued: Issued, kind: str) -> x509.CertificateBuilder:
    """The profile's builder for ``kind`` with the names and key of the issued certificate."""
    ca, real = issued.ca, issued.certificates[kind]
    not_before, not_after = real.not_valid_before_utc, real.not_valid_after_utc
    if kind == "issuing":
        return build_issuing(real.subject, real.public_key(), ca.root, not_before, not_after, x509.random_serial_number())
    return build_end_entity(
        kind, name="gw" if kind == "gateway" else "TW", trust_domain=ca.settings.trust_domain,
        public_key=real.public_key(), issuer=ca.issuing, not_before=not_before, not_after=not_after,
        serial=x509.random_serial_number(), dns_names=GATEWAY_DNS, ip_addresses=GATEWAY_IPS,
    )


@pytest.mark.parametrize("kind", ["issuing", "gateway", "node"])
def test_prelint_passes_the_profile_and_never_signs_with_the_real_key(issued, kind):
    """prelint accepts the profile's builder and returns a certificate with the real one's extensions
    and signature algorithm that does not verify under the real issuer."""
    real = issued.certificates[kind]
    issuer = issued.ca.root if kind == "issuing" else issued.ca.issuing
    linted, ran = prelint(_profile_builder(issued, kind), issuer_key_type=issuer.public_key())
    assert ran
    assert linted.signature_algorithm_oid == real.signature_algorithm_oid
    assert (linted.subject, linted.issuer, list(linted.extensions)) == (real.subject, real.issuer, list(real.extensions))
    with pytest.raises(InvalidSignature):
        linted.verify_directly_issued_by(issuer)


def _self_issued_ca(key, *, aki: bool) -> x509.CertificateBuilder:
    """A root as the profile makes it (CA:TRUE, keyCertSign + cRLSign, SKI), with or without an AKI."""
    not_before, not_after = validity_window(NOW, dt.timedelta(days=3650))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_named("pkictl test root")).issuer_name(_named("pkictl test root")).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if aki:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    return builder


@pytest.mark.parametrize(
    "make_key, hash_algorithm",
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256()),
        (ed25519.Ed25519PrivateKey.generate, None),
    ],
    ids=["p384", "rsa2048", "ed25519"],
)
def test_prelint_throwaway_key_matches_the_issuer_key_type(make_key, hash_algorithm):
    """For P-384, RSA and Ed25519 issuers the throwaway signature covers byte-identical TBS bytes to the real one."""
    key = make_key()
    builder = _self_issued_ca(key, aki=True)
    linted, _ = prelint(builder, issuer_key_type=key, hash_algorithm=hash_algorithm)
    real = builder.sign(key, hash_algorithm)
    assert linted.tbs_certificate_bytes == real.tbs_certificate_bytes
    assert linted.signature_algorithm_oid == real.signature_algorithm_oid
    assert linted.signature != real.signature
    assert lint_certificate(_der(real)) == []


def test_root_without_aki_passes_lint_but_not_prelint():
    """An AKI-less root passes once self-signed, but its throwaway-signed twin is not self-signed and is refused."""
    key = generate_key()
    builder = _self_issued_ca(key, aki=False)
    assert lint_certificate(_der(builder.sign(key, hashes.SHA256()))) == []
    with pytest.raises(LintError, match="pkix.authority_key_identifier_extension_absent") as caught:
        prelint(builder, issuer_key_type=key)
    assert "its own SKI" in str(caught.value)


def test_prelint_accepts_a_key_class(issued):
    """A key class (no instance at hand) picks a throwaway key of that family."""
    key = generate_key()
    builder = _uri_san_builder(issued, "spiffe://pkictl.internal/node/tw")
    linted, _ = prelint(builder, issuer_key_type=ec.EllipticCurvePrivateKey)
    assert linted.signature_algorithm_oid == builder.sign(key, hashes.SHA256()).signature_algorithm_oid


# -- broken profiles are refused ---------------------------------------------------------------------


def _broken_keycertsign(issued: Issued) -> x509.CertificateBuilder:
    key = generate_key()
    return (
        _end_entity(issued.ca.issuing, _named("tw"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )


def _broken_empty_subject(issued: Issued) -> x509.CertificateBuilder:
    key = generate_key()
    return (
        _end_entity(issued.ca.issuing, x509.Name([]), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gw.example.lan")]), critical=False)
    )


BROKEN = {
    # RFC 5280 4.2.1.3: keyCertSign only with cA TRUE.
    "keycertsign on an end entity": (_broken_keycertsign, "pkix.ee_certificate_keycertsign_keyusage_set"),
    # RFC 5280 4.2.1.6: with an empty subject the SAN extension MUST be critical.
    "empty subject, non-critical SAN": (_broken_empty_subject, "pkix.san_extension_not_critical_empty_subject"),
    # Not a URI at all (a space in the host): must not ride on the SPIFFE allow-list.
    "bad non-SPIFFE URI SAN": (lambda i: _uri_san_builder(i, "http://exa mple.org/node/tw"), "pkix.invalid_uri_syntax"),
    # spiffe:// but not a SPIFFE ID (SPIFFE-ID.md 2.1: no upper case or space in a trust domain).
    "malformed SPIFFE URI SAN": (lambda i: _uri_san_builder(i, "spiffe://Bad Domain/node/tw"), "pkix.invalid_uri_syntax"),
    # A well-formed SPIFFE ID outside the SAN: only the SAN's URI is allow-listed.
    "SPIFFE URI in issuerAltName": (
        lambda i: _uri_san_builder(i, "spiffe://pkictl.internal/node/tw", issuer_alt_name=True), "pkix.invalid_uri_syntax",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_profile_has_findings(issued, case, tmp_path):
    """A deliberately broken certificate gets the expected finding, and the same count as lint_pkix_cert's exit status."""
    make, code = BROKEN[case]
    key = generate_key()
    certificate = make(issued).sign(key, hashes.SHA256())
    findings = lint_certificate(_der(certificate))
    assert code in [f.code for f in findings], findings
    assert all(isinstance(f, Finding) and f.severity in ("FATAL", "ERROR", "WARNING") for f in findings)
    assert _lint_pkix_cert(certificate, tmp_path / "broken.pem").returncode == len(findings)


@pytest.mark.parametrize("case", BROKEN)
def test_prelint_refuses_a_broken_profile(issued, case):
    """prelint raises LintError, a PolicyError, naming the finding in its message and its findings."""
    make, code = BROKEN[case]
    with pytest.raises(PolicyError) as caught:
        prelint(make(issued), issuer_key_type=issued.ca.issuing.public_key())
    assert isinstance(caught.value, LintError)
    assert code in str(caught.value)
    assert code in [f.code for f in caught.value.findings]


def test_non_spiffe_uri_finding_names_the_uri(issued):
    """The finding on a bad non-SPIFFE URI SAN points at the SAN node and quotes the URI."""
    certificate = _uri_san_builder(issued, "http://exa mple.org/node/tw").sign(generate_key(), hashes.SHA256())
    [finding] = lint_certificate(_der(certificate))
    assert (finding.code, finding.severity, finding.validator) == ("pkix.invalid_uri_syntax", "ERROR", "GeneralNameUriSyntaxValidator")
    assert finding.path.endswith("extnValue.subjectAltName.0.uniformResourceIdentifier")
    assert "http://exa mple.org/node/tw" in finding.message


def test_lint_certificate_refuses_what_is_not_a_certificate():
    """Bytes that do not decode as a certificate raise LintError instead of passing unlinted."""
    with pytest.raises(LintError, match="cannot decode"):
        lint_certificate(b"\x30\x03\x02\x01\x01")


@pytest.mark.parametrize(
    "uri, valid",
    [
        ("spiffe://pkictl.internal/node/tw", True),
        ("spiffe://pkictl.internal", True),
        ("spiffe://Pkictl.internal/node/tw", False),
        ("spiffe://pkictl.internal/node/tw/", False),
        ("spiffe://pkictl.internal//tw", False),
        ("spiffe://pkictl.internal/node/..", False),
        ("spiffe://pkictl.internal:443/node/tw", False),
        ("spiffe://pkictl.internal/node/tw?x=1", False),
        ("https://pkictl.internal/node/tw", False),
    ],
)
def test_is_spiffe_id(uri, valid):
    """Only well-formed SPIFFE IDs (SPIFFE-ID.md section 2) qualify for the allow-list."""
    assert is_spiffe_id(uri) is valid
