"""What the gateway checks after OpenSSL accepted a client chain, and why OpenSSL is not enough.

OpenSSL accepts a client certificate with no EKU and a CA certificate used as a leaf
(../shared/DESIGN.md, "mTLS server checks"); the application must check those itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import PeerRejected

__all__ = ["PeerIdentity", "authorize_client", "handshake_refusal_reason"]


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """An authenticated node.

    Attributes:
        name: the node name, lower case, from its SPIFFE URI SAN.
        serial: the serial number of the certificate it presented.
        not_after: end of that certificate's validity, aware UTC.
    """

    name: str
    serial: int
    not_after: dt.datetime


def authorize_client(der: bytes | None, trust_domain: str, revoked: frozenset[tuple[bytes, int]] = frozenset()) -> PeerIdentity:
    """Check the verified client certificate ``der`` and return the node it names.

    Rules: not revoked (again: OpenSSL checks the CRL on full handshakes, this also covers a
    resumed session), EKU present and containing clientAuth (RFC 5280 4.2.1.12), not a CA
    certificate (RFC 5280 4.2.1.9), exactly one ``spiffe://<trust_domain>/node/<name>`` URI SAN.

    Args:
        revoked: ``(issuer name DER, serial)`` pairs from the current CRL.

    Raises:
        PeerRejected: with ``reason`` ``no client certificate``, ``revoked``, ``wrong purpose``,
            ``CA certificate as client`` or ``no node identity``.
    """
    if not der:
        raise PeerRejected("no client certificate", "the client sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    if (cert.issuer.public_bytes(), cert.serial_number) in revoked:
        raise PeerRejected("revoked", f"serial {cert.serial_number:x} is on the CRL")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerRejected("wrong purpose", f"serial {cert.serial_number:x} has no extended key usage; want clientAuth") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise PeerRejected("wrong purpose", f"serial {cert.serial_number:x} is not for clientAuth")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PeerRejected("CA certificate as client", f"serial {cert.serial_number:x} is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    prefix = f"spiffe://{trust_domain}/node/"
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    names = [u[len(prefix):] for u in uris if u.startswith(prefix)]
    if len(names) != 1 or not names[0]:
        raise PeerRejected("no node identity", f"serial {cert.serial_number:x} carries {len(names)} identities under {prefix}; want exactly one")
    return PeerIdentity(names[0].lower(), cert.serial_number, cert.not_valid_after_utc)


# X509_V_ERR_* codes (OpenSSL include/openssl/x509_vfy.h) -> the reasons operators read in logs.
_VERIFY_REASONS = {
    2: "unknown CA", 18: "unknown CA", 19: "unknown CA", 20: "unknown CA", 21: "unknown CA",
    9: "not yet valid", 10: "expired", 23: "revoked", 26: "wrong purpose",
    3: "CRL unavailable", 11: "CRL not yet valid", 12: "CRL expired",
}
_NOT_TLS = {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


def handshake_refusal_reason(exc: BaseException) -> tuple[str, str]:
    """Map a server-side handshake failure to ``(reason, detail)`` for the refusal log.

    ``reason`` is one of: no client certificate, unknown CA, expired, not yet valid, revoked,
    wrong purpose, CRL unavailable/expired/not yet valid, not TLS, protocol version,
    handshake timeout, closed during handshake, or ``TLS error`` for anything else.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "certificate rejected"), exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate", "the client sent no certificate"
        if reason in _NOT_TLS:
            return "not TLS", reason
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "protocol version", reason
        if reason in ("UNEXPECTED_EOF_WHILE_READING",):
            return "closed during handshake", reason
        return "TLS error", reason or str(exc)
    # asyncio reports its ssl_handshake_timeout as ConnectionAbortedError("... taking longer than ...").
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)):
        return "handshake timeout", str(exc) or "the client did not finish its handshake in time"
    if isinstance(exc, (ConnectionError, OSError, EOFError)):
        return "closed during handshake", type(exc).__name__
    return "TLS error", repr(exc)
