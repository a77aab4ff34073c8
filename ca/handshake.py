"""Why a server-side TLS handshake failed, in the words operators read in refusal logs.

Shared by ``pkictl serve`` and pki-agent's gateway listener, so that both name a refused client
the same way: OpenSSL's verify codes (``X509_V_ERR_*``) and ssl errors mapped to short reasons.
"""

from __future__ import annotations

import re
import ssl

__all__ = ["VERIFY_REASONS", "CLIENT_REJECTED", "client_alert", "handshake_refusal_reason", "likely_cause"]

CLIENT_REJECTED = "client rejected our certificate"

# X509_V_ERR_* codes (OpenSSL include/openssl/x509_vfy.h) -> the reasons operators read in logs.
VERIFY_REASONS = {
    2: "unknown CA", 18: "unknown CA", 19: "unknown CA", 20: "unknown CA", 21: "unknown CA",
    9: "not yet valid", 10: "expired", 23: "revoked", 26: "wrong purpose",
    3: "CRL unavailable", 11: "CRL not yet valid", 12: "CRL expired",
}
_NOT_TLS = {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}

# TLS alerts (RFC 8446 6.2) a client sends when it does not accept the server's certificate.
# OpenSSL raises a received alert as reason SSLV3_ALERT_* / TLSV1_ALERT_*: an alert this server
# sends is raised with the error that made it send one, so such a reason is always the peer's.
_ALERT = re.compile(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z_]+)")
_CERTIFICATE_ALERTS = {
    "unknown ca": "it does not trust the CA that issued this server's certificate: its trust anchor (ca.pem) is another "
                  "CA's, or this server sends its certificate without the issuing CA (fullchain.pem)",
    "bad certificate": "it finds this server's certificate unacceptable: most often the address it dialed is not among "
                       "the certificate's SAN, or its clock is outside the certificate's validity",
    "certificate expired": "it finds this server's certificate expired: this server's certificate, or the client's clock",
    "certificate revoked": "it finds this server's certificate on a CRL",
    "certificate unknown": "it cannot use this server's certificate (wrong purpose, or no path to its trust anchor)",
    "unsupported certificate": "it does not accept this certificate's purpose or key type",
    "decrypt error": "it could not verify this server's signature: the certificate and the private key it serves "
                     "may not belong together",
}
_FIX = "give the client this CA's ca.pem, and check this server's certificate (pki-agent doctor, pkictl doctor)"

# What a verify code says about the client's chain (OpenSSL's build_chain in crypto/x509/x509_vfy.c):
# 20 = the issuer of the last certificate the client sent is neither sent nor trusted; with one
# certificate sent, that is the leaf alone. 2, 18 and 19 = the client sent a chain (or a
# self-signed certificate) that ends at a CA this server does not trust.
_CAUSES = {
    20: "the client sent a certificate whose issuer it did not send and this server does not trust: most likely a "
        "certificate of this CA sent without its chain (the client must send fullchain.pem: leaf and issuing CA), "
        "else a certificate of another CA",
    2: "the client's chain ends at a CA this server does not trust: a certificate of another CA",
    18: "the client sent a self-signed certificate: not one of this CA",
    19: "the client's chain ends at a root this server does not trust: a certificate of another CA",
    21: "the client sent a lone certificate that no CA here signed: a certificate of another CA",
}


def handshake_refusal_reason(exc: BaseException) -> tuple[str, str]:
    """Map a server-side handshake failure to ``(reason, detail)`` for the refusal log.

    Args:
        exc: what the handshake raised (``ssl.SSLError`` and subclasses, ``TimeoutError``,
            asyncio's ``ConnectionAbortedError`` for ``ssl_handshake_timeout``, ``OSError``).

    Returns:
        ``reason`` is one of: no client certificate, unknown CA, expired, not yet valid, revoked,
        wrong purpose, CRL unavailable/expired/not yet valid, :data:`CLIENT_REJECTED` (the client
        sent an alert refusing this server's certificate), not TLS, protocol version,
        handshake timeout, closed during handshake, or ``TLS error`` for anything else;
        ``detail`` is what OpenSSL or the loop said.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return VERIFY_REASONS.get(exc.verify_code, "certificate rejected"), exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate", "the client sent no certificate"
        if (alert := client_alert(reason)) in _CERTIFICATE_ALERTS:
            return CLIENT_REJECTED, (f"the client rejected our certificate (alert {alert}): {_CERTIFICATE_ALERTS[alert]}; "
                                     f"{_FIX}")
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


def client_alert(reason: str) -> str | None:
    """The alert a peer sent, as RFC 8446 names it (``unknown ca``), from an ssl error's
    ``reason`` (``TLSV1_ALERT_UNKNOWN_CA``); None when the reason is not a received alert."""
    match = _ALERT.fullmatch(reason)
    return match.group(1).lower().replace("_", " ") if match else None


def likely_cause(exc: BaseException) -> str | None:
    """What an ``unknown CA`` refusal most likely means for the client, or None for other failures.

    OpenSSL does not hand a rejected certificate to the application, so the cause is read from
    the verify code alone: code 20 (issuer not found, the usual result of a leaf sent without its
    chain) versus a chain that ends at a CA not trusted here (another CA).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _CAUSES.get(exc.verify_code)
    return None
