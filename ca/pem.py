"""PEM encoding and decoding of certificates and keys (thin helpers over cryptography)."""

from __future__ import annotations

from typing import Iterable, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import StoreError
from .file_errors import key_problem, parse_certificates

__all__ = [
    "PrivateKey",
    "certificates_to_pem",
    "certificates_from_pem",
    "private_key_to_pem",
    "private_key_from_pem",
    "issued_by",
    "public_key_bytes",
]

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]


def certificates_to_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def certificates_from_pem(data: bytes, *, source: str) -> list[x509.Certificate]:
    """Decode every certificate of a PEM bundle.

    Raises:
        StoreError: the data holds no certificate or is not PEM; the message names ``source``.
    """
    return parse_certificates(data, source=source)


def private_key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes, *, source: str) -> PrivateKey:
    """Decode an unencrypted PEM private key.

    Raises:
        StoreError: not a PEM private key (empty, truncated, a certificate instead...), encrypted,
            or of another type than :data:`PrivateKey` (X25519, DSA...: it could not sign a CSR);
            the message names ``source`` and the defect.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        problem = "is encrypted, and pkictl's end-entity keys are not (they are protected by mode 0600)" \
            if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data else key_problem(data, exc)
        raise StoreError(f"{source} {problem}; expected an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise StoreError(f"{source}: holds a key of type {type(key).__name__.removeprefix('_')}; want an EC, RSA or Ed25519 key")
    return key


def public_key_bytes(key) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, for comparing keys."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer``'s name is the issuer of ``certificate`` and its key verifies the signature
    (RFC 5280 section 6.1.3 (a)(1) and (a)(4), for one link only)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
