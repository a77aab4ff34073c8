"""Certificate linting with pkilint's RFC 5280 linter, and pre-issuance lint of a builder before signing.

Sources:
    - pkilint (DigiCert, https://github.com/digicert/pkilint): the validator is built exactly as its
      ``lint_pkix_cert`` console script builds it (``pkilint/bin/lint_pkix_cert.py``), so an
      in-process lint and ``lint_pkix_cert lint -s WARNING cert.pem`` report the same findings.
      Its CA/Browser Forum linters are not used: they apply to publicly trusted CAs, not this one.
    - Let's Encrypt's pre-issuance linting (Boulder ``linter/linter.go``): sign the to-be-signed
      certificate with a throwaway key of the issuer's key type, lint that, then sign for real.
    - RFC 5280 (the profile linted); SPIFFE-ID.md section 2 (the syntax of ``spiffe://`` URIs).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .errors import LintError

__all__ = ["Finding", "lint_certificate", "prelint", "is_spiffe_id"]

# pkilint severities run FATAL=0, ERROR=1, WARNING=2, NOTICE=3, INFO=4, DEBUG=5; "at least WARNING"
# is "value <= 2", the same threshold as ``lint_pkix_cert lint -s WARNING``.
_WARNING = 2

# The one allow-listed finding (DESIGN.md, "Certificate profile"). pkilint checks URIs with
# ``validators.url``, whose scheme list (http, https, ftp, ...) has no ``spiffe``, so every SPIFFE ID
# is reported as "pkix.invalid_uri_syntax" although it is a well-formed URI (RFC 3986).
_SPIFFE_FALSE_POSITIVE_CODE = "pkix.invalid_uri_syntax"
_SPIFFE_FALSE_POSITIVE_VALIDATOR = "GeneralNameUriSyntaxValidator"
# A uniformResourceIdentifier directly in the certificate's own subjectAltName extension (not the
# issuerAltName, a CRL distribution point or a name constraint).
_SAN_URI_PATH = re.compile(
    r"certificate\.tbsCertificate\.extensions\.\d+\.extnValue\.subjectAltName\.\d+\.uniformResourceIdentifier"
)
# SPIFFE-ID.md 2.1 / 2.2: trust domain of [a-z0-9._-], path segments of [a-zA-Z0-9._-] that are not
# "." or "..", no empty segment, no trailing slash, no port, user info, query or fragment.
_SPIFFE_ID = re.compile(r"spiffe://(?P<trust_domain>[a-z0-9._-]{1,255})(?P<path>(?:/[A-Za-z0-9._-]+)*)")
_SPIFFE_ID_MAX_BYTES = 2048  # SPIFFE-ID.md 2.3
_AKI_ABSENT = "pkix.authority_key_identifier_extension_absent"

_build_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Finding:
    """One pkilint finding about a certificate.

    Attributes:
        code: pkilint's finding code, such as ``pkix.ee_certificate_keycertsign_keyusage_set``.
        severity: ``"FATAL"``, ``"ERROR"`` or ``"WARNING"`` (lesser ones are not reported).
        message: pkilint's detail text, ``""`` when it gives none.
        path: the node of the decoded certificate the finding is about, such as
            ``certificate.tbsCertificate.extensions.1.extnValue.keyUsage``.
        validator: the pkilint validator that raised it, such as ``KeyUsageValidator``.
    """

    code: str
    severity: str
    message: str
    path: str
    validator: str

    def __str__(self) -> str:
        detail = f": {self.message}" if self.message else ""
        return f"{self.code} ({self.severity}) at {self.path}{detail}"


def is_spiffe_id(uri: str) -> bool:
    """Whether ``uri`` is a well-formed SPIFFE ID (SPIFFE-ID.md section 2), such as
    ``spiffe://pkictl.internal/node/tw``."""
    match = _SPIFFE_ID.fullmatch(uri)
    if match is None or len(uri.encode()) > _SPIFFE_ID_MAX_BYTES:
        return False
    return all(segment not in (".", "..") for segment in match["path"].split("/")[1:])


@functools.cache
def _validator():
    """pkilint's RFC 5280 certificate validator, built once (importing pkilint costs ~150 ms).

    Built as ``pkilint/bin/lint_pkix_cert.py`` builds it. The validators keep no per-document
    state (each call gets the document's nodes), so one instance serves every thread.
    """
    from pkilint.pkix import certificate, extension, name

    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def _is_spiffe_false_positive(result, description) -> bool:
    """Whether a pkilint finding is the documented false positive: ``pkix.invalid_uri_syntax`` on
    a URI SAN of the certificate whose value is a well-formed SPIFFE ID. Anything else, a bad
    ``spiffe://`` URI included, stays a finding."""
    from pyasn1_alt_modules import rfc5280

    node = result.node
    return (
        description.finding.code == _SPIFFE_FALSE_POSITIVE_CODE
        and result.validator.name == _SPIFFE_FALSE_POSITIVE_VALIDATOR
        and _SAN_URI_PATH.fullmatch(node.path) is not None
        and isinstance(node.parent.pdu, rfc5280.GeneralName)
        and isinstance(node.parent.parent.pdu, rfc5280.SubjectAltName)
        and is_spiffe_id(str(node.pdu))
    )


