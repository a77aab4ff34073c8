"""CA keys at rest: PKCS#8 PBES2 + scrypt written by pkictl and read by cryptography and by the real
``openssl`` binary (both directions), the refusals (no, wrong or weak passphrase, unprotected
passphrase file), and a negative control that the file holds no plaintext key material."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pkictl.errors import KeyProtectionError, PassphraseError, StoreError
from pkictl.files import PRIVATE_FILE_MODE, write_new_file
from pkictl.keys import (
    MIN_PASSPHRASE_LENGTH,
    PASSPHRASE_ENV,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    encrypt_private_key,
    is_encrypted,
    load_private_key,
    read_passphrase,
)
from pkictl.pem import private_key_to_pem, public_key_bytes

from support import DEADLINE

PASSPHRASE = b"correct horse battery staple"
WRONG_PASSPHRASE = b"correct horse battery stapler"

KEY_TYPES = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@dataclasses.dataclass(frozen=True)
class Sealed:
    """A key and its encryption under PASSPHRASE with the default parameters."""

    key: object
    pem: bytes


@pytest.fixture(scope="module", params=sorted(KEY_TYPES))
def sealed(request) -> Sealed:
    key = KEY_TYPES[request.param]()
    return Sealed(key, encrypt_private_key(key, PASSPHRASE))


@pytest.fixture(scope="module")
def sealed_p256() -> Sealed:
    key = KEY_TYPES["p256"]()
    return Sealed(key, encrypt_private_key(key, PASSPHRASE))


def _private_file(path: Path, data: bytes) -> Path:
    write_new_file(path, data, PRIVATE_FILE_MODE)
    return path


def _openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, timeout=DEADLINE)


@dataclasses.dataclass(frozen=True)
class Field:
    """One line of ``openssl asn1parse``: nesting depth, type, content length, printed value."""

    depth: int
    type: str
    length: int
    value: str = ""


def _asn1parse(path: Path) -> list[Field]:
    """The fields of a PEM file as the real ``openssl asn1parse`` decodes them."""
    result = _openssl("asn1parse", "-in", str(path))
    assert result.returncode == 0, result.stderr.decode()
    fields = []
    for line in result.stdout.decode().splitlines():
        # "   33:d=5  hl=2 l=   8 prim:      OCTET STRING      [HEX DUMP]:F55764067EADCBC2"
        match = re.match(r"\s*\d+:d=(\d+)\s+hl=\d+\s+l=\s*(\d+)\s+(?:prim|cons):\s*(.*)$", line)
        assert match, line
        kind, _, value = match[3].partition(":")
        fields.append(Field(int(match[1]), kind.replace("[HEX DUMP]", "").strip(), int(match[2]), value))
    return fields


def _plain_der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- Writing and reading back. ---


def test_round_trip_returns_the_same_key(sealed: Sealed) -> None:
    """A P-256, RSA-2048 and Ed25519 key encrypted by pkictl decrypts to the very same key."""
    loaded = load_private_key(sealed.pem, PASSPHRASE, source="ca/key.pem")
    assert _plain_der(loaded) == _plain_der(sealed.key)


def test_pem_label_is_encrypted_private_key(sealed: Sealed) -> None:
    """The file is one RFC 7468 "ENCRYPTED PRIVATE KEY" block with 64-character base64 lines."""
    lines = sealed.pem.decode().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
    assert lines[-1] == "-----END ENCRYPTED PRIVATE KEY-----"
    assert sealed.pem.endswith(b"-----\n")
    assert all(len(line) == 64 for line in lines[1:-2]) and 0 < len(lines[-2]) <= 64
    assert is_encrypted(sealed.pem)
    assert not is_encrypted(private_key_to_pem(sealed.key))


def test_asn1parse_shows_pbes2_scrypt_with_the_default_parameters(tmp_path: Path, sealed_p256: Sealed) -> None:
    """openssl decodes PBES2 + scrypt (N=16384, r=8, p=12, 16-byte salt) + AES-256-CBC (16-byte IV), nothing else."""
    assert (SCRYPT_N, SCRYPT_R, SCRYPT_P) == (16384, 8, 12)
    fields = _asn1parse(_private_file(tmp_path / "key.pem", sealed_p256.pem))
    shape = [(f.depth, f.type, f.value if f.type in ("OBJECT", "INTEGER") else f.length) for f in fields]
    ciphertext_length = len(_plain_der(sealed_p256.key)) // 16 * 16 + 16  # PKCS#7 pads 1 to 16 bytes
    assert shape == [
        (0, "SEQUENCE", fields[0].length),  # EncryptedPrivateKeyInfo
        (1, "SEQUENCE", fields[1].length),  # encryptionAlgorithm
        (2, "OBJECT", "PBES2"),
        (2, "SEQUENCE", fields[3].length),  # PBES2-params
        (3, "SEQUENCE", fields[4].length),  # keyDerivationFunc
        (4, "OBJECT", "scrypt"),
        (4, "SEQUENCE", fields[6].length),  # scrypt-params
        (5, "OCTET STRING", 16),  # salt
        (5, "INTEGER", "4000"),  # costParameter N = 16384
        (5, "INTEGER", "08"),  # blockSize r = 8
        (5, "INTEGER", "0C"),  # parallelizationParameter p = 12
        (3, "SEQUENCE", fields[11].length),  # encryptionScheme
        (4, "OBJECT", "aes-256-cbc"),
        (4, "OCTET STRING", 16),  # IV
        (1, "OCTET STRING", ciphertext_length),  # encryptedData
    ]


def test_explicit_parameters_are_written_and_read(tmp_path: Path) -> None:
    """Caller-given parameters land in the file (N=32768 needs a leading zero octet) and both readers accept them."""
    key = KEY_TYPES["p256"]()
    pem = encrypt_private_key(key, PASSPHRASE, n=2**15, r=4, p=2)
    path = _private_file(tmp_path / "key.pem", pem)
    integers = [f.value for f in _asn1parse(path) if f.type == "INTEGER"]
    assert integers == ["8000", "04", "02"]
    assert _plain_der(load_private_key(pem, PASSPHRASE, source=str(path))) == _plain_der(key)
    passfile = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    assert _openssl("pkey", "-in", str(path), "-passin", f"file:{passfile}", "-noout").returncode == 0


@pytest.mark.parametrize(("n", "r"), [(2**15, 8), (2**14, 16)], ids=["n32768-r8", "n16384-r16"])
def test_parameters_openssl_cannot_read_are_refused(n: int, r: int) -> None:
    """Parameters above OpenSSL's 32 MiB scrypt limit are refused, though cryptography alone could read them."""
    with pytest.raises(ValueError, match="OpenSSL refuses more"):
        encrypt_private_key(KEY_TYPES["p256"](), PASSPHRASE, n=n, r=r, p=1)


