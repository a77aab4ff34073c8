"""Issuance policy: small named validators whose errors read "got X, want Y".

Identity comes from policy, never from a request: a CSR contributes its public key and the proof
that its sender holds the private key, nothing else (docs/design.md, "Certificate profile"; the
rules a CSR meets are in docs/design.md, "CSR policy").
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from .errors import PKIError, PolicyError
from .names import validate_name
from .profile import node_identity

__all__ = ["check_public_key", "check_dns_name", "check_ip_address", "check_csr_signature", "parse_csr", "check_enrollment_csr",
           "MAX_CSR_BYTES", "RSA_PUBLIC_EXPONENT"]

MAX_CSR_BYTES = 16 * 1024  # a P-256 or RSA-4096 CSR is well under 4 KiB
RSA_PUBLIC_EXPONENT = 65537

# Hash algorithms a CSR's signature may use (cryptography's names -> how people write them).
_SIGNATURE_HASHES = {"sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}
_HASH_NAMES = {"sha1": "SHA-1", "md5": "MD5", "sha224": "SHA-224", "sha512-224": "SHA-512/224", "sha512-256": "SHA-512/256"}
# RFC 7468 section 2: "-----BEGIN label-----", base64 lines, "-----END label-----". Only to count and
# name the blocks of an input; cryptography decodes the one CSR.
_PEM_BLOCK = re.compile(rb"-----BEGIN ([^\r\n-]*)-----.*?-----END \1-----", re.DOTALL)
_PEM_CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")  # RFC 7468 section 7 (the second is legacy)
_WANT_ONE = "want exactly one CERTIFICATE REQUEST"


def check_public_key(public_key) -> None:
    """Accept ECDSA P-256/P-384, RSA >= 2048 bits with public exponent 65537, or Ed25519.

    Args:
        public_key: a ``cryptography`` public key object.

    Raises:
        PolicyError: any other key type, curve, size or RSA exponent.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise PolicyError(f"EC key on {public_key.curve.name}: want P-256 or P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise PolicyError(f"RSA key of {public_key.key_size} bits: want at least 2048")
        exponent = public_key.public_numbers().e
        if exponent != RSA_PUBLIC_EXPONENT:
            # A small exponent (e=3) has a long record of signature forgeries against lax verifiers;
            # 65537 is what every current tool makes (NIST SP 800-56B 6.2: 65537 <= e < 2^256 in FIPS).
            raise PolicyError(f"RSA public exponent: got e={exponent}, want {RSA_PUBLIC_EXPONENT}; make a new key "
                              "(openssl genpkey -algorithm RSA makes e=65537)")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise PolicyError(f"{type(public_key).__name__}: want an ECDSA P-256/P-384, RSA >= 2048 or Ed25519 key")


def _undialable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why no client can ever connect to ``address`` (as a unicast TCP peer), or None."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for candidate in (address, mapped) if mapped is not None else (address,):
        if candidate.is_unspecified:  # RFC 1122 3.2.1.3, RFC 4291 2.5.2: "this host", a listener's "any"
            return "the unspecified address (a server binds it to listen on every address)"
        if candidate == ipaddress.IPv4Address("255.255.255.255"):  # RFC 919, RFC 922: limited broadcast
            return "the limited broadcast address"
        if candidate.is_multicast:  # RFC 5771 (224.0.0.0/4), RFC 4291 2.7 (ff00::/8): TCP has no group peers
            return "a multicast address"
    return None


def check_ip_address(value: str) -> str:
    """Return the canonical form of an IPv4 or IPv6 address a client can dial.

    Args:
        value: the address as text (``--ip``, or an IP subject alternative name).

    Raises:
        PolicyError: not an IP address, or one no client can connect to: unspecified
            (``0.0.0.0``, ``::``), limited broadcast (``255.255.255.255``) or multicast
            (``224.0.0.0/4``, ``ff00::/8``), IPv4-mapped forms included.
    """
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise PolicyError(f"--ip {value!r}: want an IPv4 or IPv6 address such as 192.168.1.10") from None
    why = _undialable(address)
    if why is not None:
        raise PolicyError(f"--ip {value!r} is {why}: no client can dial it; pass the address clients dial, "
                          "such as 192.168.1.10 (127.0.0.1 or ::1 for loopback)")
    return str(address)


def check_dns_name(value: str) -> str:
    """Return the canonical (lower case, no trailing dot) form of a DNS name a gateway may carry.

    Raises:
        PolicyError: not made of DNS labels, longer than 253 characters, or a localhost name
            (never certified: docs/design.md, "Certificate profile").
    """
    name = value.rstrip(".").lower()  # "localhost." is "localhost": compare the canonical form
    if len(name) > 253:  # RFC 1035 2.3.4: 255 octets on the wire = 253 characters as text
        raise PolicyError(f"--dns name of {len(name)} characters: want at most 253 (RFC 1035 2.3.4)")
    try:
        for label in name.split("."):
            validate_name(label)
    except PKIError:
        raise PolicyError(
            f"--dns {value!r}: want a DNS name made of labels of letters, digits and hyphens, "
            "such as gateway.example.lan"
        ) from None
    if name == "localhost" or name.endswith(".localhost"):
        raise PolicyError(f"--dns {value!r}: localhost names are not certified; use --ip 127.0.0.1 for loopback")
    return name


def _der_length(data: bytes) -> int | None:
    """The length in bytes of the DER SEQUENCE ``data`` starts with (X.690 8.1.3), or None if it
    does not start with a well-formed definite-length SEQUENCE header. Only used to tell "bytes
    after the CSR" apart from "not a CSR"; cryptography decodes the CSR itself."""
    if len(data) < 2 or data[0] != 0x30:
        return None
    if data[1] < 0x80:
        return 2 + data[1]
    count = data[1] & 0x7F
    if not 1 <= count <= 4 or len(data) < 2 + count:  # 0x80: indefinite length, not DER (X.690 10.1)
        return None
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


def _parse_der(data: bytes, *, source: str) -> x509.CertificateSigningRequest:
    length = _der_length(data)
    if length is not None and length < len(data):
        raise PolicyError(f"{source}: {len(data) - length} bytes follow the {length}-byte DER CSR; "
                          "want exactly one CSR and nothing after it")
    try:
        return _decoded(x509.load_der_x509_csr(data), source=source)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion: not a ValueError (cryptography)
        try:
            x509.load_der_x509_certificate(data)
        except ValueError:
            raise PolicyError(f"{source}: not a PKCS#10 certificate signing request, PEM or DER ({exc})") from None
        raise PolicyError(f"{source}: found a certificate (DER); want a CERTIFICATE REQUEST (the CSR made on the host "
                          "with its key)") from None


def _decoded(csr: x509.CertificateSigningRequest, *, source: str) -> x509.CertificateSigningRequest:
    """``csr`` once the parts cryptography decodes only when first read (the subject, the
    extensions, the public key) have decoded: a malformed extension or key in a well-formed
    envelope is refused here, as a PolicyError, instead of escaping from a later check as a
    ValueError (docs/design.md, "Fuzz tests").

    Raises:
        PolicyError: an extension, the subject or the public key does not decode, an extension
            appears twice, a general name is of a type cryptography does not support (x400Address,
            EDIPartyName), or the key's algorithm or curve is one cryptography does not know.
    """
    part = "subject"
    try:
        csr.subject  # noqa: B018 - decoded on first access
        part = "extensions"
        csr.extensions  # noqa: B018 - decoded on first access
        part = "public key"
        csr.public_key()
    # TypeError: a CN (or other attribute) of the BitString type (cryptography's x509.Name refuses it)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise PolicyError(f"{source}: cannot decode the CSR's {part} ({' '.join(str(exc).split())}); want a PKCS#10 "
                          "request with an ECDSA P-256/P-384, RSA >= 2048 or Ed25519 key (RFC 2986)") from None
    return csr


