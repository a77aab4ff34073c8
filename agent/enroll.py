"""``pki-agent enroll``: a node's first certificate over EST, with no shared secret.

The node makes its key, pins the CA by the root fingerprint the operator gave it (RFC 7030
4.1.1), and asks for a certificate with a one-time token or waits for the operator's approval.
Nothing is written until the certificate is in hand and verified; then the bundle directory has
the same layout as ``pkictl enroll-node`` writes, and an ``agent.yaml`` that renews over EST.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from pkictl.bundle_config import render_agent_config
from pkictl.errors import PKIError, StoreError
from pkictl.est.wire import approval_code
from pkictl.files import atomic_write
from pkictl.names import validate_name
from pkictl.pem import certificates_to_pem
from pkictl.profile import generate_key
from pkictl.store import Credential, CredentialStore

from .est_client import ESTClient, select_chain, self_signed

__all__ = ["enroll"]


def enroll(
    *,
    ca_url: str,
    fingerprint: str,
    name: str,
    directory: Path,
    token: str | None = None,
    wait: float = 600.0,
    say: Callable[[str], None] = print,
    tunnel: dict | None = None,
) -> Credential:
    """Enroll node ``name`` with the EST server at ``ca_url`` and write its bundle to ``directory``.

    Args:
        fingerprint: ``sha256:<hex>`` of the CA's root, from the operator.
        token: the one-time token from ``pkictl enroll-node NAME --token``; None asks for approval.
        wait: seconds to keep polling while approval is pending.
        tunnel: ``{"listen": ..., "gateway": ...}`` for the ``tunnel:`` section of the agent.yaml
            written (:func:`pkictl.bundle_config.parse_tunnel`), or None for none.

    Returns:
        The installed credential.

    Raises:
        InvalidNameError: the name is not a DNS label.
        StoreError: ``directory`` exists and is not empty.
        AuthenticationError: the root does not match, the token is refused or the request denied.
        RenewalError: the server cannot be reached, or approval did not come in time.
    """
    validate_name(name)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise StoreError(f"{directory} exists and is not empty; choose another --dir")
    client = ESTClient(ca_url, anchors_path=None)
    cacerts = client.pinned_root(fingerprint)
    anchor = next(c for c in cacerts if self_signed(c) and fingerprint.lower().replace(":", "").endswith(c.fingerprint(hashes.SHA256()).hex()))
    key = generate_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ).sign(key, hashes.SHA256())
    say(f"key made on this host; its approval code is {approval_code(key.public_key())}")
    with tempfile.TemporaryDirectory() as tmp:
        anchors_path = Path(tmp) / "ca.pem"
        anchors_path.write_bytes(certificates_to_pem([anchor]))
        client.anchors_path = anchors_path  # from here on the server must prove it is that CA
        certificate = client.wait_for_certificate(csr, name=name, token=token, deadline=time.monotonic() + wait, say=say)
        chain = select_chain(certificate, client.cacerts())
    try:
        credential = Credential(key, certificate, chain)
        verification.PolicyBuilder().store(verification.Store([anchor])).build_client_verifier().verify(certificate, list(chain))
    except (PKIError, verification.VerificationError) as exc:
        raise StoreError(f"the certificate from {ca_url} does not verify for this key against the pinned root: {exc}") from None
    CredentialStore.create(directory, credential, [anchor])
    uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    trust_domain = uris[0].split("/")[2] if uris else "pkictl.internal"
    atomic_write(directory / "agent.yaml", render_agent_config(name=name, kind="node", trust_domain=trust_domain, ca_url=ca_url,
                                                                tunnel=tunnel, written_by="pki-agent enroll",
                                                                trust_anchor_sha256=anchor.fingerprint(hashes.SHA256()).hex()).encode())
    say(f"enrolled {name}: serial {certificate.serial_number:x}, not after {certificate.not_valid_after_utc.isoformat()}")
    say(f"bundle: {directory}; run: pki-agent run --config {directory / 'agent.yaml'}")
    return credential