def test_largest_block_size_openssl_reads_is_accepted(tmp_path: Path) -> None:
    """r=15 at N=16384 (30 MiB) is just under OpenSSL's limit: written, and read by openssl."""
    key = KEY_TYPES["p256"]()
    path = _private_file(tmp_path / "key.pem", encrypt_private_key(key, PASSPHRASE, n=2**14, r=15, p=1))
    passfile = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    assert _openssl("pkey", "-in", str(path), "-passin", f"file:{passfile}", "-noout").returncode == 0


# --- Interoperability with the openssl binary. ---


def test_openssl_pkey_decrypts_the_key(tmp_path: Path, sealed: Sealed) -> None:
    """``openssl pkey -passin file:`` opens the file with the passphrase file pkictl reads, and finds the same key."""
    path = _private_file(tmp_path / "key.pem", sealed.pem)
    passfile = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    assert read_passphrase(passphrase_file=passfile, environ={}) == PASSPHRASE
    assert _openssl("pkey", "-in", str(path), "-passin", f"file:{passfile}", "-noout").returncode == 0
    result = _openssl("pkey", "-in", str(path), "-passin", f"file:{passfile}", "-pubout", "-outform", "DER")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == public_key_bytes(sealed.key.public_key())


def test_openssl_pkey_refuses_a_wrong_passphrase(tmp_path: Path, sealed_p256: Sealed) -> None:
    """``openssl pkey`` fails and prints no key when given a wrong passphrase."""
    path = _private_file(tmp_path / "key.pem", sealed_p256.pem)
    passfile = _private_file(tmp_path / "pass", WRONG_PASSPHRASE + b"\n")
    result = _openssl("pkey", "-in", str(path), "-passin", f"file:{passfile}")
    assert result.returncode != 0
    assert b"PRIVATE KEY" not in result.stdout


def test_key_encrypted_by_openssl_with_scrypt_loads(tmp_path: Path) -> None:
    """A key written by ``openssl pkcs8 -topk8 -scrypt`` loads through load_private_key (the other direction)."""
    key = KEY_TYPES["p256"]()
    plain = _private_file(tmp_path / "plain.pem", private_key_to_pem(key))
    passfile = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    out = tmp_path / "openssl.pem"
    result = _openssl(
        "pkcs8", "-topk8", "-scrypt", "-in", str(plain), "-out", str(out), "-passout", f"file:{passfile}"
    )
    assert result.returncode == 0, result.stderr.decode()
    assert _plain_der(load_private_key(out.read_bytes(), PASSPHRASE, source=str(out))) == _plain_der(key)


