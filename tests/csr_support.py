"""CSR policy test support: keys and CSRs made by ``openssl`` (none of our code on the request
side), and what a refusal must leave behind on disk: nothing but its audit record."""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
from pathlib import Path

from est_support import openssl

__all__ = ["DiskState", "KEY_ARGS", "audit_records", "disk_state", "openssl_csr", "openssl_key"]

# kind -> openssl genpkey arguments
KEY_ARGS = {
    "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "rsa-e3": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-pkeyopt", "rsa_keygen_pubexp:3"],
}


def openssl_key(directory: Path, kind: str = "ec") -> Path:
    """A new private key made by ``openssl genpkey`` (``kind``: a key of :data:`KEY_ARGS`), PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"key-{kind}-{secrets.token_hex(4)}.pem"
    openssl("genpkey", *KEY_ARGS[kind], "-out", str(path))
    return path


def openssl_csr(directory: Path, key: Path, *, subject: str = "/CN=TW", digest: str = "sha256", der: bool = False,
                san: str | None = None) -> Path:
    """``openssl req -new -key KEY -<digest>``: a CSR signed with ``digest`` (sha1, md5, sha384...)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"csr-{secrets.token_hex(4)}.{'der' if der else 'pem'}"
    args = ["req", "-new", "-key", str(key), "-subj", subject, f"-{digest}", "-out", str(path), "-outform", "DER" if der else "PEM"]
    if san is not None:
        args += ["-addext", f"subjectAltName={san}"]
    openssl(*args)
    return path


@dataclasses.dataclass(frozen=True)
class DiskState:
    """What issuance writes: inventory rows (certificates, requests, spent tokens) and bundles."""

    certificates: int
    requests: tuple
    tokens_spent: int
    bundles: tuple[str, ...]


def disk_state(home: Path) -> DiskState:
    """The :class:`DiskState` of the CA in ``home`` (read with sqlite3 directly, not our inventory code)."""
    db = sqlite3.connect(home / "inventory.sqlite3")
    try:
        certificates = db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]
        requests = tuple(db.execute("SELECT spki_sha256, name, status FROM requests ORDER BY spki_sha256").fetchall())
        spent = db.execute("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL").fetchone()[0]
    finally:
        db.close()
    bundles = home / "bundles"
    return DiskState(certificates, requests, spent, tuple(sorted(p.name for p in bundles.iterdir())) if bundles.is_dir() else ())


def audit_records(home: Path) -> list[dict]:
    """Every record of ``<home>/audit.log``, oldest first."""
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
