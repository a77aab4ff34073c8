"""Renewal of an end-entity certificate over EST (RFC 7030 section 4.2.2): who may renew, and
the answer to a renewal of a certificate that was renewed already (docs/design.md, "One
identity, one live certificate")."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Protocol, Sequence

from cryptography import x509

from .audit import audits_refusals
from .errors import CertificateUnusable, PolicyError
from .inventory import Superseded
from .pem import issued_by, public_key_bytes
from .policy import check_csr_signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

    from .audit import AuditLog
    from .clock import Clock
    from .inventory import Inventory, Record

__all__ = ["Reenrollment", "ReenrollmentHost"]


class ReenrollmentHost(Protocol):
    """What :class:`Reenrollment` uses of the CA it serves (:class:`pkictl.authority.CertificateAuthority`)."""

    clock: Clock
    audit: AuditLog
    issuing: x509.Certificate

    @property
    def inventory(self) -> Inventory: ...

    def retired_issuers(self) -> list[x509.Certificate]: ...

    def issue(self, kind: str, name: str, public_key: CertificatePublicKeyTypes, *, dns_names: Sequence[str] = (),
              ip_addresses: Sequence[str] = (), first: bool = True, predecessor: x509.Certificate | None = None) -> x509.Certificate: ...


class Reenrollment:
    """``simple_reenroll`` for one CA: a certificate renews itself while it is valid, unrevoked
    and its identity's current one, with the subject and names it has.

    Args:
        ca: the CA that issues the successor.
    """

    def __init__(self, ca: ReenrollmentHost) -> None:
        self._ca = ca

    @property
    def audit(self) -> AuditLog:
        return self._ca.audit

    @audits_refusals("simple_reenroll")
    def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: x509.Certificate, *, rekey: bool = True) -> x509.Certificate:
        """Issue a successor to ``current`` for the key in ``csr`` (RFC 7030 section 4.2.2).

        Args:
            csr: the renewal request; its signature proves possession of the new key.
            current: the certificate being renewed; it authenticates the request.
            rekey: require a new key (the default; renewing with the same key is refused).

        Raises:
            CertificateUnusable: ``current`` was not issued by this CA, is not valid now, is
                revoked, or the inventory has no issued record of it (``reason`` says which).
            PolicyError: the CSR's signature is weak or invalid, its key unacceptable or reused,
                or its subject or subject alternative names differ from ``current`` (RFC 7030
                4.2.2: they MUST be identical).
            KeyReused: the new key is a CA key or another identity's.
        """
        now = self._ca.clock.now()
        serial = f"{current.serial_number:x}"
        if not any(issued_by(current, issuer) for issuer in (self._ca.issuing, *self._ca.retired_issuers())):
            raise CertificateUnusable(f"certificate serial {serial} (issuer {current.issuer.rfc4514_string()}) was not issued "
                                      "by this CA", reason="another CA")
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise CertificateUnusable(
                f"certificate serial {serial} is not valid now (valid {current.not_valid_before_utc.isoformat()} to "
                f"{current.not_valid_after_utc.isoformat()}): a certificate renews itself only while it is valid",
                reason="expired" if now > current.not_valid_after_utc else "not yet valid",
            )
        record = self._ca.inventory.get(current.serial_number)
        if record is not None and record.status == "revoked":
            raise CertificateUnusable(f"certificate serial {serial} is revoked ({record.revocation_reason}): a revoked "
                                      "certificate cannot renew", reason="revoked")
        if record is not None and record.kind == "operator":
            # A person's certificate for the admin page: it neither renews nor enrolls a node
            # (docs/design.md, "Operator certificates").
            raise CertificateUnusable(f"certificate serial {serial} is operator {record.name}'s: an operator certificate does not "
                                      f"renew over EST; run 'pkictl enroll-operator {record.name} --replace' on the CA host",
                                      reason="unknown")
        if record is None or record.status != "issued" or record.kind not in ("node", "gateway", "service"):
            raise CertificateUnusable(f"certificate serial {serial} is not in the inventory as an issued end entity", reason="unknown")
        check_csr_signature(csr)
        if csr.subject != current.subject:
            raise PolicyError(f"CSR subject {csr.subject.rfc4514_string()!r} differs from the current certificate's {current.subject.rfc4514_string()!r} (RFC 7030 4.2.2)")
        try:
            csr_sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            csr_sans = None
        current_sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if csr_sans != current_sans:
            got = [str(getattr(n, "value", n)) for n in csr_sans] if csr_sans is not None else []
            want = [str(getattr(n, "value", n)) for n in current_sans]
            raise PolicyError(f"CSR subject alternative names differ from the current certificate's: got {got}, want exactly "
                              f"{want} (RFC 7030 4.2.2)")
        if rekey and public_key_bytes(csr.public_key()) == public_key_bytes(current.public_key()):
            raise PolicyError("the CSR reuses the current key; a renewal needs a new key (rekey)")
        for _ in range(2):  # a lost race is answered as the winner's state says, on a second look
            if record.successor is not None or record.superseded:
                return self._renewed_already(record, csr)
            dns = [s[4:] for s in record.sans if s.startswith("DNS:")]
            ips = [s[3:] for s in record.sans if s.startswith("IP:")]
            try:
                return self._ca.issue(record.kind, record.name, csr.public_key(), dns_names=dns, ip_addresses=ips, first=False,
                                  predecessor=current)
            except Superseded:
                record = self._ca.inventory.get(current.serial_number) or record
        raise CertificateUnusable(f"certificate serial {serial} was renewed by a concurrent request", reason="superseded")

    def _renewed_already(self, record: Record, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """The answer to a renewal of a certificate that is no longer its identity's current one.

        The same request again (its key is the successor's: the first answer was lost) gets the
        successor once more, so a renewal can be retried; any other key is refused, so that a
        key stolen with an old certificate does not keep the identity, and concurrent renewals of
        one certificate fork nothing.

        Raises:
            CertificateUnusable: ``superseded``, naming the certificate that is current now.
        """
        successor = self._ca.inventory.get(record.successor) if record.successor is not None else None
        spki = hashlib.sha256(public_key_bytes(csr.public_key())).hexdigest()
        if successor is not None and successor.status == "issued" and successor.spki_sha256 == spki and not successor.superseded:
            return x509.load_pem_x509_certificate(successor.pem.encode())
        current = successor if successor is not None and not successor.superseded else self._ca.inventory.current(record.kind, record.name)
        by = f"serial {current.serial:x}" if current is not None else "a newer certificate"
        raise CertificateUnusable(f"certificate serial {record.serial:x} is superseded by {by}: only the current certificate "
                                  f"of {record.kind} {record.name} renews", reason="superseded")
