"""Rotation of one credential: rekey, request a successor, verify it, install it atomically.

rotate = renew (the CA signs a successor for a new key) + install (new archive version, ``live``
swapped) + reload (the caller's business, after this returns).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pkictl.clock import Clock
from pkictl.errors import DiskWriteError, PathValidationError, PKIError
from pkictl.files import PRIVATE_FILE_MODE, read_private_file, write_new_file
from pkictl.keys import load_private_key
from pkictl.paths import validate_path
from pkictl.pem import PrivateKey, private_key_to_pem, public_key_bytes
from pkictl.profile import generate_key
from pkictl.store import Credential, CredentialStore

from ..errors import RenewalError
from ..est_client import ESTClient

__all__ = ["SuccessorSource", "RenewalSource", "LocalCA", "build_reenroll_csr", "verify_successor", "rotate", "pending_key", "discard_pending_key",
           "RENEWAL_KEY"]


class SuccessorSource(Protocol):
    """Where a successor certificate comes from: all that :func:`rotate` needs."""

    def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: Credential) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Return the new certificate and its chain (intermediates), or raise RenewalError."""
        ...


class RenewalSource(SuccessorSource, Protocol):
    """The CA an agent renews from, whichever way it is reached: the CA home on this host
    (:class:`LocalCA`) or EST over the network (:class:`pki_agent.est_client.ESTClient`).

    The agent asks its source, never its type: what only the network can do (fetching the CRL
    and the trust bundle, re-pairing a revoked host) comes through :attr:`est_client`.
    """

    @property
    def est_client(self) -> ESTClient | None:
        """The EST client when the CA is reached over the network, else None."""
        ...

    def maintain(self) -> str | None:
        """The source's own work between renewals (the CA host re-signs a CRL past half its
        validity); returns a line for the log when it did something.

        Raises:
            PKIError: the work failed; the agent logs it and keeps serving.
        """
        ...

    def gateway_report(self, body: bytes) -> None:
        """Hand this gateway's connection table (JSON, :mod:`pkictl.fleet_report`) to the CA.

        Raises:
            PKIError: refused or unreachable; the report is sent again at the next heartbeat.
        """
        ...


class LocalCA:
    """Renew with the CA in ``home`` directly: for an agent running on the CA host.

    Args:
        home: the CA home directory.
        clock: the CA's time source.
        passphrase_file: the CA key passphrase file, when the keys are encrypted (else the
            PKICTL_CA_PASSPHRASE environment variable is used, if set).
        store: this host's credential, whose certificate a gateway's reports are stored under.
    """

    est_client = None  # the CA is on this host: nothing goes over the network

    def __init__(self, home: Path, clock: Clock, passphrase_file: Path | None = None, store: CredentialStore | None = None) -> None:
        self.home = Path(home)
        self.clock = clock
        self.passphrase_file = passphrase_file
        self.store = store

    def _load(self):
        import os

        from pkictl.authority import CertificateAuthority
        from pkictl.keys import read_passphrase

        passphrase = read_passphrase(passphrase_file=self.passphrase_file, environ=os.environ)
        return CertificateAuthority.load(self.home, clock=self.clock, passphrase=passphrase)

    def simple_reenroll(self, csr, current):
        try:
            ca = self._load()
            try:
                return ca.simple_reenroll(csr, current.certificate), ca.chain
            finally:
                ca.close()
        except PKIError as exc:
            raise RenewalError(f"the CA in {self.home} refused the renewal: {exc}") from exc

    def refresh_crl(self) -> bool:
        """Re-sign the CA's CRL if half its validity has passed; True if it did."""
        ca = self._load()
        try:
            return ca.refresh_crl()
        finally:
            ca.close()

    def maintain(self) -> str | None:
        return f"CRL of the CA in {self.home} re-signed" if self.refresh_crl() else None

    def gateway_report(self, body: bytes) -> None:
        """Store the report in the CA home's inventory, with the checks ``pkictl serve`` makes
        (:func:`pkictl.fleet_report.accept_report`): this gateway's certificate, issued and valid."""
        from pkictl.fleet_report import accept_report
        from pkictl.inventory import Inventory

        assert self.store is not None, "a gateway's LocalCA is given its credential store"
        inventory = Inventory.open(self.home)
        try:
            accept_report(inventory, self.store.load().certificate, body, self.clock.now())
        finally:
            inventory.close()


