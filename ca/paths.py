"""Certification path validation (RFC 5280 section 6) of a certificate for its own purpose, by cryptography's verifier."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import PathValidationError

__all__ = ["validate_path"]


def _purposes(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _server_subject(certificate: x509.Certificate) -> x509.DNSName | x509.IPAddress:
    """The first DNS name (else IP address) a server certificate names, to verify it for."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    dns, ips = sans.get_values_for_type(x509.DNSName), sans.get_values_for_type(x509.IPAddress)
    if not dns and not ips:
        raise PathValidationError("a server certificate without a DNS name or IP address")
    return x509.DNSName(dns[0]) if dns else x509.IPAddress(ips[0])


def validate_path(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                  anchors: Sequence[x509.Certificate], at: dt.datetime) -> list[x509.Certificate]:
    """The path from ``leaf`` through some of ``intermediates`` to one of ``anchors``, validated at ``at``.

    cryptography builds the path (signatures checked, not only names matched: two CAs of one
    name cannot be confused) and validates it under its RFC 5280 policy, for the leaf's own
    purpose: serverAuth, named by its first DNS name or IP address, when its extended key usage
    allows it (a gateway), else clientAuth (a node).

    Args:
        leaf: the end-entity certificate.
        intermediates: candidate CA certificates, in any order; unused ones are ignored.
        anchors: the trust anchors (self-signed roots).
        at: the time to validate at (aware UTC datetime).

    Returns:
        The path, leaf first and trust anchor last.

    Raises:
        PathValidationError: no valid path, with cryptography's reason.
    """
    if not anchors:
        raise PathValidationError("no trust anchor to validate the path against")
    builder = verification.PolicyBuilder().store(verification.Store(list(anchors))).time(at)
    try:
        if ExtendedKeyUsageOID.SERVER_AUTH in _purposes(leaf):
            return builder.build_server_verifier(_server_subject(leaf)).verify(leaf, list(intermediates))
        return builder.build_client_verifier().verify(leaf, list(intermediates)).chain
    except verification.VerificationError as exc:
        raise PathValidationError(str(exc)) from None
