"""Fuzz test support: bounded, deterministic hypothesis settings and the shared input strategies.

CI runs every fuzz test with a small fixed number of examples, derandomized (the same inputs on
every run) and without a per-example deadline (a loaded 2-core runner is slow, not wrong).
``PKICTL_FUZZ_EXAMPLES=N`` raises every fuzz test to N examples and draws them at random (a new
seed each run; hypothesis prints the failing example and how to reproduce it).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import string

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtensionOID, NameOID
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = [
    "EXAMPLES_VARIABLE",
    "csr_bytes",
    "dns_names",
    "fuzz_settings",
    "ip_texts",
    "mutated",
    "names",
    "odd_pem",
    "seed_csrs",
    "signed_csrs",
]

EXAMPLES_VARIABLE = "PKICTL_FUZZ_EXAMPLES"


def fuzz_settings(examples: int) -> settings:
    """The hypothesis settings of one fuzz test: ``examples`` inputs in CI, derandomized; with
    ``PKICTL_FUZZ_EXAMPLES`` set, that many inputs from a random seed.

    No example database: CI starts clean anyway, and a run must not leave a ``.hypothesis``
    directory behind in the worktree.
    """
    wanted = os.environ.get(EXAMPLES_VARIABLE, "").strip()
    longer = int(wanted) if wanted else 0
    return settings(
        max_examples=max(longer, examples) if longer else examples,
        deadline=None,
        derandomize=not longer,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


_SHA256 = hashes.SHA256()


def _csr(key, *, subject: x509.Name, extensions=(), algorithm: hashes.HashAlgorithm | None = _SHA256) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_ED_KEY = ed25519.Ed25519PrivateKey.generate()
_TW = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TW")])
_SAN = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/TW")])

# Valid CSRs to mutate: what a node makes (P-256, CN=TW, its identity URI) and its variants.
SEEDS: tuple[bytes, ...] = (
    _csr(_EC_KEY, subject=_TW),
    _csr(_EC_KEY, subject=x509.Name([]), extensions=[(_SAN, False), (x509.BasicConstraints(ca=False, path_length=None), True)]),
    _csr(_ED_KEY, subject=_TW, algorithm=None),
)
seed_csrs = st.sampled_from(SEEDS)


@st.composite
def mutated(draw, seeds=seed_csrs) -> bytes:
    """A valid DER CSR after 1 to 4 edits: bit flips, byte overwrites, truncations, inserted or
    appended junk, a duplicated slice."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        edit = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "append", "duplicate"]))
        at = draw(st.integers(0, len(data) - 1))
        if edit == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "byte":
            data[at] = draw(st.integers(0, 255))
        elif edit == "truncate":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        else:
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end]
    return bytes(data)


def _pem(label: bytes, der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"


_LABELS = st.one_of(
    st.sampled_from([b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST", b"CERTIFICATE", b"PRIVATE KEY", b"", b"X509 CRL"]),
    st.binary(max_size=24).filter(lambda b: b"-" not in b and b"\n" not in b and b"\r" not in b),
)


@st.composite
def odd_pem(draw) -> bytes:
    """One or more PEM blocks around a valid or mutated CSR, with odd labels (another kind, empty,
    control bytes), mismatched END labels, and text or junk before or after."""
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        der = draw(st.one_of(seed_csrs, mutated()))
        label = draw(_LABELS)
        block = _pem(label, der)
        if draw(st.booleans()) and draw(st.booleans()):  # an END that does not match its BEGIN
            block = block.replace(b"-----END " + label, b"-----END " + draw(_LABELS), 1)
        blocks.append(block)
    before = draw(st.sampled_from([b"", b"\n", b"junk\n", b"\x00", b"   "]))
    after = draw(st.one_of(st.sampled_from([b"", b"\n", b"-----BEGIN", b"\r\n\r\n"]), st.binary(max_size=16)))
    return before + b"".join(blocks) + after


# Whatever could arrive as a CSR: random bytes, DER-like headers, mutated CSRs, odd PEM.
csr_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda tag, length, rest: bytes([tag]) + length + rest, st.sampled_from([0x30, 0x31, 0x04, 0xA0]),
              st.sampled_from([b"\x80", b"\x81\xff", b"\x84\xff\xff\xff\xff", b"\x82\x01\x00", b"\x00", b"\x85"]),
              st.binary(max_size=64)),
    mutated(),
    odd_pem(),
)


# Extensions a signed CSR may carry whose values are junk: what cryptography decodes lazily.
_EXTENSION_OIDS = st.sampled_from([ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                                   ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                                   x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")])
_EXTENSION_VALUES = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"\x30\x00", b"\x30\x02\xa3\x00", b"\x30\x02\xa5\x00", b"\x30\x03\x01\x01\xff", b"\x03\x02\x05\xa0",
                     b"\x30\x04\x86\x02\xff\xfe", b"\x30\x06\x87\x04\x7f\x00\x00\x01", b"\x30\x03\x87\x01\x00"]),
)
_SUBJECT_VALUES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(lambda t: len(t.encode()) <= 64)  # X.520 ub-common-name


@st.composite
def signed_csrs(draw) -> bytes:
    """A well-signed DER CSR whose subject and extensions are random: a CN or another attribute of
    random text, and 0 to 3 extensions of random (often malformed) DER."""
    attributes = []
    for _ in range(draw(st.integers(0, 2))):
        oid = draw(st.sampled_from([NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.LOCALITY_NAME]))
        attributes.append(x509.NameAttribute(oid, draw(st.one_of(st.just("TW"), _SUBJECT_VALUES))))
    extensions, seen = [], set()
    for _ in range(draw(st.integers(0, 3))):
        oid = draw(_EXTENSION_OIDS)
        if oid in seen:  # the builder refuses a duplicate
            continue
        seen.add(oid)
        extensions.append((x509.UnrecognizedExtension(oid, draw(_EXTENSION_VALUES)), draw(st.booleans())))
    key = draw(st.sampled_from([_EC_KEY, _ED_KEY]))
    return _csr(key, subject=x509.Name(attributes), extensions=extensions, algorithm=None if key is _ED_KEY else hashes.SHA256())


# Node names, DNS names and IP addresses as an operator or a peer might type them.
_LABEL_ALPHABET = string.ascii_letters + string.digits + "-"
names = st.one_of(
    st.text(_LABEL_ALPHABET, max_size=70),
    st.text(max_size=70),
    st.sampled_from(["TW", "-TW", "TW-", "a" * 63, "a" * 64, "tw\n", "tw\x00", "t\u0131", "ＴＷ", " TW"]),
)
dns_names = st.one_of(
    st.lists(st.text(_LABEL_ALPHABET, max_size=65), min_size=1, max_size=6).map(".".join),
    st.text(max_size=300),
    st.sampled_from(["localhost", "LOCALHOST.", "a.localhost", ".", "..", "gw.example.lan.", "a" * 254, "xn--bcher-kva.example"]),
)
ip_texts = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),
    st.ip_addresses(v=4).map(lambda a: str(ipaddress.IPv6Address(f"::ffff:{a}"))),
    st.text(string.digits + ".:abcdef%/", max_size=45),
    st.text(max_size=45),
)
