"""CA private keys at rest: PKCS#8 encrypted with PBES2 + scrypt, passphrases from a file or the environment.

Format. :func:`encrypt_private_key` writes the standard PEM "ENCRYPTED PRIVATE KEY" block, an
EncryptedPrivateKeyInfo (RFC 5958 section 3) whose algorithm is PBES2 (RFC 8018 section 6.2,
params in A.4) with the scrypt KDF (RFC 7914 section 7) and AES-256-CBC (RFC 8018 B.2.5 style
AlgorithmIdentifier, OID from NIST CSOR), the layout ``openssl pkcs8 -topk8 -scrypt`` writes.
Both cryptography's ``load_pem_private_key`` and ``openssl pkey`` read it, so an operator can
recover a CA key with stock tools. cryptography offers no writer for it (``PrivateFormat.PKCS8``
has no ``encryption_builder``; ``BestAvailableEncryption`` is PBKDF2 with 2048 iterations, and a
PKCS#12 file with many KDF rounds still carries a 2048-iteration MAC keyed by the same
passphrase), so pkictl builds the structure from the RFCs' ASN.1 modules (pyasn1-alt-modules)
and encodes it with pyasn1's DER encoder.

Parameters. Defaults N=16384 (2**14), r=8, p=12, 32-byte key, 16-byte random salt, random IV.
scrypt's memory is 128*r*N bytes (16 MiB here) whatever p is; its time is proportional to N*r*p.
OpenSSL 3.0 refuses a file whose 128*r*(N+2) + 128*r*p bytes exceed 32 MiB (its default
``maxmem``; ``openssl pkey`` has no option to raise it): N=32768 with r=8 (32 MiB + 2 KiB) is
refused, N=32768 with r=4 costs the same memory and time as N=16384 with r=8. r could go up to 15
at N=16384 (30 MiB, still read by both), but r=8 is RFC 7914 section 2's and OpenSSL's value and
keeps half of OpenSSL's limit as margin; so only p is raised: it multiplies the work per guess
(p lanes of 16 MiB each) without touching the memory limit.

Measured on the development machine (2 cores, OpenSSL 3.0.19, cryptography 50.0.2), median time
to load one encrypted key:

    ======  ===  ===  =========  ==================  ==================
    N       r    p    memory     cryptography load   openssl pkey
    ======  ===  ===  =========  ==================  ==================
    2**14   8    1    16 MiB     0.04 s              0.07 s
    2**14   8    4    16 MiB     0.12-0.17 s         0.18 s
    2**14   8    8    16 MiB     0.25-0.33 s         0.32-0.38 s
    2**14   8    12   16 MiB     0.37-0.43 s         0.48-0.63 s   (default)
    2**14   8    16   16 MiB     0.50-0.61 s         0.64-0.77 s
    2**14   12   8    24 MiB     0.37 s              0.50 s
    2**14   15   6    30 MiB     0.48 s              0.45 s
    2**14   16   1    32 MiB     0.08 s              refused
    2**15   4    8    16 MiB     0.32-0.35 s         0.36-0.40 s
    2**15   4    12   16 MiB     0.55 s              0.62 s
    2**15   8    1    32 MiB     0.11 s              refused ("illegal scrypt parameters")
    2**15   8    4    32 MiB     0.33 s              refused
    2**16   4    4    32 MiB     0.37 s              refused
    2**16   8    1    64 MiB     0.17 s              refused
    2**17   8    1    128 MiB    0.34 s              refused
    ======  ===  ===  =========  ==================  ==================

(medians of 3 to 11 loads, ranges over separate runs on a machine with other work going on;
``openssl pkey`` includes about 5 ms of process start.) p=12 keeps both readers in 0.3-0.6 s.

At the default each guess at the passphrase costs about 0.4 s of one core and 16 MiB; pkictl
loads the CA key once per command, so the operator pays that once per command. The passphrase
itself must be at least :data:`MIN_PASSPHRASE_LENGTH` characters (:func:`read_passphrase`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pyasn1.codec.der import encoder
from pyasn1_alt_modules import rfc5958, rfc7914, rfc8018

from .errors import PassphraseError, StoreError
from .file_errors import key_problem
from .files import read_private_file
from .pem import PrivateKey

__all__ = [
    "PASSPHRASE_ENV",
    "MIN_PASSPHRASE_LENGTH",
    "SCRYPT_N",
    "SCRYPT_R",
    "SCRYPT_P",
    "encrypt_private_key",
    "is_encrypted",
    "load_private_key",
    "read_passphrase",
]

PASSPHRASE_ENV = "PKICTL_CA_PASSPHRASE"
MIN_PASSPHRASE_LENGTH = 12  # characters

SCRYPT_N = 2**14  # CPU/memory cost; with r=8 the most OpenSSL 3.0 accepts (32 MiB maxmem)
SCRYPT_R = 8  # block size, RFC 7914 section 2
SCRYPT_P = 12  # parallelization: multiplies the work without raising memory; see module docstring

_OPENSSL_SCRYPT_MAXMEM = 32 * 1024 * 1024  # bytes: OpenSSL 3.0 SCRYPT_MAX_MEM, the limit when reading
_SALT_BYTES = 16  # RFC 8018 section 4.1 asks for at least 8 bytes
_KEY_BYTES = 32  # AES-256
_IV_BYTES = 16  # AES block size

_PEM_LABEL = b"ENCRYPTED PRIVATE KEY"  # RFC 7468 section 11
_ENCRYPTED_MARKERS = (
    b"-----BEGIN " + _PEM_LABEL + b"-----",
    b"Proc-Type: 4,ENCRYPTED",  # legacy OpenSSL PEM encryption (RFC 1421 headers)
)

def _encrypted_private_key_info(*, salt: bytes, n: int, r: int, p: int, iv: bytes, ciphertext: bytes) -> bytes:
    """DER of the EncryptedPrivateKeyInfo (RFC 5958 section 3), built from the RFCs' own ASN.1
    modules (pyasn1-alt-modules) and encoded by pyasn1's DER encoder."""
    scrypt_params = rfc7914.Scrypt_params()  # RFC 7914 section 7; keyLength omitted, as OpenSSL does: the cipher fixes it
    scrypt_params["salt"] = salt
    scrypt_params["costParameter"] = n
    scrypt_params["blockSize"] = r
    scrypt_params["parallelizationParameter"] = p
    pbes2_params = rfc8018.PBES2_params()  # RFC 8018 A.4
    pbes2_params["keyDerivationFunc"]["algorithm"] = rfc7914.id_scrypt
    pbes2_params["keyDerivationFunc"]["parameters"] = encoder.encode(scrypt_params)
    pbes2_params["encryptionScheme"]["algorithm"] = rfc8018.aes256_CBC_PAD  # RFC 8018 B.2.5: the parameters are the IV
    pbes2_params["encryptionScheme"]["parameters"] = encoder.encode(rfc8018.AES_IV(iv))
    info = rfc5958.EncryptedPrivateKeyInfo()
    info["encryptionAlgorithm"]["algorithm"] = rfc8018.id_PBES2
    info["encryptionAlgorithm"]["parameters"] = encoder.encode(pbes2_params)
    info["encryptedData"] = ciphertext
    return encoder.encode(info)


