"""The certificate authority: a root and an issuing CA in a home directory, and issuance policy.

Home layout::

    <home>/ca.yaml                 settings (written last by init: its presence means "a CA is here")
    <home>/ca.pem                  trust anchor (the root certificate)
    <home>/root/{cert,key}.pem     root; the key is needed only to certify an issuing CA and sign its own CRL
    <home>/root/crl.pem            the root's last CRL, copied into crl.pem (:mod:`pkictl.root_crl`)
    <home>/crl.pem                 the issuing CAs' CRLs and the root's (:mod:`pkictl.revocation`)
    <home>/issuing/{cert,key}.pem  issuing CA; signs every end-entity certificate
    <home>/inventory.sqlite3       every issued certificate (:mod:`pkictl.inventory`)
    <home>/bundles/<name>/         default output of enroll-node / enroll-gateway
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from .activation import file_state
from .clock import Clock, SystemClock
from .errors import CANotFoundError, CertificateUnusable, NotEnrolledError, PolicyError, StoreError
from .audit import AuditLog, audits_refusals
from .file_errors import CA_FILE_FIX, read_certificates
from .files import make_private_dir, remove_stale_temp_files, write_new_file
from .inventory import Inventory, Record, Superseded
from .lifecycle import init_ca, rotate_issuing
from .lint import prelint, signed
from .names import validate_name
from .policy import check_csr_signature, check_dns_name, check_enrollment_csr, check_ip_address, check_public_key, parse_csr
from .pem import certificates_to_pem, public_key_bytes
from .bootstrap import Bootstrap
from .revocation import Revocation
from .profile import build_end_entity, generate_key, node_identity, validity_window
from .settings import CASettings
from .store import Credential, CredentialStore

if TYPE_CHECKING:
    import datetime as dt

    from .activation import PendingIssuer

__all__ = ["CertificateAuthority", "Enrollment", "san_strings", "signed"]

_SERIAL_ATTEMPTS = 5


def san_strings(certificate: x509.Certificate) -> tuple[str, ...]:
    """The subject alternative names of ``certificate`` as ``DNS:x``, ``IP:x``, ``URI:x`` strings."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{v}" for v in sans.get_values_for_type(x509.DNSName)]
    out += [f"IP:{v}" for v in sans.get_values_for_type(x509.IPAddress)]
    out += [f"URI:{v}" for v in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    return tuple(out)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


@dataclasses.dataclass(frozen=True)
class Enrollment:
    """What an enrollment produced: the certificate and the bundle directory written."""

    certificate: x509.Certificate
    directory: Path


class CertificateAuthority(Revocation, Bootstrap):
    """A loaded CA. Create one with :meth:`init` or :meth:`load`, never directly.

    Args:
        home: the CA home directory.
        settings: the CA's policy.
        root: the root (trust anchor) certificate.
        issuing: the issuing CA certificate.
        issuing_key: the issuing CA's private key.
        clock: the time source (inject a :class:`pkictl.clock.FixedClock` in tests).
    """

    def __init__(self, home: Path, settings: CASettings, root: x509.Certificate, issuing: x509.Certificate, issuing_key, clock: Clock) -> None:
        self.home = Path(home)
        self.settings = settings
        self.root = root
        self.issuing = issuing
        self._issuing_key = issuing_key
        self.clock = clock
        self._inventory: Inventory | None = None
        self._passphrase: bytes | None = None  # to open retired issuing keys, which sign their CRLs
        self.audit = AuditLog(self.home / "audit.log", clock=clock)
        self.pending: PendingIssuer | None = None  # the next issuing CA while it waits for activation (pkictl.activation)
        self._pending_state: tuple[int, int, int, int] | None = None  # what refresh_issuing last saw on disk
        self._issuing_state: tuple[int, int, int, int] | None = None

    # -- creation and loading ---------------------------------------------------------------

    @staticmethod
    def exists(home: Path) -> bool:
        return (Path(home) / "ca.yaml").exists()

    @classmethod
    def init(
        cls, home: Path, settings: CASettings | None = None, *, clock: Clock | None = None, passphrase: bytes | None = None
    ) -> "CertificateAuthority":
        """Create a root and an issuing CA in ``home`` (:func:`pkictl.lifecycle.init_ca` writes
        them) and return it loaded; its audit log starts with ``init``, and the root's CRL is
        signed while the root key is at hand."""
        home, settings, clock = Path(home), settings or CASettings(), clock or SystemClock()
        made = init_ca(home, settings, clock=clock, passphrase=passphrase)
        ca = cls(home, settings, made.root, made.issuing, made.issuing_key, clock)
        ca._passphrase, ca._issuing_state = passphrase, file_state(home / "issuing" / "cert.pem")  # loaded: no re-read
        ca.audit.append("init", root_serial=made.root.serial_number, issuing_serial=made.issuing.serial_number,
                        trust_domain=settings.trust_domain, encrypted=passphrase is not None)
        # Empty CRLs from the start, the root's too (while its key is here): a server checking CRLs
        # needs one for each level of the chain to admit anyone (pkictl.root_crl).
        ca.sign_root_crl(made.root_key)
        return ca

    @classmethod
    def load(cls, home: Path, *, clock: Clock | None = None, passphrase: bytes | None = None) -> "CertificateAuthority":
        """Load the CA in ``home`` (only the issuing key is read; the root key may be offline).

        Args:
            passphrase: the CA key passphrase, when the keys are encrypted.

        Raises:
            CANotFoundError: no CA in ``home``.
            KeyProtectionError: the issuing key is readable by others or is a symlink.
            PassphraseError: the key is encrypted and the passphrase is missing or wrong.
            SettingsError: ca.yaml is malformed.
        """
        home = Path(home)
        if not cls.exists(home):
            raise CANotFoundError(f"no CA in {home}: run 'pkictl init-ca' first, or pass --home / set PKICTL_HOME")
        settings = CASettings.load(home / "ca.yaml")
        from .activation import finish_interrupted_rotation, open_issuing, promote_due

        clock = clock or SystemClock()
        remove_stale_temp_files(home)  # of a write cut short (a full disk, a kill): never read, only confusing
        finish_interrupted_rotation(home)
        promote_due(home, clock.now(), audit=AuditLog(home / "audit.log", clock=clock))  # its activation time has come
        root = read_certificates(home / "root" / "cert.pem", expected="the root CA certificate (PEM)",
                                 fix=CA_FILE_FIX.format(home=home))[0]
        issuing, issuing_key, state = open_issuing(home, passphrase)
        ca = cls(home, settings, root, issuing, issuing_key, clock)
        ca._passphrase, ca._issuing_state = passphrase, state
        ca.refresh_issuing()  # the pending issuing CA, if any
        return ca

    def refresh_issuing(self) -> bool:
        """Follow ``pkictl rotate-issuing`` made by another process: promote a pending issuing CA
        whose activation time has come, reload the issuing CA and the pending one when they
        changed on disk (:func:`pkictl.activation.refresh`; two stat calls when nothing did).

        Returns:
            True if the issuing CA or the pending one changed.

        Raises:
            KeyProtectionError, PassphraseError, StoreError: a new issuing key does not load.
        """
        from .activation import refresh

        return refresh(self)

    def rotate_issuing(self, *, activate_in: dt.timedelta | None = None) -> x509.Certificate:
        """Create the next issuing CA, active after ``activate_in``: see :func:`pkictl.lifecycle.rotate_issuing`."""
        return rotate_issuing(self, activate_in=activate_in)

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = Inventory(self.home / "inventory.sqlite3")
        return self._inventory

    def close(self) -> None:
        if self._inventory is not None:
            self._inventory.close()
            self._inventory = None

    @property
    def trust_anchors(self) -> list[x509.Certificate]:
        return [self.root]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Intermediates an end entity sends with its certificate (the issuing CA)."""
        return (self.issuing,)

    # -- issuance -----------------------------------------------------------------------------

    def issue(
        self,
        kind: str,
        name: str,
        public_key,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        first: bool = True,
        predecessor: x509.Certificate | None = None,
    ) -> x509.Certificate:
        """Sign an end-entity certificate for ``name`` with the identity policy gives it.

        The serial is recorded in the inventory before signing and the certificate is committed
        with it in one transaction, so no certificate ever leaves this method unrecorded. In the
        same transaction the key is checked to be nobody else's: not a CA key, not certified for
        or awaiting approval as another identity (:meth:`pkictl.inventory.Inventory.check_key_unused`).

        Args:
            kind: ``"node"`` (clientAuth) or ``"gateway"`` (serverAuth).
            name: node or gateway name (a DNS label).
            public_key: the subject's public key; P-256, P-384, RSA >= 2048 or Ed25519.
            dns_names, ip_addresses: gateway SANs (at least one of them for a gateway).
            first: a first enrollment (refused while the name holds an unexpired certificate);
                False for a renewal.
            predecessor: for a renewal, the certificate being renewed (issued, hence linted,
                by this CA): pkilint runs again only if the successor's profile differs from it
                (:func:`pkictl.lint.profile_difference`). The audit record says which.

        Raises:
            InvalidNameError, PolicyError: bad name, SAN or key.
            KeyReused: the key is a CA key or another identity's.
            AlreadyEnrolledError: ``first`` and the name is taken.
        """
        validate_name(name)
        check_public_key(public_key)
        self.refresh_issuing()  # a pending issuing CA whose activation time has come issues from now on
        if kind in ("gateway", "service"):
            dns_names = [check_dns_name(d) for d in dns_names]
            ip_addresses = [check_ip_address(i) for i in ip_addresses]
            if not dns_names and not ip_addresses:
                raise PolicyError("a gateway certificate needs at least one --dns NAME or --ip ADDRESS that nodes dial")
        elif kind == "node":
            dns_names, ip_addresses = (), ()
        else:
            raise PolicyError(f"kind {kind!r}: want node or gateway")
        now = self.clock.now()
        not_before, not_after = validity_window(now, self.settings.lifetime(kind))
        if not_after > self.issuing.not_valid_after_utc:
            raise PolicyError(
                f"the issuing CA expires at {self.issuing.not_valid_after_utc.isoformat()}, before the "
                f"new certificate would ({not_after.isoformat()}); rotate the issuing CA first"
            )
        sans = [f"DNS:{d}" for d in dns_names] + [f"IP:{i}" for i in ip_addresses]
        for _ in range(_SERIAL_ATTEMPTS):
            serial = x509.random_serial_number()
            builder = build_end_entity(
                kind, name=name, trust_domain=self.settings.trust_domain, public_key=public_key,
                issuer=self.issuing, not_before=not_before, not_after=not_after, serial=serial,
                dns_names=dns_names, ip_addresses=ip_addresses,
            )
            # Before any record or real signature.
            _, linted = prelint(builder, issuer_key_type=self._issuing_key, predecessor=predecessor)
            try:
                # The row goes in under the serial's UNIQUE constraint before the signature is
                # made, and both commit together (Inventory.record_signed).
                certificate = self.inventory.record_signed(
                    serial=serial, name=name, kind=kind, sans=sans, now=now, exclusive=first, issuer=self.issuing.serial_number,
                    sign=functools.partial(builder.sign, self._issuing_key, hashes.SHA256()), renewal_fraction=self.settings.renewal_fraction,
                    predecessor=predecessor.serial_number if predecessor is not None else None,
                    spki_sha256=hashlib.sha256(public_key_bytes(public_key)).hexdigest(),
                )
                break
            except sqlite3.IntegrityError:
                continue  # a serial collision: 2^-159 odds, but never reuse one
        else:  # pragma: no cover - needs a broken random source
            raise PolicyError("could not draw an unused serial number; is the random source broken?")
        self.audit.append("issued", kind=kind, name=name, serial=serial, not_after=not_after, sans=sans or [f"URI:{node_identity(self.settings.trust_domain, name)}"],
                          renewal=not first, lint="pkilint" if linted or predecessor is None else f"same profile as serial {predecessor.serial_number:x}")
        return certificate

    @audits_refusals("enroll")
    def enroll(
        self,
        kind: str,
        name: str,
        *,
        out: Path | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        replace: bool = False,
    ) -> Enrollment:
        """Make a key, issue the first certificate for ``name`` and write its bundle directory.

        Args:
            out: bundle directory; default ``<home>/bundles/<name>``. Without ``replace`` it must
                not exist or be empty.
            replace: issue anew even though ``name`` holds a current certificate, then revoke the
                old one(s) as ``superseded``. An existing bundle in ``out`` gets the new
                credential as a new version (its ``live`` link moves; nothing is deleted).

        Raises:
            InvalidNameError, PolicyError, AlreadyEnrolledError: see :meth:`issue` (the name is
                checked before ``out``).
            StoreError: ``out`` exists and is not empty (checked before anything is issued).
        """
        validate_name(name)
        now = self.clock.now()
        previous = self.inventory.unexpired(name, [kind], now) if replace else []
        if not replace:
            # The name first: an operator told "directory not empty" would only hit this next.
            self.inventory.check_available(kind, name, now)
        out = Path(out) if out is not None else self.home / "bundles" / name
        store = CredentialStore(out)
        update_in_place = replace and store.live.is_symlink()
        if not update_in_place and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"{out} exists and is not empty; choose another --out directory")
        key = generate_key()
        certificate = self.issue(kind, name, key.public_key(), dns_names=dns_names, ip_addresses=ip_addresses, first=not replace)
        credential = Credential(key, certificate, self.chain)
        if update_in_place:
            store.install(credential)
            store.write_trust_anchors(self.trust_anchors)
        else:
            CredentialStore.create(out, credential, self.trust_anchors)
        if previous:
            self.revoke_records(previous, reason="superseded")
        return Enrollment(certificate, out)

    @audits_refusals("enroll-csr")
    def enroll_csr(self, name: str, csr: x509.CertificateSigningRequest | bytes, *, out: Path, replace: bool = False) -> Enrollment:
        """Certify the key of a CSR made on node ``name`` (the private key never leaves the node)
        and write ``cert.pem``, ``chain.pem``, ``fullchain.pem`` and ``ca.pem`` into ``out``.

        Args:
            name: the node name.
            csr: the CSR, parsed or as the file's bytes (:func:`pkictl.policy.parse_csr`: exactly one CSR).
            out: the directory to write; it must not exist or be empty.
            replace: issue although ``name`` holds a current certificate, then revoke it as superseded.

        Raises:
            InvalidNameError, PolicyError: see :func:`pkictl.policy.parse_csr` and
                :func:`pkictl.policy.check_enrollment_csr`.
            KeyReused: the CSR's key is a CA key or another identity's (``operator_message`` says whose).
            AlreadyEnrolledError: the name holds a current certificate and not ``replace``.
            StoreError: ``out`` exists and is not empty (checked before anything is issued).
        """
        validate_name(name)
        if isinstance(csr, bytes):
            csr = parse_csr(csr, source="the CSR")
        check_enrollment_csr(csr, name=name, trust_domain=self.settings.trust_domain)
        now = self.clock.now()
        previous = self.inventory.unexpired(name, ["node"], now) if replace else []
        if not replace:
            self.inventory.check_available("node", name, now)
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"{out} exists and is not empty; choose another --out directory")
        certificate = self.issue("node", name, csr.public_key(), first=not replace)
        make_private_dir(out)
        write_new_file(out / "cert.pem", certificates_to_pem([certificate]))
        write_new_file(out / "chain.pem", certificates_to_pem(self.chain))
        write_new_file(out / "fullchain.pem", certificates_to_pem([certificate, *self.chain]))
        write_new_file(out / "ca.pem", certificates_to_pem(self.trust_anchors))
        if previous:
            self.revoke_records(previous, reason="superseded")
        return Enrollment(certificate, out)

    @audits_refusals("simple_reenroll")
    def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: x509.Certificate, *, rekey: bool = True) -> x509.Certificate:
        """Issue a successor to ``current`` for the key in ``csr`` (RFC 7030 section 4.2.2).

        Args:
            csr: the renewal request; its signature proves possession of the new key.
            current: the certificate being renewed; it authenticates the request.
            rekey: require a new key (the default; renewing with the same key is refused).

        Raises:
            CertificateUnusable: ``current`` was not issued by this CA, is not valid now, is
                revoked, or the inventory has no issued record of it (``reason`` says which).
            PolicyError: the CSR's signature is weak or invalid, its key unacceptable or reused,
                or its subject or subject alternative names differ from ``current`` (RFC 7030
                4.2.2: they MUST be identical).
            KeyReused: the new key is a CA key or another identity's.
        """
        now = self.clock.now()
        serial = f"{current.serial_number:x}"
        if not any(_issued_by(current, issuer) for issuer in (self.issuing, *self.retired_issuers())):
            raise CertificateUnusable(f"certificate serial {serial} (issuer {current.issuer.rfc4514_string()}) was not issued "
                                      "by this CA", reason="another CA")
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise CertificateUnusable(
                f"certificate serial {serial} is not valid now (valid {current.not_valid_before_utc.isoformat()} to "
                f"{current.not_valid_after_utc.isoformat()}): a certificate renews itself only while it is valid",
                reason="expired" if now > current.not_valid_after_utc else "not yet valid",
            )
        record = self.inventory.get(current.serial_number)
        if record is not None and record.status == "revoked":
            raise CertificateUnusable(f"certificate serial {serial} is revoked ({record.revocation_reason}): a revoked "
                                      "certificate cannot renew", reason="revoked")
        if record is None or record.status != "issued" or record.kind not in ("node", "gateway", "service"):
            raise CertificateUnusable(f"certificate serial {serial} is not in the inventory as an issued end entity", reason="unknown")
        check_csr_signature(csr)
        if csr.subject != current.subject:
            raise PolicyError(f"CSR subject {csr.subject.rfc4514_string()!r} differs from the current certificate's {current.subject.rfc4514_string()!r} (RFC 7030 4.2.2)")
        try:
            csr_sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            csr_sans = None
        current_sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if csr_sans != current_sans:
            got = [str(getattr(n, "value", n)) for n in csr_sans] if csr_sans is not None else []
            want = [str(getattr(n, "value", n)) for n in current_sans]
            raise PolicyError(f"CSR subject alternative names differ from the current certificate's: got {got}, want exactly "
                              f"{want} (RFC 7030 4.2.2)")
        if rekey and public_key_bytes(csr.public_key()) == public_key_bytes(current.public_key()):
            raise PolicyError("the CSR reuses the current key; a renewal needs a new key (rekey)")
        for _ in range(2):  # a lost race is answered as the winner's state says, on a second look
            if record.successor is not None or record.superseded:
                return self._renewed_already(record, csr)
            dns = [s[4:] for s in record.sans if s.startswith("DNS:")]
            ips = [s[3:] for s in record.sans if s.startswith("IP:")]
            try:
                return self.issue(record.kind, record.name, csr.public_key(), dns_names=dns, ip_addresses=ips, first=False,
                                  predecessor=current)
            except Superseded:
                record = self.inventory.get(current.serial_number) or record
        raise CertificateUnusable(f"certificate serial {serial} was renewed by a concurrent request", reason="superseded")

    def _renewed_already(self, record: Record, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """The answer to a renewal of a certificate that is no longer its identity's current one.

        The same request again (its key is the successor's: the first answer was lost) gets the
        successor once more, so a renewal can be retried; any other key is refused, so that a
        key stolen with an old certificate does not keep the identity, and concurrent renewals of
        one certificate fork nothing.

        Raises:
            CertificateUnusable: ``superseded``, naming the certificate that is current now.
        """
        successor = self.inventory.get(record.successor) if record.successor is not None else None
        spki = hashlib.sha256(public_key_bytes(csr.public_key())).hexdigest()
        if successor is not None and successor.status == "issued" and successor.spki_sha256 == spki and not successor.superseded:
            return x509.load_pem_x509_certificate(successor.pem.encode())
        current = successor if successor is not None and not successor.superseded else self.inventory.current(record.kind, record.name)
        by = f"serial {current.serial:x}" if current is not None else "a newer certificate"
        raise CertificateUnusable(f"certificate serial {record.serial:x} is superseded by {by}: only the current certificate "
                                  f"of {record.kind} {record.name} renews", reason="superseded")

    def record(self, name: str, kind: str) -> Record:
        """The newest issued record of ``name``.

        Raises:
            NotEnrolledError: none.
        """
        for record in self.inventory.records():
            if record.kind == kind and record.name.lower() == name.lower():
                return record
        raise NotEnrolledError(f"no {kind} named {name} in the inventory of {self.home}")