def _printable(label: bytes) -> str:
    """A PEM label from the input with every byte outside printable ASCII escaped (``\\x1b``)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in label)


def _parse_pem(data: bytes, *, source: str) -> x509.CertificateSigningRequest:
    blocks = list(_PEM_BLOCK.finditer(data))
    labels = [block.group(1) for block in blocks]
    if len(blocks) != 1 or labels[0] not in _PEM_CSR_LABELS:
        found = f"{len(blocks)} PEM block{'' if len(blocks) == 1 else 's'}"
        if blocks:
            found += " (" + ", ".join(_printable(label) for label in labels) + ")"
        raise PolicyError(f"{source}: found {found}; {_WANT_ONE}")
    before, after = data[:blocks[0].start()].strip(), data[blocks[0].end():].strip()
    if before or after:
        where = " and ".join(w for w, extra in (("before", before), ("after", after)) if extra)
        raise PolicyError(f"{source}: {len(before) + len(after)} bytes of other data {where} the PEM block; "
                          f"{_WANT_ONE} and nothing else (whitespace aside)")
    try:
        return _decoded(x509.load_pem_x509_csr(blocks[0].group(0)), source=source)
    except (ValueError, x509.InvalidVersion) as exc:
        raise PolicyError(f"{source}: not a PKCS#10 certificate signing request, PEM or DER ({exc})") from None


def parse_csr(data: bytes, *, source: str) -> x509.CertificateSigningRequest:
    """Decode exactly one PKCS#10 request (RFC 2986) of at most :data:`MAX_CSR_BYTES`: one PEM
    block labelled ``CERTIFICATE REQUEST`` (RFC 7468 section 7) with nothing but whitespace
    around it, or one DER ``CertificationRequest`` with nothing after it.

    Several PEM blocks (a CA certificate and a CSR, two CSRs), a block of another kind, text
    around the block or bytes after the DER are refused: whoever checks an input must see the
    same request that gets certified.

    Args:
        data: the file's or request body's bytes.
        source: what ``data`` is (``"tw.csr"``, ``"request body"``), for the message.

    Raises:
        PolicyError: too large, or not exactly one CSR; the message says what was found.
    """
    if len(data) > MAX_CSR_BYTES:
        raise PolicyError(f"{source}: {len(data)} bytes; a CSR is at most {MAX_CSR_BYTES} bytes")
    if data[:1] == b"\x30":  # a DER SEQUENCE; PEM text starts with "-" (or with what it should not)
        return _parse_der(data, source=source)
    if not data.strip():
        raise PolicyError(f"{source}: empty; {_WANT_ONE} (PEM) or its DER")
    if b"-----BEGIN" not in data:
        raise PolicyError(f"{source}: not a PKCS#10 certificate signing request, PEM or DER; {_WANT_ONE}")
    return _parse_pem(data, source=source)


def check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    """Check that ``csr`` is signed with SHA-256, SHA-384 or SHA-512 (or Ed25519, which hashes
    internally), then that the signature verifies: proof of possession (RFC 2986 section 3).

    The hash comes first so that a SHA-1 or MD5 CSR is refused for what it is rather than as a
    signature that "does not verify" (cryptography does not verify them).

    Raises:
        PolicyError: a weak or unknown signature algorithm (named), a subject, extension or public
            key that does not decode, or a signature that does not verify.
    """
    _decoded(csr, source="the CSR")
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise PolicyError(f"the CSR is signed with an algorithm pkictl does not accept (OID {csr.signature_algorithm_oid.dotted_string}); "
                          "want ECDSA or RSA with SHA-256, SHA-384 or SHA-512, or Ed25519") from None
    if algorithm is not None and algorithm.name not in _SIGNATURE_HASHES:
        name = _HASH_NAMES.get(algorithm.name, algorithm.name.upper())
        raise PolicyError(f"the CSR is signed with {name}; want SHA-256, SHA-384 or SHA-512 (make it again, "
                          "e.g. openssl req -sha256)")
    if not csr.is_signature_valid:  # the key decoded above: this verifies or is False
        raise PolicyError("the CSR's signature does not verify: it does not prove possession of its key")


def check_enrollment_csr(csr: x509.CertificateSigningRequest, *, name: str, trust_domain: str) -> None:
    """Check a node's own CSR before its public key is certified for ``name``.

    Rules: the signature uses SHA-2 and verifies (:func:`check_csr_signature`), the key is
    acceptable (:func:`check_public_key`), no CA:TRUE is requested, the subject is empty or only
    ``CN=<name>``, and the subject alternative names, if any, are exactly the node's identity URI.
    Whether the key belongs to another identity is the inventory's to say
    (:meth:`pkictl.inventory.Inventory.check_key_unused`).

    Args:
        csr: the parsed request (:func:`parse_csr`).
        name: the node name it is to be certified for.
        trust_domain: the CA's trust domain, for the identity URI.

    Raises:
        PolicyError: naming the rule broken, with what was got and what is wanted.
    """
    check_csr_signature(csr)
    check_public_key(csr.public_key())
    try:
        if csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PolicyError("the CSR asks for CA:TRUE; pkictl issues CA certificates only through init-ca")
    except x509.ExtensionNotFound:
        pass
    attributes = list(csr.subject)
    if attributes and not (
        len(attributes) == 1 and attributes[0].oid == NameOID.COMMON_NAME and str(attributes[0].value).lower() == name.lower()
    ):
        raise PolicyError(f"CSR subject {csr.subject.rfc4514_string()!r}: want CN={name} or an empty subject (another identity is refused)")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    wanted = node_identity(trust_domain, name)
    got = [str(getattr(n, "value", n)) for n in sans]
    if got != [wanted]:
        raise PolicyError(f"CSR subject alternative names {got}: want none or exactly [{wanted!r}]; identity comes from pkictl")