def build_reenroll_csr(current: x509.Certificate, key) -> x509.CertificateSigningRequest:
    """A CSR for ``key`` with the subject and SAN of ``current`` (RFC 7030 4.2.2: they MUST be
    identical to the certificate being renewed)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(current.subject)
    try:
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = builder.add_extension(san, critical=False)
    except x509.ExtensionNotFound:
        pass
    return builder.sign(key, hashes.SHA256())


def verify_successor(new: Credential, current: Credential, anchors: list[x509.Certificate], now: dt.datetime) -> None:
    """Check a successor before it may replace ``current``.

    Checks: it chains to ``anchors`` for the same purpose (clientAuth or serverAuth, via
    cryptography's RFC 5280 path validation), its subject and SAN equal the current ones, and it
    is valid at ``now``. The key match is checked when the Credential is built.

    Raises:
        RenewalError: naming the check that failed.
    """
    if new.certificate.subject != current.certificate.subject:
        raise RenewalError(f"the CA returned subject {new.certificate.subject.rfc4514_string()}, want {current.certificate.subject.rfc4514_string()}")
    san_type = x509.SubjectAlternativeName
    if new.certificate.extensions.get_extension_for_class(san_type).value != current.certificate.extensions.get_extension_for_class(san_type).value:
        raise RenewalError("the CA returned different subject alternative names")
    if not new.certificate.not_valid_before_utc <= now < new.certificate.not_valid_after_utc:
        raise RenewalError(
            f"the new certificate is not valid now ({now.isoformat()}): valid "
            f"{new.certificate.not_valid_before_utc.isoformat()} to {new.certificate.not_valid_after_utc.isoformat()}; check the clocks"
        )
    try:
        validate_path(new.certificate, new.chain, anchors, now)
    except PathValidationError as exc:
        raise RenewalError(f"the new certificate does not verify against the trust anchor: {exc}") from None


RENEWAL_KEY = ".renewal-key.pem"  # in the credential directory from a renewal's request until its install


def pending_key(path: Path, *, not_for: x509.Certificate | None = None) -> PrivateKey:
    """The key a pending request was (or is about to be) made for: the one in ``path`` if it is
    there, else a new one written there first (0600).

    A request can be answered and the answer lost (the connection drops, the process is killed
    before it installs): the CA has then renewed the certificate, and only the same request
    again, for the same key, gets that successor back (a renewal of a superseded certificate
    with another key is refused). So the key outlives the process until its certificate is
    installed.

    Args:
        path: where the pending key lives.
        not_for: a certificate whose key must not be taken (an install whose pending key was not
            removed: the key is the current certificate's already).
    """
    try:
        key = load_private_key(read_private_file(path), None, source=str(path))
        if not_for is None or public_key_bytes(key.public_key()) != public_key_bytes(not_for.public_key()):
            return key
    except FileNotFoundError:
        pass
    except PKIError:
        pass  # half-written by a crash before any request went out with it: start over
    discard_pending_key(path)
    key = generate_key()
    write_new_file(path, private_key_to_pem(key), PRIVATE_FILE_MODE)
    return key


def discard_pending_key(path: Path) -> None:
    """Forget a pending key (its certificate is installed, or its request was refused for good)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rotate(store: CredentialStore, current: Credential, source: SuccessorSource, clock: Clock) -> Credential:
    """Rekey and renew ``current``, verify the successor and install it in ``store``.

    On any error nothing on disk changes but the pending key (:func:`pending_key`), and
    ``current`` stays in service.

    Returns:
        The installed successor.

    Raises:
        RenewalError: the source refused, the successor failed verification, or the disk has no
            room for it (the message names the path and the fix).
    """
    key_path = store.directory / RENEWAL_KEY
    try:
        key = pending_key(key_path, not_for=current.certificate)
    except DiskWriteError as exc:
        raise _disk_failure(exc) from None
    csr = build_reenroll_csr(current.certificate, key)
    certificate, chain = source.simple_reenroll(csr, current)
    try:
        successor = Credential(key, certificate, tuple(chain))
    except PKIError as exc:
        raise RenewalError(f"the CA returned a certificate for another key: {exc}") from None
    verify_successor(successor, current, store.load_trust_anchors(), clock.now())
    try:
        store.install(successor)
    except DiskWriteError as exc:
        # The pending key stays: the CA has renewed for it, and the same request gets that
        # successor back once there is room.
        raise _disk_failure(exc) from None
    discard_pending_key(key_path)
    return successor


def _disk_failure(exc: DiskWriteError) -> RenewalError:
    return RenewalError(f"{exc}, then run pki-agent renew-now")
