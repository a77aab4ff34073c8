"""The CRL profile (RFC 5280 section 5): reason names, signing a CRL, reading CRLs back, and
finding the CA that signed one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from .errors import PolicyError, StoreError
from .file_errors import parse_crls

if TYPE_CHECKING:
    from .inventory import Record

__all__ = ["REASONS", "CRL_FIX", "parse_reason", "build_crl", "crl_due", "load_crls", "crls_from_pem", "revoked_serials", "signed_by",
           "crl_number", "issuer_of"]

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


CRL_FIX = ("on the CA host 'pkictl sign-crl' writes a fresh <CA home>/crl.pem; a gateway's copy comes from there "
           "(copy it again, or let its agent fetch it with renewal.ca_url)")
"""What restores a damaged ``crl.pem``."""


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Read every CRL of a PEM file (one per issuing CA during a rotation).

    Raises:
        StoreError: the file is missing or holds no PEM CRL (empty, truncated, a certificate
            instead...); the message names the file, the defect and the fix.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: no CRL file; on the CA host it is <home>/crl.pem") from None
    return parse_crls(data, source=str(path), fix=CRL_FIX)


def crls_from_pem(data: bytes, *, source: str) -> list[x509.CertificateRevocationList]:
    """Every CRL of PEM ``data`` (from ``source``, named in errors).

    Raises:
        StoreError: a block is not a CRL, or there is none.
    """
    return parse_crls(data, source=source)


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


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL number of ``crl`` (RFC 5280 5.2.3), or None for a CRL without one."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def issuer_of(crl: x509.CertificateRevocationList, certificates: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The certificate among ``certificates`` whose subject is the CRL's issuer, preferring the
    one whose subject key identifier is the CRL's authority key identifier (RFC 5280 5.2.1: it
    tells CA generations with one name apart); None if no subject matches. The signature is not
    checked here (:func:`signed_by` does)."""
    named = [c for c in certificates if c.subject == crl.issuer]
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    for cert in named:
        try:
            if aki is not None and cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == aki:
                return cert
        except x509.ExtensionNotFound:
            continue
    return named[0] if named else None
