"""Operator certificates: a person's TLS client certificate for the admin page of ``pkictl serve``,
issued by ``pkictl enroll-operator``, and the check that tells an operator from a node.

An operator certificate carries clientAuth and exactly one URI SAN
``spiffe://<trust domain>/operator/<name>`` (:func:`pkictl.profile.operator_identity`), and is
recorded in the inventory as kind ``operator`` (docs/design.md, "Operator certificates"). The
gateway admits only ``/node/`` identities, so an operator certificate never opens a node's way
in, and EST refuses to renew one; the admin listener admits only this identity, so a node's
certificate never opens the admin page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from .audit import audits_refusals
from .errors import PKIError, StoreError
from .files import PRIVATE_FILE_MODE, fsync_dir, make_private_dir, write_new_file
from .names import validate_name
from .pem import certificates_to_pem, private_key_to_pem
from .profile import generate_key, operator_identity

if TYPE_CHECKING:
    from .audit import AuditLog
    from .authority import CertificateAuthority
    from .inventory import Inventory

__all__ = ["OperatorEnrollment", "Operators", "OperatorIdentity", "NotAnOperator", "identify_operator", "OPERATOR_FILES"]

OPERATOR_FILES = ("key.pem", "cert.pem", "fullchain.pem", "ca.pem", "operator.p12")
_P12_KDF_ROUNDS = 200_000  # PBKDF2 iterations of the bundle's key encryption (PBES2, AES-256-CBC)


@dataclasses.dataclass(frozen=True)
class OperatorEnrollment:
    """What ``pkictl enroll-operator`` wrote.

    Attributes:
        certificate: the operator certificate.
        directory: where key.pem (0600), cert.pem, fullchain.pem, ca.pem and operator.p12 (0600) are.
        p12_password: the password of operator.p12 (shown once; a browser asks for it on import).
        replaced: serial numbers of the operator's earlier certificates, now revoked (superseded).
    """

    certificate: x509.Certificate
    directory: Path
    p12_password: str
    replaced: tuple[int, ...] = ()


class Operators:
    """Issuing operator certificates for one CA.

    Args:
        ca: the loaded CA (its issuing key signs).
    """

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca

    @property
    def audit(self) -> AuditLog:
        return self._ca.audit

    @audits_refusals("enroll-operator")
    def enroll(self, name: str, *, out: Path | None = None, replace: bool = False) -> OperatorEnrollment:
        """Make a key, issue operator ``name``'s certificate and write its directory atomically.

        The files are written into a staging directory beside ``out`` and moved into place with
        one rename, so that ``out`` holds a complete set or nothing new.

        Args:
            name: the operator's name (a DNS label, such as ``alice``).
            out: the directory to write; default ``<home>/operators/<name>``. It must not exist
                (or be empty) unless ``replace``.
            replace: issue although ``name`` holds a current operator certificate, revoke that one
                (superseded) and replace the directory's files.

        Raises:
            InvalidNameError: the name is not a DNS label.
            AlreadyEnrolledError: ``name`` holds a current operator certificate and not ``replace``.
            StoreError: ``out`` exists, is not empty and not ``replace`` (checked before issuing).
        """
        validate_name(name)
        ca = self._ca
        now = ca.clock.now()
        if not replace:
            ca.inventory.check_available("operator", name, now)
        out = Path(out) if out is not None else ca.home / "operators" / name
        if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"{out} exists and is not empty; choose another --out directory, or pass --replace")
        previous = ca.inventory.unexpired(name, ["operator"], now) if replace else []
        key = generate_key()
        certificate = ca.issue("operator", name, key.public_key(), first=not replace)
        password = secrets.token_urlsafe(12)
        bundle = pkcs12.serialize_key_and_certificates(
            f"pkictl operator {name}".encode(), key, certificate, list(ca.chain),
            PrivateFormat.PKCS12.encryption_builder().kdf_rounds(_P12_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256()).build(password.encode()),
        )
        files = {
            "key.pem": (private_key_to_pem(key), PRIVATE_FILE_MODE),
            "cert.pem": (certificates_to_pem([certificate]), 0o644),
            "fullchain.pem": (certificates_to_pem([certificate, *ca.chain]), 0o644),
            "ca.pem": (certificates_to_pem(ca.trust_anchors), 0o644),
            "operator.p12": (bundle, PRIVATE_FILE_MODE),
        }
        _install_directory(out, files)
        if previous:
            ca.revoke_records(previous, reason="superseded")
        return OperatorEnrollment(certificate, out, password, tuple(r.serial for r in previous))


def _install_directory(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write ``files`` into a new private directory beside ``out`` and rename it to ``out``; an
    existing ``out`` is moved aside first and removed after (its files never mix with the new)."""
    make_private_dir(out.parent)
    staging = out.with_name(f".{out.name}.{os.getpid()}.new")
    shutil.rmtree(staging, ignore_errors=True)
    make_private_dir(staging)
    try:
        for name, (data, mode) in files.items():
            write_new_file(staging / name, data, mode)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.rename(out, old)
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class OperatorIdentity:
    """An authenticated operator.

    Attributes:
        name: the operator's name as enrolled.
        serial: the serial number of the certificate presented.
        fingerprint: SHA-256 of that certificate's DER, hex (what a CSRF token is bound to).
    """

    name: str
    serial: int
    fingerprint: str


