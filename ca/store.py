"""A credential directory: numbered versions under ``archive/`` behind an atomic ``live`` symlink.

Layout (what ``pkictl enroll-*`` writes and ``pki-agent`` renews in place)::

    <dir>/ca.pem                trust anchors (our root)
    <dir>/archive/<N>/          cert.pem chain.pem fullchain.pem privkey.pem (0600), combined.pem
                                (0600), keystore.p12 when configured (pkictl.formats)
    <dir>/live -> archive/<N>   replaced atomically, so a certificate and its key change together
    <dir>/cert.pem -> live/cert.pem (and the others): stable paths for other software

Writing two files with temp+rename each can leave a mismatched pair after a crash; one symlink
swap cannot (docs/design.md, "Files on disk").
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

from cryptography import x509

from .errors import StoreError
from .file_errors import is_write_failure, parse_certificates, read_certificates, write_error
from .files import (
    PUBLIC_FILE_MODE,
    atomic_write,
    fsync_dir,
    make_private_dir,
    open_dir_to_group,
    read_private_file,
    remove_stale_temp_files,
    write_new_file,
)
from .formats import KEYSTORE_FILE, VersionLayout
from .pem import (
    PrivateKey,
    certificates_to_pem,
    private_key_from_pem,
    private_key_to_pem,
    public_key_bytes,
)

__all__ = ["Credential", "CredentialStore", "CREDENTIAL_FILES", "TRUST_ANCHORS_FIX", "TRUST_ANCHORS_EXPECTED"]

CREDENTIAL_FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")

TRUST_ANCHORS_FIX = ("copy the root certificate again from the CA host (<CA home>/root/cert.pem, the ca.pem of any bundle) "
                     "to {path}, or copy the bundle directory again keeping its links (tar or rsync -a)")
"""What restores a damaged ``ca.pem`` (formatted with ``path``)."""
TRUST_ANCHORS_EXPECTED = "the trust anchors (the root certificate, PEM)"

_REISSUE = ("restore the credential directory from a backup, or issue a new bundle on the CA host "
            "(pkictl enroll-gateway NAME --replace or pkictl enroll-node NAME --replace) and copy it here")


@dataclasses.dataclass(frozen=True)
class Credential:
    """An end entity's private key, certificate and the intermediates up to the trust anchor.

    Attributes:
        private_key: the end entity's key.
        certificate: the end-entity certificate.
        chain: intermediate CA certificates, the leaf's issuer first (not the trust anchor).
    """

    private_key: PrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if public_key_bytes(self.private_key.public_key()) != public_key_bytes(self.certificate.public_key()):
            raise StoreError(
                f"private key does not match the certificate (serial {self.certificate.serial_number:x})"
            )

    @property
    def fullchain(self) -> tuple[x509.Certificate, ...]:
        return (self.certificate, *self.chain)


class CredentialStore:
    """One end entity's credential directory (see the module docstring for the layout).

    Args:
        directory: the credential directory.
        keep: how many versions :meth:`install` keeps under ``archive/`` (at least 2).
        layout: the files beyond the four PEM files and who may read the keys
            (:class:`pkictl.formats.VersionLayout`); :meth:`install` writes it, :meth:`load`
            accepts keys readable by its group.
    """

    def __init__(self, directory: Path, *, keep: int = 5, layout: VersionLayout | None = None) -> None:
        self.directory = Path(directory)
        self.keep = max(2, keep)
        self.layout = layout or VersionLayout()

    @property
    def live(self) -> Path:
        return self.directory / "live"

    @property
    def trust_anchors_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def archive(self) -> Path:
        return self.directory / "archive"

    def versions(self) -> list[int]:
        """The version numbers present under ``archive/``, ascending."""
        try:
            return sorted(int(p.name) for p in self.archive.iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return []

    def current_version_dir(self) -> Path:
        """Resolve ``live`` once, so that all files of one load come from the same version.

        Raises:
            StoreError: ``live`` is missing or is not a symlink into ``archive/``.
        """
        if not self.live.is_symlink():
            if self.live.exists():
                raise StoreError(
                    f"{self.live} is not a symlink: the credential directory was probably copied "
                    "with a tool that follows links; copy it with 'tar' or 'rsync -a', or run "
                    "'pkictl enroll-*' again"
                )
            raise StoreError(f"{self.directory} holds no credential (no 'live' link): enroll first")
        target = os.readlink(self.live)
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "archive" or not parts[1].isdigit():
            raise StoreError(f"{self.live} points to {target!r}, expected archive/<number>")
        return self.directory / target

    def load_trust_anchors(self) -> list[x509.Certificate]:
        """Read ``ca.pem``.

        Raises:
            StoreError: missing or not PEM certificates (empty, truncated, a key or a CRL instead):
                the message names the file, the defect and the fix.
        """
        path = self.trust_anchors_path
        return read_certificates(path, expected=TRUST_ANCHORS_EXPECTED, fix=TRUST_ANCHORS_FIX.format(path=path))

    def load(self, version: Path | None = None) -> Credential:
        """Read the current version, or ``version`` (a directory from :meth:`current_version_dir`).

        Every file OpenSSL is handed afterwards (``fullchain.pem``, ``privkey.pem``) is checked
        here first, so a damaged one is named with its defect.

        Raises:
            StoreError: a file is missing or malformed (the message names it and the fix),
                ``fullchain.pem`` does not start with ``cert.pem``'s certificate, or the key does
                not match the certificate.
            KeyProtectionError: ``privkey.pem`` is readable by others or is a symlink.
        """
        version = version or self.current_version_dir()
        try:
            cert_data = (version / "cert.pem").read_bytes()
            chain_data = (version / "chain.pem").read_bytes()
            fullchain_data = (version / "fullchain.pem").read_bytes()
            key_data = read_private_file(version / "privkey.pem", group=self.layout.group)
        except FileNotFoundError as exc:
            raise StoreError(f"{exc.filename} is missing from the credential version {version}; fix: {_REISSUE}") from None
        rebuild = f"rebuild it from cert.pem and chain.pem (cd {version} && cat cert.pem chain.pem > fullchain.pem), or {_REISSUE}"
        certificate = parse_certificates(cert_data, source=str(version / "cert.pem"), expected="the end-entity certificate (PEM)",
                                         fix=_REISSUE)[0]
        chain = parse_certificates(chain_data, source=str(version / "chain.pem"), expected="the intermediate CA certificates (PEM)",
                                   fix=f"put the issuing CA certificate (<CA home>/issuing/cert.pem) there, or {_REISSUE}") \
            if chain_data.strip() else []
        fullchain = parse_certificates(fullchain_data, source=str(version / "fullchain.pem"),
                                       expected="the end-entity certificate then its chain (PEM)", fix=rebuild)
        if fullchain != [certificate, *chain]:  # what OpenSSL sends: a leaf without its chain is refused by peers
            raise StoreError(f"{version / 'fullchain.pem'} holds serials {', '.join(f'{c.serial_number:x}' for c in fullchain)}, "
                             f"not cert.pem then chain.pem ({', '.join(f'{c.serial_number:x}' for c in [certificate, *chain])}); "
                             f"fix: {rebuild}")
        try:
            key = private_key_from_pem(key_data, source=str(version / "privkey.pem"))
        except StoreError as exc:
            raise StoreError(f"{exc}; fix: {_REISSUE}") from None
        try:
            return Credential(key, certificate, tuple(chain))
        except StoreError as exc:
            raise StoreError(f"{version}: {exc}; fix: {_REISSUE}") from None

    def layout_problem(self) -> str | None:
        """Why the live version is not as :attr:`layout` would write it now (a file missing, a
        key of another mode or group), or None; see :meth:`pkictl.formats.VersionLayout.problem`.

        Raises:
            StoreError: as :meth:`current_version_dir`.
        """
        return self.layout.problem(self.directory, self.current_version_dir())

    def install(self, credential: Credential) -> Path:
        """Write ``credential`` as a new version and point ``live`` at it atomically.

        Every file of the version (the four PEM files and :attr:`layout`'s extra files, with
        its modes and group) is built first, then written, and flushed to disk before the link
        moves; a crash at any moment leaves ``live`` on a complete, matching version. Old
        versions beyond ``keep`` are removed afterwards.

        Returns:
            The new version directory.

        Raises:
            StoreError: an extra file cannot be built (the keystore password file is unreadable
                or empty); nothing was written.
            DiskWriteError: no room or a broken disk (ENOSPC, EDQUOT, EFBIG, EIO): the message
                names the path and the fix; ``live`` still points at the previous version and
                the partial new version is removed.
            OSError: writing failed otherwise (``live`` still points at the previous version).
        """
        layout = self.layout
        key = credential.private_key
        files = [
            ("cert.pem", certificates_to_pem([credential.certificate])),
            ("chain.pem", certificates_to_pem(credential.chain)),
            ("fullchain.pem", certificates_to_pem(credential.fullchain)),
            ("privkey.pem", private_key_to_pem(key)),
            *layout.render_extra(key, credential.certificate, credential.chain),
        ]
        make_private_dir(self.archive)
        number = (self.versions() or [0])[-1] + 1
        while True:
            version = self.archive / str(number)
            try:
                version.mkdir(mode=0o700)
                break
            except FileExistsError:
                number += 1  # another writer, or a half-written version left by a crash
            except OSError as exc:
                if is_write_failure(exc):
                    raise write_error(version, exc) from None
                raise
        tmp_link = self.directory / f".live.{number}.tmp"
        try:
            for name, data in files:
                mode = layout.key_mode if name in layout.key_files else PUBLIC_FILE_MODE
                write_new_file(version / name, data, mode, group=layout.group)
            if layout.group is not None:
                # The group may enter the new version, then archive/ and the directory: all before
                # live moves, so a consumer never meets a live version it cannot read.
                for directory in (version, self.archive, self.directory):
                    open_dir_to_group(directory, layout.group)
            fsync_dir(version)
            fsync_dir(self.archive)
            try:
                tmp_link.unlink()
            except FileNotFoundError:
                pass
            os.symlink(f"archive/{number}", tmp_link)
            os.replace(tmp_link, self.live)
        except BaseException as exc:
            # live still points at the previous version: what this install wrote goes now, not
            # at the next start (docs/design.md, "Files on disk").
            shutil.rmtree(version, ignore_errors=True)
            try:
                tmp_link.unlink()
            except OSError:
                pass
            if isinstance(exc, OSError) and is_write_failure(exc):
                failed = exc.filename if isinstance(exc.filename, str) and os.path.isabs(exc.filename) else None
                raise write_error(Path(failed) if failed else self.live if exc.filename else version, exc) from None
            raise
        fsync_dir(self.directory)
        self._ensure_stable_links()
        self._prune(current=number)
        return version

    def remove_leftovers(self) -> list[Path]:
        """Remove what an interrupted write left behind (killed, or the disk full): archive
        versions newer than ``live`` that lack a file of :data:`CREDENTIAL_FILES` or hold an
        empty one, ``live`` links that were never swapped in, and :func:`pkictl.files.atomic_write`'s
        temporary files of dead processes. The version ``live`` points to is never touched, nor
        anything when ``live`` is missing or broken (that is for the operator to look at).

        Returns:
            The paths removed.
        """
        removed = remove_stale_temp_files(self.directory)
        try:
            current = int(self.current_version_dir().name)
        except StoreError:
            return removed
        for entry in self.directory.glob(".live.*.tmp"):
            if entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        for number in self.versions():
            version = self.archive / str(number)
            if number > current and any(not (version / n).is_file() or not (version / n).stat().st_size for n in CREDENTIAL_FILES):
                shutil.rmtree(version, ignore_errors=True)
                removed.append(version)
        return removed

    def write_trust_anchors(self, anchors: Sequence[x509.Certificate]) -> None:
        """Replace ``ca.pem`` atomically."""
        atomic_write(self.trust_anchors_path, certificates_to_pem(anchors), PUBLIC_FILE_MODE)

    @classmethod
    def create(cls, directory: Path, credential: Credential, anchors: Sequence[x509.Certificate]) -> "CredentialStore":
        """Make a new credential directory holding ``credential`` as version 1.

        Raises:
            StoreError: ``directory`` exists and is not empty (nothing is overwritten).
        """
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise StoreError(f"{directory} exists and is not empty; choose another --out directory")
        make_private_dir(directory)
        store = cls(directory)
        store.write_trust_anchors(anchors)
        store.install(credential)
        return store

    def _ensure_stable_links(self) -> None:
        for name in (*CREDENTIAL_FILES, *self.layout.extra_files):
            link = self.directory / name
            if not link.is_symlink() and not link.exists():
                os.symlink(f"live/{name}", link)
        keystore = self.directory / KEYSTORE_FILE
        if self.layout.keystore is None and keystore.is_symlink() and os.readlink(keystore) == f"live/{KEYSTORE_FILE}":
            keystore.unlink()  # no longer configured: a link to nothing would only mislead

    def _prune(self, *, current: int) -> None:
        old = [n for n in self.versions() if n != current]
        for number in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(self.archive / str(number), ignore_errors=True)
