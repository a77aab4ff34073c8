"""Revocation: reason names, the CRL profile (RFC 5280 section 5), and reading CRLs back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .errors import PolicyError, StoreError
from .inventory import Record

__all__ = ["REASONS", "parse_reason", "build_crl", "crl_due", "load_crls", "revoked_serials"]

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
    with CRL checking on, an expired CRL rejects every client (DESIGN.md)."""
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
    crls = []
    marker = b"-----BEGIN X509 CRL-----"
    for chunk in data.split(marker)[1:]:
        try:
            crls.append(x509.load_pem_x509_crl(marker + chunk))
        except ValueError as exc:
            raise StoreError(f"{path}: not a PEM CRL ({exc})") from None
    if not crls:
        raise StoreError(f"{path}: holds no PEM CRL (-----BEGIN X509 CRL-----)")
    return crls


def revoked_serials(crls: Sequence[x509.CertificateRevocationList]) -> frozenset[tuple[bytes, int]]:
    """``(issuer name DER, serial)`` of every entry: a serial number is unique only per issuer."""
    return frozenset((crl.issuer.public_bytes(), entry.serial_number) for crl in crls for entry in crl)
