"""crl.pem as nginx (``ssl_crl``) and haproxy (``crl-file``) use it: they check the CRL of every
certificate in the chain (OpenSSL's X509_V_FLAG_CRL_CHECK_ALL), so crl.pem carries the root's CRL
beside the issuing CA's. Real servers, real clients (curl, Python ssl), real certificates.

The servers must be installed (.ci/run installs them); a missing one fails the test.
"""

from __future__ import annotations

import http.client
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from est_support import curl
from pkictl.revocation import load_crls
from support import DEADLINE, client_context, live_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # bench/ is not a package

README = Path(__file__).resolve().parents[1] / "README.md"
BUNDLE = "/var/lib/pki-agent/gw/"  # the gateway's bundle directory in the README's snippets


def readme_snippet(language: str) -> str:
    """The README's ```nginx or ```haproxy block (section "CRLs for nginx and haproxy"): the tests
    run exactly those directives."""
    [block] = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)
    return block


def nginx_config(work: Path, port: int, gateway: Path, crl: Path) -> str:
    server = readme_snippet("nginx")
    server = server.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;").replace(f"{BUNDLE}crl.pem", str(crl))
    server = server.replace(BUNDLE, f"{gateway}/").rstrip().removesuffix("}")
    server += '    location / { return 200 "in: $ssl_client_s_dn\\n"; }\n}\n'
    temps = "".join(f"    {kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
            f"events {{ worker_connections 64; }}\nhttp {{\n    access_log off;\n{temps}{server}}}\n")


def haproxy_config(work: Path, port: int, gateway: Path, crl: Path, combined: Path) -> str:
    frontend = readme_snippet("haproxy")
    frontend = frontend.replace("bind :443", f"bind 127.0.0.1:{port}").replace("/etc/haproxy/gw.pem", str(combined))
    frontend = frontend.replace(f"{BUNDLE}crl.pem", str(crl)).replace(BUNDLE, f"{gateway}/")
    return (f"global\n    nbthread 1\n    pidfile {work}/haproxy.pid\n\ndefaults\n    mode http\n    timeout connect 5s\n"
            f"    timeout client 10s\n    timeout server 10s\n\n{frontend}"
            '    http-request return status 200 content-type text/plain string "in"\n')