class NotAnOperator(PKIError):
    """The client presented no operator certificate.

    Attributes:
        reason: ``no certificate`` (none came), ``not an operator`` (a node's, a gateway's or
            another certificate of this CA), ``revoked``, ``expired`` or ``unknown`` (not in the
            inventory).
    """

    REASONS = ("no certificate", "not an operator", "revoked", "expired", "unknown")

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        if reason not in self.REASONS:
            raise ValueError(f"reason {reason!r}: want one of {self.REASONS}")
        self.reason = reason


def identify_operator(der: bytes | None, *, inventory: Inventory, trust_domain: str, now: dt.datetime) -> OperatorIdentity:
    """The operator a verified TLS client certificate names.

    Rules: clientAuth in the EKU (RFC 5280 4.2.1.12), not a CA, exactly one URI SAN
    ``spiffe://<trust_domain>/operator/<name>`` and no other identity, recorded in the inventory
    as operator ``name``'s, issued (not revoked) and valid at ``now``.

    Args:
        der: the client's certificate (``getpeercert(binary_form=True)``), already verified by
            OpenSSL against the trust anchor; None when the client sent none.
        inventory: the CA's inventory.
        trust_domain: the CA's SPIFFE trust domain.
        now: aware UTC.

    Raises:
        NotAnOperator: with ``reason`` as the class lists; the message says what came and what is wanted.
    """
    if not der:
        raise NotAnOperator("no TLS client certificate came with this request; the admin page wants an operator "
                            "certificate (pkictl enroll-operator NAME)", reason="no certificate")
    certificate = x509.load_der_x509_certificate(der)
    serial = certificate.serial_number
    cn = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    shown = f"serial {serial:x} (CN={str(cn[0].value) if cn else '?'})"
    try:
        uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    try:
        eku = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = []
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    prefix = operator_identity(trust_domain, "")
    names = [u[len(prefix):] for u in uris if u.startswith(prefix)]
    if is_ca or ExtendedKeyUsageOID.CLIENT_AUTH not in eku or len(names) != 1 or len(uris) != 1 or not names[0]:
        raise NotAnOperator(f"{shown} is no operator certificate (it names {', '.join(uris) or 'no URI identity'}); the admin "
                            f"page wants one with the single identity {prefix}NAME, from pkictl enroll-operator NAME",
                            reason="not an operator")
    record = inventory.get(serial)
    if record is None or record.kind != "operator" or record.name.lower() != names[0]:
        raise NotAnOperator(f"{shown} is not in the inventory as operator {names[0]}'s certificate", reason="unknown")
    if record.status == "revoked":
        raise NotAnOperator(f"{shown} of operator {record.name} is revoked ({record.revocation_reason}); get a new one with "
                            f"pkictl enroll-operator {record.name} --replace", reason="revoked")
    if record.status != "issued" or not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise NotAnOperator(f"{shown} of operator {record.name} is not valid now; get a new one with pkictl enroll-operator "
                            f"{record.name} --replace", reason="expired")
    return OperatorIdentity(record.name, serial, certificate.fingerprint(hashes.SHA256()).hex())

