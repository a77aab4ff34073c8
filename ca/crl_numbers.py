"""CRL numbers only grow (RFC 5280 5.2.3): the CRLs a file holds per issuer, and refusing a file
with an older one than the CRL in service, so that a replayed CRL cannot let revoked clients back.

A CRL is identified by its issuer name and authority key identifier (two CA generations with one
name are two issuers). For each, a newer file must hold a higher CRL number, or the very same CRL
(byte for byte: the root's CRL is carried along unchanged while the issuing CAs' are re-signed).
The same number with other content is refused too: a CRL number names one CRL, so two differing
CRLs under it mean one of them is not what the CA published in that order (docs/design.md, "CRLs
for every level of the chain"). An issuer missing from the newer file is no rollback (a retired
issuing CA's CRL may lapse); its number is remembered in case its CRL comes back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .crl import crl_number
from .errors import CRLRollbackError

__all__ = ["CRLKey", "HeldCRL", "crl_key", "held_crls", "refuse_older"]

CRLKey = tuple[bytes, bytes | None]  # (issuer name DER, authority key identifier or None)


@dataclasses.dataclass(frozen=True)
class HeldCRL:
    """The CRL of one issuer in service.

    Attributes:
        issuer: its issuer name (RFC 4514), for messages.
        number: its CRL number.
        sha256: the SHA-256 of its DER.
    """

    issuer: str
    number: int
    sha256: bytes


def crl_key(crl: x509.CertificateRevocationList) -> CRLKey:
    """Whose CRL ``crl`` is: its issuer name (DER) and authority key identifier (RFC 5280 5.2.1)."""
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    return crl.issuer.public_bytes(), aki


def held_crls(crls: Iterable[x509.CertificateRevocationList]) -> dict[CRLKey, HeldCRL]:
    """The highest-numbered CRL of each issuer among ``crls`` (CRLs without a number are left out:
    nothing orders them)."""
    held: dict[CRLKey, HeldCRL] = {}
    for crl in crls:
        number = crl_number(crl)
        if number is None:
            continue
        key = crl_key(crl)
        if key not in held or number > held[key].number:
            held[key] = HeldCRL(crl.issuer.rfc4514_string(), number, hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).digest())
    return held


def refuse_older(held: Mapping[CRLKey, HeldCRL], offered: Iterable[x509.CertificateRevocationList], *,
                 source: str) -> dict[CRLKey, HeldCRL]:
    """Check the CRLs ``offered`` (from ``source``, named in the error) against those ``held``.

    Args:
        held: the CRLs in service, as :func:`held_crls` or an earlier call returned them.
        offered: the CRLs of the file that would replace them.

    Returns:
        What is held once ``offered`` is in service: its CRLs, and the held ones of issuers it lacks.

    Raises:
        CRLRollbackError: for some issuer, ``offered`` has a lower CRL number than ``held``, or the
            same number with other content (RFC 5280 5.2.3).
    """
    newer = held_crls(offered)
    for key, new in newer.items():
        old = held.get(key)
        if old is None or new.number > old.number or (new.number == old.number and new.sha256 == old.sha256):
            continue
        if new.number < old.number:
            what = f"has CRL number {new.number}, lower than {old.number} in service (RFC 5280 5.2.3: an older CRL replayed?)"
        else:
            what = (f"has CRL number {new.number} like the one in service but other content (a CRL number names one CRL, "
                    "RFC 5280 5.2.3)")
        raise CRLRollbackError(f"{source}: the CRL of {new.issuer} {what}; refused, the CRL in service is kept")
    return {**held, **newer}
