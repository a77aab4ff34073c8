"""Fuzz tests of CSR parsing and issuance policy (pkictl.policy, pkictl.est.wire.decode_csr_body,
pkictl.names): whatever the bytes or names, the only outcomes are a valid result or a PKIError
with a message, never another exception (a 500 in pkictl serve, a traceback in the CLI)."""

from __future__ import annotations

import base64

from cryptography import x509
from hypothesis import example, given
from hypothesis import strategies as st

from pkictl.errors import PKIError
from pkictl.est.wire import decode_csr_body
from pkictl.names import validate_name
from pkictl.policy import check_dns_name, check_enrollment_csr, check_ip_address, check_public_key, parse_csr

from fuzz_support import csr_bytes, dns_names, fuzz_settings, ip_texts, names, signed_csrs

# Findings of these tests, pinned: each raised something other than a PKIError before the fix.
VERSION_32 = bytes.fromhex(
    "3081c6306f020120300d310b300906035504030c0254573059301306072a8648ce3d020106082a8648ce3d0301070342"
    "0004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2b3"
    "db252273e3d6616c989ca90eed91ec360e98a000300a06082a8648ce3d040302034700304402207d5b670a47e078400e"
    "b3672ca93321fbce0b8d1117c064e662c79d51dda1d5f802205f64743dd960bbccda0f0816560fce528b3ee3f1e7f992"
    "e5706dd2583b4d32cd"
)
UNKNOWN_KEY_ALGORITHM = bytes.fromhex(
    "3081c6306f020100300d310b300906035504030c0254573059301306072a8648ce3d020906082a8648ce3d0301070342"
    "0004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2b3"
    "db252273e3d6616c989ca90eed91ec360e98a000300a06082a8648ce3d040302034700304402207d5b670a47e078400e"
    "b3672ca93321fbce0b8d1117c064e662c79d51dda1d5f802205f64743dd960bbccda0f0816560fce528b3ee3f1e7f992"
    "e5706dd2583b4d32cd"
)
UNKNOWN_CURVE = bytes.fromhex(
    "3081c6306f020100300d310b300906035504030c0254573059301306072a8648ce3d020106082a8648ce3d03011c0342"
    "0004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2b3"
    "db252273e3d6616c989ca90eed91ec360e98a000300a06082a8648ce3d040302034700304402207d5b670a47e078400e"
    "b3672ca93321fbce0b8d1117c064e662c79d51dda1d5f802205f64743dd960bbccda0f0816560fce528b3ee3f1e7f992"
    "e5706dd2583b4d32cd"
)
POINT_NOT_ON_CURVE = bytes.fromhex(
    "3081c6306f020100300d310b300906035504030c0254573059301306072a8648ce3d020106082a8648ce3d0301070342"
    "0004edb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2b3"
    "db252273e3d6616c989ca90eed91ec360e98a000300a06082a8648ce3d040302034700304402207d5b670a47e078400e"
    "b3672ca93321fbce0b8d1117c064e662c79d51dda1d5f802205f64743dd960bbccda0f0816560fce528b3ee3f1e7f992"
    "e5706dd2583b4d32cd"
)
BITSTRING_CN = bytes.fromhex(
    "3081c6306f020100300d310b30090603550403030254573059301306072a8648ce3d020106082a8648ce3d0301070342"
    "0004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2b3"
    "db252273e3d6616c989ca90eed91ec360e98a000300a06082a8648ce3d040302034700304402207d5b670a47e078400e"
    "b3672ca93321fbce0b8d1117c064e662c79d51dda1d5f802205f64743dd960bbccda0f0816560fce528b3ee3f1e7f992"
    "e5706dd2583b4d32cd"
)
SIGNED_JUNK_SAN = bytes.fromhex(
    "3081e530818d020100300d310b300906035504030c0254573059301306072a8648ce3d020106082a8648ce3d03010703"
    "420004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2"
    "b3db252273e3d6616c989ca90eed91ec360e98a01e301c06092a864886f70d01090e310f300d300b0603551d1104046a"
    "756e6b300a06082a8648ce3d040302034700304402203fb2e6036d4402205204d71ca0bae9b04007c601ff9db2b2faae"
    "07de6131a38d022034920bca58cfda906c5acaaa6e44f75e5e1bb89e069621fa83a74b69d07adb84"
)
SIGNED_X400_SAN = bytes.fromhex(
    "3081e530818d020100300d310b300906035504030c0254573059301306072a8648ce3d020106082a8648ce3d03010703"
    "420004ecb0458936fc615eed76b8b1ba386e3167c47f18245cfedb1d19d0c8b4d6205824af68a1da9c6c879ae29d0ed2"
    "b3db252273e3d6616c989ca90eed91ec360e98a01e301c06092a864886f70d01090e310f300d300b0603551d11040430"
    "02a300300a06082a8648ce3d040302034700304402207c3bcaf42a72a95ffb43f949990c78b98caedfd6ffb41b728fc1"
    "c1c571e08d8502201ddf5474f8ba76d51b905c8d3b23bdf7139b66bf42842c39f17e6f4175808e87"
)


