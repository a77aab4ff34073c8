"""What the doctor knows about one credential directory, read lazily, once, and never written.

The facts are read without the protections the store enforces when it loads a key (a key
readable by others is still read, so that the doctor can say both "readable by others" and
whether it matches).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..store import CREDENTIAL_FILES

__all__ = ["CredentialFacts", "describe", "fingerprint", "purposes", "subject_alternative_names", "verify_chain"]


def describe(certificate: x509.Certificate) -> str:
    """``CN=TW serial 1a2b3c4d...`` (the serial shortened as pkictl status shows it)."""
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = f"CN={str(cn[0].value)}" if cn else certificate.subject.rfc4514_string()
    return f"{name} serial {certificate.serial_number:x}"[:80]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, 64 lower-case hex digits."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def purposes(certificate: x509.Certificate) -> set:
    """The extended key usage OIDs of ``certificate`` (empty without the extension)."""
    try:
        return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def subject_alternative_names(certificate: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def verify_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                 at: dt.datetime) -> str | None:
    """RFC 5280 path validation of ``leaf`` (for its own purpose: clientAuth or serverAuth) to
    ``anchors`` at ``at``; None when it verifies, else the reason."""
    builder = verification.PolicyBuilder().store(verification.Store(list(anchors))).time(at)
    try:
        if ExtendedKeyUsageOID.SERVER_AUTH in purposes(leaf):
            sans = subject_alternative_names(leaf)
            dns = sans.get_values_for_type(x509.DNSName) if sans else []
            ips = sans.get_values_for_type(x509.IPAddress) if sans else []
            if not dns and not ips:
                return "a server certificate without a DNS name or IP address"
            subject = x509.DNSName(dns[0]) if dns else x509.IPAddress(ips[0])
            builder.build_server_verifier(subject).verify(leaf, list(intermediates))
        else:
            builder.build_client_verifier().verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        return str(exc)
    return None


@dataclasses.dataclass
class CredentialFacts:
    """What the credential checks look at, read lazily and once.

    Args:
        directory: the credential directory.
        now: the time to judge validity at (aware UTC; from the caller's clock).
        kind: ``node``, ``gateway`` or ``service``: the purpose the certificate must have.
        name: the expected node or gateway name (None: not checked).
        trust_domain: the expected SPIFFE trust domain of a node (None: not checked).
        pinned_sha256: the expected fingerprint of a trust anchor in ``ca.pem`` (None: not pinned).
        crls: ``(where from, CRLs)`` to look the certificate up in (revocation check).
        reenroll: the fix for "this credential is unusable": the command that gets a new one.
        config: the configuration file that set these expectations, named in fixes.
        renews_over_est: the host renews over EST, authenticated by this certificate as a TLS
            client (so a gateway's certificate must be for clientAuth too).
        key_group: the group id that may read the key files (the agent's ``credential_group``),
            or None: keys must then be 0600.
        reference_clock: ``(whose, skew)``: another host's clock against this one (its time
            minus ours, e.g. the EST server's HTTP ``Date``), or None when none was read. It
            tells a clock behind here from a CA clock that was ahead when it signed.
        issuing_cas: our issuing CA certificates when known (the CA home's); None: those of
            chain.pem that a trust anchor signed.
    """

    directory: Path
    now: dt.datetime
    kind: str
    name: str | None = None
    trust_domain: str | None = None
    pinned_sha256: str | None = None
    crls: list[tuple[str, list[x509.CertificateRevocationList]]] = dataclasses.field(default_factory=list)
    reenroll: str = "enroll again"
    config: str = "the agent configuration"
    renews_over_est: bool = False
    key_group: int | None = None
    reference_clock: tuple[str, dt.timedelta] | None = None
    issuing_cas: list[x509.Certificate] | None = None

    @property
    def live(self) -> Path:
        return self.directory / "live"

    @functools.cached_property
    def live_problem(self) -> tuple[str, str] | None:
        """``(problem, expected)`` when ``live`` does not lead to a complete version, else None."""
        if not self.directory.is_dir():
            return f"{self.directory} does not exist or is not a directory", "the credential directory written by pkictl enroll-* or pki-agent enroll"
        if not self.live.is_symlink():
            if self.live.exists():
                return "live is not a symlink (copied with a tool that follows links?)", "live -> archive/<N>, copied with tar or rsync -a"
            return "no live link: nothing is installed here", "live -> archive/<N>"
        target = os.readlink(self.live)
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "archive" or not parts[1].isdigit():
            return f"live points to {target!r}", "live -> archive/<N>"
        missing = [n for n in CREDENTIAL_FILES if not (self.directory / target / n).is_file()]
        if missing:
            return f"live -> {target}, which lacks {', '.join(missing)}", f"a complete version ({', '.join(CREDENTIAL_FILES)})"
        return None

    @functools.cached_property
    def version(self) -> Path | None:
        return None if self.live_problem else self.directory / os.readlink(self.live)

    def _certificates(self, name: str) -> list[x509.Certificate] | str:
        assert self.version is not None
        try:
            data = (self.version / name).read_bytes()
        except OSError as exc:
            return f"cannot read {name}: {exc.strerror}"
        if not data.strip():
            return []
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            return f"{name} is not PEM certificates ({exc})"

    @functools.cached_property
    def certificate(self) -> x509.Certificate | None:
        if self.version is None:
            return None
        certs = self._certificates("cert.pem")
        return certs[0] if isinstance(certs, list) and certs else None

    @functools.cached_property
    def chain(self) -> list[x509.Certificate] | str | None:
        return None if self.version is None else self._certificates("chain.pem")

    @functools.cached_property
    def fullchain(self) -> list[x509.Certificate] | str | None:
        return None if self.version is None else self._certificates("fullchain.pem")

    @functools.cached_property
    def key(self):
        """The private key (read whatever its mode), or an error string."""
        from cryptography.hazmat.primitives import serialization

        if self.version is None:
            return None
        try:
            data = (self.version / "privkey.pem").read_bytes()
            return serialization.load_pem_private_key(data, password=None)
        except OSError as exc:
            return f"cannot read privkey.pem: {exc.strerror}"
        except (ValueError, TypeError) as exc:
            return f"privkey.pem is not an unencrypted PEM private key ({exc})"

    @functools.cached_property
    def anchors(self) -> list[x509.Certificate] | str:
        path = self.directory / "ca.pem"
        try:
            anchors = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            return f"{path} is missing"
        except (OSError, ValueError) as exc:
            return f"{path} is not readable PEM certificates ({exc})"
        return anchors

    @property
    def subject(self) -> str:
        return str(self.version or self.directory)

    @property
    def pin_mismatch(self) -> bool:
        """ca.pem was read and holds no certificate of the pinned fingerprint: every judgement
        made against it (chain, the peers' certificates) is then unfounded."""
        anchors = self.anchors
        return (self.pinned_sha256 is not None and isinstance(anchors, list)
                and self.pinned_sha256 not in {fingerprint(a) for a in anchors})
