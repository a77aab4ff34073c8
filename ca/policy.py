"""Issuance policy: small named validators whose errors read "got X, want Y".

Identity comes from policy, never from a request: a CSR contributes its public key and the proof
that its sender holds the private key, nothing else (docs/design.md, "Certificate profile").
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from .errors import PKIError, PolicyError
from .names import validate_name
from .profile import node_identity

__all__ = ["check_public_key", "check_dns_name", "check_ip_address", "parse_csr", "check_enrollment_csr", "MAX_CSR_BYTES"]

MAX_CSR_BYTES = 16 * 1024  # a P-256 or RSA-4096 CSR is well under 4 KiB


def check_public_key(public_key) -> None:
    """Accept ECDSA P-256/P-384, RSA >= 2048 bits or Ed25519.

    Raises:
        PolicyError: any other key type, curve or size.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise PolicyError(f"EC key on {public_key.curve.name}: want P-256 or P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise PolicyError(f"RSA key of {public_key.key_size} bits: want at least 2048")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise PolicyError(f"{type(public_key).__name__}: want an ECDSA P-256/P-384, RSA >= 2048 or Ed25519 key")


def check_ip_address(value: str) -> str:
    """Return the canonical form of an IPv4 or IPv6 address.

    Raises:
        PolicyError: not an IP address.
    """
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise PolicyError(f"--ip {value!r}: want an IPv4 or IPv6 address such as 192.168.1.10") from None


def check_dns_name(value: str) -> str:
    """Return the canonical (lower case, no trailing dot) form of a DNS name a gateway may carry.

    Raises:
        PolicyError: not made of DNS labels, longer than 253 characters, or a localhost name
            (never certified: docs/design.md, "Certificate profile").
    """
    name = value.rstrip(".").lower()  # "localhost." is "localhost": compare the canonical form
    if len(name) > 253:  # RFC 1035 2.3.4: 255 octets on the wire = 253 characters as text
        raise PolicyError(f"--dns name of {len(name)} characters: want at most 253 (RFC 1035 2.3.4)")
    try:
        for label in name.split("."):
            validate_name(label)
    except PKIError:
        raise PolicyError(
            f"--dns {value!r}: want a DNS name made of labels of letters, digits and hyphens, "
            "such as gateway.example.lan"
        ) from None
    if name == "localhost" or name.endswith(".localhost"):
        raise PolicyError(f"--dns {value!r}: localhost names are not certified; use --ip 127.0.0.1 for loopback")
    return name


def parse_csr(data: bytes, *, source: str) -> x509.CertificateSigningRequest:
    """Decode a PEM or DER PKCS#10 request (RFC 2986) of at most :data:`MAX_CSR_BYTES`.

    Raises:
        PolicyError: too large, or not a CSR.
    """
    if len(data) > MAX_CSR_BYTES:
        raise PolicyError(f"{source}: {len(data)} bytes; a CSR is at most {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise PolicyError(f"{source}: not a PKCS#10 certificate signing request, PEM or DER ({exc})") from None


def check_enrollment_csr(csr: x509.CertificateSigningRequest, *, name: str, trust_domain: str) -> None:
    """Check a node's own CSR before its public key is certified for ``name``.

    Rules: the signature verifies (proof of possession, RFC 2986 section 3), the key is
    acceptable, no CA:TRUE is requested, the subject is empty or only ``CN=<name>``, and the
    subject alternative names, if any, are exactly the node's identity URI.

    Raises:
        PolicyError: naming the rule broken, with what was got and what is wanted.
    """
    if not csr.is_signature_valid:
        raise PolicyError("the CSR's signature does not verify: it does not prove possession of its key")
    check_public_key(csr.public_key())
    try:
        if csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PolicyError("the CSR asks for CA:TRUE; pkictl issues CA certificates only through init-ca")
    except x509.ExtensionNotFound:
        pass
    attributes = list(csr.subject)
    if attributes and not (
        len(attributes) == 1 and attributes[0].oid == NameOID.COMMON_NAME and str(attributes[0].value).lower() == name.lower()
    ):
        raise PolicyError(f"CSR subject {csr.subject.rfc4514_string()!r}: want CN={name} or an empty subject (another identity is refused)")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    wanted = node_identity(trust_domain, name)
    got = [str(getattr(n, "value", n)) for n in sans]
    if got != [wanted]:
        raise PolicyError(f"CSR subject alternative names {got}: want none or exactly [{wanted!r}]; identity comes from pkictl")
