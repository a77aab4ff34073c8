"""TLS settings every pkictl endpoint shares (the EST service, the gateway listener, node clients)
and the client context of a credential store.

Every reload builds a fresh, complete context from files: a live context is never mutated
(docs/design.md, "Hot reload").
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .file_errors import load_into_context, read_certificates
from .store import TRUST_ANCHORS_EXPECTED, TRUST_ANCHORS_FIX, Credential, CredentialStore

__all__ = ["harden", "client_context", "load_credential", "load_trust_anchors", "alert_reason"]


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
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    return ctx, load_credential(ctx, store)


def load_credential(ctx: ssl.SSLContext, store: CredentialStore) -> Credential:
    """Load the live version's ``fullchain.pem`` and ``privkey.pem`` and the store's ``ca.pem``
    into the new context ``ctx``, each checked with cryptography first
    (:meth:`CredentialStore.load`, :meth:`CredentialStore.load_trust_anchors`): a damaged file is
    refused naming the file, its defect and the fix, not with OpenSSL's bare ``PEM lib``.

    Returns:
        The credential loaded.

    Raises:
        StoreError: a file is missing or damaged, or OpenSSL refused it (the path named).
        KeyProtectionError: ``privkey.pem`` is not protected.
    """
    version = store.current_version_dir()
    credential = store.load(version)
    fix = f"restore the credential version {version} (see pki-agent doctor or pkictl doctor)"
    load_into_context(lambda: ctx.load_cert_chain(version / "fullchain.pem", version / "privkey.pem"),
                      version / "fullchain.pem", fix=fix)
    load_trust_anchors(ctx, store.trust_anchors_path)
    return credential


def load_trust_anchors(ctx: ssl.SSLContext, path: Path) -> None:
    """Load the trust anchors file ``path`` (a ``ca.pem``) into ``ctx`` after checking it with cryptography.

    Raises:
        StoreError: missing, damaged or refused by OpenSSL; the message names ``path`` and the fix.
    """
    fix = TRUST_ANCHORS_FIX.format(path=path)
    read_certificates(path, expected=TRUST_ANCHORS_EXPECTED, fix=fix)
    load_into_context(lambda: ctx.load_verify_locations(cafile=path), path, fix=fix)


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
