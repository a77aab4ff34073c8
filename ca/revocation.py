"""Revocation: reason names, the CRL profile (RFC 5280 section 5), and reading CRLs back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from .audit import audits_refusals
from .errors import NotEnrolledError, PKIError, PolicyError, StoreError
from .files import atomic_write, read_ca_key_file
from .inventory import Record
from .keys import load_private_key
from .names import validate_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    from .audit import AuditLog
    from .clock import Clock
    from .inventory import Inventory
    from .settings import CASettings

__all__ = ["REASONS", "parse_reason", "build_crl", "crl_due", "load_crls", "crls_from_pem", "revoked_serials", "signed_by", "Revocation"]

# RFC 5280 5.3.1 CRLReason values an operator may give (certificateHold is deliberately absent:
# a hold can be lifted, which makes "revoked" ambiguous; cACompromise belongs on the root's CRL).
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def parse_reason(text: str) -> str:
    """Normalise a reason name (``key-compromise``, ``keyCompromise`` or ``key_compromise``).

    Raises:
        PolicyError: not one of :data:`REASONS`.
    """
    key = "".join("-" + c.lower() if c.isupper() else c for c in text).replace("_", "-").strip("-")
    if key not in REASONS:
        raise PolicyError(f"revocation reason {text!r}: want one of {', '.join(REASONS)} (RFC 5280 5.3.1)")
    return key


def build_crl(
    *,
    issuer: x509.Certificate,
    issuer_key,
    revoked: Iterable[Record],
    number: int,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.CertificateRevocationList:
    """Sign a CRL for ``issuer`` (RFC 5280 section 5).

    thisUpdate is backdated like certificates (min(5 min, lifetime / 10)) for clock skew;
    nextUpdate = now + lifetime. Extensions: AKI (RFC 5280 5.2.1, needed to tell CA generations
    apart) and CRL number (5.2.3). Each entry carries its revocation date and, unless it is
    ``unspecified``, a reasonCode (5.3.1: unspecified SHOULD be left out).
    """
    backdate = min(dt.timedelta(minutes=5), lifetime / 10)
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update((now - backdate).replace(microsecond=0))
        .next_update((now + lifetime).replace(microsecond=0))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for record in revoked:
        assert record.revoked_at is not None
        entry = x509.RevokedCertificateBuilder().serial_number(record.serial).revocation_date(record.revoked_at)
        reason = record.revocation_reason or "unspecified"
        if reason != "unspecified":
            entry = entry.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, hashes.SHA256())


def crl_due(this_update: dt.datetime, next_update: dt.datetime, now: dt.datetime) -> bool:
    """True once half of the CRL's validity has passed: re-sign well before nextUpdate, because
    with CRL checking on, an expired CRL rejects every client (docs/design.md)."""
    return now >= this_update + (next_update - this_update) / 2


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Read every CRL of a PEM file (one per issuing CA during a rotation).

    Raises:
        StoreError: the file is missing or holds no PEM CRL.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: no CRL file; on the CA host it is <home>/crl.pem") from None
    return crls_from_pem(data, source=str(path))


def crls_from_pem(data: bytes, *, source: str) -> list[x509.CertificateRevocationList]:
    """Every CRL of PEM ``data`` (from ``source``, named in errors).

    Raises:
        StoreError: a block is not a CRL, or there is none.
    """
    crls = []
    marker = b"-----BEGIN X509 CRL-----"
    for chunk in data.split(marker)[1:]:
        try:
            crls.append(x509.load_pem_x509_crl(marker + chunk))
        except ValueError as exc:
            raise StoreError(f"{source}: not a PEM CRL ({exc})") from None
    if not crls:
        raise StoreError(f"{source}: holds no PEM CRL (-----BEGIN X509 CRL-----)")
    return crls


def revoked_serials(crls: Sequence[x509.CertificateRevocationList], *, reason: x509.ReasonFlags | None = None) -> frozenset[tuple[bytes, int]]:
    """``(issuer name DER, serial)`` of every entry (a serial number is unique only per issuer),
    or only of the entries with ``reason`` (RFC 5280 5.3.1; an entry without one is unspecified)."""
    return frozenset((crl.issuer.public_bytes(), entry.serial_number) for crl in crls for entry in crl
                     if reason is None or _reason(entry) == reason)


# Key types that sign: a certificate may hold one that cannot (X25519, X448), which no CRL verifies with.
_SIGNING_KEYS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey, dsa.DSAPublicKey)


def signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """True if the key of ``issuer`` verifies the signature of ``crl`` (False for a key that cannot sign)."""
    key = issuer.public_key()
    return isinstance(key, _SIGNING_KEYS) and crl.is_signature_valid(key)


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified


class Revocation:
    """Revocation and CRL signing of :class:`pkictl.authority.CertificateAuthority` (its base
    class; kept here with the CRL profile). Uses the CA's ``home``, ``clock``, ``settings``,
    ``inventory``, ``audit``, ``issuing`` and issuing key."""

    if TYPE_CHECKING:  # what this class uses of CertificateAuthority, which sets or defines each
        home: Path
        clock: Clock
        settings: CASettings
        audit: AuditLog
        issuing: x509.Certificate
        _issuing_key: CertificateIssuerPrivateKeyTypes
        _passphrase: bytes | None

        @property
        def inventory(self) -> Inventory: ...

        def refresh_issuing(self) -> bool: ...

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
            record = self.inventory.get(int(text, 16))
        if record is not None:
            if record.kind not in ("node", "gateway", "service"):
                raise PolicyError(f"serial {record.serial:x} is the {record.kind} CA certificate; pkictl revokes end-entity certificates only")
            if record.status != "issued":
                raise PolicyError(f"serial {record.serial:x} is {record.status}, not an issued certificate")
            return [record]
        try:
            validate_name(target)
        except PKIError:
            raise NotEnrolledError(f"{target!r} is neither a known serial number nor a node or gateway name") from None
        records = self.inventory.unexpired(target, ["node", "gateway", "service"], self.clock.now())
        if not records:
            raise NotEnrolledError(f"no unexpired, unrevoked certificate of {target} in the inventory of {self.home}")
        return records

    @audits_refusals("revoke")
    def revoke(self, target: str, *, reason: str = "unspecified") -> list[Record]:
        """Revoke what :meth:`find_revocable` finds for ``target`` and re-sign the CRL.

        Args:
            target: a serial number (hex) or a node or gateway name.
            reason: a name from :data:`pkictl.revocation.REASONS` (RFC 5280 5.3.1).

        Returns:
            The records revoked (as they were before).

        Raises:
            PolicyError: unknown reason, or a CA certificate.
            NotEnrolledError: nothing to revoke.
        """
        reason = parse_reason(reason)
        records = self.find_revocable(target)
        self.revoke_records(records, reason=reason)
        return records

    def revoke_superseded(self) -> list[Record]:
        """Revoke, with reason superseded (RFC 5280 5.3.1), every certificate renewed or replaced
        more than ``superseded_grace`` ago, and publish the CRL: one identity, one certificate
        that opens anything. The grace gives the host time to install the successor and its
        software to reload; connections open with the predecessor are not closed by it.

        Returns:
            The records revoked (empty: nothing was due, no CRL written).
        """
        due = self.inventory.superseded_due(self.clock.now(), self.settings.superseded_grace)
        if due:
            self.revoke_records(due, reason="superseded")
        return due

    def revoke_records(self, records: Sequence[Record], *, reason: str) -> None:
        """Mark ``records`` revoked now and publish a new CRL."""
        self.inventory.revoke([r.serial for r in records], at=self.clock.now(), reason=reason)
        self.audit.append("revoked", serials=[r.serial for r in records], names=sorted({r.name for r in records}), reason=reason)
        self.sign_crl()

    @property
    def crl_path(self) -> Path:
        return self.home / "crl.pem"

    def retired_issuers(self) -> list[x509.Certificate]:
        """Issuing CA certificates replaced by ``rotate-issuing`` (in ``<home>/retired/``)."""
        retired = self.home / "retired"
        if not retired.is_dir():
            return []
        return [x509.load_pem_x509_certificate((d / "cert.pem").read_bytes()) for d in sorted(retired.iterdir()) if (d / "cert.pem").exists()]

    def _crl_signers(self, now: dt.datetime) -> list[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]]:
        """The current issuing CA, the pending one (its empty CRL published before it issues:
        pkictl.activation), and each retired one while a certificate it signed is unexpired: with
        CRL checking on, a gateway needs the CRL of every leaf's issuer (VERIFY_CRL_CHECK_LEAF).
        Read from disk under the issuing lock, so that a promotion by another process cannot
        leave a CA out."""
        from .activation import issuer_dirs

        self.refresh_issuing()
        signers: list[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]] = []
        with issuer_dirs(self.home) as found:
            for role, cert, directory in found:
                if any(cert.serial_number == c.serial_number for c, _ in signers):
                    continue
                if role == "retired" and not self.inventory.has_unexpired(cert.serial_number, now):
                    self.inventory.forget_crl(cert.serial_number)  # nothing left to revoke: its CRL may lapse
                    continue
                if cert.serial_number == self.issuing.serial_number:
                    key = self._issuing_key
                else:
                    path = directory / "key.pem"
                    key = load_private_key(read_ca_key_file(path), self._passphrase, source=str(path))
                signers.append((cert, key))
        return signers

    def sign_crl(self) -> list[x509.CertificateRevocationList]:
        """Sign a new CRL for each active issuing CA and write them all to ``<home>/crl.pem``
        atomically (one file, one CRL per issuer, each with its own AKI and CRL number)."""
        now = self.clock.now()
        signers = self._crl_signers(now)
        crls = []
        for issuer, key in signers:
            cn = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            number = self.inventory.next_crl_number(issuer.serial_number, str(cn))
            crls.append(build_crl(
                issuer=issuer, issuer_key=key, number=number, now=now,
                revoked=self.inventory.revoked(issuer.serial_number, now), lifetime=self.settings.crl_lifetime,
            ))
        atomic_write(self.crl_path, b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls))
        for (issuer, _), crl in zip(signers, crls, strict=True):
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            assert crl.next_update_utc is not None, "build_crl sets nextUpdate"
            self.inventory.record_crl(issuer.serial_number, number=number, this_update=crl.last_update_utc, next_update=crl.next_update_utc)
        return crls

    def refresh_crl(self) -> bool:
        """Revoke the predecessors whose grace has passed (:meth:`revoke_superseded`), and re-sign
        the CRL when half of its validity has passed (or it is missing).

        Returns:
            True if a new CRL was written.
        """
        if self.revoke_superseded():
            return True
        now = self.clock.now()
        for _, _, this_update, next_update in self.inventory.crls():
            if not crl_due(this_update, next_update, now) and self.crl_path.exists():
                return False
        self.sign_crl()
        return True
