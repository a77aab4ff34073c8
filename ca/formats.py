"""The credential in the forms other servers read (haproxy's combined PEM, Java's PKCS#12 keystore) and who may read its keys.

:class:`VersionLayout` says what one version directory of a credential store holds beyond the
four PEM files and with which modes; :class:`pkictl.store.CredentialStore` writes all of it in
the same version, so every file changes with the ``live`` swap (docs/design.md, "Files for other
software").
"""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .errors import StoreError
from .pem import PrivateKey, certificates_to_pem, private_key_to_pem

__all__ = [
    "COMBINED_FILE", "KEYSTORE_FILE", "PKCS12_KDF_ROUNDS", "Keystore", "VersionLayout", "combined_pem", "pkcs12_keystore",
    "read_keystore_password",
]

COMBINED_FILE = "combined.pem"
"""The end-entity certificate, the chain, then the private key: haproxy's ``crt`` file."""

KEYSTORE_FILE = "keystore.p12"
"""The PKCS#12 keystore (RFC 7292) with the key, the end-entity certificate and the chain."""

PKCS12_KDF_ROUNDS = 100_000
"""PBKDF2 iterations of the keystore's encryption and MAC key. Java's own keytool uses 10,000;
the keystore sits beside privkey.pem with the same mode, so more buys little but install time."""


def combined_pem(key: PrivateKey, certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> bytes:
    """The PEM haproxy's ``crt`` takes: end-entity certificate, chain (leaf's issuer first), private key (PKCS#8)."""
    return certificates_to_pem([certificate, *chain]) + private_key_to_pem(key)


def pkcs12_keystore(key: PrivateKey, certificate: x509.Certificate, chain: Sequence[x509.Certificate], *, password: bytes,
                    alias: str) -> bytes:
    """A PKCS#12 keystore (RFC 7292) Java 11+ loads with ``KeyStore.getInstance("PKCS12")``.

    Key and certificates are encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) and the file
    is MACed with HMAC-SHA256 (RFC 9579), :data:`PKCS12_KDF_ROUNDS` iterations: the algorithms OpenJDK
    writes its own keystores with since 11.0.12 (tests/test_consumer_formats.py loads it with the
    installed Java); the legacy RC2/3DES forms are not used.

    Args:
        key, certificate, chain: the credential (chain: intermediates, the leaf's issuer first).
        password: the keystore password (non-empty bytes, UTF-8 for a Java ``char[]``).
        alias: the friendly name of the key entry (Java's alias).
    """
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(PKCS12_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(alias.encode(), key, certificate, list(chain) or None, encryption)


def read_keystore_password(path: Path) -> bytes:
    """The keystore password: the file's one line, without its line ending.

    Raises:
        StoreError: the file cannot be read, is empty, or holds more than one line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read the keystore password file {path}: {exc.strerror}; create it with the password "
                         f"on one line (install -m 600 /dev/null {path}, then write the password into it)") from None
    password = data.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        raise StoreError(f"the keystore password file {path} is empty; want the password on one line")
    if b"\n" in password or b"\r" in password:
        raise StoreError(f"the keystore password file {path} holds more than one line; want the password on one line")
    return password


@dataclasses.dataclass(frozen=True)
class Keystore:
    """A PKCS#12 keystore in every version.

    Attributes:
        password_file: the file holding its password, read at each install.
        alias: the key entry's friendly name (the agent's name).
    """

    password_file: Path
    alias: str


@dataclasses.dataclass(frozen=True)
class VersionLayout:
    """What a credential version holds beyond cert.pem, chain.pem, fullchain.pem and privkey.pem,
    and who may read its keys.

    Every version holds :data:`COMBINED_FILE`; with ``keystore``, :data:`KEYSTORE_FILE` too.

    Attributes:
        group: a group id given read access to the keys: the credential directory, ``archive/``
            and each version become 0750 and every file holding the key 0640, all of group
            ``group``. None: 0700 versions and 0600 keys, directories' modes left as they are.
        keystore: write a PKCS#12 keystore, or None.
    """

    group: int | None = None
    keystore: Keystore | None = None

    @property
    def key_mode(self) -> int:
        """The mode of a file holding the private key."""
        return 0o640 if self.group is not None else 0o600

    @property
    def key_files(self) -> tuple[str, ...]:
        """The files of a version that hold the private key."""
        return ("privkey.pem", COMBINED_FILE, *((KEYSTORE_FILE,) if self.keystore else ()))

    @property
    def extra_files(self) -> tuple[str, ...]:
        """The files beyond the four PEM files, which get stable links in the credential directory."""
        return self.key_files[1:]

    def render_extra(self, key: PrivateKey, certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> list[tuple[str, bytes]]:
        """The contents of :attr:`extra_files`, built before anything is written.

        Raises:
            StoreError: the keystore password file cannot be read or is empty.
        """
        files = [(COMBINED_FILE, combined_pem(key, certificate, chain))]
        if self.keystore is not None:
            password = read_keystore_password(self.keystore.password_file)
            files.append((KEYSTORE_FILE, pkcs12_keystore(key, certificate, chain, password=password, alias=self.keystore.alias)))
        return files

    def problem(self, directory: Path, version: Path) -> str | None:
        """Why ``version`` (the live one of ``directory``) is not as this layout writes it: a file
        missing, a key file of another mode or group, a directory the group cannot enter; None
        when it is."""
        for name in self.extra_files:
            if not (version / name).is_file():
                return f"{version.name} has no {name}"
        for name in self.key_files:
            info = (version / name).lstat()
            if stat.S_IMODE(info.st_mode) != self.key_mode or (self.group is not None and info.st_gid != self.group):
                want = f"mode {self.key_mode:04o}" + (f", group {self.group}" if self.group is not None else "")
                return f"{version.name}/{name} has mode {stat.S_IMODE(info.st_mode):04o}, group {info.st_gid}; want {want}"
        if self.group is None:
            return None
        for path in (directory, directory / "archive", version):
            info = path.lstat()
            if stat.S_IMODE(info.st_mode) != 0o750 or info.st_gid != self.group:
                return f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, group {info.st_gid}; want 0750, group {self.group}"
        return None

