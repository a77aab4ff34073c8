"""The EST client picks the chain of a renewed certificate by path validation, not by name: a CA
certificate that has the issuer's name but not its key is never chosen."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki_agent.est_client import select_chain

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.lan"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
               .not_valid_after(NOW + dt.timedelta(days=30))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if ca:
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True))
    else:
        builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.lan/node/tw")]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _fleet():
    root_key, issuing_key, decoy_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = _certificate(_name("Root"), root_key, _name("Root"), root_key, ca=True)
    issuing = _certificate(_name("Issuing"), issuing_key, _name("Root"), root_key, ca=True)
    # Same name as the issuing CA, also signed by the root: only its key differs.
    decoy = _certificate(_name("Issuing"), decoy_key, _name("Root"), root_key, ca=True)
    leaf = _certificate(_name("TW"), leaf_key, _name("Issuing"), issuing_key, ca=False)
    return root, issuing, decoy, leaf


def test_the_issuer_is_found_by_its_key_not_its_name():
    root, issuing, decoy, leaf = _fleet()
    assert select_chain(leaf, [decoy, issuing, root]) == (issuing,)
    assert select_chain(leaf, [root, issuing, decoy]) == (issuing,)


def test_no_chain_without_the_real_issuer_or_a_root():
    root, issuing, decoy, leaf = _fleet()
    assert select_chain(leaf, [decoy, root]) == ()  # a name match alone is not a path
    assert select_chain(leaf, [issuing]) == ()  # no self-signed root to end at
    other_root = _fleet()[0]
    assert select_chain(leaf, [issuing, other_root]) == ()  # another CA's root of the same name