def program(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    assert found, f"{name} is required for this test: apt-get install -y {name} (.ci/run does)"
    return found


class Server:
    """nginx or haproxy on a free loopback port, configured with the README's snippet: the
    gateway's bundle (fullchain.pem, privkey.pem, ca.pem) and ``crl`` as its crl.pem."""

    def __init__(self, kind: str, pki, crl: Path, work: Path) -> None:
        work.mkdir()
        files = live_files(pki.gateway)
        combined = work / "combined.pem"
        combined.touch(0o600)
        combined.write_bytes(files["fullchain"].read_bytes() + files["privkey"].read_bytes())
        self.port = peers.free_port()
        config = work / "server.conf"
        self.error_log = work / "error.log"
        if kind == "nginx":
            config.write_text(nginx_config(work, self.port, pki.gateway, crl))
            argv = [program("nginx"), "-p", str(work), "-e", str(self.error_log), "-c", str(config)]
        else:
            config.write_text(haproxy_config(work, self.port, pki.gateway, crl, combined))
            argv = [program("haproxy"), "-db", "-f", str(config)]
        self.log = (work / "stdout.log").open("w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            peers.wait_listening(self.port, self.proc, DEADLINE)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        peers.stop(self.proc)
        self.log.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Server] = []

    def start(kind: str, pki, crl: Path) -> Server:
        started.append(Server(kind, pki, crl, tmp_path / f"{kind}-{len(started)}"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def curl_get(port: int, bundle: Path):
    """GET / with curl, presenting the bundle's certificate and chain (fullchain.pem)."""
    files = live_files(bundle)
    return curl(f"https://127.0.0.1:{port}/", "--cert", str(files["fullchain"]), "--key", str(files["privkey"]),
                cacert=bundle / "ca.pem")


def python_get(port: int, bundle: Path) -> str:
    """GET / with Python's ssl and http.client; the status and body, or how the connection failed."""
    files = live_files(bundle)
    ctx = client_context(bundle / "ca.pem", fullchain=files["fullchain"], key=files["privkey"])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=DEADLINE)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return f"{response.status} {response.read().decode()}"
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as exc:
        return f"refused: {exc!r}"
    finally:
        conn.close()


def issuing_only(pki, out: Path) -> Path:
    """crl.pem without the root's CRL: what pkictl published before it signed one."""
    crls = [c for c in load_crls(pki.ca.crl_path) if c.issuer != pki.ca.root.subject]
    out.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return out


@pytest.fixture
def revoked(pki, tmp_path) -> Path:
    """Node ``gone``, enrolled and revoked (crl.pem re-signed)."""
    bundle = pki.ca.enroll("node", "gone", out=tmp_path / "gone").directory
    pki.ca.revoke("gone", reason="key-compromise")
    return bundle


def test_crl_pem_holds_the_root_crl_beside_the_issuing_one(pki, revoked):
    """crl.pem holds two CRLs: the issuing CA's (listing the revoked node) and the root's (empty),
    each verifying with its issuer's key."""
    crls = {c.issuer: c for c in load_crls(pki.ca.crl_path)}
    assert set(crls) == {pki.ca.issuing.subject, pki.ca.root.subject}
    assert crls[pki.ca.root.subject].is_signature_valid(pki.ca.root.public_key())
    assert crls[pki.ca.issuing.subject].is_signature_valid(pki.ca.issuing.public_key())
    assert len(crls[pki.ca.root.subject]) == 0 and len(crls[pki.ca.issuing.subject]) == 1


def test_nginx_ssl_crl_admits_a_valid_node_and_refuses_a_revoked_one(pki, revoked, serve, tmp_path):
    """nginx with ssl_verify_client on and ssl_crl crl.pem: node TW gets its 200 (curl), the
    revoked node gets nginx's 400 with 'certificate revoked' in the error log; with the
    issuing-only CRL file, TW is refused too ('unable to get certificate CRL': the root's is missing)."""
    server = serve("nginx", pki, pki.ca.crl_path)
    ok = curl_get(server.port, pki.node)
    assert (ok.returncode, ok.status) == (0, 200), ok
    assert b"CN=TW" in ok.body, ok.body
    bad = curl_get(server.port, revoked)
    assert bad.status == 400 and b"CN=TW" not in bad.body, bad
    assert "certificate revoked" in server.error_log.read_text()

    old = serve("nginx", pki, issuing_only(pki, tmp_path / "issuing-only.pem"))
    refused = curl_get(old.port, pki.node)
    assert refused.status == 400, refused
    assert "unable to get certificate CRL" in old.error_log.read_text()


def test_haproxy_crl_file_admits_a_valid_node_and_refuses_a_revoked_one(pki, revoked, serve, tmp_path):
    """haproxy with verify required and crl-file crl.pem: node TW gets in (Python ssl client),
    the revoked node's handshake is refused; with the issuing-only CRL file TW is refused too."""
    server = serve("haproxy", pki, pki.ca.crl_path)
    assert python_get(server.port, pki.node) == "200 in"
    assert python_get(server.port, revoked).startswith("refused"), "haproxy admitted a revoked node"

    old = serve("haproxy", pki, issuing_only(pki, tmp_path / "issuing-only.pem"))
    assert python_get(old.port, pki.node).startswith("refused"), "haproxy admitted TW without the root's CRL"
    ok = curl_get(server.port, pki.node)  # and curl, another client, agrees with the first server
    assert (ok.returncode, ok.status, ok.body) == (0, 200, b"in"), ok
