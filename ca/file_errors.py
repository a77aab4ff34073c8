"""What is wrong with a file pkictl reads or writes, in words an operator can act on: the file, the problem, the fix.

Reading: PEM files (certificates, private keys, CRLs) are checked with cryptography before OpenSSL
sees them, so a damaged file is named with its defect (empty, not PEM, truncated, a key where a
certificate belongs...) instead of OpenSSL's bare ``PEM lib``. Writing: a failed write (disk full,
quota, file size limit, I/O error) names the path and what frees it (docs/design.md, "Files on disk").
"""

from __future__ import annotations

import errno
import re
import ssl
from pathlib import Path
from typing import Callable, TypeVar

from cryptography import x509

from .errors import DiskWriteError, StoreError

__all__ = [
    "pem_problem",
    "parse_certificates",
    "parse_crls",
    "key_problem",
    "read_certificates",
    "load_into_context",
    "write_error",
    "is_write_failure",
    "WRITE_FAILURES",
    "CA_FILE_FIX",
]

CA_FILE_FIX = "restore it from a backup of the CA home {home} (the root certificate is also the ca.pem of every bundle)"
"""What restores a damaged file of the CA home (formatted with ``home``)."""

T = TypeVar("T")

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_END = re.compile(rb"-----END ([A-Z0-9 ]+)-----")
_LABELS = {  # PEM label (RFC 7468) -> what an operator calls it
    b"CERTIFICATE": "certificate",
    b"TRUSTED CERTIFICATE": "certificate",
    b"X509 CRL": "CRL",
    b"PRIVATE KEY": "private key",
    b"EC PRIVATE KEY": "private key",
    b"RSA PRIVATE KEY": "private key",
    b"ENCRYPTED PRIVATE KEY": "private key",
    b"CERTIFICATE REQUEST": "CSR",
    b"NEW CERTIFICATE REQUEST": "CSR",
    b"PUBLIC KEY": "public key",
}


def pem_problem(data: bytes, want: str, error: Exception | None = None) -> str:
    """Why ``data`` is not the PEM ``want`` ("certificate", "private key" or "CRL") it should be.

    Args:
        data: the file's content.
        want: what the file should hold.
        error: the decoder's exception, when the blocks are there but do not decode.

    Returns:
        A phrase such as ``is empty``, ``is not PEM (no -----BEGIN line)``, ``holds a private
        key, not a certificate``, ``is truncated (...)``.
    """
    if not data.strip():
        return f"is empty ({len(data)} bytes)"
    begins = _BEGIN.findall(data)
    if not begins:
        if data[:1] == b"\x30":
            return f"holds DER (binary), not PEM; pkictl wants a PEM {want}"
        return "is not PEM (no -----BEGIN line)"
    kinds = [_LABELS.get(label, label.decode(errors="replace")) for label in begins]
    if want not in kinds:
        return f"holds a {kinds[0]}, not a {want}"
    if len(_END.findall(data)) < len(begins) or _cut_tail(data):
        return f"is truncated (a -----BEGIN {begins[-1].decode()}----- block has no -----END line: cut off while copied or written?)"
    if error is not None:
        return f"holds a damaged {want} block (it does not decode: {error})"
    return f"holds no {want}"


def _cut_tail(data: bytes) -> bool:
    """True if a block was cut inside its BEGIN line: dashes after the last END line."""
    ends = list(_END.finditer(data))
    if not ends:
        return False
    tail = data[ends[-1].end():].strip()
    return tail.startswith(b"-") or b"-----" in tail


def _refusal(source: str, problem: str, expected: str, fix: str | None) -> StoreError:
    return StoreError(f"{source} {problem}; expected {expected}" + (f"; fix: {fix}" if fix else ""))


def parse_certificates(data: bytes, *, source: str, expected: str = "PEM certificates", fix: str | None = None) -> list[x509.Certificate]:
    """Every certificate of the PEM ``data`` read from ``source``.

    A block cut off without its END line is refused even when other blocks decode (cryptography
    would skip it; OpenSSL refuses the whole file).

    Raises:
        StoreError: empty, not PEM, truncated, damaged, or holding something else; the message
            names ``source``, what was expected and ``fix``.
    """
    problem = None
    if not data.strip() or len(_END.findall(data)) < len(_BEGIN.findall(data)) or _cut_tail(data):
        problem = pem_problem(data, "certificate")
    else:
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            problem = pem_problem(data, "certificate", exc)
    if problem is not None:
        raise _refusal(source, problem, expected, fix) from None
    return certificates


