"""Re-enrollment when this host's certificate can no longer renew itself (revoked, expired, from
another CA, unknown to the CA): what the operator is told, and a node's own pairing request.

A certificate that the CA refuses to renew stays refused: retrying changes nothing. A node whose
configuration says ``renewal.reenroll: approval`` then makes a new key and files the same pairing
request as ``pki-agent enroll`` without a token (RFC 7030 4.2.1, answered 202 until the operator
approves), so that the operator only runs ``pkictl approve``. The new key is kept on disk (0600)
while the request waits, so that a restarted agent asks again with the same key and code instead
of filing a second request. Nothing replaces the installed credential before the new certificate
is in hand and verified against the trust anchor for this node's identity.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from pkictl.errors import AuthenticationError, PKIError
from pkictl.est.wire import approval_code
from pkictl.profile import node_identity
from pkictl.store import Credential, CredentialStore

from ..config import AgentConfig
from ..errors import CredentialUnusable, RenewalError
from ..est_client import ESTClient, select_chain
from .rotate import discard_pending_key, pending_key

__all__ = ["Reenrollment", "Pairing", "PAIRING_KEY", "unusable_advice", "find_revocation"]

PAIRING_KEY = ".pairing-key.pem"  # in the credential directory while a pairing request waits

log = logging.getLogger("pki_agent")


def unusable_advice(config: AgentConfig, certificate: x509.Certificate, config_path: str = "agent.yaml") -> str:
    """What the operator does about a certificate that can no longer renew, as one sentence
    naming real commands (a gateway's bundle is re-issued on the CA host; a node re-pairs)."""
    name = config.name
    if config.kind == "gateway":
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"--dns {d}" for d in sans.get_values_for_type(x509.DNSName)]
        names += [f"--ip {ip}" for ip in sans.get_values_for_type(x509.IPAddress)]
        source = f" --ca-url {config.renewal.ca_url}" if config.renewal.ca_url else ""
        return (f"on the CA host run 'pkictl enroll-gateway {name} --replace {' '.join(names)}{source} --out {name}' "
                f"and copy that directory over {config.credential_dir} (tar or rsync -a, keeping the live link)")
    if config.renewal.ca_url is None:
        return f"on the CA host run 'pkictl enroll-node {name} --replace' and use the new bundle"
    if config.renewal.reenroll == "approval":
        return "this agent asks for approval with a new key (below)"
    return (f"set 'reenroll: approval' under renewal: in {config_path} and restart the agent, which then asks the "
            f"operator for approval with a new key; or on the CA host run 'pkictl enroll-node {name} --token' and "
            f"enroll again here with 'pki-agent enroll --token TOKEN' into a new --dir")


def find_revocation(certificate: x509.Certificate, crls) -> str | None:
    """``revoked (REASON)`` if a CRL of ``certificate``'s issuer lists its serial, else None."""
    for crl in crls:
        if crl.issuer != certificate.issuer:
            continue
        entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        if entry is not None:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
            except x509.ExtensionNotFound:
                reason = "unspecified"
            return f"serial {certificate.serial_number:x} is on the CRL of {crl.issuer.rfc4514_string()} (reason {reason})"
    return None


class Pairing:
    """A node's pairing request for a new certificate, for its existing credential directory.

    Args:
        store: the credential directory; the pending key is kept in it (:data:`PAIRING_KEY`).
        name: the node name (the CSR's CN).
        trust_domain: the node identity's SPIFFE trust domain.
        client: the EST client of ``renewal.ca_url``.

    Raises:
        OSError: the credential directory is not writable.
    """

    def __init__(self, store: CredentialStore, *, name: str, trust_domain: str, client: ESTClient) -> None:
        self.store, self.name, self.trust_domain, self.client = store, name, trust_domain, client
        self.key_path: Path = store.directory / PAIRING_KEY
        self.key = pending_key(self.key_path)
        self.code = approval_code(self.key.public_key())
        self.csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ).sign(self.key, hashes.SHA256())

    def poll(self) -> Credential | int:
        """Ask once: the installed credential once approved, else the seconds to wait (Retry-After).

        Raises:
            AuthenticationError: the operator denied the request.
            RenewalError: the server could not be reached, or what it issued does not verify for
                this node (nothing is installed then).
        """
        result = self.client.simple_enroll(self.csr, name=self.name, token=None)
        if not isinstance(result, x509.Certificate):
            return result[1]
        chain = select_chain(result, self.client.cacerts())
        try:
            credential = Credential(self.key, result, chain)
            anchors = self.store.load_trust_anchors()
            verification.PolicyBuilder().store(verification.Store(anchors)).build_client_verifier().verify(result, list(chain))
        except (PKIError, verification.VerificationError) as exc:
            raise RenewalError(f"the certificate issued for the pairing request does not verify for this key against "
                               f"{self.store.trust_anchors_path}: {exc}") from None
        uris = result.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        if uris != [node_identity(self.trust_domain, self.name)]:
            raise RenewalError(f"the certificate issued for the pairing request names {', '.join(uris) or 'no identity'}, "
                               f"not {node_identity(self.trust_domain, self.name)}")
        self.store.install(credential)
        self.discard()
        return credential

    def discard(self) -> None:
        """Forget the pending key (after its certificate is installed, or after a denial)."""
        discard_pending_key(self.key_path)


