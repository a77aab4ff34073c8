"""The credential in the forms other servers read, kept in step on every rotation: haproxy serves
combined.pem, a Java client loads keystore.p12 (both with real programs, real handshakes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from pki_agent.config import AgentConfig, Hook, RenewalConfig, load_config
from pki_agent.daemon import Agent
from pki_agent.errors import ConfigError
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.pem import private_key_from_pem, public_key_bytes
from pkictl.store import CredentialStore

from conftest import RunningAgent
from support import DEADLINE, TLSClient, bundle_context, client_context, refused, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # bench/ is not a package: the same haproxy lookup and readiness wait as the benchmark

JAVA_CLIENT = Path(__file__).parent / "java" / "MtlsClient.java"


@pytest.fixture
def fleet(tmp_path):
    """A CA on an injected clock (at the real time: haproxy, Java and Python verify with the real
    one) with gateway gw (IP SAN 127.0.0.1) and node TW."""
    clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    ca = CertificateAuthority.init(tmp_path / "ca", clock=clock)
    gateway = ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"]).directory
    node = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    return clock, tmp_path / "ca", gateway, node


def _combined(path: Path) -> tuple[list[x509.Certificate], object]:
    data = path.read_bytes()
    return x509.load_pem_x509_certificates(data), private_key_from_pem(data, source=str(path))


def test_haproxy_serves_combined_pem_and_the_rotated_one_after_reload(fleet, echo_server, tmp_path):
    """haproxy `crt combined.pem ca-file ca.pem verify required` serves the gateway's certificate
    and chain to node TW and refuses a client without a certificate; after a rotation combined.pem
    holds the new certificate, its chain and its key, and the reloaded haproxy serves the new serial."""
    clock, home, gateway, node = fleet
    program = peers.HAPROXY.find()
    assert program, f"haproxy is required: {peers.HAPROXY.install} (.ci/run does)"
    port = peers.free_port()
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(f"""global
    pidfile {tmp_path}/haproxy.pid

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend gw
    bind 127.0.0.1:{port} ssl crt {gateway}/combined.pem ca-file {gateway}/ca.pem verify required
    default_backend upstream

backend upstream
    server echo 127.0.0.1:{echo_server.port}