# --- Refusals when loading. ---


def test_wrong_passphrase_raises_passphrase_error(sealed_p256: Sealed) -> None:
    """A wrong passphrase is a PassphraseError naming the file, not a bare ValueError."""
    expected = r"does not decrypt the CA key in /ca/issuing/key\.pem: wrong passphrase"
    with pytest.raises(PassphraseError, match=expected):
        load_private_key(sealed_p256.pem, WRONG_PASSPHRASE, source="/ca/issuing/key.pem")


def test_missing_passphrase_says_how_to_give_one(sealed_p256: Sealed) -> None:
    """An encrypted key with no passphrase names the file, --passphrase-file and PKICTL_CA_PASSPHRASE."""
    with pytest.raises(PassphraseError) as caught:
        load_private_key(sealed_p256.pem, None, source="/ca/issuing/key.pem")
    message = str(caught.value)
    assert "/ca/issuing/key.pem is encrypted" in message
    assert "--passphrase-file FILE" in message and "PKICTL_CA_PASSPHRASE" in message


def test_unencrypted_key_loads_with_or_without_passphrase() -> None:
    """An unencrypted key loads whether or not a passphrase is given, so an existing key can be encrypted."""
    key = KEY_TYPES["p256"]()
    pem = private_key_to_pem(key)
    assert _plain_der(load_private_key(pem, None, source="key.pem")) == _plain_der(key)
    assert _plain_der(load_private_key(pem, PASSPHRASE, source="key.pem")) == _plain_der(key)


@pytest.mark.parametrize(
    "data", [b"", b"not a key\n", trustme.CA().cert_pem.bytes()], ids=["empty", "text", "certificate"]
)
def test_not_a_key_raises_store_error(data: bytes) -> None:
    """Data that is not a PEM private key is a StoreError naming the source, not a passphrase problem."""
    with pytest.raises(StoreError, match=r"^ca/key\.pem: not a PEM private key") as caught:
        load_private_key(data, PASSPHRASE, source="ca/key.pem")
    assert not isinstance(caught.value, PassphraseError)


def test_damaged_ciphertext_is_refused(sealed_p256: Sealed) -> None:
    """A flipped byte in the encrypted data is refused with a PassphraseError, never returns a key."""
    body = b"".join(sealed_p256.pem.splitlines()[1:-1])
    der = bytearray(base64.b64decode(body))
    der[-20] ^= 0x01  # inside encryptedData, the last field
    lines = sealed_p256.pem.splitlines()
    damaged = b"\n".join([lines[0], base64.b64encode(bytes(der)), lines[-1], b""])
    with pytest.raises(PassphraseError):
        load_private_key(damaged, PASSPHRASE, source="key.pem")


# --- What the file does not reveal. ---


def test_salt_and_iv_differ_between_encryptions(tmp_path: Path) -> None:
    """Two encryptions of one key under one passphrase use a different salt, IV and ciphertext."""
    key = KEY_TYPES["p256"]()
    first = _asn1parse(_private_file(tmp_path / "1.pem", encrypt_private_key(key, PASSPHRASE, p=1)))
    second = _asn1parse(_private_file(tmp_path / "2.pem", encrypt_private_key(key, PASSPHRASE, p=1)))
    octet_strings = [
        (a.value, b.value) for a, b in zip(first, second, strict=True) if a.type == b.type == "OCTET STRING"
    ]
    assert len(octet_strings) == 3  # salt, IV, encryptedData
    for one, other in octet_strings:
        assert one and other and one != other


def test_file_holds_no_plaintext_key_material(sealed: Sealed) -> None:
    """Neither the PKCS#8 DER, nor the unencrypted PEM body, nor the raw private value appears in the file."""
    plain_der = _plain_der(sealed.key)
    if isinstance(sealed.key, ec.EllipticCurvePrivateKey):
        secret = sealed.key.private_numbers().private_value.to_bytes(32, "big")
    elif isinstance(sealed.key, rsa.RSAPrivateKey):
        secret = sealed.key.private_numbers().d.to_bytes(256, "big").lstrip(b"\0")
    else:
        secret = sealed.key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    assert secret in plain_der  # the control: the search does find the secret where it is in clear
    encrypted_der = base64.b64decode(b"".join(sealed.pem.splitlines()[1:-1]))
    assert plain_der not in encrypted_der and secret not in encrypted_der
    assert secret[:16] not in encrypted_der
    for line in private_key_to_pem(sealed.key).splitlines()[1:-1]:
        assert line not in sealed.pem


# --- Reading the passphrase. ---