def parse_crls(data: bytes, *, source: str, fix: str | None = None) -> list[x509.CertificateRevocationList]:
    """Every CRL of the PEM ``data`` read from ``source`` (one per issuing CA).

    Raises:
        StoreError: empty, not PEM, truncated, damaged, or holding no CRL; names ``source``.
    """
    marker = b"-----BEGIN X509 CRL-----"
    chunks = data.split(marker)[1:]
    if not chunks or len(_END.findall(data)) < len(_BEGIN.findall(data)) or _cut_tail(data):
        raise _refusal(source, pem_problem(data, "CRL"), "PEM CRLs (-----BEGIN X509 CRL-----)", fix) from None
    crls = []
    for chunk in chunks:
        try:
            crls.append(x509.load_pem_x509_crl(marker + chunk))
        except ValueError as exc:
            raise _refusal(source, pem_problem(data, "CRL", exc), "PEM CRLs (-----BEGIN X509 CRL-----)", fix) from None
    return crls


def key_problem(data: bytes, error: Exception | None = None) -> str:
    """:func:`pem_problem` for a private key file."""
    return pem_problem(data, "private key", error)


def read_certificates(path: Path, *, expected: str, fix: str) -> list[x509.Certificate]:
    """Read and decode the PEM certificate file ``path``.

    Args:
        path: the file.
        expected: what it should hold, for the message ("the trust anchors (the root certificate)").
        fix: what the operator does when it is missing or damaged.

    Raises:
        StoreError: missing, unreadable, or not what :func:`parse_certificates` accepts.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; expected {expected}; fix: {fix}") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror}); expected {expected}; fix: {fix}") from None
    return parse_certificates(data, source=str(path), expected=expected, fix=fix)


def load_into_context(load: Callable[[], T], path: Path, *, fix: str) -> T:
    """Run an ``SSLContext`` loader (``load_cert_chain``, ``load_verify_locations``) for ``path``,
    turning OpenSSL's refusal, which names no file, into one that does.

    Raises:
        StoreError: OpenSSL refused the file.
    """
    try:
        return load()
    except ssl.SSLError as exc:
        raise StoreError(f"{path}: OpenSSL refused it ({exc.reason or exc}); fix: {fix}") from None


# errno -> (what happened to the filesystem of DIR, how to make room); the failures a retry
# after the operator acts can cure, unlike a permission or a missing directory.
WRITE_FAILURES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the filesystem of {dir}", "free space there (df -h {dir})"),
    errno.EDQUOT: ("the disk quota of this account on the filesystem of {dir} is used up", "free space there or raise the quota (quota -s)"),
    errno.EFBIG: ("the file is larger than this process may write (the file size limit, ulimit -f, or the filesystem's)",
                  "raise the service's file size limit (ulimit -f; LimitFSIZE= in a systemd unit)"),
    errno.EIO: ("an I/O error on the filesystem of {dir} (a failing disk or a lost network mount?)",
                "check the disk (dmesg, smartctl) or the mount"),
    errno.EROFS: ("the filesystem of {dir} is read-only", "remount it read-write"),
}


def is_write_failure(exc: BaseException) -> bool:
    """True if ``exc`` is a write that failed for lack of room or a broken disk (:data:`WRITE_FAILURES`)."""
    return isinstance(exc, OSError) and not isinstance(exc, DiskWriteError) and exc.errno in WRITE_FAILURES


def write_error(path: Path, exc: OSError, *, then: str | None = None) -> DiskWriteError:
    """The :class:`DiskWriteError` for a failed write of ``path``.

    Args:
        path: the file that could not be written.
        exc: the OSError (its errno one of :data:`WRITE_FAILURES`).
        then: what to run once the cause is fixed ("run the command again").
    """
    directory = Path(path).parent
    what, fix = WRITE_FAILURES.get(exc.errno or 0, ("{err}", "fix the cause"))
    name = errno.errorcode.get(exc.errno or 0, "error")
    message = (f"cannot write {path}: {what.format(dir=directory, err=exc.strerror)} ({name}); "
               f"fix: {fix.format(dir=directory)}" + (f", then {then}" if then else ""))
    error = DiskWriteError(message)
    error.errno, error.strerror, error.filename = exc.errno, exc.strerror, str(path)
    return error
