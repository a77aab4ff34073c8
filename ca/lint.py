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
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .errors import LintError

__all__ = ["Finding", "lint_certificate", "prelint", "profile_difference", "is_spiffe_id", "signed"]

# pkilint severities run FATAL=0, ERROR=1, WARNING=2, NOTICE=3, INFO=4, DEBUG=5; "at least WARNING"
# is "value <= 2", the same threshold as ``lint_pkix_cert lint -s WARNING``.
_WARNING = 2

# The one allow-listed finding (docs/design.md, "Certificate profile"). pkilint checks URIs with
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
# The hashes a certificate may be signed with (what CertificateBuilder.sign accepts).
_SignatureHash: TypeAlias = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | hashes.SHA3_224 | hashes.SHA3_256 | hashes.SHA3_384 | hashes.SHA3_512
_SHA256 = hashes.SHA256()


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
    hash_algorithm: _SignatureHash | None = _SHA256,
    predecessor: x509.Certificate | None = None,
) -> tuple[x509.Certificate, bool]:
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
        predecessor: for a renewal, the certificate being renewed, which passed this lint when
            it was issued. When the new certificate differs from it only where a renewal must
            (:func:`profile_difference` is None), pkilint's verdict on it stands and pkilint is
            not run again; any other difference gets the full lint.

    Returns:
        ``(certificate, linted)``: the certificate, signed by the throwaway key (for inspection
        only, it verifies under no issuer; sign ``builder`` with the real key to issue), and
        True if pkilint ran on it, False if it was found equivalent to ``predecessor``.

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
    if predecessor is not None and profile_difference(certificate, predecessor) is None:
        return certificate, False
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
    return certificate, True


# RFC 5280 4.1.2.5: dates through 2049 are UTCTime, from 2050 on GeneralizedTime.
_GENERALIZED_TIME_FROM = 2050
# RFC 5280 4.1.2.2: a positive integer of at most 20 octets (DER, sign bit included).
_MAX_SERIAL_BITS = 20 * 8 - 1


def _key_parameters(public_key) -> tuple:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ("ec", public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return ("rsa", public_key.key_size, public_key.public_numbers().e)
    return (type(public_key).__name__,)


def _ski_is_method_1(certificate: x509.Certificate) -> bool:
    """Whether the SKI is the SHA-1 of the subjectPublicKey (RFC 5280 4.2.1.2, method 1)."""
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return False
    return ski.digest == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def profile_difference(certificate: x509.Certificate, predecessor: x509.Certificate) -> str | None:
    """How ``certificate`` differs from ``predecessor`` beyond what a renewal changes, or None.

    A renewal (RFC 7030 4.2.2) changes exactly: the serial number, the validity dates, the
    public key and, with it, the subject key identifier. Everything else that pkilint's RFC 5280
    linter reads must be byte-identical: version, signature algorithm, issuer, subject, and every
    other extension with its criticality, in the same order. What changes is checked against the
    rules pkilint applies to it: the serial is positive and fits 20 octets (RFC 5280 4.1.2.2), the
    lifetime is the same and each date keeps its encoding, UTCTime before 2050 (4.1.2.5), the key
    has the same algorithm and parameters (4.1.2.7), and both SKIs are method 1 over their own key
    (4.2.1.2). A certificate that passes this is, for the linter, the predecessor with other
    numbers: the predecessor's clean lint stands for it.

    Returns:
        None when equivalent; otherwise what differs, e.g. ``"extensions differ"``.
    """
    new, old = certificate, predecessor
    if new.version != old.version or new.signature_algorithm_oid != old.signature_algorithm_oid:
        return "version or signature algorithm differ"
    if new.issuer.public_bytes() != old.issuer.public_bytes() or new.subject.public_bytes() != old.subject.public_bytes():
        return "issuer or subject differ"
    if not (0 < new.serial_number and new.serial_number.bit_length() <= _MAX_SERIAL_BITS):
        return "serial number out of RFC 5280 range"
    if new.not_valid_after_utc - new.not_valid_before_utc != old.not_valid_after_utc - old.not_valid_before_utc:
        return "lifetime differs"
    encodings = [(c.not_valid_before_utc.year >= _GENERALIZED_TIME_FROM, c.not_valid_after_utc.year >= _GENERALIZED_TIME_FROM)
                 for c in (new, old)]
    if encodings[0] != encodings[1]:
        return "validity time encodings differ"
    if _key_parameters(new.public_key()) != _key_parameters(old.public_key()):
        return "public key algorithm or parameters differ"
    if not (_ski_is_method_1(new) and _ski_is_method_1(old)):
        return "subject key identifier is not RFC 5280 method 1"
    ski = x509.SubjectKeyIdentifier.oid
    shape = [[(e.oid, e.critical, e.value.public_bytes() if e.oid != ski else b"") for e in c.extensions] for c in (new, old)]
    if shape[0] != shape[1]:
        return "extensions differ"
    return None


def signed(builder: x509.CertificateBuilder, key) -> x509.Certificate:
    """Lint ``builder`` with a throwaway key (:func:`prelint`), then sign it with ``key`` (SHA-256).

    Raises:
        LintError: the certificate would break the profile; nothing is signed.
    """
    prelint(builder, issuer_key_type=key)
    return builder.sign(key, hashes.SHA256())
