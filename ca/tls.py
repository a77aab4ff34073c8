"""TLS settings every pkictl endpoint shares (the EST service, the gateway listener, node clients)
and the client context of a credential store.

Every reload builds a fresh, complete context from files: a live context is never mutated
(docs/design.md, "Hot reload").
"""

from __future__ import annotations

import ssl

from .store import Credential, CredentialStore

__all__ = ["harden", "client_context", "alert_reason"]


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 minimum, no renegotiation, no session tickets (a resumed session would skip the
    revocation check of a reloaded CRL; docs/design.md, "Hot reload"), strict X.509 verification."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(store: CredentialStore) -> tuple[ssl.SSLContext, Credential]:
    """A client context that sends our certificate and chain and verifies the server against
    our trust anchor and the name or IP address dialed (pass ``server_hostname``).

    Raises:
        StoreError, KeyProtectionError, ssl.SSLError, OSError: as :func:`server_context`.
    """
    version = store.current_version_dir()
    credential = store.load(version)
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_cert_chain(version / "fullchain.pem", version / "privkey.pem")
    ctx.load_verify_locations(cafile=store.trust_anchors_path)
    return ctx, credential


# TLS alerts a server sends when it refuses the client certificate (RFC 8446 6.2) -> the reason logged.
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired or not yet valid",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "wrong purpose",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV1_ALERT_DECRYPT_ERROR": "signature check failed",
}


def alert_reason(exc: object) -> str | None:
    """The reason a server (a gateway, the EST service) gave for refusing our client certificate,
    from the TLS alert in ``exc``: ``no client certificate``, ``revoked``, ``expired or not yet
    valid``, ``unknown CA``, ``wrong purpose``, ...; None if ``exc`` is not such an alert (a
    network error, say). With TLS 1.3 the alert arrives on the first read after the handshake."""
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.reason or ""
        if reason in _ALERTS:
            return _ALERTS[reason]
        if "ALERT" in reason:
            return reason.lower().replace("_", " ")
    return None
