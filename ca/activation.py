"""A new issuing CA is published before it issues: ``<home>/pending-issuing/`` and its promotion.

``pkictl rotate-issuing`` puts the new issuing CA in ``pending-issuing/`` (``cert.pem``,
``key.pem``, ``activate-at``: ISO 8601 UTC). From then on its certificate is in /cacerts and its
(empty) CRL in ``crl.pem``, while the current issuing CA keeps issuing. Gateways check client
certificates against CRLs (VERIFY_CRL_CHECK_LEAF): a node certificate from an issuing CA whose
CRL a gateway has not fetched yet would be refused, so the new CA issues only once every gateway
has had time to fetch ``crl.pem`` (``issuing_activation_delay``; README, "Rotating the issuing CA").

Whoever loads the CA after the activation time (``CertificateAuthority.load``, the periodic check
of ``pkictl serve``, a signing worker before its next call) promotes it with the renames
``issuing/`` -> ``retired/<serial>/`` then ``pending-issuing/`` -> ``issuing/``, under an exclusive
``flock`` on ``<home>/.issuing.lock``: concurrent processes promote exactly once. Readers of the
issuing CA's files take the same lock shared, so none reads a half-promoted home. A crash
between the two renames is finished by :func:`finish_interrupted_rotation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import os
from pathlib import Path
from typing import Iterator

from cryptography import x509

from .errors import StoreError
from .file_errors import CA_FILE_FIX, read_certificates
from .files import PRIVATE_FILE_MODE, fsync_dir, make_private_dir, read_ca_key_file, write_new_file
from .keys import load_private_key
from .pem import public_key_bytes

__all__ = ["PENDING", "PendingIssuer", "file_state", "finish_interrupted_rotation", "issuer_dirs", "issuing_lock",
           "open_issuing", "promote_due", "publish_pending", "read_pending", "usable_pending"]

PENDING = "pending-issuing"
_LOCK = ".issuing.lock"
_STAGING = ".pending-issuing-new"
_LEGACY_STAGING = ".issuing-new"  # rotate-issuing before activation delays renamed this into issuing/


@dataclasses.dataclass(frozen=True)
class PendingIssuer:
    """A new issuing CA waiting for its activation.

    Attributes:
        certificate: its certificate (certified by the root).
        activate_at: when it starts issuing, aware UTC.
    """

    certificate: x509.Certificate
    activate_at: dt.datetime


@contextlib.contextmanager
def issuing_lock(home: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``<home>/.issuing.lock``: exclusive to move issuing CAs, shared to read their files."""
    fd = os.open(Path(home) / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def file_state(path: Path) -> tuple[int, int, int, int] | None:
    """``(device, inode, size, mtime ns)`` of ``path``, None if it is missing: a rename changes it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def read_pending(home: Path) -> PendingIssuer | None:
    """The pending issuing CA of ``home``, or None (none, or promoted while this read).

    Raises:
        StoreError: ``activate-at`` is not an ISO 8601 time with a time zone.
    """
    directory = Path(home) / PENDING
    try:
        certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
        text = (directory / "activate-at").read_text().strip()
    except FileNotFoundError:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
        if when.tzinfo is None:
            raise ValueError("no time zone")
    except ValueError as exc:
        raise StoreError(f"{directory / 'activate-at'}: {text!r} is not an ISO 8601 time with a time zone ({exc}); "
                         "write the activation time as e.g. 2026-12-01T12:00:00+00:00") from None
    return PendingIssuer(certificate, when.astimezone(dt.timezone.utc))


def publish_pending(home: Path, certificate: x509.Certificate, key_pem: bytes, activate_at: dt.datetime) -> None:
    """Write the new issuing CA to ``pending-issuing/`` atomically (a staging directory, then one rename).

    Raises:
        StoreError: a new issuing CA is pending already, or an earlier attempt left its staging directory.
    """
    home = Path(home)
    staging, pending = home / _STAGING, home / PENDING
    if pending.exists():
        raise StoreError(f"{pending} exists: a new issuing CA waits for its activation already")
    if staging.exists():
        raise StoreError(f"{staging} exists: an earlier rotate-issuing did not finish; remove it and try again")
    make_private_dir(staging)
    write_new_file(staging / "cert.pem", certificate_pem(certificate))
    write_new_file(staging / "key.pem", key_pem, PRIVATE_FILE_MODE)
    write_new_file(staging / "activate-at", (activate_at.astimezone(dt.timezone.utc).isoformat() + "\n").encode())
    fsync_dir(staging)
    os.rename(staging, pending)
    fsync_dir(home)


def certificate_pem(certificate: x509.Certificate) -> bytes:
    from .pem import certificates_to_pem

    return certificates_to_pem([certificate])


def finish_interrupted_rotation(home: Path) -> None:
    """Complete a promotion (or an older rotate-issuing) that stopped between its two renames:
    ``issuing/`` moved to ``retired/``, the new issuing CA still in ``pending-issuing/`` (or
    ``.issuing-new/``), complete. Cheap when ``issuing/`` is in place (one stat)."""
    home = Path(home)
    current = home / "issuing"
    if current.exists():
        return
    with issuing_lock(home, exclusive=True):
        if current.exists():  # a promotion under way in another process finished meanwhile
            return
        for staged in (home / PENDING, home / _LEGACY_STAGING):
            if staged.is_dir():
                os.rename(staged, current)
                fsync_dir(home)
                return


def promote_due(home: Path, now: dt.datetime, *, audit, pending: PendingIssuer | None = None) -> bool:
    """Promote the pending issuing CA if its activation time has come; exactly once across processes.

    Args:
        home: the CA home.
        now: aware UTC, from the caller's clock.
        audit: the :class:`pkictl.audit.AuditLog` that records ``issuing-activated``.
        pending: what the caller last read (saves a read when it is not due yet); None reads it.

    Returns:
        True if this call promoted it.
    """
    home = Path(home)
    pending = pending or usable_pending(home)
    if pending is None or now < pending.activate_at:
        return False
    with issuing_lock(home, exclusive=True):
        pending = usable_pending(home)  # again, under the lock: another process may have promoted it
        if pending is None or now < pending.activate_at:
            return False
        current = home / "issuing"
        old = x509.load_pem_x509_certificate((current / "cert.pem").read_bytes())
        make_private_dir(home / "retired")
        os.rename(current, home / "retired" / f"{old.serial_number:x}")
        os.rename(home / PENDING, current)  # a crash in between is finished by finish_interrupted_rotation
        fsync_dir(home)
        new = pending.certificate
        audit.append("issuing-activated", old_serial=old.serial_number, new_serial=new.serial_number,
                     subject=new.subject.rfc4514_string(), activate_at=pending.activate_at)
    return True


def open_issuing(home: Path, passphrase: bytes | None):
    """Read ``issuing/cert.pem`` and ``key.pem`` under the shared lock and check they match.

    Returns:
        ``(certificate, private key, file_state of cert.pem)``.

    Raises:
        KeyProtectionError, PassphraseError: see :func:`pkictl.keys.load_private_key`.
        StoreError: the key does not match the certificate.
    """
    home = Path(home)
    finish_interrupted_rotation(home)
    directory = home / "issuing"
    with issuing_lock(home, exclusive=False):
        state = file_state(directory / "cert.pem")
        certificate = read_certificates(directory / "cert.pem", expected="the issuing CA certificate (PEM)",
                                        fix=CA_FILE_FIX.format(home=home))[0]
        key_path = directory / "key.pem"
        key = load_private_key(read_ca_key_file(key_path), passphrase, source=str(key_path))
    if public_key_bytes(key.public_key()) != public_key_bytes(certificate.public_key()):
        raise StoreError(f"{key_path} does not match {directory / 'cert.pem'}")
    return certificate, key, state


@contextlib.contextmanager
def issuer_dirs(home: Path) -> Iterator[list[tuple[str, x509.Certificate, Path]]]:
    """Every issuing CA on disk, as ``(role, certificate, directory)`` with role ``issuing``,
    ``pending`` or ``retired``, while holding the shared lock (read their keys inside)."""
    home = Path(home)
    finish_interrupted_rotation(home)
    with issuing_lock(home, exclusive=False):
        found = []
        for role, directory in [("issuing", home / "issuing"), ("pending", home / PENDING),
                                *(("retired", d) for d in sorted((home / "retired").glob("*")))]:
            try:
                found.append((role, x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes()), directory))
            except FileNotFoundError:
                continue
        yield found


def usable_pending(home: Path) -> PendingIssuer | None:
    """:func:`read_pending`, with a malformed ``activate-at`` taken as nothing pending: such a
    CA is never promoted, and the current one keeps issuing (``pkictl doctor`` reports it)."""
    try:
        return read_pending(home)
    except StoreError:
        return None
