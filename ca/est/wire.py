"""EST (RFC 7030) on the wire: paths, media types, base64 PKCS#7 and PKCS#10 bodies, and the
short approval code that pairs a node's request with the operator's approval."""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ..errors import PolicyError
from ..policy import parse_csr

__all__ = [
    "EST_PREFIX",
    "PKCS7_CERTS_ONLY",
    "PKCS10",
    "PKIX_CRL",
    "REFUSAL_HEADER",
    "encode_certs_only",
    "decode_certs_only",
    "encode_csr",
    "decode_csr_body",
    "approval_code",
    "root_fingerprint",
]

EST_PREFIX = "/.well-known/est"  # RFC 7030 3.2.2
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"  # RFC 7030 4.1.3, 4.2.3
PKCS10 = "application/pkcs10"  # RFC 7030 4.2.1
PKIX_CRL = "application/pkix-crl"  # RFC 2585 section 4.2
# On a 403 to simplereenroll: why the certificate presented can no longer renew
# (pkictl.errors.CertificateUnusable.reason), for the agent to act on; the body says it in words.
REFUSAL_HEADER = "Pkictl-Refusal"


def encode_certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A degenerate PKCS#7 SignedData of ``certificates`` (RFC 7030 4.1.3), DER then base64
    (RFC 7030 sends bodies with Content-Transfer-Encoding: base64)."""
    return base64.encodebytes(pkcs7.serialize_certificates(certificates, serialization.Encoding.DER))


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """Certificates of a base64 PKCS#7 certs-only body.

    Raises:
        PolicyError: not base64 PKCS#7 holding certificates.
    """
    try:
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body, validate=False))
    except (ValueError, binascii.Error) as exc:
        raise PolicyError(f"the EST server's answer is not a base64 PKCS#7 certs-only body ({exc})") from None


def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """A CSR as RFC 7030 4.2.1 sends it: base64 of the DER PKCS#10."""
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def decode_csr_body(body: bytes) -> x509.CertificateSigningRequest:
    """Parse a simpleenroll / simplereenroll body: base64 of one DER PKCS#10 (RFC 7030 4.2.1;
    one PEM CSR is tolerated), held to :func:`pkictl.policy.parse_csr`'s "exactly one CSR".

    The base64 is decoded strictly, line breaks and spaces aside (RFC 2045 6.8 lines): a lax
    decoder skips characters outside the alphabet and stops at the first padding, so junk after
    the CSR would pass unseen.

    Args:
        body: the HTTP request body.

    Raises:
        PolicyError: not base64 of exactly one DER CSR (junk, padding in the middle, bytes after
            the DER), or not exactly one PEM CSR.
    """
    if body.lstrip().startswith(b"-----BEGIN"):
        return parse_csr(body, source="request body")
    try:
        der = binascii.a2b_base64(body.translate(None, b" \t\r\n"), strict_mode=True)
    except binascii.Error as exc:
        raise PolicyError(f"request body: not base64 ({exc}); want the base64 of one DER CSR and nothing else "
                          "(RFC 7030 4.2.1)") from None
    return parse_csr(der, source="request body")


def approval_code(public_key) -> str:
    """A short code naming a public key, shown by the node and by ``pkictl requests``, so that
    an operator approves the key the node really holds: ``XXXX-XXXX``, 40 bits of SHA-256 of
    the SubjectPublicKeyInfo in base32 (letters and digits 2-7)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    code = base64.b32encode(hashlib.sha256(spki).digest())[:8].decode()
    return f"{code[:4]}-{code[4:]}"


def root_fingerprint(certificate: x509.Certificate) -> str:
    """``sha256:<hex>`` of a certificate's DER: how an operator hands a node the trust anchor."""
    return "sha256:" + certificate.fingerprint(hashes.SHA256()).hex()
