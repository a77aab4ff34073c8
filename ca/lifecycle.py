"""The CA's life cycle: creating the root and issuing CA, and replacing the issuing CA.

The root key is needed only here. Day-to-day issuance, revocation and CRL signing use the issuing
key alone, so the root key can live offline (``pkictl rotate-issuing`` asks for it back).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from .authority import CertificateAuthority, signed
from .clock import Clock
from .errors import CAExistsError, PKIError, StoreError
from .files import PRIVATE_FILE_MODE, atomic_write, fsync_dir, make_private_dir, read_private_file, write_new_file
from .inventory import Inventory
from .keys import encrypt_private_key, load_private_key
from .pem import certificates_to_pem, private_key_to_pem
from .profile import build_issuing, build_root, generate_key, validity_window
from .settings import CASettings

__all__ = ["init_ca", "rotate_issuing", "finish_interrupted_rotation"]


def _generation(now) -> str:
    """A distinct suffix per CA generation: two CAs with one name and AKI-less CRLs broke CRL
    checking (DESIGN.md), so every issuing CA gets its own subject."""
    return f"{now:%Y-%m-%d} {secrets.token_hex(2)}"


def _key_pem(key, passphrase: bytes | None) -> bytes:
    return encrypt_private_key(key, passphrase) if passphrase else private_key_to_pem(key)


def init_ca(home: Path, settings: CASettings, *, clock: Clock, passphrase: bytes | None = None) -> CertificateAuthority:
    """Create a root and an issuing CA in ``home``.

    Everything is written into a staging directory first and moved into place with
    ``ca.yaml`` last, so an interrupted init never looks like a CA. Both certificates are
    linted before they are signed (:func:`pkictl.lint.prelint`).

    Args:
        passphrase: encrypt both CA keys with it (PKCS#8, scrypt: :mod:`pkictl.keys`);
            None writes them unencrypted (still 0600 in 0700 directories).

    Raises:
        CAExistsError: ``home`` holds a CA already, or the remains of an interrupted init.
        LintError: a CA certificate would break the profile (nothing is written).
    """
    home = Path(home)
    if CertificateAuthority.exists(home):
        raise CAExistsError(f"a CA exists already in {home}; pkictl never overwrites a CA. Use another --home")
    leftovers = [n for n in ("root", "issuing", "ca.pem", "inventory.sqlite3") if (home / n).exists()]
    if leftovers:
        raise CAExistsError(
            f"{home} holds {', '.join(leftovers)} but no ca.yaml (an interrupted init-ca?); "
            "remove them or choose another --home"
        )
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
        inventory = Inventory(staging / "inventory.sqlite3")
        for kind, cert in (("root", root), ("issuing", issuing)):
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            issuer = None if kind == "root" else root.serial_number
            inventory.record_intent(serial=cert.serial_number, name=str(cn), kind=kind, sans=(), now=now, exclusive=False, issuer=issuer)
            inventory.record_issued(cert, renewal_fraction=settings.renewal_fraction)
        inventory.close()
        for name in ("root", "issuing", "ca.pem", "inventory.sqlite3"):
            os.rename(staging / name, home / name)
        import yaml

        atomic_write(home / "ca.yaml", ("# pkictl CA settings, written by init-ca\n" + yaml.safe_dump(settings.to_dict(), sort_keys=False)).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ca = CertificateAuthority(home, settings, root, issuing, issuing_key, clock)
    ca._passphrase = passphrase
    ca.audit.append("init", root_serial=root.serial_number, issuing_serial=issuing.serial_number,
                    trust_domain=settings.trust_domain, encrypted=passphrase is not None)
    ca.sign_crl()  # an empty CRL from the start: a gateway checking CRLs needs one to admit anyone
    return ca


def finish_interrupted_rotation(home: Path) -> None:
    """Complete a rotate-issuing that stopped between its two renames (``issuing/`` moved to
    ``retired/``, the new one still in ``.issuing-new/``): the new issuing CA was complete."""
    new, current = home / ".issuing-new", home / "issuing"
    if new.is_dir() and not current.exists():
        os.rename(new, current)
        fsync_dir(home)


def rotate_issuing(ca: CertificateAuthority) -> x509.Certificate:
    """Replace ``ca``'s issuing CA with a new one under a distinct name, certified by the root.

    The old issuing CA moves to ``<home>/retired/<serial>/`` and keeps signing its CRL while a
    certificate it issued is unexpired; its certificates keep working (they chain to the same
    root, the trust anchor, which does not change) and move to the new issuing CA as they renew.
    New certificates are issued by the new one at once.

    Raises:
        PKIError: the root key is not at ``<home>/root/key.pem`` (bring it back from offline
            storage: this is the command that needs it), or it does not open.
        LintError: the new certificate would break the profile (nothing changes).
    """
    home = ca.home
    root_key_path = home / "root" / "key.pem"
    if not root_key_path.exists():
        raise PKIError(
            f"rotate-issuing needs the root key at {root_key_path}: bring it back from offline storage "
            "for this command (nothing else needs it), then move it away again"
        )
    root_key = load_private_key(read_private_file(root_key_path), ca._passphrase, source=str(root_key_path))
    now = ca.clock.now()
    key = generate_key()
    not_before, not_after = validity_window(now, ca.settings.issuing_lifetime)
    not_after = min(not_after, ca.root.not_valid_after_utc)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.settings.trust_domain)
    subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"pkictl Issuing CA {_generation(now)}")])
    certificate = signed(build_issuing(subject, key.public_key(), ca.root, not_before, not_after, x509.random_serial_number()), root_key)

    staging = home / ".issuing-new"
    if staging.exists():
        raise StoreError(f"{staging} exists: an earlier rotate-issuing did not finish; remove it and try again")
    make_private_dir(staging)
    write_new_file(staging / "cert.pem", certificates_to_pem([certificate]))
    write_new_file(staging / "key.pem", _key_pem(key, ca._passphrase), PRIVATE_FILE_MODE)
    fsync_dir(staging)
    cn = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    ca.inventory.record_intent(serial=certificate.serial_number, name=cn, kind="issuing", sans=(), now=now,
                               exclusive=False, issuer=ca.root.serial_number)
    ca.inventory.record_issued(certificate, renewal_fraction=ca.settings.renewal_fraction)
    make_private_dir(home / "retired")
    old = ca.issuing
    os.rename(home / "issuing", home / "retired" / f"{old.serial_number:x}")
    os.rename(staging, home / "issuing")  # a crash in between is finished by finish_interrupted_rotation
    fsync_dir(home)
    ca.issuing, ca._issuing_key = certificate, key
    ca.audit.append("rotated-issuing", old_serial=old.serial_number, new_serial=certificate.serial_number, subject=cn)
    ca.sign_crl()
    return certificate