def _refused(exc: PKIError) -> None:
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


def _enrollment(data: bytes) -> None:
    """Parse ``data`` as pkictl does and, when it parses, hold it to the enrollment policy."""
    try:
        csr = parse_csr(data, source="request body")
    except PKIError as exc:
        _refused(exc)
        return
    assert isinstance(csr, x509.CertificateSigningRequest)
    csr.subject.rfc4514_string()  # what pkictl serve logs (the CN) and quotes in refusals
    try:
        check_enrollment_csr(csr, name="TW", trust_domain="pkictl.internal")
    except PKIError as exc:
        _refused(exc)


@fuzz_settings(300)
@given(csr_bytes)
@example(VERSION_32)
@example(UNKNOWN_KEY_ALGORITHM)
@example(UNKNOWN_CURVE)
@example(POINT_NOT_ON_CURVE)
@example(BITSTRING_CN)
def test_parse_csr_and_policy_refuse_any_bytes_with_a_pki_error(data: bytes) -> None:
    """Random bytes, mutated CSRs and odd PEM are parsed or refused with a PKIError."""
    _enrollment(data)


@fuzz_settings(150)
@given(signed_csrs())
@example(SIGNED_JUNK_SAN)
@example(SIGNED_X400_SAN)
def test_a_signed_csr_with_malformed_contents_is_refused_with_a_pki_error(data: bytes) -> None:
    """A CSR whose signature verifies but whose subject or extensions are junk is a PolicyError."""
    _enrollment(data)


@fuzz_settings(300)
@given(st.one_of(csr_bytes, csr_bytes.map(base64.encodebytes), csr_bytes.map(lambda b: base64.b64encode(b) + b"=junk")))
@example(base64.b64encode(BITSTRING_CN))
@example(base64.b64encode(SIGNED_X400_SAN))
def test_decode_csr_body_refuses_any_body_with_a_pki_error(body: bytes) -> None:
    """An EST simpleenroll body is one CSR or a PKIError, whatever it holds."""
    try:
        csr = decode_csr_body(body)
    except PKIError as exc:
        _refused(exc)
        return
    csr.subject.rfc4514_string()
    try:
        check_public_key(csr.public_key())
    except PKIError as exc:
        _refused(exc)


def _valid_or_pki_error(check, value) -> None:
    try:
        result = check(value)
    except PKIError as exc:
        _refused(exc)
        return
    assert isinstance(result, str)
    assert check(result) == result, "the canonical form is accepted as it is"


@fuzz_settings(300)
@given(names)
def test_validate_name_returns_the_name_or_a_pki_error(name: str) -> None:
    """A node name is returned unchanged or refused with an InvalidNameError."""
    _valid_or_pki_error(validate_name, name)


@fuzz_settings(300)
@given(dns_names)
def test_check_dns_name_returns_a_canonical_name_or_a_pki_error(value: str) -> None:
    """A DNS name is returned canonical (lower case, no trailing dot) or refused with a PolicyError."""
    _valid_or_pki_error(check_dns_name, value)


@fuzz_settings(300)
@given(ip_texts)
def test_check_ip_address_returns_a_canonical_address_or_a_pki_error(value: str) -> None:
    """An IP address is returned canonical or refused with a PolicyError."""
    _valid_or_pki_error(check_ip_address, value)


@fuzz_settings(50)
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.text(max_size=8)))
def test_check_public_key_refuses_what_is_no_key(value) -> None:
    """Something that is no public key object is a PolicyError, not an AttributeError."""
    try:
        check_public_key(value)
    except PKIError as exc:
        _refused(exc)
    else:
        raise AssertionError(f"{value!r} accepted as a public key")