def test_passphrase_file_0600_is_read_without_its_newline(tmp_path: Path) -> None:
    """A 0600 passphrase file is read, with or without one trailing newline that is dropped."""
    lf = _private_file(tmp_path / "lf", PASSPHRASE + b"\n")
    bare = _private_file(tmp_path / "bare", PASSPHRASE)
    for path in (lf, bare):
        assert read_passphrase(passphrase_file=path, environ={}) == PASSPHRASE


def test_crlf_passphrase_file_is_refused_because_openssl_keeps_the_cr(tmp_path: Path, sealed_p256: Sealed) -> None:
    """A CRLF passphrase file is refused: openssl would take the CR as part of the passphrase and fail."""
    crlf = _private_file(tmp_path / "crlf", PASSPHRASE + b"\r\n")
    with pytest.raises(PassphraseError, match="carriage return"):
        read_passphrase(passphrase_file=crlf, environ={})
    key = _private_file(tmp_path / "key.pem", sealed_p256.pem)
    assert _openssl("pkey", "-in", str(key), "-passin", f"file:{crlf}", "-noout").returncode != 0


def test_passphrase_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A passphrase file with mode 0644 is refused with a KeyProtectionError that says chmod 600."""
    path = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    os.chmod(path, 0o644)
    with pytest.raises(KeyProtectionError, match=r"mode 0644.*chmod 600"):
        read_passphrase(passphrase_file=path, environ={})


def test_passphrase_file_symlink_is_refused(tmp_path: Path) -> None:
    """A symlink to a 0600 passphrase file is refused."""
    target = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(KeyProtectionError, match="symlink"):
        read_passphrase(passphrase_file=link, environ={})


def test_missing_passphrase_file_is_refused(tmp_path: Path) -> None:
    """A passphrase file that does not exist is a PassphraseError naming it."""
    with pytest.raises(PassphraseError, match=r"passphrase file .*nowhere does not exist"):
        read_passphrase(passphrase_file=tmp_path / "nowhere", environ={PASSPHRASE_ENV: PASSPHRASE.decode()})


def test_environment_variable_is_used() -> None:
    """Without a file, PKICTL_CA_PASSPHRASE gives the passphrase as bytes."""
    environ = {PASSPHRASE_ENV: "correct horse battery staple"}
    assert read_passphrase(passphrase_file=None, environ=environ) == PASSPHRASE


def test_file_wins_over_environment(tmp_path: Path) -> None:
    """When both are given, the file's passphrase is used, not the environment's."""
    path = _private_file(tmp_path / "pass", PASSPHRASE + b"\n")
    environ = {PASSPHRASE_ENV: "another long passphrase"}
    assert read_passphrase(passphrase_file=path, environ=environ) == PASSPHRASE


def test_no_source_gives_none() -> None:
    """With no file and no PKICTL_CA_PASSPHRASE (other variables set), there is no passphrase."""
    assert read_passphrase(passphrase_file=None, environ={"PATH": "/usr/bin", "PKICTL_HOME": "/ca"}) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty passphrase; expected at least 12 characters"),
        (b"\n", "empty passphrase; expected at least 12 characters"),
        (b"elevenchars\n", "passphrase of 11 characters; expected at least 12"),
        ("\u00fc".encode() * 6, "passphrase of 6 characters; expected at least 12"),  # 12 bytes, 6 characters
        (PASSPHRASE + b"\n\n", "several lines; expected the passphrase on a single line"),
        (PASSPHRASE + b"\nsecond line\n", "several lines"),
    ],
    ids=["empty", "newline-only", "short", "short-in-characters", "blank-line", "two-lines"],
)
def test_weak_or_ambiguous_passphrase_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    """An empty, short (counted in characters) or multi-line passphrase file is refused with what is expected."""
    path = _private_file(tmp_path / "pass", content)
    with pytest.raises(PassphraseError, match=message):
        read_passphrase(passphrase_file=path, environ={})


@pytest.mark.parametrize("value", ["", "elevenchars"], ids=["empty", "short"])
def test_weak_environment_passphrase_is_refused(value: str) -> None:
    """A set but empty or short PKICTL_CA_PASSPHRASE is refused rather than treated as absent."""
    with pytest.raises(PassphraseError, match=f"environment variable {PASSPHRASE_ENV} holds"):
        read_passphrase(passphrase_file=None, environ={PASSPHRASE_ENV: value})


def test_twelve_characters_is_enough() -> None:
    """Exactly MIN_PASSPHRASE_LENGTH characters is accepted, also when they are multi-byte."""
    assert MIN_PASSPHRASE_LENGTH == 12
    assert read_passphrase(passphrase_file=None, environ={PASSPHRASE_ENV: "\u00fc" * 12}) == "\u00fc".encode() * 12

