"""The certificate profile (RFC 5280): one builder per kind, identity taken from policy only.

See docs/design.md, "Certificate profile", for the table these functions implement.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KINDS",
    "END_ENTITY_KINDS",
    "node_identity",
    "operator_identity",
    "generate_key",
    "validity_window",
    "build_root",
    "build_issuing",
    "build_end_entity",
]

KINDS = ("root", "issuing", "gateway", "node", "service", "operator")
# service: pkictl serve's own server certificate; operator: a person's client certificate for the
# admin page of pkictl serve (docs/design.md, "Operator certificates")
END_ENTITY_KINDS = ("gateway", "node", "service", "operator")

# RFC 5280 4.1.2.5 allows any notBefore; backdating absorbs clock skew between the CA and the
# peers that verify, but never more than a tenth of a short lifetime.
_MAX_BACKDATE = dt.timedelta(minutes=5)


def node_identity(trust_domain: str, name: str) -> str:
    """The URI SAN naming node ``name``: ``spiffe://<trust_domain>/node/<name in lower case>``."""
    return f"spiffe://{trust_domain}/node/{name.lower()}"


def operator_identity(trust_domain: str, name: str) -> str:
    """The URI SAN naming operator ``name``: ``spiffe://<trust_domain>/operator/<name in lower case>``.

    A path apart from ``/node/``: the gateway admits exactly one ``/node/`` identity, so an
    operator certificate never authenticates a node, and the admin listener admits only this one.
    """
    return f"spiffe://{trust_domain}/operator/{name.lower()}"


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key, the profile's key type for every certificate."""
    return ec.generate_private_key(ec.SECP256R1())


def validity_window(now: dt.datetime, lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    """``(not_valid_before, not_valid_after)`` for a certificate issued at ``now``.

    notBefore is backdated by min(5 min, lifetime / 10) and truncated to whole seconds (X.509
    times have one-second resolution, RFC 5280 4.1.2.5); notAfter = notBefore + lifetime, so the
    lifetime read back from the certificate is exactly ``lifetime``.
    """
    backdate = min(_MAX_BACKDATE, lifetime / 10)
    not_before = (now - backdate).replace(microsecond=0)
    return not_before, not_before + lifetime


def _ski(public_key) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _base(subject: x509.Name, issuer: x509.Name, public_key, not_before, not_after, serial: int):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def build_root(subject: x509.Name, public_key, not_before, not_after, serial: int) -> x509.CertificateBuilder:
    """The self-signed trust anchor: CA:TRUE (critical), keyCertSign + cRLSign, SKI, no EKU.

    It also carries an AKI equal to its own SKI (RFC 5280 4.2.1.1 allows it for self-signed
    certificates): pre-issuance lint signs with a throwaway key, under which the root is not
    self-signed, and pkilint then requires the AKI.
    """
    return (
        _base(subject, subject, public_key, not_before, not_after, serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    )


def build_issuing(subject: x509.Name, public_key, root: x509.Certificate, not_before, not_after, serial: int) -> x509.CertificateBuilder:
    """The issuing CA: CA:TRUE pathLen 0 (critical), keyCertSign + cRLSign, SKI + AKI, no EKU.

    No EKU on purpose: an issuing CA restricted to serverAuth breaks client chains (docs/design.md).
    """
    return (
        _base(subject, root.subject, public_key, not_before, not_after, serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(root), critical=False)
    )


def build_end_entity(
    kind: str,
    *,
    name: str,
    trust_domain: str,
    public_key,
    issuer: x509.Certificate,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> x509.CertificateBuilder:
    """A gateway (serverAuth + clientAuth), EST service (serverAuth), node or operator (clientAuth) certificate.

    Args:
        kind: ``"gateway"`` (serverAuth for its listener, clientAuth to renew over EST),
            ``"service"`` (serverAuth), ``"node"`` (clientAuth, URI SAN ``.../node/<name>``) or
            ``"operator"`` (clientAuth, URI SAN ``.../operator/<name>``: the admin page's users).
        name: the validated name; it becomes the subject CN.
        trust_domain: SPIFFE trust domain of node identities.
        public_key: the subject's public key (from a key made here or a verified CSR).
        issuer: the issuing CA certificate (for the issuer name and AKI).
        not_before, not_after: aware UTC datetimes.
        serial: a fresh random serial number (RFC 5280 4.1.2.2).
        dns_names, ip_addresses: gateway subject alternative names; ignored for nodes, whose
            only SAN is their SPIFFE URI.
    """
    if kind == "node":
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_identity(trust_domain, name))]
        ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    elif kind == "operator":
        sans = [x509.UniformResourceIdentifier(operator_identity(trust_domain, name))]
        ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    elif kind in ("gateway", "service"):
        sans = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        # A gateway renews over EST authenticated by its own certificate (RFC 7030 4.2.2), and
        # OpenSSL verifies a TLS client against the clientAuth purpose: without it the gateway
        # can never renew. Node identity is the node URI SAN, which a gateway never carries, so
        # the listener still refuses it as a node (docs/design.md, "Gateway certificates").
        ekus = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if kind == "gateway" else [])
    else:
        raise ValueError(f"kind {kind!r}: want one of {END_ENTITY_KINDS}")
    return (
        _base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), issuer.subject, public_key, not_before, not_after, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
