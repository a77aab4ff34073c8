"""GET /.well-known/est/csrattrs (RFC 7030 4.5) from a real 'pkictl serve': curl fetches it,
openssl asn1parse and pyasn1 decode it, and what it lists is what the CSR policy accepts."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from pyasn1.codec.der import decoder
from pyasn1.type import univ
from pyasn1_alt_modules import rfc7030

from pkictl.errors import PolicyError
from pkictl.est.csrattrs import EC_CURVES, RSA_MIN_BITS
from pkictl.policy import check_public_key

from est_support import EST, ServeProcess, curl, openssl

# What RFC 7030 4.5.2 lists, by dotted OID (RFC 5480, RFC 4055, RFC 8410, RFC 2985, RFC 5280).
ECDSA_WITH_SHA256, SHA256_WITH_RSA = "1.2.840.10045.4.3.2", "1.2.840.113549.1.1.11"
EC_PUBLIC_KEY, RSA_ENCRYPTION, ED25519 = "1.2.840.10045.2.1", "1.2.840.113549.1.1.1", "1.3.101.112"
P256, P384 = "1.2.840.10045.3.1.7", "1.3.132.0.34"
EXTENSION_REQUEST, SUBJECT_ALT_NAME = "1.2.840.113549.1.9.14", "2.5.29.17"


@pytest.fixture
def serve(pki):
    process = ServeProcess(pki.home, "--workers", "0")
    yield process
    assert process.stop() == 0


def test_csrattrs_lists_the_key_types_signature_and_san_for_curl_openssl_and_pyasn1(pki, serve):
    """curl gets 200 application/csrattrs in base64; openssl asn1parse reads the key types (P-256,
    P-384, RSA 2048, Ed25519), ecdsa-with-SHA256 and extensionRequest(subjectAltName); pyasn1 decodes
    exactly those OIDs and nothing else: no SHA-1, no challengePassword, no P-521, no DSA."""
    reply = curl(serve.url + EST + "/csrattrs", cacert=pki.home / "ca.pem")
    assert (reply.returncode, reply.status) == (0, 200), reply
    assert reply.headers["content-type"] == "application/csrattrs"
    assert reply.headers["content-transfer-encoding"] == "base64"

    der = openssl("base64", "-d", input=reply.body)  # the body as a shell user decodes it
    parsed = openssl("asn1parse", "-inform", "DER", input=der).decode()
    for name in ("ecdsa-with-SHA256", "sha256WithRSAEncryption", "id-ecPublicKey", "prime256v1", "secp384r1", "rsaEncryption",
                 "INTEGER           :0800", "ED25519", "Extension Request", "X509v3 Subject Alternative Name"):
        assert name in parsed, parsed
    for absent in ("secp521r1", "sha1", "SHA1", "challengePassword", ":dsa", "ED448"):  # negative controls
        assert absent not in parsed, parsed

    attrs, rest = decoder.decode(base64.b64decode(reply.body), asn1Spec=rfc7030.CsrAttrs())
    assert rest == b""
    oids, attributes = set(), {}
    for entry in attrs:
        if entry.getName() == "oid":
            oids.add(str(entry["oid"]))
        else:
            attribute = entry["attribute"]
            attributes[str(attribute["attrType"])] = [bytes(v) for v in attribute["attrValues"]]
    assert oids == {ECDSA_WITH_SHA256, SHA256_WITH_RSA, ED25519}
    assert set(attributes) == {EC_PUBLIC_KEY, RSA_ENCRYPTION, EXTENSION_REQUEST}
    curves = {str(decoder.decode(v, asn1Spec=univ.ObjectIdentifier())[0]) for v in attributes[EC_PUBLIC_KEY]}
    assert curves == {P256, P384}
    assert [int(decoder.decode(v, asn1Spec=univ.Integer())[0]) for v in attributes[RSA_ENCRYPTION]] == [2048]
    assert [str(decoder.decode(v, asn1Spec=univ.ObjectIdentifier())[0]) for v in attributes[EXTENSION_REQUEST]] == [SUBJECT_ALT_NAME]

    # negative control: the path is GET only; a POST is told so
    post = curl(serve.url + EST + "/csrattrs", cacert=pki.home / "ca.pem", data=b"", content_type="application/pkcs10")
    assert post.status == 405 and "want GET" in post.text, post


CURVES = [ec.SECP192R1(), ec.SECP224R1(), ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1(), ec.SECP256K1(), ec.BrainpoolP256R1()]


def _accepted(public_key) -> bool:
    try:
        check_public_key(public_key)
        return True
    except PolicyError:
        return False


def test_csrattrs_agrees_with_the_policy_both_ways():
    """Every curve check_public_key accepts is listed and every one listed is accepted (seven
    curves tried); RSA of the listed minimum is accepted and one of 1024 bits refused; Ed25519 is
    accepted and Ed448, which is not listed, refused."""
    for curve in CURVES:
        listed = curve.name in EC_CURVES
        assert _accepted(ec.generate_private_key(curve).public_key()) is listed, curve.name
    assert _accepted(rsa.generate_private_key(65537, RSA_MIN_BITS).public_key())
    assert not _accepted(rsa.generate_private_key(65537, 1024).public_key())
    assert _accepted(ed25519.Ed25519PrivateKey.generate().public_key())
    assert not _accepted(ed448.Ed448PrivateKey.generate().public_key())
