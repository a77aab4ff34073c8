"""What the gateway checks after OpenSSL accepted a client chain, and why OpenSSL is not enough.

OpenSSL accepts a client certificate with no EKU and a CA certificate used as a leaf
(docs/design.md, "mTLS server checks"); the application must check those itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ssl
from typing import Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pkictl.errors import PKIError
from pkictl.handshake import handshake_refusal_reason  # re-exported: the listener's reasons live in the CA library
from pkictl.names import validate_name

from ..errors import PeerRejected

__all__ = ["PeerIdentity", "Authorizer", "allowed_names", "authorize_client", "handshake_refusal_reason"]


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """An authenticated node.

    Attributes:
        name: the node name, lower case, from its SPIFFE URI SAN.
        serial: the serial number of the certificate it presented.
        not_after: end of that certificate's validity, aware UTC.
        issuer: the DER of its issuer name (with ``serial``, the key a CRL revokes by).
    """

    name: str
    serial: int
    not_after: dt.datetime
    issuer: bytes = b""


def allowed_names(allow: Sequence[str]) -> frozenset[str] | None:
    """The allow list as lower-case names, or None for ``["*"]`` (every node of the CA).

    Raises:
        ValueError: the list is empty, mixes ``*`` with names, or holds a name that is not a DNS
            label (RFC 1123 2.1).
    """
    if isinstance(allow, str) or not allow:
        raise ValueError(f"got {allow!r}: want a non-empty list of node names, or ['*'] for every node")
    if "*" in allow:
        if len(allow) > 1:
            raise ValueError(f"{list(allow)}: '*' already lets every node in; give '*' alone or only names")
        return None
    try:
        return frozenset(validate_name(name).lower() for name in allow)
    except PKIError as exc:
        raise ValueError(str(exc)) from None


def authorize_client(
    der: bytes | None,
    trust_domain: str,
    revoked: frozenset[tuple[bytes, int]] = frozenset(),
    allow: frozenset[str] | None = None,
) -> PeerIdentity:
    """Check the verified client certificate ``der`` and return the node it names.

    Rules: not revoked (again: OpenSSL checks the CRL on full handshakes, this also covers a
    resumed session), not a CA certificate (RFC 5280 4.2.1.9), EKU present and containing
    clientAuth (RFC 5280 4.2.1.12), exactly one ``spiffe://<trust_domain>/node/<name>`` URI SAN,
    and that name among ``allow``.

    Args:
        der: the peer's certificate (``SSLObject.getpeercert(binary_form=True)``), already
            verified by OpenSSL against our trust anchor.
        trust_domain: the SPIFFE trust domain of node identities.
        revoked: ``(issuer name DER, serial)`` pairs from the current CRL.
        allow: lower-case node names let through; None lets every node through.

    Raises:
        PeerRejected: with ``reason`` ``no client certificate``, ``revoked``, ``wrong purpose``,
            ``CA certificate as client``, ``no node identity`` or ``not allowed``; ``node`` is
            set once the identity is known.
    """
    if not der:
        raise PeerRejected("no client certificate", "the client sent no certificate")
    found = _examine(der, trust_domain)
    if (found.issuer, found.serial) in revoked:
        raise PeerRejected("revoked", f"serial {found.serial:x} is on the CRL", node=found.claimed, serial=found.serial)
    if found.problem is not None:
        raise PeerRejected(*found.problem, node=found.claimed, serial=found.serial)
    if allow is not None and found.claimed not in allow:
        raise PeerRejected("not allowed", f"node {found.claimed} (serial {found.serial:x}) is not in listener.allow",
                           node=found.claimed, serial=found.serial)
    assert found.claimed is not None, "no problem: exactly one node identity"
    return PeerIdentity(found.claimed, found.serial, found.not_after, found.issuer)


@dataclasses.dataclass(frozen=True)
class _Examined:
    """What a certificate's bytes say, independent of the CRL and the allow list of the moment."""

    serial: int
    issuer: bytes
    not_after: dt.datetime
    claimed: str | None  # the node name if exactly one, else the CN (for the log)
    problem: tuple[str, str] | None  # (reason, detail) of the first static rule it breaks


# Nodes reconnect with the same certificate: parsing it once saves ~50 us per handshake. The
# result is a pure function of the bytes OpenSSL verified, so caching cannot change a decision.
@functools.lru_cache(maxsize=4096)
def _examine(der: bytes, trust_domain: str) -> _Examined:
    cert = x509.load_der_x509_certificate(der)
    serial = cert.serial_number
    prefix = f"spiffe://{trust_domain}/node/"
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    names = [u[len(prefix):] for u in uris if u.startswith(prefix)]
    one = len(names) == 1 and bool(names[0])
    claimed = names[0].lower() if one else _common_name(cert)
    problem = None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if is_ca:
        problem = ("CA certificate as client", f"serial {serial:x} is a CA certificate (basicConstraints CA:TRUE)")
    elif eku is None:
        problem = ("wrong purpose", f"serial {serial:x} has no extended key usage; want clientAuth")
    elif ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        problem = ("wrong purpose", f"serial {serial:x} is not for clientAuth")
    elif not names and ExtendedKeyUsageOID.SERVER_AUTH in eku:
        # A gateway's certificate is for clientAuth too (it renews over EST), never a node's.
        problem = ("no node identity", f"serial {serial:x} (CN={claimed}) is a server certificate with no identity under "
                                       f"{prefix}: a gateway's certificate does not authenticate a node")
    elif not one:
        problem = ("no node identity", f"serial {serial:x} carries {len(names)} identities under {prefix}; want exactly one")
    return _Examined(serial, cert.issuer.public_bytes(), cert.not_valid_after_utc, claimed, problem)


def _common_name(cert: x509.Certificate) -> str | None:
    """The subject CN, shown as the claimed identity of a certificate without a node identity."""
    values = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


@dataclasses.dataclass(frozen=True)
class Authorizer:
    """The gateway's authorization rules, bound to a trust domain and an allow list.

    Attributes:
        trust_domain: the SPIFFE trust domain of node identities.
        allow: lower-case node names let through; None lets every node of the CA through.
    """

    trust_domain: str
    allow: frozenset[str] | None

    def check(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, revoked: frozenset[tuple[bytes, int]] = frozenset()) -> PeerIdentity:
        """Authorize the peer of a completed server-side handshake (see :func:`authorize_client`).

        Raises:
            PeerRejected: the peer fails a rule; ``reason`` says which.
        """
        return authorize_client(ssl_object.getpeercert(binary_form=True), self.trust_domain, revoked, self.allow)
