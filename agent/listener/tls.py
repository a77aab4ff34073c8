"""The gateway listener's server SSLContext, from a credential store (clients: :mod:`pkictl.tls`).

Every reload builds a fresh, complete context from files: a live context is never mutated
(docs/design.md, "Hot reload").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from pathlib import Path
from typing import Mapping

from cryptography import x509

from pkictl.crl import CRL_FIX
from pkictl.crl_numbers import CRLKey, HeldCRL, refuse_older
from pkictl.file_errors import load_into_context
from pkictl.revocation import load_crls, revoked_serials
from pkictl.store import Credential, CredentialStore
from pkictl.tls import harden, load_credential

__all__ = ["ServerTLS", "server_context"]


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """Everything a new connection needs, built together and swapped as one reference.

    Attributes:
        context: the server SSLContext.
        credential: the certificate and key it serves.
        revoked: ``(issuer name DER, serial)`` pairs of the CRL it was built with (empty without one).
        superseded: those of them revoked with reason ``superseded`` (RFC 5280 5.3.1).
        crl_next_update: the earliest nextUpdate of those CRLs, aware UTC (None without CRL).
        crl_numbers: the CRL number of each issuer's CRL in service (and of issuers whose CRL
            has left the file since): a reload offering a lower one is refused.
    """

    context: ssl.SSLContext
    credential: Credential
    revoked: frozenset[tuple[bytes, int]] = frozenset()
    superseded: frozenset[tuple[bytes, int]] = frozenset()
    crl_next_update: dt.datetime | None = None
    crl_numbers: Mapping[CRLKey, HeldCRL] = dataclasses.field(default_factory=dict)


def server_context(store: CredentialStore, crl: Path | None = None, *, held: Mapping[CRLKey, HeldCRL] | None = None) -> ServerTLS:
    """An mTLS server context: our certificate and chain; clients must present a certificate
    that chains to our trust anchor and, with ``crl``, is not revoked.

    Args:
        store: the gateway's credential directory.
        crl: a PEM file of CRLs. OpenSSL then checks the leaf against it
            (``VERIFY_CRL_CHECK_LEAF``; CRLs load only through ``cafile``, docs/design.md, "mTLS server checks"), and its
            entries are returned for the application's own check.
        held: the CRL numbers in service (the current ServerTLS's ``crl_numbers``); None on the
            first load.

    Raises:
        CRLRollbackError: ``crl`` holds an older CRL of some issuer than ``held`` (a lower CRL
            number, or the same with other content: RFC 5280 5.2.3); a replayed CRL must not let
            revoked clients back in.
        StoreError, KeyProtectionError: the credential, the trust anchors or the CRL is missing or
            malformed, or OpenSSL refused one: the message names the file and the fix.
        OSError: a file cannot be read.
    """
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    credential = load_credential(ctx, store)
    if crl is None:
        return ServerTLS(ctx, credential)
    crls = load_crls(crl)
    numbers = refuse_older(held or {}, crls, source=str(crl))
    load_into_context(lambda: ctx.load_verify_locations(cafile=crl), crl, fix=CRL_FIX)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ServerTLS(ctx, credential, revoked_serials(crls), revoked_serials(crls, reason=x509.ReasonFlags.superseded),
                     min((c.next_update_utc for c in crls if c.next_update_utc is not None), default=None), numbers)
