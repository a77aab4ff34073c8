"""README.md "EST with curl and openssl", followed literally: its shell blocks are read from the
README and run by bash with curl and openssl alone against a real 'pkictl serve' on a free port,
so a change there changes what runs here. What differs from the README, and nothing else: the
URL (``https://127.0.0.1:PORT`` for ``https://ca.example.lan:8443``), the token (the one
``pkictl enroll-node TW --token`` printed, for ``TOKEN``) and ``ca.pem`` (copied from the CA
home into the node's working directory, as the README says to)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkictl.authority import CertificateAuthority
from pkictl.settings import CASettings

from est_support import OPENSSL, ServeProcess, pkictl
from readme_support import readme_section, shell_blocks
from support import DEADLINE

SECTION = "EST with curl and openssl"
README_URL = "https://ca.example.lan:8443"
TW_URI = "spiffe://example.lan/node/tw"


def run_block(lines: list[str], cwd: Path, variables: dict[str, str], url: str, token: str) -> subprocess.CompletedProcess:
    """Run one README block as bash runs it (``set -euo pipefail``), after the variable assignments
    of the blocks before it; the URL and the token put in place of the README's examples."""
    script = "\n".join(["set -euo pipefail", *(f"{k}={v}" for k, v in variables.items()), *lines])
    script = script.replace(README_URL, url).replace("TW:TOKEN", f"TW:{token}")
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=DEADLINE * 2)


def ok(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"README block {what} -> exit {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def spki(pem: bytes) -> bytes:
    return serialization.load_pem_private_key(pem, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def mtls_handshake(ca_pem: Path, cert: Path, key: Path, chain: Path, scratch: Path) -> str:
    """A real handshake: a Python TLS server that requires a client certificate of this CA, and
    ``openssl s_client`` with ``cert``, ``chain`` and ``key``. Returns the server's verdict:
    ``accepted`` or ``refused: <why>``."""
    server_ca = trustme.CA()
    leaf = server_ca.issue_cert("127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_pem))
    leaf.configure_cert(ctx)
    server_pem = scratch / "server-ca.pem"
    server_ca.cert_pem.write_to_path(str(server_pem))
    verdict: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE)

        def serve_once() -> None:
            try:
                raw, _ = listener.accept()
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.sendall(b"hello\n")
                    verdict.append("accepted")
            except (ssl.SSLError, OSError) as exc:
                verdict.append(f"refused: {exc}")

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}", "-CAfile", str(server_pem),
                        "-cert", str(cert), "-cert_chain", str(chain), "-key", str(key), "-verify_return_error"],
                       input=b"", capture_output=True, timeout=DEADLINE, check=False)
        thread.join(DEADLINE)
    assert verdict, "the TLS server saw no client"
    return verdict[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A CA home of trust domain example.lan, the README's."""
    path = tmp_path / "ca"
    CertificateAuthority.init(path, CASettings(trust_domain="example.lan")).close()
    return path


def test_the_readme_curl_and_openssl_cycle_enrolls_and_renews(home, tmp_path):
    """The README's blocks enroll TW with its token and renew it with curl and openssl alone; the
    renewed certificate verifies against the CA bundle and a server requiring this CA's client
    certificates accepts it; a second simpleenroll with the same token gets 401, and a foreign
    client certificate is refused by the same server (negative controls)."""
    blocks = shell_blocks(readme_section(SECTION, level=3))
    enroll = next((b for b in blocks if any("/simpleenroll" in line for line in b)), None)
    renew = next((b for b in blocks if any("/simplereenroll" in line for line in b)), None)
    assert enroll and renew, f"README.md '{SECTION}' no longer has a simpleenroll and a simplereenroll block: {blocks}"
    assignments = [re.fullmatch(r"([A-Z_]+)=(\S+)", line) for block in blocks for line in block]
    variables = {m.group(1): m.group(2) for m in assignments if m}  # EST=...: the later blocks use it
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(home / "ca.pem", node / "ca.pem")  # "the trust anchor ca.pem copied from the CA host"

    serve = ServeProcess(home, "--workers", "0")
    try:
        token = pkictl(home, "enroll-node", "TW", "--token").stdout.splitlines()[1].strip()
        parsed = ok(run_block(enroll, node, {}, serve.url, token), "enroll")
        assert "id-ecPublicKey" in parsed and "Subject Alternative Name" in parsed, parsed  # the csrattrs line's output
        first = x509.load_pem_x509_certificate((node / "cert.pem").read_bytes())
        assert first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier) == [TW_URI]
        assert first.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
            spki((node / "privkey.pem").read_bytes())
        assert (node / "privkey.pem").stat().st_mode & 0o077 == 0, "the README's umask 077 keeps the key private"

        # negative control: the same token again, in a copy of the node's directory, is refused
        again = tmp_path / "again"
        shutil.copytree(node, again)
        line = next(line for line in enroll if "/simpleenroll" in line)
        refused = run_block([line], again, variables, serve.url, token)
        assert refused.returncode == 22, refused  # curl --fail-with-body: HTTP >= 400
        assert "wrong, expired or already used" in (again / "cert.p7").read_text(), (again / "cert.p7").read_text()

        ok(run_block(renew, node, variables, serve.url, token), "renew")
        renewed = x509.load_pem_x509_certificate((node / "cert.pem").read_bytes())
        assert renewed.serial_number != first.serial_number and renewed.subject == first.subject
        assert renewed.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
            spki((node / "privkey.pem").read_bytes()) != spki((again / "privkey.pem").read_bytes())
    finally:
        assert serve.stop() == 0

    verified = subprocess.run([OPENSSL, "verify", "-CAfile", str(node / "ca.pem"), "-untrusted", str(node / "cacerts.pem"),
                               "-purpose", "sslclient", str(node / "cert.pem")], capture_output=True, text=True, timeout=DEADLINE)
    assert verified.returncode == 0 and "cert.pem: OK" in verified.stdout, verified
    assert mtls_handshake(node / "ca.pem", node / "cert.pem", node / "privkey.pem", node / "cacerts.pem", tmp_path) == "accepted"

    foreign = trustme.CA().issue_cert("TW")  # negative control: a client certificate of another CA
    foreign.cert_chain_pems[0].write_to_path(str(tmp_path / "foreign.pem"))
    foreign.private_key_pem.write_to_path(str(tmp_path / "foreign.key"))
    refusal = mtls_handshake(node / "ca.pem", tmp_path / "foreign.pem", tmp_path / "foreign.key", tmp_path / "foreign.pem", tmp_path)
    assert refusal.startswith("refused") and "certificate verify failed" in refusal, refusal