""")
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen([program, "-W", "-db", "-f", str(config_file)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        peers.wait_listening(port, proc, DEADLINE)
        first = CredentialStore(gateway).load()
        client = TLSClient(port, bundle_context(node))  # verifies the chain to ca.pem and IP 127.0.0.1
        try:
            assert client.echo(b"via haproxy") == b"via haproxy"
            assert client.server_serial() == first.certificate.serial_number
        finally:
            client.close()
        assert refused(port, client_context(node / "ca.pem"))  # no client certificate: haproxy refuses

        # systemctl reload haproxy sends the master SIGUSR2; here the hook sends it itself.
        agent = Agent(AgentConfig(name="gw", kind="gateway", credential_dir=gateway, renewal=RenewalConfig(ca_home=home, jitter=0),
                                  hooks=[Hook(run=["kill", "-USR2", str(proc.pid)])]), clock=clock)
        agent.reload()

        async def rotate() -> bool:
            renewed = await agent.renew()
            await agent.wait_for_hooks()
            return renewed

        assert asyncio.run(rotate()) is True
        second = CredentialStore(gateway).load()
        assert second.certificate.serial_number != first.certificate.serial_number
        certificates, key = _combined(gateway / "combined.pem")
        assert certificates == [second.certificate, *second.chain]
        assert public_key_bytes(key.public_key()) == public_key_bytes(second.certificate.public_key())
        assert stat.S_IMODE((gateway / "live" / "combined.pem").stat().st_mode) == 0o600

        def serves_new_serial() -> bool:
            try:
                client = TLSClient(port, bundle_context(node))
            except (ssl.SSLError, OSError):
                return False
            try:
                return client.server_serial() == second.certificate.serial_number
            finally:
                client.close()

        wait_until(serves_new_serial, what="haproxy serving the rotated certificate after its reload")
        assert refused(port, client_context(node / "ca.pem"))
    finally:
        peers.stop(proc)
        log.close()


class MtlsServer:
    """A Python ssl server on 127.0.0.1, port 0, that requires a client certificate of ``trust``
    and answers each accepted client with one line; it records the client serials it saw."""

    def __init__(self, credential: Path, trust: Path | str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(credential / "fullchain.pem", credential / "privkey.pem")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cafile=str(trust))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.clients: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            raw.settimeout(DEADLINE)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.clients.append(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number)
                    conn.sendall(b"hello java\n")
            except (ssl.SSLError, OSError):
                raw.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session")
def java_client(tmp_path_factory) -> list[str]:
    """The Java client compiled once per session (``java MtlsClient.java`` compiles it on each run)."""
    javac, java = shutil.which("javac"), shutil.which("java")
    assert javac and java, "a JDK (java, javac; 11 or later) is required for the PKCS#12 test"
    out = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-d", str(out), str(JAVA_CLIENT)], check=True, timeout=120)
    return [java, "-cp", str(out), "MtlsClient"]


def _java(java_client: list[str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*java_client, *map(str, args)], capture_output=True, text=True, timeout=60)


def _write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_java_loads_the_keystore_and_makes_an_mtls_connection(fleet, java_client, tmp_path):
    """With pkcs12 configured every install writes keystore.p12 (PBES2/AES-256-CBC, HMAC-SHA256);
    after a rotation Java loads the new one with the password file, verifies the server by ca.pem
    and connects with node TW's certificate; a wrong password fails, a server trusting a foreign
    CA refuses, and a password file emptied later fails the install and keeps the old keystore."""
    clock, home, gateway, node = fleet
    password = tmp_path / "keystore-password"
    password.write_text("correct horse\n")
    password.chmod(0o600)
    config = load_config(_write_config(tmp_path / "agent.yaml", f"name: TW\nkind: node\ncredential_dir: {node}\n"
                                       f"renewal: {{ca_home: {home}, jitter: 0}}\npkcs12: {{password_file: keystore-password}}\n"))
    assert config.pkcs12 is not None and config.pkcs12.password_file == password
    agent = Agent(config, clock=clock)
    assert agent.conform_layout() is True  # enrolled without a keystore: installed again with one
    agent.reload()
    assert asyncio.run(agent.renew()) is True
    current = CredentialStore(node).load()
    keystore = node / "keystore.p12"
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    key, certificate, chain = pkcs12.load_key_and_certificates(keystore.read_bytes(), b"correct horse")
    assert certificate == current.certificate and chain == list(current.chain)
    assert key is not None and public_key_bytes(key.public_key()) == public_key_bytes(current.certificate.public_key())
    info = subprocess.run(["openssl", "pkcs12", "-info", "-noout", "-in", str(keystore), "-passin", f"file:{password}"],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert "PBES2, PBKDF2, AES-256-CBC" in info.stderr and "MAC: sha256" in info.stderr, info.stderr

    server = MtlsServer(gateway, node / "ca.pem")
    try:
        ran = _java(java_client, keystore, password, node / "ca.pem", "127.0.0.1", server.port)
        gateway_certificate = CredentialStore(gateway).load().certificate
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.strip() == f"peer: CN=gw serial {gateway_certificate.serial_number:x}"
        assert server.clients == [current.certificate.serial_number]

        wrong = tmp_path / "wrong-password"
        wrong.write_text("incorrect horse\n")
        ran = _java(java_client, keystore, wrong, node / "ca.pem", "127.0.0.1", server.port)
        assert ran.returncode == 1 and "password" in ran.stdout, ran.stdout + ran.stderr
    finally:
        server.close()

    foreign = tmp_path / "foreign.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    server = MtlsServer(gateway, foreign)
    try:
        ran = _java(java_client, keystore, password, node / "ca.pem", "127.0.0.1", server.port)
        # The alert races Java's write (an SSLException, or a broken pipe): the server accepted no one.
        assert ran.returncode == 1 and ran.stdout.startswith("error: "), ran.stdout + ran.stderr
        assert server.clients == []
    finally:
        server.close()

    before, version = keystore.read_bytes(), os.readlink(node / "live")
    password.write_text("")
    assert asyncio.run(agent.renew()) is False
    assert agent.state()["last_attempt"]["error"].endswith(f"the keystore password file {password} is empty; want the password on one line")
    assert os.readlink(node / "live") == version and keystore.read_bytes() == before
    assert CredentialStore(node).load().certificate == current.certificate


@pytest.mark.parametrize("content, problem", [(None, "cannot read the keystore password file"),
                                              ("", "is empty"), ("one\ntwo\n", "more than one line")])
def test_a_bad_keystore_password_file_fails_the_configuration(tmp_path, content, problem):
    """A missing, empty or multi-line pkcs12.password_file is refused when the configuration is loaded, naming the field and the file."""
    if content is not None:
        (tmp_path / "pw").write_text(content)
    path = _write_config(tmp_path / "agent.yaml", "name: TW\nkind: node\npkcs12: {password_file: pw}\n")
    with pytest.raises(ConfigError, match=f"pkcs12.password_file: .*{problem}") as raised:
        load_config(path)
    assert str(tmp_path / "pw") in str(raised.value)
    assert not list((tmp_path).glob("archive"))


def test_a_running_agent_writes_a_newly_configured_keystore_at_start(fleet, tmp_path):
    """An agent started with pkcs12 on a credential enrolled without it installs the same
    certificate again, with keystore.p12, before it serves: not weeks later at the next renewal."""
    clock, home, _, node = fleet
    (tmp_path / "pw").write_text("s3cret\n")
    before = CredentialStore(node).load().certificate
    config = AgentConfig(name="TW", kind="node", credential_dir=node, renewal=RenewalConfig(ca_home=home, jitter=0),
                         pkcs12={"password_file": tmp_path / "pw"}, watch=False)
    running = RunningAgent(Agent(config, clock=clock)).start()
    try:
        assert os.readlink(node / "live") == "archive/2"
        _, certificate, _ = pkcs12.load_key_and_certificates((node / "keystore.p12").read_bytes(), b"s3cret")
        assert certificate == before == running.agent.credential.certificate
    finally:
        running.stop()
