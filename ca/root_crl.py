"""The root's CRL: long-lived, signed only where the root key is, published in crl.pem beside
the issuing CAs' CRLs (docs/design.md, "CRLs for every level of the chain").

Servers that check the CRL of every certificate in the chain (OpenSSL's X509_V_FLAG_CRL_CHECK_ALL:
nginx ``ssl_crl``, haproxy ``crl-file``) refuse every client unless crl.pem also holds a CRL
from the root, the issuer of the issuing CA. The root key is normally offline, so this CRL
lives ``root_crl_lifetime`` (365 days by default), is signed at ``init-ca``, ``rotate-issuing``
and ``sign-crl --root``, kept in ``<home>/root/crl.pem`` and carried along unchanged whenever
the issuing CAs' CRLs are re-signed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .crl import build_crl, crl_due, crls_from_pem
from .errors import PKIError, StoreError
from .files import atomic_write, read_ca_key_file
from .keys import load_private_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    from .inventory import Inventory

__all__ = ["root_crl_path", "root_key_path", "read_root_crl", "load_root_key", "sign_root_crl", "root_crl_due", "root_crl_fix"]


def root_crl_fix(home: Path | str) -> str:
    """What re-signs the root's CRL: the operator, with the root key back for one command."""
    return f"bring the root key back to {root_key_path(Path(home))} and run pkictl sign-crl --root, then move the key offline again"


def root_crl_path(home: Path) -> Path:
    """``<home>/root/crl.pem``: the last CRL the root signed (PEM)."""
    return Path(home) / "root" / "crl.pem"


def root_key_path(home: Path) -> Path:
    """``<home>/root/key.pem``: present only while the operator has brought the root key back."""
    return Path(home) / "root" / "key.pem"


def read_root_crl(home: Path, root: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The root's last CRL from ``<home>/root/crl.pem``, or None if there is none (a CA made
    before pkictl signed root CRLs) or it is unreadable or not the root's (the doctor reports a
    crl.pem without a root CRL; the issuing CAs' CRLs must be re-signed regardless)."""
    try:
        crls = crls_from_pem(root_crl_path(home).read_bytes(), source=str(root_crl_path(home)))
    except (OSError, StoreError):
        return None
    return next((c for c in crls if c.issuer == root.subject), None)


def load_root_key(home: Path, passphrase: bytes | None, *, command: str) -> CertificateIssuerPrivateKeyTypes:
    """Open the root key for ``command`` (named in the error).

    Raises:
        PKIError: the key is not at ``<home>/root/key.pem`` (it is kept offline: bring it back
            for this command), or it does not open.
        KeyProtectionError: the key or its directory is open to others.
    """
    path = root_key_path(home)
    if not path.exists():
        raise PKIError(f"{command} needs the root key at {path}: bring it back from offline storage for this command, "
                       "then move it away again")
    return load_private_key(read_ca_key_file(path), passphrase, source=str(path))


def sign_root_crl(*, home: Path, root: x509.Certificate, root_key: CertificateIssuerPrivateKeyTypes, inventory: Inventory,
                  now: dt.datetime, lifetime: dt.timedelta) -> x509.CertificateRevocationList:
    """Sign the root's next CRL and write it to ``<home>/root/crl.pem`` atomically.

    It lists the revoked, unexpired certificates the root signed (issuing CAs; empty unless one
    was revoked) and takes the next CRL number of the root's row in the ``crls`` table (RFC 5280
    5.2.3: per issuer, it only grows). Publishing it in crl.pem is the caller's next step.

    Args:
        root: the root certificate; ``root_key`` its private key.
        now: aware UTC; ``lifetime``: nextUpdate - now (``root_crl_lifetime``).

    Returns:
        The CRL written.
    """
    cn = str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    number = inventory.next_crl_number(root.serial_number, cn)
    crl = build_crl(issuer=root, issuer_key=root_key, revoked=inventory.revoked(root.serial_number, now),
                    number=number, now=now, lifetime=lifetime)
    atomic_write(root_crl_path(home), crl.public_bytes(serialization.Encoding.PEM))
    assert crl.next_update_utc is not None, "build_crl sets nextUpdate"
    inventory.record_crl(root.serial_number, number=number, this_update=crl.last_update_utc, next_update=crl.next_update_utc,
                         pem=crl.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    return crl


def root_crl_due(home: Path, root: x509.Certificate, now: dt.datetime) -> bool:
    """True when the root's CRL is missing or half of its validity has passed (re-sign it then
    if the root key is at hand: the rule of every CRL, :func:`pkictl.crl.crl_due`)."""
    crl = read_root_crl(home, root)
    if crl is None or crl.next_update_utc is None:
        return True
    return crl_due(crl.last_update_utc, crl.next_update_utc, now)
