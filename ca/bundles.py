"""Enrollment on the CA host into a bundle directory: ``pkictl enroll-node`` and
``enroll-gateway`` make the key and write the credential the agent runs on; ``--csr`` certifies
a key made on the node (the private key never leaves it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from cryptography import x509

from .audit import audits_refusals
from .errors import StoreError
from .files import make_private_dir, write_new_file
from .names import validate_name
from .pem import certificates_to_pem
from .policy import check_enrollment_csr, parse_csr
from .profile import generate_key
from .settings import CASettings
from .store import Credential, CredentialStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

    from .audit import AuditLog
    from .clock import Clock
    from .inventory import Inventory
    from .revocation import Revocation

__all__ = ["BundleEnrollment", "BundleHost", "Enrollment"]


@dataclasses.dataclass(frozen=True)
class Enrollment:
    """What an enrollment produced: the certificate and the bundle directory written."""

    certificate: x509.Certificate
    directory: Path


class BundleHost(Protocol):
    """What :class:`BundleEnrollment` uses of the CA it serves (:class:`pkictl.authority.CertificateAuthority`)."""

    home: Path
    clock: Clock
    settings: CASettings
    audit: AuditLog

    @property
    def inventory(self) -> Inventory: ...

    @property
    def trust_anchors(self) -> list[x509.Certificate]: ...

    @property
    def chain(self) -> tuple[x509.Certificate, ...]: ...

    def issue(self, kind: str, name: str, public_key: CertificatePublicKeyTypes, *, dns_names: Sequence[str] = (),
              ip_addresses: Sequence[str] = (), first: bool = True, predecessor: x509.Certificate | None = None) -> x509.Certificate: ...


class BundleEnrollment:
    """First certificates issued on the CA host and written as bundle directories.

    Args:
        ca: the CA that issues them.
        revocation: revokes what a ``replace`` enrollment supersedes.
    """

    def __init__(self, ca: BundleHost, revocation: Revocation) -> None:
        self._ca = ca
        self._revocation = revocation

    @property
    def audit(self) -> AuditLog:
        return self._ca.audit

    @audits_refusals("enroll")
    def enroll(
        self,
        kind: str,
        name: str,
        *,
        out: Path | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        replace: bool = False,
    ) -> Enrollment:
        """Make a key, issue the first certificate for ``name`` and write its bundle directory.

        Args:
            out: bundle directory; default ``<home>/bundles/<name>``. Without ``replace`` it must
                not exist or be empty.
            replace: issue anew even though ``name`` holds a current certificate, then revoke the
                old one(s) as ``superseded``. An existing bundle in ``out`` gets the new
                credential as a new version (its ``live`` link moves; nothing is deleted).

        Raises:
            InvalidNameError, PolicyError, AlreadyEnrolledError: see :meth:`issue` (the name is
                checked before ``out``).
            StoreError: ``out`` exists and is not empty (checked before anything is issued).
        """
        validate_name(name)
        now = self._ca.clock.now()
        previous = self._ca.inventory.unexpired(name, [kind], now) if replace else []
        if not replace:
            # The name first: an operator told "directory not empty" would only hit this next.
            self._ca.inventory.check_available(kind, name, now)
        out = Path(out) if out is not None else self._ca.home / "bundles" / name
        store = CredentialStore(out)
        update_in_place = replace and store.live.is_symlink()
        if not update_in_place and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"{out} exists and is not empty; choose another --out directory")
        key = generate_key()
        certificate = self._ca.issue(kind, name, key.public_key(), dns_names=dns_names, ip_addresses=ip_addresses, first=not replace)
        credential = Credential(key, certificate, self._ca.chain)
        if update_in_place:
            store.install(credential)
            store.write_trust_anchors(self._ca.trust_anchors)
        else:
            CredentialStore.create(out, credential, self._ca.trust_anchors)
        if previous:
            self._revocation.revoke_records(previous, reason="superseded")
        return Enrollment(certificate, out)

    @audits_refusals("enroll-csr")
    def enroll_csr(self, name: str, csr: x509.CertificateSigningRequest | bytes, *, out: Path, replace: bool = False) -> Enrollment:
        """Certify the key of a CSR made on node ``name`` (the private key never leaves the node)
        and write ``cert.pem``, ``chain.pem``, ``fullchain.pem`` and ``ca.pem`` into ``out``.

        Args:
            name: the node name.
            csr: the CSR, parsed or as the file's bytes (:func:`pkictl.policy.parse_csr`: exactly one CSR).
            out: the directory to write; it must not exist or be empty.
            replace: issue although ``name`` holds a current certificate, then revoke it as superseded.

        Raises:
            InvalidNameError, PolicyError: see :func:`pkictl.policy.parse_csr` and
                :func:`pkictl.policy.check_enrollment_csr`.
            KeyReused: the CSR's key is a CA key or another identity's (``operator_message`` says whose).
            AlreadyEnrolledError: the name holds a current certificate and not ``replace``.
            StoreError: ``out`` exists and is not empty (checked before anything is issued).
        """
        validate_name(name)
        if isinstance(csr, bytes):
            csr = parse_csr(csr, source="the CSR")
        check_enrollment_csr(csr, name=name, trust_domain=self._ca.settings.trust_domain)
        now = self._ca.clock.now()
        previous = self._ca.inventory.unexpired(name, ["node"], now) if replace else []
        if not replace:
            self._ca.inventory.check_available("node", name, now)
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"{out} exists and is not empty; choose another --out directory")
        certificate = self._ca.issue("node", name, csr.public_key(), first=not replace)
        make_private_dir(out)
        write_new_file(out / "cert.pem", certificates_to_pem([certificate]))
        write_new_file(out / "chain.pem", certificates_to_pem(self._ca.chain))
        write_new_file(out / "fullchain.pem", certificates_to_pem([certificate, *self._ca.chain]))
        write_new_file(out / "ca.pem", certificates_to_pem(self._ca.trust_anchors))
        if previous:
            self._revocation.revoke_records(previous, reason="superseded")
        return Enrollment(certificate, out)
