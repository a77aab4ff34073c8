"""The EST service's own server certificate: renewed through the CA's renewal policy, like everyone's.

A due certificate renews with :meth:`CertificateAuthority.simple_reenroll`, authenticated by the
current certificate, so the CA refuses a revoked or expired one (RFC 7030 4.2.2) for the service
exactly as for a node. Only a certificate that cannot renew (revoked, expired, issued by a retired
CA that is gone, or with other names than the service now has) is replaced by a fresh issuance,
with a WARNING saying why.
"""

from __future__ import annotations

import logging

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..authority import CertificateAuthority, san_strings
from ..errors import PKIError, StoreError
from ..profile import generate_key
from ..renewal import is_due
from ..store import Credential, CredentialStore

__all__ = ["SERVICE_NAME", "ensure_service_credential"]

log = logging.getLogger("pkictl.serve")
SERVICE_NAME = "est"  # the name of the service's own certificate in the inventory


def _wanted(dns_names: list[str], ip_addresses: list[str]) -> list[str]:
    return sorted([f"DNS:{d.lower()}" for d in dns_names] + [f"IP:{i}" for i in ip_addresses])


def ensure_service_credential(ca: CertificateAuthority, store: CredentialStore, *, dns_names: list[str],
                              ip_addresses: list[str], name: str = SERVICE_NAME) -> tuple[Credential, bool]:
    """Keep ``store`` holding a usable service certificate for these names.

    Args:
        ca: the loaded CA; its clock decides what is due.
        store: the service's credential directory (``<home>/service``).
        dns_names, ip_addresses: the names nodes dial (the certificate's SANs).
        name: its identity in the inventory; each replica of a CA on one database has its own
            (``pkictl serve --replica``): under one name, each replica's issuance would supersede
            the other's, and the superseded one would be revoked.

    Returns:
        ``(credential in service, whether it is new)``.

    Raises:
        PKIError: a fresh issuance was needed and the CA refused it (e.g. a bad name).
    """
    now = ca.clock.now()
    credential, damaged = None, None
    if store.live.is_symlink():
        try:
            credential = store.load()
        except StoreError as exc:  # the CA can make another: a damaged file of its own is no reason not to serve
            damaged = str(exc)
            log.warning("the service credential in %s is damaged: %s; issuing a new one", store.directory, exc)
    try:
        store.load_trust_anchors()
    except StoreError as exc:
        if damaged is None and store.live.is_symlink():
            log.warning("%s; rewriting it from the CA's root certificate", exc)
            store.write_trust_anchors(ca.trust_anchors)
    wanted = _wanted(dns_names, ip_addresses)
    why = None
    if credential is not None:
        cert = credential.certificate
        record = ca.inventory.get(cert.serial_number)
        if sorted(san_strings(cert)) != wanted:
            why = f"its names {sorted(san_strings(cert))} are not the service's {wanted}"
        elif record is not None and record.status == "revoked":
            why = f"it is revoked ({record.revocation_reason})"
        elif not is_due(now, cert.not_valid_before_utc, cert.not_valid_after_utc, fraction=ca.settings.renewal_fraction):
            return credential, False
    key = generate_key()
    certificate = None
    if credential is not None and why is None:
        csr = _renewal_csr(credential.certificate, key)
        try:
            certificate = ca.simple_reenroll(csr, credential.certificate)
        except PKIError as exc:  # audited by simple_reenroll; the service must keep a certificate
            why = f"it cannot renew: {exc}"
    if certificate is None:
        if credential is not None:
            log.warning("the service certificate (serial %x) is unusable: %s; issuing a new one", credential.certificate.serial_number, why)
        certificate = ca.issue("service", name, key.public_key(), dns_names=dns_names, ip_addresses=ip_addresses, first=False)
    fresh = Credential(key, certificate, ca.chain)
    if store.live.is_symlink():
        store.install(fresh)
        store.write_trust_anchors(ca.trust_anchors)
    else:
        CredentialStore.create(store.directory, fresh, ca.trust_anchors)
    log.info("service certificate serial %x, not after %s (%s)", certificate.serial_number, certificate.not_valid_after_utc.isoformat(),
             "renewed" if why is None and credential is not None else "issued")
    return fresh, True


def _renewal_csr(current: x509.Certificate, key) -> x509.CertificateSigningRequest:
    """A CSR for ``key`` with ``current``'s subject and SANs, as RFC 7030 4.2.2 wants them (identical)."""
    sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (x509.CertificateSigningRequestBuilder().subject_name(current.subject)
            .add_extension(sans, critical=False).sign(key, hashes.SHA256()))
