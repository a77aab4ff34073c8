"""First enrollment over the network without a shared secret: one-time tokens and approval.

A token is a single-use secret bound to one name, shown once and stored only as its SHA-256;
it expires after minutes. Approval needs no secret at all: the node's request waits until an
operator approves the short code derived from the node's public key, which the node shows too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import TYPE_CHECKING, Protocol, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .audit import audits_refusals
from .errors import AccessDenied, AlreadyEnrolledError, AuthenticationError, NotEnrolledError, PendingApproval, PolicyError
from .est.wire import approval_code
from .names import validate_name
from .policy import check_enrollment_csr

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

    from .audit import AuditLog
    from .clock import Clock
    from .inventory import Inventory
    from .revocation import Revocation
    from .settings import CASettings

__all__ = ["Bootstrap", "DEFAULT_TOKEN_TTL", "EnrollmentHost"]

DEFAULT_TOKEN_TTL = dt.timedelta(minutes=10)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spki_sha256(csr: x509.CertificateSigningRequest) -> str:
    return _sha256(csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


class EnrollmentHost(Protocol):
    """What :class:`Bootstrap` uses of the CA it serves (:class:`pkictl.authority.CertificateAuthority`)."""

    clock: Clock
    settings: CASettings
    audit: AuditLog

    @property
    def inventory(self) -> Inventory: ...

    def issue(self, kind: str, name: str, public_key: CertificatePublicKeyTypes, *, dns_names: Sequence[str] = (),
              ip_addresses: Sequence[str] = (), first: bool = True, predecessor: x509.Certificate | None = None) -> x509.Certificate: ...


class Bootstrap:
    """First enrollment of nodes for one CA: single-use tokens and the operator's approval of a
    pairing request (RFC 7030 section 4.2.1 leaves how a first request is authorized to the CA).

    Args:
        ca: the CA that issues the certificates.
        revocation: revokes what a replacing enrollment supersedes.
    """

    def __init__(self, ca: EnrollmentHost, revocation: Revocation) -> None:
        self._ca = ca
        self._revocation = revocation

    @property
    def audit(self) -> AuditLog:
        return self._ca.audit

    def create_token(self, name: str, *, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, replace: bool = False) -> tuple[str, dt.datetime]:
        """A single-use enrollment token for node ``name``, valid for ``ttl``.

        Args:
            replace: the certificate the token gets may replace a current one of ``name``, which
                is then revoked as superseded (a node that lost its key, say).

        Returns:
            ``(token, expires_at)``; only the token's SHA-256 is stored.

        Raises:
            InvalidNameError: not a DNS label.
            AlreadyEnrolledError: the name holds a current certificate and not ``replace``.
        """
        validate_name(name)
        now = self._ca.clock.now()
        if not replace:
            self._ca.inventory.check_available("node", name, now)
        token = secrets.token_urlsafe(24)  # 192 bits
        expires = now + ttl
        self._ca.inventory.add_token(name, _sha256(token.encode()), now=now, expires_at=expires, replaces=replace)
        self._ca.audit.append("token-created", name=name, expires=expires, replaces=replace)
        return token, expires

    @audits_refusals("simpleenroll")
    def simple_enroll(self, csr: x509.CertificateSigningRequest, *, name: str | None, token: str | None, peer: str) -> x509.Certificate:
        """First enrollment of a node over EST (RFC 7030 4.2.1), authenticated by a token or by
        the operator's approval.

        Args:
            csr: the node's CSR; it contributes only its key (:func:`pkictl.policy.check_enrollment_csr`).
            name: the node name from HTTP authentication (with a token); without one, the CSR's CN.
            token: the one-time token, or None to ask for approval.
            peer: the client's address, shown to the operator.

        Returns:
            The node's certificate.

        Raises:
            PendingApproval: no token, and the operator has not approved (yet).
            RequestLimitError: no token, a new key, and too many requests wait already (for this
                name or in all: the settings pending_requests_per_name, pending_requests_total).
            AuthenticationError: the token is wrong, expired or spent.
            AccessDenied: the operator denied the request.
            PolicyError, InvalidNameError, AlreadyEnrolledError: the request breaks policy.
            KeyReused: the key is a CA key or another identity's; checked before a token is spent
                or a request recorded (its message does not say whose: the client is not yet known).
        """
        if name is None:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(cns) != 1:
                raise PolicyError("the CSR names no node: put CN=<node name> in its subject, or enroll with a token")
            name = str(cns[0].value)
        validate_name(name)
        check_enrollment_csr(csr, name=name, trust_domain=self._ca.settings.trust_domain)
        spki = _spki_sha256(csr)
        # Before anything is written or spent; issue() checks again in its transaction.
        self._ca.inventory.check_key_unused(spki, kind="node", name=name)
        now = self._ca.clock.now()
        if token is not None:
            digest = _sha256(token.encode())
            replaces = self._ca.inventory.token_replaces(name, digest, now)
            if replaces is None:
                raise AuthenticationError(f"the enrollment token for {name} is wrong, expired or already used: ask for a new one (pkictl enroll-node {name} --token)")
            if not replaces:  # checked before the token is spent, so that a refusal does not cost it
                try:
                    self._ca.inventory.check_available("node", name, now)
                except AlreadyEnrolledError as exc:
                    raise exc.with_fix(f"a token for it must say so: pkictl enroll-node {name} --token --replace") from None
            if not self._ca.inventory.consume_token(name, digest, now):
                raise AuthenticationError(f"the enrollment token for {name} was used meanwhile: ask for a new one (pkictl enroll-node {name} --token)")
            return self._issue_replacing(name, csr, now) if replaces else self._ca.issue("node", name, csr.public_key())
        settings = self._ca.settings
        request, created, expired = self._ca.inventory.request_approval(
            name=name, spki_sha256=spki, code=approval_code(csr.public_key()), peer=peer, now=now,
            per_name=settings.pending_requests_per_name, total=settings.pending_requests_total, ttl=settings.pending_request_ttl)
        for old in expired:
            self._ca.audit.append("approval-request-expired", name=old["name"], code=old["code"], peer=old["peer"])
        if created:
            self._ca.audit.append("approval-requested", name=name, code=request["code"], peer=peer)
        if request["name_key"] != name.lower():
            # Another node's request for this key, denied (a pending or approved one is refused above):
            # whose is not the client's to know.
            raise PolicyError(f"this key was already presented for another node; make a new key for {name}")
        if request["status"] == "pending":
            raise PendingApproval(name, request["code"])
        if request["status"] == "denied":
            raise AccessDenied(f"the operator denied the request of {name} (code {request['code']}): this key will not be "
                               "certified; a request with a new key waits for approval anew")
        if request["status"] == "issued":  # the answer to an earlier poll was lost: hand it out again
            record = self._ca.inventory.get(int(request["serial"], 16))
            assert record is not None, "an issued request's certificate is in the inventory"
            return x509.load_pem_x509_certificate(record.pem.encode())
        # The operator approved this key for this name: it replaces whatever the name holds.
        certificate = self._issue_replacing(name, csr, now)
        self._ca.inventory.request_issued(spki, certificate.serial_number)
        return certificate

    def _issue_replacing(self, name: str, csr: x509.CertificateSigningRequest, now: dt.datetime) -> x509.Certificate:
        """Issue node ``name`` a certificate for the key of ``csr`` and revoke the certificates it
        held until now as superseded (RFC 5280 5.3.1), so that an old key opens nothing."""
        previous = self._ca.inventory.unexpired(name, ["node"], now)
        certificate = self._ca.issue("node", name, csr.public_key(), first=not previous)
        if previous:
            self._revocation.revoke_records(previous, reason="superseded")
        return certificate

    def approve(self, name: str, *, code: str) -> list:
        """Approve node ``name``'s pending request whose key has approval ``code``.

        Returns:
            The :class:`pkictl.inventory.Record` of each current certificate of ``name`` that the
            new one replaces: they are revoked as superseded once it is issued (empty for a node
            without a valid certificate).

        Raises:
            NotEnrolledError: no pending request of ``name`` with that code.
        """
        validate_name(name)
        now = self._ca.clock.now()
        if self._ca.inventory.decide_request(name, code=code, status="approved", now=now) == 0:
            raise NotEnrolledError(f"no pending request from {name} with code {code}: see 'pkictl requests'")
        replaced = self._ca.inventory.unexpired(name, ["node"], now)
        self._ca.audit.append("approved", name=name, code=code.upper(), replaces=[f"{r.serial:x}" for r in replaced])
        return replaced

    def deny(self, name: str) -> int:
        """Deny every pending request of node ``name``; return how many.

        Raises:
            NotEnrolledError: none pending.
        """
        validate_name(name)
        count = self._ca.inventory.decide_request(name, code=None, status="denied", now=self._ca.clock.now())
        if count == 0:
            raise NotEnrolledError(f"no pending request from {name}: see 'pkictl requests'")
        self._ca.audit.append("denied", name=name, requests=count)
        return count
