"""Revocation: revoking end-entity certificates and signing the CRLs that crl.pem publishes.

The CRL profile itself is :mod:`pkictl.crl` (re-exported here); the root's CRL, signed only where
the root key is, is :mod:`pkictl.root_crl`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .activation import issuer_dirs
from .audit import audits_refusals
from .crl import REASONS, build_crl, crl_due, crl_number, crls_from_pem, load_crls, parse_reason, revoked_serials, signed_by
from .errors import NotEnrolledError, PKIError, PolicyError
from .files import atomic_write, read_ca_key_file
from .inventory import Record
from .keys import load_private_key
from .names import validate_name
from .root_crl import load_root_key, read_root_crl, root_crl_due, root_key_path, sign_root_crl

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    from .audit import AuditLog
    from .clock import Clock
    from .inventory import Inventory
    from .settings import CASettings

__all__ = ["REASONS", "parse_reason", "build_crl", "crl_due", "load_crls", "crls_from_pem", "revoked_serials", "signed_by",
           "Revocation", "RevocationHost"]


def _older(new: bytes, current: bytes) -> bool:
    """Whether ``new`` holds, for some issuer, a lower CRL number than ``current`` (both PEM)."""
    try:
        held = {crl.issuer: crl_number(crl) for crl in crls_from_pem(current, source="crl.pem")}
    except PKIError:
        return False  # a damaged file is replaced
    return any((number := held.get(crl.issuer)) is not None and (crl_number(crl) or 0) < number
               for crl in crls_from_pem(new, source="the CA database"))


class RevocationHost(Protocol):
    """What :class:`Revocation` uses of the CA it serves (:class:`pkictl.authority.CertificateAuthority`)."""

    home: Path
    clock: Clock
    settings: CASettings
    audit: AuditLog
    root: x509.Certificate
    issuing: x509.Certificate

    @property
    def issuing_key(self) -> CertificateIssuerPrivateKeyTypes: ...

    @property
    def passphrase(self) -> bytes | None: ...

    @property
    def inventory(self) -> Inventory: ...

    def refresh_issuing(self) -> bool: ...


class Revocation:
    """Revocation and CRL signing for one CA: revoking end-entity certificates, and the CRLs of
    every issuing CA and the root that crl.pem publishes (RFC 5280 section 5).

    Args:
        ca: the CA whose inventory, keys and home it works on.
    """

    def __init__(self, ca: RevocationHost) -> None:
        self._ca = ca

    @property
    def audit(self) -> AuditLog:
        return self._ca.audit

    def find_revocable(self, target: str) -> list[Record]:
        """The certificates ``pkictl revoke TARGET`` means: a serial number (hex, colons and a
        ``0x`` prefix allowed) or a name (all its unexpired, unrevoked end-entity certificates).

        Raises:
            NotEnrolledError: nothing matches.
            PolicyError: the target is a CA certificate (revoke those on the root's CRL, by
                rotating the CA).
        """
        text = target.strip().lower().removeprefix("0x").replace(":", "")
        record = None
        if text and all(c in "0123456789abcdef" for c in text):
            record = self._ca.inventory.get(int(text, 16))
        if record is not None:
            if record.kind not in ("node", "gateway", "service", "operator"):
                raise PolicyError(f"serial {record.serial:x} is the {record.kind} CA certificate; pkictl revokes end-entity certificates only")
            if record.status != "issued":
                raise PolicyError(f"serial {record.serial:x} is {record.status}, not an issued certificate")
            return [record]
        try:
            validate_name(target)
        except PKIError:
            raise NotEnrolledError(f"{target!r} is neither a known serial number nor a node or gateway name") from None
        records = self._ca.inventory.unexpired(target, ["node", "gateway", "service", "operator"], self._ca.clock.now())
        if not records:
            raise NotEnrolledError(f"no unexpired, unrevoked certificate of {target} in the inventory of {self._ca.home}")
        return records

    @audits_refusals("revoke")
    def revoke(self, target: str, *, reason: str = "unspecified", by: str | None = None) -> list[Record]:
        """Revoke what :meth:`find_revocable` finds for ``target`` and re-sign the CRL.

        Args:
            target: a serial number (hex) or a node or gateway name.
            reason: a name from :data:`pkictl.revocation.REASONS` (RFC 5280 5.3.1).
            by: the operator who revoked (the admin page's), recorded in the audit log as ``operator``.

        Returns:
            The records revoked (as they were before).

        Raises:
            PolicyError: unknown reason, or a CA certificate.
            NotEnrolledError: nothing to revoke.
        """
        reason = parse_reason(reason)
        records = self.find_revocable(target)
        self.revoke_records(records, reason=reason, by=by)
        return records

    def revoke_superseded(self) -> list[Record]:
        """Revoke, with reason superseded (RFC 5280 5.3.1), every certificate renewed or replaced
        more than ``superseded_grace`` ago, and publish the CRL: one identity, one certificate
        that opens anything. The grace gives the host time to install the successor and its
        software to reload; connections open with the predecessor are not closed by it.

        Returns:
            The records revoked (empty: nothing was due, no CRL written).
        """
        due = self._ca.inventory.superseded_due(self._ca.clock.now(), self._ca.settings.superseded_grace)
        if due:
            self.revoke_records(due, reason="superseded")
        return due

    def revoke_records(self, records: Sequence[Record], *, reason: str, by: str | None = None) -> None:
        """Mark ``records`` revoked now and publish a new CRL (``by``: the operator, as :meth:`revoke`)."""
        self._ca.inventory.revoke([r.serial for r in records], at=self._ca.clock.now(), reason=reason)
        self._ca.audit.append("revoked", serials=[r.serial for r in records], names=sorted({r.name for r in records}), reason=reason,
                              **({"operator": by} if by else {}))
        self.sign_crl()

    @property
    def crl_path(self) -> Path:
        return self._ca.home / "crl.pem"

    def retired_issuers(self) -> list[x509.Certificate]:
        """Issuing CA certificates replaced by ``rotate-issuing`` (in ``<home>/retired/``)."""
        retired = self._ca.home / "retired"
        if not retired.is_dir():
            return []
        return [x509.load_pem_x509_certificate((d / "cert.pem").read_bytes()) for d in sorted(retired.iterdir()) if (d / "cert.pem").exists()]

    def _crl_signers(self, now: dt.datetime) -> list[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]]:
        """The current issuing CA, the pending one (its empty CRL published before it issues:
        pkictl.activation), and each retired one while a certificate it signed is unexpired: with
        CRL checking on, a gateway needs the CRL of every leaf's issuer (VERIFY_CRL_CHECK_LEAF).
        Read from disk under the issuing lock, so that a promotion by another process cannot
        leave a CA out."""
        self._ca.refresh_issuing()
        signers: list[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]] = []
        with issuer_dirs(self._ca.home) as found:
            for role, cert, directory in found:
                if any(cert.serial_number == c.serial_number for c, _ in signers):
                    continue
                if role == "retired" and not self._ca.inventory.has_unexpired(cert.serial_number, now):
                    self._ca.inventory.forget_crl(cert.serial_number)  # nothing left to revoke: its CRL may lapse
                    continue
                if cert.serial_number == self._ca.issuing.serial_number:
                    key = self._ca.issuing_key
                else:
                    path = directory / "key.pem"
                    key = load_private_key(read_ca_key_file(path), self._ca.passphrase, source=str(path))
                signers.append((cert, key))
        return signers

    def sign_crl(self) -> list[x509.CertificateRevocationList]:
        """Sign a new CRL for each active issuing CA and write them all to ``<home>/crl.pem``
        atomically (one file, one CRL per issuer, each with its own AKI and CRL number), with the
        root's last CRL after them, unchanged (:mod:`pkictl.root_crl`: servers that check every
        level of the chain need it, and its key is offline).

        Returns:
            The issuing CAs' CRLs just signed (not the root's, which is carried along).
        """
        now = self._ca.clock.now()
        signers = self._crl_signers(now)
        crls = []
        for issuer, key in signers:
            cn = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            number = self._ca.inventory.next_crl_number(issuer.serial_number, str(cn))
            crls.append(build_crl(
                issuer=issuer, issuer_key=key, number=number, now=now,
                revoked=self._ca.inventory.revoked(issuer.serial_number, now), lifetime=self._ca.settings.crl_lifetime,
            ))
        shared = self._ca.inventory.engine != "sqlite"
        if not shared:
            root_crl = read_root_crl(self._ca.home, self._ca.root)
            published = [*crls, *([root_crl] if root_crl is not None else [])]
            atomic_write(self.crl_path, b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in published))
        for (issuer, _), crl in zip(signers, crls, strict=True):
            signed_number = crl_number(crl)
            assert signed_number is not None and crl.next_update_utc is not None, "build_crl sets the CRL number and nextUpdate"
            self._ca.inventory.record_crl(issuer.serial_number, number=signed_number, this_update=crl.last_update_utc,
                                          next_update=crl.next_update_utc, pem=crl.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        if shared:
            # Written from the database after recording: a replica that signed a higher number
            # meanwhile wins, and crl.pem here never goes back to a lower one.
            self.publish()
        return crls

    def publish(self, inventory: Inventory | None = None) -> bool:
        """Replicas on one database: write ``<home>/crl.pem`` from the newest CRLs the database
        holds (:meth:`pkictl.inventory.Inventory.published_crls`) when they differ from the
        file, so that a revocation made through any replica is in every replica's CRL. ``pkictl
        serve`` calls it every ``follow_interval`` seconds. A CA on SQLite writes crl.pem when it
        signs, and this does nothing there.

        Args:
            inventory: read this one instead of the CA's (``pkictl serve`` follows on a thread of
                its own, with its own connection, so that a database away stalls no request).

        Returns:
            True if crl.pem was written.
        """
        inventory = inventory if inventory is not None else self._ca.inventory
        if inventory.engine == "sqlite":
            return False
        rows = inventory.published_crls()
        if not rows:
            return False
        data = "".join(pem for _, _, pem in rows).encode("ascii")
        try:
            current = self.crl_path.read_bytes()
        except FileNotFoundError:
            current = b""
        if current == data:
            return False
        if current and _older(data, current):
            return False  # read before a CRL this process signed meanwhile: the next follow catches up
        atomic_write(self.crl_path, data)
        return True

    def sign_root_crl(self, root_key: CertificateIssuerPrivateKeyTypes | None = None) -> x509.CertificateRevocationList:
        """Sign the root's next CRL (:func:`pkictl.root_crl.sign_root_crl`, ``root_crl_lifetime``)
        and publish it in crl.pem with fresh CRLs of the issuing CAs (:meth:`sign_crl`).

        Args:
            root_key: the root's private key if the caller holds it (init-ca, rotate-issuing);
                None reads it from ``<home>/root/key.pem``.

        Raises:
            PKIError: the root key is not in the CA home (it is kept offline), or does not open.
        """
        key = root_key if root_key is not None else load_root_key(self._ca.home, self._ca.passphrase, command="sign-crl --root")
        crl = sign_root_crl(home=self._ca.home, root=self._ca.root, root_key=key, inventory=self._ca.inventory,
                            now=self._ca.clock.now(), lifetime=self._ca.settings.root_crl_lifetime)
        self._ca.audit.append("root-crl-signed", number=crl_number(crl), revoked=len(crl), next_update=crl.next_update_utc)
        self.sign_crl()
        return crl

    def refresh_crl(self) -> bool:
        """Revoke the predecessors whose grace has passed (:meth:`revoke_superseded`), re-sign
        the issuing CAs' CRLs when half of their validity has passed (or crl.pem is missing), and
        the root's likewise when the root key is in the CA home (otherwise ``pkictl status`` and
        ``pkictl doctor`` say when ``pkictl sign-crl --root`` is needed).

        Returns:
            True if a new CRL was written.

        Raises:
            PKIError: the root's CRL was due and its key present, but it did not open (the issuing
                CAs' CRLs were refreshed first).
        """
        written = bool(self.revoke_superseded())
        now = self._ca.clock.now()
        due = any(crl_due(this_update, next_update, now)
                  for issuer, _, _, this_update, next_update in self._ca.inventory.crls() if issuer != self._ca.root.serial_number)
        # A replica whose crl.pem is missing takes the database's CRLs when they are not due.
        if not written and (due or (not self.crl_path.exists() and not self.publish())):
            self.sign_crl()
            written = True
        if root_key_path(self._ca.home).exists() and root_crl_due(self._ca.home, self._ca.root, now):
            self.sign_root_crl()
            written = True
        return written