def _pem(label: bytes, der: bytes) -> bytes:
    """RFC 7468 section 2: base64 in lines of 64 characters between BEGIN and END lines."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"\n".join([b"-----BEGIN " + label + b"-----", *lines, b"-----END " + label + b"-----", b""])


# --- Public functions. ---


def encrypt_private_key(
    key: PrivateKey, passphrase: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """Encrypt ``key`` under ``passphrase`` as a PEM "ENCRYPTED PRIVATE KEY" (PBES2 + scrypt + AES-256-CBC).

    The PKCS#8 PrivateKeyInfo DER (RFC 5958 section 2) is padded (PKCS#7, RFC 8018 section 6.2.1
    step 4) and encrypted with AES-256-CBC under a key derived by scrypt (RFC 7914) from the
    passphrase and a fresh 16-byte salt; the IV is fresh too, so two encryptions never match.

    Args:
        key: an EC, RSA or Ed25519 private key.
        passphrase: the raw passphrase bytes (not empty); policy on its length is
            :func:`read_passphrase`'s job.
        n: scrypt CPU/memory cost, a power of two > 1. Memory is 128*r*n bytes.
        r: scrypt block size.
        p: scrypt parallelization; time grows linearly with it, memory does not.

    Returns:
        The PEM text, ending with a newline; store it 0600 like any key.

    Raises:
        ValueError: empty passphrase; parameters scrypt rejects; or parameters needing more than
            OpenSSL's 32 MiB, 128*r*(n+2) + 128*r*p bytes, since ``openssl`` could not read the file
            (cryptography could: a key only pkictl can open defeats recovery with stock tools).
    """
    if not passphrase:
        raise ValueError("got an empty passphrase, want at least one byte")
    memory = 128 * r * (n + 2) + 128 * r * p
    if memory > _OPENSSL_SCRYPT_MAXMEM:
        raise ValueError(
            f"got scrypt n={n} r={r} p={p} needing {memory} bytes, want at most {_OPENSSL_SCRYPT_MAXMEM} "
            "(OpenSSL refuses more when reading the key)"
        )
    salt = os.urandom(_SALT_BYTES)
    iv = os.urandom(_IV_BYTES)
    secret = Scrypt(salt=salt, length=_KEY_BYTES, n=n, r=r, p=p).derive(passphrase)
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    der = _encrypted_private_key_info(salt=salt, n=n, r=r, p=p, iv=iv, ciphertext=ciphertext)
    return _pem(_PEM_LABEL, der)


def is_encrypted(data: bytes) -> bool:
    """Whether PEM ``data`` holds an encrypted private key (PKCS#8 "ENCRYPTED PRIVATE KEY" or legacy)."""
    return any(marker in data for marker in _ENCRYPTED_MARKERS)


def load_private_key(data: bytes, passphrase: bytes | None, *, source: str) -> PrivateKey:
    """Decode a PEM private key, decrypting it with ``passphrase`` when it is encrypted.

    An unencrypted key loads whatever ``passphrase`` is (so a key can be loaded in order to
    encrypt it); callers that require encryption check :func:`is_encrypted` first.

    Args:
        data: the PEM file content.
        passphrase: the passphrase bytes, or None when the operator gave none.
        source: where ``data`` came from (a path), for messages.

    Returns:
        The EC, RSA or Ed25519 private key.

    Raises:
        PassphraseError: the key is encrypted and no passphrase was given, or the passphrase does
            not decrypt it (wrong passphrase, or a damaged file: CBC cannot tell them apart).
        StoreError: ``data`` is not a PEM private key, or holds a key type pkictl does not use.
    """
    encrypted = is_encrypted(data)
    if encrypted and passphrase is None:
        raise PassphraseError(
            f"the CA key in {source} is encrypted: give its passphrase with --passphrase-file FILE "
            f"or the {PASSPHRASE_ENV} environment variable"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if encrypted:
            raise PassphraseError(
                f"the passphrase does not decrypt the CA key in {source}: wrong passphrase "
                f"(or a damaged key file): check --passphrase-file or {PASSPHRASE_ENV}"
            ) from None
        raise StoreError(f"{source}: not a PEM private key: it {key_problem(data, exc)}; fix: restore it from a backup of "
                         "its directory") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise StoreError(f"{source}: got a {type(key).__name__}, want an EC, RSA or Ed25519 private key")
    return key


def read_passphrase(*, passphrase_file: Path | None, environ: Mapping[str, str]) -> bytes | None:
    """The CA passphrase from ``passphrase_file`` or the ``PKICTL_CA_PASSPHRASE`` variable, or None.

    Never from a command-line argument: arguments are visible to every user in ``ps``. The file
    wins when both are given. One trailing ``\\n`` of the file is removed, as ``openssl -passin
    file:`` does, so one passphrase file opens the key with pkictl and with openssl. For the same
    reason a carriage return is refused (openssl keeps the ``\\r`` of a CRLF line end as part of
    the passphrase: proven), and so are several lines (openssl reads only the first).

    Args:
        passphrase_file: a 0600 regular file holding the passphrase, or None.
        environ: the process environment (passed in so that tests choose it); its str value is
            turned back into the raw bytes with :func:`os.fsencode`.

    Returns:
        The passphrase bytes, or None when neither source is given.

    Raises:
        KeyProtectionError: the file is a symlink, not a regular file, or readable by group or others.
        PassphraseError: the file does not exist, or the passphrase is empty, shorter than
            :data:`MIN_PASSPHRASE_LENGTH` characters, or holds a carriage return or several lines.
    """
    if passphrase_file is not None:
        source = f"passphrase file {passphrase_file}"
        try:
            passphrase = read_private_file(passphrase_file)
        except FileNotFoundError:
            raise PassphraseError(
                f"{source} does not exist; expected a 0600 file holding the passphrase"
            ) from None
        if passphrase.endswith(b"\n"):
            passphrase = passphrase[:-1]
    elif PASSPHRASE_ENV in environ:
        source = f"environment variable {PASSPHRASE_ENV}"
        passphrase = os.fsencode(environ[PASSPHRASE_ENV])
    else:
        return None
    if b"\r" in passphrase:
        raise PassphraseError(
            f"{source} holds a carriage return (a Windows line end?); expected the passphrase on one "
            "line ending in a plain newline, which is how openssl -passin file: reads it too"
        )
    if b"\n" in passphrase:
        raise PassphraseError(f"{source} holds several lines; expected the passphrase on a single line")
    if not passphrase:
        raise PassphraseError(
            f"{source} holds an empty passphrase; expected at least {MIN_PASSPHRASE_LENGTH} characters"
        )
    length = len(passphrase.decode("utf-8", errors="replace"))
    if length < MIN_PASSPHRASE_LENGTH:
        raise PassphraseError(
            f"{source} holds a passphrase of {length} characters; expected at least {MIN_PASSPHRASE_LENGTH}"
        )
    return passphrase
