"""What a CSR sent to ``pkictl serve`` must carry, as the CSR attributes of RFC 7030 section 4.5
(``GET /.well-known/est/csrattrs``), encoded by pyasn1-alt-modules, never by hand.

The answer lists what :func:`pkictl.policy.check_public_key` and
:func:`pkictl.policy.check_enrollment_csr` accept (docs/design.md, "What a CSR must carry"):

- ``ecdsa-with-SHA256`` and ``sha256WithRSAEncryption``: the signature algorithms to sign with
  (an ``oid`` entry, RFC 7030 4.5.2);
- an ``id-ecPublicKey`` attribute whose values are the named curves accepted (P-256, P-384), an
  ``rsaEncryption`` attribute whose value is the smallest RSA modulus accepted (2048 bits), and
  ``id-Ed25519``: the key types (RFC 7030 4.5.2 and its example; RFC 9908 gives an RSA key size
  as an INTEGER value of ``rsaEncryption``, here the smallest size accepted);
- an ``extensionRequest`` attribute naming ``subjectAltName``: the one extension a CSR may carry.

What RFC 7030 cannot express is said elsewhere: the subject alternative name, if any, must be
exactly ``URI:spiffe://<trust domain>/node/<name>`` and the subject ``CN=<name>`` or empty. That
value depends on the node, which an anonymous GET does not name, so the README, the 400 answers
to a CSR and this module's :data:`IDENTITY_FORM` state it instead of an RFC 9908 template.
"""

from __future__ import annotations

import base64

from pyasn1.codec.der import encoder
from pyasn1.type import univ
from pyasn1_alt_modules import rfc2985, rfc4055, rfc5280, rfc5480, rfc5652, rfc7030, rfc8410

__all__ = [
    "CSRATTRS",
    "EC_CURVES",
    "IDENTITY_FORM",
    "RSA_MIN_BITS",
    "SIGNATURE_ALGORITHMS",
    "csr_attributes",
    "encode_csr_attributes",
]

CSRATTRS = "application/csrattrs"  # RFC 7030 4.5.2
# The named curves pkictl.policy.check_public_key accepts, by cryptography's curve name.
EC_CURVES = {"secp256r1": rfc5480.secp256r1, "secp384r1": rfc5480.secp384r1}
RSA_MIN_BITS = 2048  # pkictl.policy.check_public_key: RSA of at least this many bits
SIGNATURE_ALGORITHMS = (rfc5480.ecdsa_with_SHA256, rfc4055.sha256WithRSAEncryption)
IDENTITY_FORM = "spiffe://<trust domain>/node/<name>"  # pkictl.profile.node_identity


def _attribute(oid: univ.ObjectIdentifier, *values) -> rfc7030.AttrOrOID:
    """An ``AttrOrOID`` holding the Attribute ``oid`` with ``values`` (pyasn1 values, DER-encoded
    into the attribute's open type)."""
    attribute = rfc5652.Attribute()
    attribute["attrType"] = oid
    for value in values:
        attribute["attrValues"].append(univ.Any(encoder.encode(value)))
    entry = rfc7030.AttrOrOID()
    entry["attribute"] = attribute
    return entry


def _oid(oid: univ.ObjectIdentifier) -> rfc7030.AttrOrOID:
    entry = rfc7030.AttrOrOID()
    entry["oid"] = oid
    return entry


def csr_attributes() -> bytes:
    """The DER ``CsrAttrs`` (RFC 7030 4.5.2: ``SEQUENCE SIZE (0..MAX) OF AttrOrOID``) of pkictl's
    CSR policy, as listed in the module docstring.

    Returns:
        DER bytes; the same on every call (the policy does not depend on the CA's settings).
    """
    attrs = rfc7030.CsrAttrs()
    for oid in SIGNATURE_ALGORITHMS:
        attrs.append(_oid(oid))
    attrs.append(_attribute(rfc5480.id_ecPublicKey, *EC_CURVES.values()))
    attrs.append(_attribute(rfc4055.rsaEncryption, univ.Integer(RSA_MIN_BITS)))
    attrs.append(_oid(rfc8410.id_Ed25519))
    attrs.append(_attribute(rfc2985.pkcs_9_at_extensionRequest, rfc5280.id_ce_subjectAltName))
    return encoder.encode(attrs)


def encode_csr_attributes() -> bytes:
    """The body of ``GET /.well-known/est/csrattrs``: :func:`csr_attributes` in base64 (RFC 7030
    4.5.2, sent with ``Content-Transfer-Encoding: base64``)."""
    return base64.encodebytes(csr_attributes())
