"""The CA's life cycle: creating the root and issuing CA, and creating the next issuing CA.

The root key is needed only here and for the root's own CRL (:mod:`pkictl.root_crl`, signed here
too). Day-to-day issuance, revocation and CRL signing use the issuing key alone, so the root key
can live offline (``pkictl rotate-issuing`` and ``pkictl sign-crl --root`` ask for it back).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
import shutil
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from .clock import Clock
from .errors import CAExistsError, PKIError
from .activation import PENDING, PendingIssuer, finish_interrupted_rotation, publish_pending
from .audit import AuditLog
from .files import PRIVATE_FILE_MODE, atomic_write, make_private_dir, read_ca_key_file, write_new_file
from .inventory import Inventory
from .storage.location import DATABASE_FILE, write_database_url
from .lint import signed
from .keys import encrypt_private_key, load_private_key
from .pem import certificates_to_pem, private_key_to_pem
from .profile import build_issuing, build_root, generate_key, validity_window
from .settings import CASettings

__all__ = ["NewCA", "RotatingCA", "init_ca", "rotate_issuing", "finish_interrupted_rotation"]


def _generation(now) -> str:
    """A distinct suffix per CA generation: two CAs with one name and AKI-less CRLs broke CRL
    checking (docs/design.md), so every issuing CA gets its own subject."""
    return f"{now:%Y-%m-%d} {secrets.token_hex(2)}"


def _key_pem(key, passphrase: bytes | None) -> bytes:
    return encrypt_private_key(key, passphrase) if passphrase else private_key_to_pem(key)


@dataclasses.dataclass(frozen=True)
class NewCA:
    """What :func:`init_ca` made: the two CA certificates and their keys."""

    root: x509.Certificate
    issuing: x509.Certificate
    issuing_key: CertificateIssuerPrivateKeyTypes
    root_key: CertificateIssuerPrivateKeyTypes


class RotatingCA(Protocol):
    """What :func:`rotate_issuing` uses of a loaded CA (:class:`pkictl.authority.CertificateAuthority`)."""

    home: Path
    settings: CASettings
    clock: Clock
    root: x509.Certificate
    audit: AuditLog
    issuing: x509.Certificate
    pending: PendingIssuer | None

    @property
    def passphrase(self) -> bytes | None: ...

    @property
    def inventory(self) -> Inventory: ...

    def refresh_issuing(self) -> bool: ...

    def sign_root_crl(self, root_key: CertificateIssuerPrivateKeyTypes | None = None) -> x509.CertificateRevocationList: ...


def init_ca(home: Path, settings: CASettings, *, clock: Clock, passphrase: bytes | None = None, db_url: str | None = None) -> NewCA:
    """Write a root and an issuing CA into ``home`` (:meth:`pkictl.authority.CertificateAuthority.init`
    loads it, starts its audit log and signs the root's CRL).

    Everything is written into a staging directory first and moved into place with
    ``ca.yaml`` last, so an interrupted init never looks like a CA. Both certificates are
    linted before they are signed (:func:`pkictl.lint.prelint`).

    Args:
        passphrase: encrypt both CA keys with it (PKCS#8, scrypt: :mod:`pkictl.keys`);
            None writes them unencrypted (still 0600 in 0700 directories).

        db_url: keep the records in this PostgreSQL database (``<home>/database.yaml`` names
            it) instead of ``<home>/inventory.sqlite3``: the first host of a CA whose
            ``pkictl serve`` replicas share it. The database must hold no CA yet.

    Raises:
        CAExistsError: ``home`` holds a CA already, or the remains of an interrupted init, or
            the database holds a CA already.
        SettingsError: ``db_url`` is not a usable URL (a password in it, no database name).
        DatabaseError: the database cannot be reached.
        LintError: a CA certificate would break the profile (nothing is written).
    """
    home = Path(home)
    if (home / "ca.yaml").exists():
        raise CAExistsError(f"a CA exists already in {home}; pkictl never overwrites a CA. Use another --home")
    leftovers = [n for n in ("root", "issuing", "ca.pem", "inventory.sqlite3") if (home / n).exists()]
    if leftovers:
        raise CAExistsError(
            f"{home} holds {', '.join(leftovers)} but no ca.yaml (an interrupted init-ca?); "
            "remove them or choose another --home"
        )
    database = _empty_database(db_url) if db_url is not None else None
    make_private_dir(home)
    now = clock.now()
    generation = _generation(now)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.trust_domain)

    root_key = generate_key()
    root_nb, root_na = validity_window(now, settings.root_lifetime)
    root_subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"pkictl Root CA {generation}")])
    root = signed(build_root(root_subject, root_key.public_key(), root_nb, root_na, x509.random_serial_number()), root_key)

    issuing_key = generate_key()
    iss_nb, iss_na = validity_window(now, settings.issuing_lifetime)
    issuing_subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"pkictl Issuing CA {generation}")])
    issuing = signed(build_issuing(issuing_subject, issuing_key.public_key(), root, iss_nb, iss_na, x509.random_serial_number()), root_key)

    staging = home / f".init-{secrets.token_hex(4)}"
    make_private_dir(staging)
    try:
        for part, cert, key in (("root", root, root_key), ("issuing", issuing, issuing_key)):
            make_private_dir(staging / part)
            write_new_file(staging / part / "cert.pem", certificates_to_pem([cert]))
            write_new_file(staging / part / "key.pem", _key_pem(key, passphrase), PRIVATE_FILE_MODE)
        write_new_file(staging / "ca.pem", certificates_to_pem([root]))
        if db_url is not None:
            write_database_url(staging, db_url)
        inventory = Inventory(staging / "inventory.sqlite3") if database is None else Inventory(database)
        for kind, cert in (("root", root), ("issuing", issuing)):
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            issuer = None if kind == "root" else root.serial_number
            inventory.record_intent(serial=cert.serial_number, name=str(cn), kind=kind, sans=(), now=now, exclusive=False, issuer=issuer)
            inventory.record_issued(cert, renewal_fraction=settings.renewal_fraction)
        inventory.close()
        for name in ("root", "issuing", "ca.pem", "inventory.sqlite3" if database is None else DATABASE_FILE):
            os.rename(staging / name, home / name)
        import yaml

        atomic_write(home / "ca.yaml", ("# pkictl CA settings, written by init-ca\n" + yaml.safe_dump(settings.to_dict(), sort_keys=False)).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return NewCA(root, issuing, issuing_key, root_key)


def _empty_database(url: str):
    """The PostgreSQL database at ``url``, its schema made, checked to hold no CA yet."""
    from .storage.location import check_url, open_database

    database = open_database(Path("."), url=check_url(url))
    try:
        inventory = Inventory(database)
        root = next((r for r in inventory.records() if r.kind == "root"), None)
    except BaseException:
        database.close()
        raise
    if root is not None:
        database.close()
        raise CAExistsError(f"the database {url} holds a CA already (root {root.name}, serial {root.serial:x}); pkictl never "
                            "overwrites a CA: give init-ca an empty database, or make this host a replica of that CA "
                            "(docs/design.md, \"CA replicas\")")
    return database


def rotate_issuing(ca: RotatingCA, *, activate_in: dt.timedelta | None = None) -> x509.Certificate:
    """Create the next issuing CA under a distinct name, certified by the root, publish it at once
    and let it issue from ``activate_in`` on.

    Until then it waits in ``<home>/pending-issuing/`` (:mod:`pkictl.activation`): its CRL is in
    ``crl.pem`` and its certificate in /cacerts, so that every gateway can fetch its CRL before
    a node certificate of it exists, and the current issuing CA keeps issuing. At the activation
    time, whoever loads the CA next promotes it: the old issuing CA moves to
    ``<home>/retired/<serial>/`` and keeps signing its CRL while a certificate it issued is
    unexpired; its certificates keep working (they chain to the same root, the trust anchor,
    which does not change) and move to the new issuing CA as they renew.

    Args:
        activate_in: the delay before the new CA issues; None takes ``issuing_activation_delay``
            from ca.yaml; zero activates it at once.

    Raises:
        PKIError: the root key is not at ``<home>/root/key.pem`` (bring it back from offline
            storage: this is the command that needs it), or it does not open; or a new issuing
            CA is pending already.
        LintError: the new certificate would break the profile (nothing changes).
    """
    home = ca.home
    delay = ca.settings.issuing_activation_delay if activate_in is None else activate_in
    ca.refresh_issuing()
    if ca.pending is not None:
        pending = ca.pending
        raise PKIError(
            f"a new issuing CA (serial {pending.certificate.serial_number:x}) already waits in {home / PENDING} and "
            f"starts issuing at {pending.activate_at.isoformat()}; rotate again after that"
        )
    root_key_path = home / "root" / "key.pem"
    if not root_key_path.exists():
        raise PKIError(
            f"rotate-issuing needs the root key at {root_key_path}: bring it back from offline storage "
            "for this command (nothing else needs it), then move it away again"
        )
    root_key = load_private_key(read_ca_key_file(root_key_path), ca.passphrase, source=str(root_key_path))
    now = ca.clock.now()
    key = generate_key()
    not_before, not_after = validity_window(now, ca.settings.issuing_lifetime)
    not_after = min(not_after, ca.root.not_valid_after_utc)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.settings.trust_domain)
    subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"pkictl Issuing CA {_generation(now)}")])
    certificate = signed(build_issuing(subject, key.public_key(), ca.root, not_before, not_after, x509.random_serial_number()), root_key)

    activate_at = now + delay
    cn = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    ca.inventory.record_intent(serial=certificate.serial_number, name=cn, kind="issuing", sans=(), now=now,
                               exclusive=False, issuer=ca.root.serial_number)
    ca.inventory.record_issued(certificate, renewal_fraction=ca.settings.renewal_fraction)
    publish_pending(home, certificate, _key_pem(key, ca.passphrase), activate_at)
    ca.audit.append("issuing-created", serial=certificate.serial_number, subject=cn, activate_at=activate_at,
                    current_serial=ca.issuing.serial_number)
    ca.refresh_issuing()  # sees it pending, or promotes it now (activate_in 0)
    ca.sign_root_crl(root_key)  # its empty CRL in crl.pem from the start, and the root's renewed while its key is back
    return certificate