class Reenrollment:
    """What an agent knows about a certificate that can no longer renew, and its pairing request.

    Args:
        config: the agent's configuration (``renewal.reenroll``, the name, the trust domain).
        store: the credential directory.
        client: the EST client, or None (an agent renewing with a CA home never re-pairs).

    Attributes:
        unusable: why the certificate in service can no longer renew, or None.
        pairing: the pairing request waiting for approval, or None.
        denied: the operator denied the last request (no new one until :meth:`ask_again`).
    """

    def __init__(self, config: AgentConfig, store: CredentialStore, client: ESTClient | None) -> None:
        self.config, self.store, self.client = config, store, client
        self.unusable: CredentialUnusable | None = None
        self.pairing: Pairing | None = None
        self.denied = False

    def report(self, exc: CredentialUnusable, certificate: x509.Certificate) -> bool:
        """Record ``exc`` about ``certificate``; say so once (with what to do) and, when the
        configuration allows it, file a pairing request.

        Returns:
            True if a pairing request was started now and should be sent at once.
        """
        first = self.unusable is None or self.unusable.reason != exc.reason
        self.unusable = exc
        if first:
            log.error("the certificate of %s (serial %x) can no longer renew: %s (%s); %s", self.config.name,
                      certificate.serial_number, exc.reason, exc.detail, unusable_advice(self.config, certificate))
        return self._start()

    def _start(self) -> bool:
        if self.pairing is not None or self.denied or self.config.renewal.reenroll != "approval" or self.client is None:
            return False
        try:
            self.pairing = Pairing(self.store, name=self.config.name, trust_domain=self.config.trust_domain, client=self.client)
        except (PKIError, OSError) as exc:
            log.error("cannot make the pairing request's key in %s: %s", self.store.directory, exc)
            return False
        log.warning("pairing request of %s: a new key was made here; its code is %s; on the CA host run 'pkictl requests', "
                    "then 'pkictl approve %s --code %s'", self.config.name, self.pairing.code, self.config.name, self.pairing.code)
        return True

    def poll(self, now: dt.datetime) -> Credential | dt.datetime | None:
        """Ask once (blocking: run it in a worker thread).

        Args:
            now: the agent clock's time, aware UTC.

        Returns:
            The installed credential once approved; else when to ask again (the server's
            Retry-After, or ``retry_initial`` after an error); None when the operator denied it.
        """
        pairing = self.pairing
        assert pairing is not None
        try:
            result = pairing.poll()
        except AuthenticationError as exc:  # denied: this key will not be approved
            log.error("the pairing request of %s (code %s) was refused: %s; the agent asks again with a new key after "
                      "SIGHUP (systemctl reload pki-agent) or a restart", self.config.name, pairing.code, exc)
            pairing.discard()
            self.pairing, self.denied = None, True
            return None
        except (PKIError, OSError) as exc:
            retry = now + self.config.renewal.retry_initial
            log.warning("pairing request of %s (code %s): %s; asking again at %s", self.config.name, pairing.code, exc, retry.isoformat())
            return retry
        if isinstance(result, int):  # still waiting for the operator (RFC 7030 4.2.3: Retry-After)
            return now + dt.timedelta(seconds=result)
        self.pairing, self.unusable = None, None
        return result

    def ask_again(self) -> bool:
        """After a denial (on SIGHUP): file a new request with a new key. True if one was started."""
        if not self.denied or self.unusable is None:
            return False
        self.denied = False
        return self._start()

    def state(self) -> dict:
        """The state file's ``unusable``, ``pairing`` and ``pairing_denied``."""
        return {
            "unusable": None if self.unusable is None else {"reason": self.unusable.reason, "detail": self.unusable.detail},
            "pairing": None if self.pairing is None else {"code": self.pairing.code, "ca_url": self.config.renewal.ca_url},
            "pairing_denied": self.denied,
        }
