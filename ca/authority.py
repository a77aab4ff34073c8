"""The certificate authority: a root and an issuing CA in a home directory, and issuance policy.

Home layout::

    <home>/ca.yaml                 settings (written last by init: its presence means "a CA is here")
    <home>/ca.pem                  trust anchor (the root certificate)
    <home>/root/{cert,key}.pem     root; the key is needed only to certify an issuing CA and sign its own CRL
    <home>/root/crl.pem            the root's last CRL, copied into crl.pem (:mod:`pkictl.root_crl`)
    <home>/crl.pem                 the issuing CAs' CRLs and the root's (:mod:`pkictl.revocation`)
    <home>/issuing/{cert,key}.pem  issuing CA; signs every end-entity certificate
    <home>/inventory.sqlite3       every issued certificate (:mod:`pkictl.inventory`)
    <home>/database.yaml           instead: the PostgreSQL database replicas share (:mod:`pkictl.storage.location`)
    <home>/bundles/<name>/         default output of enroll-node / enroll-gateway
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .activation import PENDING, file_state, finish_interrupted_rotation, open_issuing, promote_due, usable_pending
from .clock import Clock, SystemClock
from .errors import CANotFoundError, NotEnrolledError, PolicyError
from .audit import AuditLog, open_audit_log
from .file_errors import CA_FILE_FIX, read_certificates
from .files import remove_stale_temp_files
from .inventory import Inventory, Record
from .storage.database import DuplicateKey
from .lifecycle import init_ca, rotate_issuing
from .lint import prelint, signed
from .names import validate_name
from .policy import check_dns_name, check_ip_address, check_public_key
from .pem import public_key_bytes
from .bootstrap import DEFAULT_TOKEN_TTL, Bootstrap
from .bundles import BundleEnrollment, Enrollment
from .reenrollment import Reenrollment
from .revocation import Revocation
from .profile import build_end_entity, node_identity, operator_identity, validity_window
from .settings import CASettings

if TYPE_CHECKING:
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

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


class CertificateAuthority:
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
        self.audit: AuditLog = open_audit_log(self.home, clock=clock)
        self.pending: PendingIssuer | None = None  # the next issuing CA while it waits for activation (pkictl.activation)
        self._pending_state: tuple[int, int, int, int] | None = None  # what refresh_issuing last saw on disk
        self._issuing_state: tuple[int, int, int, int] | None = None
        # Collaborators, each with the interface it needs of this CA (RevocationHost, EnrollmentHost).
        self.revocation = Revocation(self)
        self.bootstrap = Bootstrap(self, self.revocation)
        self.reenrollment = Reenrollment(self)
        self.bundles = BundleEnrollment(self, self.revocation)

    # -- creation and loading ---------------------------------------------------------------

    @staticmethod
    def exists(home: Path) -> bool:
        return (Path(home) / "ca.yaml").exists()

    @classmethod
    def init(
        cls, home: Path, settings: CASettings | None = None, *, clock: Clock | None = None, passphrase: bytes | None = None,
        db_url: str | None = None,
    ) -> "CertificateAuthority":
        """Create a root and an issuing CA in ``home`` (:func:`pkictl.lifecycle.init_ca` writes
        them, and takes ``db_url``) and return it loaded; its audit log starts with ``init``, and
        the root's CRL is signed while the root key is at hand."""
        home, settings, clock = Path(home), settings or CASettings(), clock or SystemClock()
        made = init_ca(home, settings, clock=clock, passphrase=passphrase, db_url=db_url)
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
        clock = clock or SystemClock()
        remove_stale_temp_files(home)  # of a write cut short (a full disk, a kill): never read, only confusing
        finish_interrupted_rotation(home)
        promote_due(home, clock.now(), audit=open_audit_log(home, clock=clock))  # its activation time has come
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
        changed on disk (two stat calls when nothing did: :func:`pkictl.activation.file_state`).

        Returns:
            True if the issuing CA or the pending one changed.

        Raises:
            KeyProtectionError, PassphraseError, StoreError: a new issuing key does not load.
        """
        home, changed = self.home, False
        pending_state = file_state(home / PENDING / "cert.pem")
        if pending_state != self._pending_state:
            self.pending, self._pending_state = usable_pending(home), pending_state
            changed = True
        if self.pending is not None and self.clock.now() >= self.pending.activate_at:
            promote_due(home, self.clock.now(), audit=self.audit, pending=self.pending)
            self.pending, self._pending_state = usable_pending(home), file_state(home / PENDING / "cert.pem")
            changed = True
        if file_state(home / "issuing" / "cert.pem") != self._issuing_state:
            certificate, key, state = open_issuing(home, self._passphrase)
            changed = changed or certificate.serial_number != self.issuing.serial_number
            self.issuing, self._issuing_key, self._issuing_state = certificate, key, state
        return changed

    @property
    def issuing_key(self) -> CertificateIssuerPrivateKeyTypes:
        """The current issuing CA's private key (it signs every end-entity certificate and its CRL)."""
        return self._issuing_key

    @property
    def passphrase(self) -> bytes | None:
        """The CA keys' passphrase given at load (None: unencrypted), to open retired and root keys."""
        return self._passphrase

    def rotate_issuing(self, *, activate_in: dt.timedelta | None = None) -> x509.Certificate:
        """Create the next issuing CA, active after ``activate_in``: see :func:`pkictl.lifecycle.rotate_issuing`."""
        return rotate_issuing(self, activate_in=activate_in)

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = Inventory.open(self.home)
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
            kind: ``"node"`` (clientAuth), ``"gateway"`` (serverAuth) or ``"operator"`` (clientAuth,
                the admin page's: :mod:`pkictl.operators`).
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
        elif kind in ("node", "operator"):
            dns_names, ip_addresses = (), ()
        else:
            raise PolicyError(f"kind {kind!r}: want node, gateway or operator")
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
            except DuplicateKey:
                continue  # a serial collision: 2^-159 odds, but never reuse one
        else:  # pragma: no cover - needs a broken random source
            raise PolicyError("could not draw an unused serial number; is the random source broken?")
        identity = operator_identity if kind == "operator" else node_identity
        self.audit.append("issued", kind=kind, name=name, serial=serial, not_after=not_after, sans=sans or [f"URI:{identity(self.settings.trust_domain, name)}"],
                          renewal=not first, lint="pkilint" if linted or predecessor is None else f"same profile as serial {predecessor.serial_number:x}")
        return certificate

    def enroll(self, kind: str, name: str, *, out: Path | None = None, dns_names: Sequence[str] = (),
               ip_addresses: Sequence[str] = (), replace: bool = False) -> Enrollment:
        """See :meth:`pkictl.bundles.BundleEnrollment.enroll`."""
        return self.bundles.enroll(kind, name, out=out, dns_names=dns_names, ip_addresses=ip_addresses, replace=replace)

    def enroll_csr(self, name: str, csr: x509.CertificateSigningRequest | bytes, *, out: Path, replace: bool = False) -> Enrollment:
        """See :meth:`pkictl.bundles.BundleEnrollment.enroll_csr`."""
        return self.bundles.enroll_csr(name, csr, out=out, replace=replace)

    def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: x509.Certificate, *, rekey: bool = True) -> x509.Certificate:
        """See :meth:`pkictl.reenrollment.Reenrollment.simple_reenroll` (RFC 7030 4.2.2)."""
        return self.reenrollment.simple_reenroll(csr, current, rekey=rekey)

    def record(self, name: str, kind: str) -> Record:
        """The newest issued record of ``name``.

        Raises:
            NotEnrolledError: none.
        """
        for record in self.inventory.records():
            if record.kind == kind and record.name.lower() == name.lower():
                return record
        raise NotEnrolledError(f"no {kind} named {name} in the inventory of {self.home}")

    # -- revocation and first enrollment: the collaborators' operations, on the CA -------------

    @property
    def crl_path(self) -> Path:
        """``<home>/crl.pem``: the CRLs of every issuing CA and the root (:class:`pkictl.revocation.Revocation`)."""
        return self.revocation.crl_path

    def find_revocable(self, target: str) -> list[Record]:
        """See :meth:`pkictl.revocation.Revocation.find_revocable`."""
        return self.revocation.find_revocable(target)

    def revoke(self, target: str, *, reason: str = "unspecified", by: str | None = None) -> list[Record]:
        """See :meth:`pkictl.revocation.Revocation.revoke`."""
        return self.revocation.revoke(target, reason=reason, by=by)

    def revoke_records(self, records: Sequence[Record], *, reason: str) -> None:
        """See :meth:`pkictl.revocation.Revocation.revoke_records`."""
        self.revocation.revoke_records(records, reason=reason)

    def revoke_superseded(self) -> list[Record]:
        """See :meth:`pkictl.revocation.Revocation.revoke_superseded`."""
        return self.revocation.revoke_superseded()

    def retired_issuers(self) -> list[x509.Certificate]:
        """See :meth:`pkictl.revocation.Revocation.retired_issuers`."""
        return self.revocation.retired_issuers()

    def sign_crl(self) -> list[x509.CertificateRevocationList]:
        """See :meth:`pkictl.revocation.Revocation.sign_crl`."""
        return self.revocation.sign_crl()

    def sign_root_crl(self, root_key: CertificateIssuerPrivateKeyTypes | None = None) -> x509.CertificateRevocationList:
        """See :meth:`pkictl.revocation.Revocation.sign_root_crl`."""
        return self.revocation.sign_root_crl(root_key)

    def refresh_crl(self) -> bool:
        """See :meth:`pkictl.revocation.Revocation.refresh_crl`."""
        return self.revocation.refresh_crl()

    def create_token(self, name: str, *, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, replace: bool = False) -> tuple[str, dt.datetime]:
        """See :meth:`pkictl.bootstrap.Bootstrap.create_token`."""
        return self.bootstrap.create_token(name, ttl=ttl, replace=replace)

    def simple_enroll(self, csr: x509.CertificateSigningRequest, *, name: str | None, token: str | None, peer: str) -> x509.Certificate:
        """See :meth:`pkictl.bootstrap.Bootstrap.simple_enroll` (RFC 7030 4.2.1)."""
        return self.bootstrap.simple_enroll(csr, name=name, token=token, peer=peer)

    def approve(self, name: str, *, code: str, by: str | None = None) -> list[Record]:
        """See :meth:`pkictl.bootstrap.Bootstrap.approve`."""
        return self.bootstrap.approve(name, code=code, by=by)

    def deny(self, name: str, *, by: str | None = None) -> int:
        """See :meth:`pkictl.bootstrap.Bootstrap.deny`."""
        return self.bootstrap.deny(name, by=by)