def lint_certificate(der: bytes) -> list[Finding]:
    """Lint one certificate with pkilint's RFC 5280 linter.

    The same findings as ``lint_pkix_cert lint -s WARNING cert.pem``, minus the allow-listed
    false positive on SPIFFE IDs: ``pkix.invalid_uri_syntax`` on a subjectAltName URI that is a
    well-formed ``spiffe://`` ID (SPIFFE-ID.md section 2). The first call imports pkilint and
    builds its validator (~150 ms); each later certificate takes ~2 ms.

    Args:
        der: the certificate, DER-encoded (RFC 5280 4.1).

    Returns:
        The findings of severity WARNING or worse (FATAL, ERROR, WARNING), in pkilint's order;
        empty for a certificate that passes.

    Raises:
        LintError: ``der`` cannot be decoded as a certificate (``findings`` is empty).
    """
    from pkilint import loader

    with _build_lock:  # build the validator once even when threads race for it
        validator = _validator()
    try:
        document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    except ValueError as exc:  # pkilint's SubstrateDecodingFailedError is a ValueError
        raise LintError(f"pkilint cannot decode the certificate: {exc}") from None
    findings = []
    for result in validator.validate(document.root):
        for description in result.finding_descriptions:
            if description.finding.severity > _WARNING or _is_spiffe_false_positive(result, description):
                continue
            findings.append(Finding(
                code=description.finding.code,
                severity=description.finding.severity.name,
                message=description.message or "",
                path=result.node.path,
                validator=result.validator.name,
            ))
    return findings


_ThrowawayKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


def _key_spec(issuer_key_type) -> tuple:
    """A hashable (family, parameter) description of the issuer's key type."""
    if isinstance(issuer_key_type, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return ("ec", type(issuer_key_type.curve))
    if isinstance(issuer_key_type, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return ("rsa", issuer_key_type.key_size)
    if isinstance(issuer_key_type, type):
        # A class only: the algorithm identifier depends on the family (and hash), not on the
        # curve or modulus size, so the profile's curve and the smallest accepted RSA size do.
        if issubclass(issuer_key_type, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
            return ("ec", ec.SECP256R1)
        if issubclass(issuer_key_type, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
            return ("rsa", 2048)
        if issubclass(issuer_key_type, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
            return ("ed25519", None)
        if issubclass(issuer_key_type, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
            return ("ed448", None)
    if isinstance(issuer_key_type, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return ("ed25519", None)
    if isinstance(issuer_key_type, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return ("ed448", None)
    raise TypeError(
        f"issuer_key_type {issuer_key_type!r}: want the issuer's EC, RSA, Ed25519 or Ed448 key "
        "(private or public) or one of those key classes"
    )


@functools.lru_cache(maxsize=8)
def _throwaway_key(spec: tuple) -> _ThrowawayKey:
    """A process-local key of the given type; it signs only certificates to be linted.

    Cached because RSA key generation takes up to a second; it is never written, trusted or
    used for anything but lint input, so reusing it within the process changes nothing.
    """
    family, parameter = spec
    if family == "ec":
        return ec.generate_private_key(parameter())
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=parameter)
    if family == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ed448.Ed448PrivateKey.generate()


def prelint(
    builder: x509.CertificateBuilder,
    *,
    issuer_key_type,
    hash_algorithm: hashes.HashAlgorithm | None = hashes.SHA256(),
) -> x509.Certificate:
    """Lint the certificate ``builder`` would make, before the real issuer signs anything.

    The builder is signed with a throwaway key of the issuer's key type (same family, curve or
    RSA modulus size; Let's Encrypt's Boulder does the same), so the linted certificate has
    exactly the to-be-signed part the real signature will cover, signature algorithm included
    (RFC 5280 4.1.1.2 and 4.1.2.3 must match). Why a throwaway key: linting a certificate needs
    a signed certificate, and signing it with the real key would create a real, verifiable
    certificate even when the lint then refuses it; a refused certificate would exist anyway
    (in memory, a core dump, a log). Signed by a key nobody trusts, the linted certificate
    verifies under no CA, so no real signature over a bad certificate ever exists.

    A self-issued certificate (a root) signed by the throwaway key is no longer self-signed, and
    pkilint exempts from the authority key identifier only self-signed CA certificates (RFC 5280
    4.2.1.1): a root passes prelint only if it carries an AKI (keyIdentifier = its own SKI).

    Args:
        builder: the complete certificate builder the caller will sign next (for
            :class:`cryptography.x509.CertificateBuilder` the same builder signs to the same
            to-be-signed bytes).
        issuer_key_type: the issuer's key, private or public (only its type, curve or modulus
            size are read; it is never used), or a key class such as
            ``ec.EllipticCurvePrivateKey`` (then P-256 or RSA-2048 stand in).
        hash_algorithm: the hash the real signature will use; ignored (None) for Ed25519 and
            Ed448, which take none.

    Returns:
        The linted certificate, signed by the throwaway key: for inspection only, it verifies
        under no issuer. Sign ``builder`` with the real key to issue.

    Raises:
        LintError: pkilint reported findings (listed in the message and in ``findings``,
            the SPIFFE false positive excepted, see :func:`lint_certificate`), or cannot decode
            the certificate. Nothing was signed with the real key.
        TypeError: ``issuer_key_type`` is not a supported key or key class.
    """
    spec = _key_spec(issuer_key_type)
    key = _throwaway_key(spec)
    if spec[0] in ("ed25519", "ed448"):
        hash_algorithm = None
    certificate = builder.sign(key, hash_algorithm)
    findings = lint_certificate(certificate.public_bytes(serialization.Encoding.DER))
    if findings:
        listed = "; ".join(str(f) for f in findings)
        hint = ""
        if certificate.issuer == certificate.subject and any(f.code == _AKI_ABSENT for f in findings):
            hint = (" (signed by a throwaway key, a self-issued certificate is not self-signed, so it "
                    "needs an authority key identifier: add one equal to its own SKI, RFC 5280 4.2.1.1)")
        raise LintError(
            f"refused to sign the certificate for {certificate.subject.rfc4514_string()!r}: pkilint "
            f"found {len(findings)} problem(s) with its RFC 5280 profile: {listed}{hint}",
            findings,
        )
    return certificate
