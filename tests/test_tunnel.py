"""The node-side tunnel as real processes: node agent (tunnel) -> gateway agent (listener) -> echo
upstream; plain clients get through, renewals reach new connections, refusals are named."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from pki_agent.cli import cli as agent_cli
from pki_agent.config import load_config
from pki_agent.errors import ConfigError
from pkictl.authority import CertificateAuthority
from pkictl.cli import cli as pkictl_cli
from pkictl.est.wire import root_fingerprint
from pkictl.files import read_private_file
from pkictl.keys import load_private_key
from pkictl.profile import generate_key
from pkictl.settings import CASettings
from pkictl.store import Credential, CredentialStore

from est_support import RunningService
from support import DEADLINE, AgentProcess, EchoServer, command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # bench/ is not a package: its haproxy config generator

NODE_NET_CLIENT = r"""
const net = require('net');
const sock = net.connect(+process.argv[1], '127.0.0.1', () => sock.write('plain from node.js'));
let got = '';
sock.on('data', d => { got += d; if (got.length >= 18) { console.log(got); sock.end(); } });
sock.on('error', e => { console.error('error: ' + e.message); process.exit(1); });
"""


def _gateway(bundle: Path, home: Path, upstream: int, check_interval: str = "1h") -> AgentProcess:
    config = bundle / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": ".",
        "renewal": {"ca_home": str(home), "check_interval": check_interval},
        "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream}", "crl": str(home / "crl.pem"), "allow": ["tw"]},
    }))
    return AgentProcess(config)


def _node(bundle: Path, home: Path, gateway_port: int, tmp_path: Path, check_interval: str = "1h", **tunnel) -> tuple[AgentProcess, int]:
    """Start node TW's agent with its tunnel on 127.0.0.1 (port 0) to the gateway (more ``tunnel``
    settings as keywords); return it and the tunnel's port."""
    config = tmp_path / f"{bundle.name}-agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": "TW", "kind": "node", "credential_dir": str(bundle),
        "renewal": {"ca_home": str(home), "check_interval": check_interval, "jitter": 0},
        "tunnel": {"listen": "127.0.0.1:0", "gateway": f"127.0.0.1:{gateway_port}", "connect_timeout": "5s", **tunnel},
    }))
    agent = AgentProcess(config)
    match = agent.log.wait_for(r"ready: node \S+, no listener, tunnel 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:\d+")
    return agent, int(match.group(1))


@contextlib.contextmanager
def _chain(gateway_bundle: Path, node_bundle: Path, home: Path, upstream: int, tmp_path: Path, *,
           gateway_check: str = "1h", node_check: str = "1h"):
    """Gateway agent (listener -> upstream) and node agent (tunnel -> gateway) as real processes;
    yields ``(gateway, node, gateway_port, tunnel_port)`` and stops both."""
    gateway = _gateway(gateway_bundle, home, upstream, gateway_check)
    node = None
    try:
        _, gw_port = gateway.wait_ready()
        node, port = _node(node_bundle, home, gw_port, tmp_path, node_check)
        yield gateway, node, gw_port, port
    finally:
        if node:
            node.stop()
        gateway.stop()


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` in plain TCP and read as many bytes back (b'' if the tunnel closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload) and (chunk := sock.recv(65536)):
            received += chunk
    return received


def _serial(bundle: Path) -> str:
    return f"{CredentialStore(bundle).load().certificate.serial_number:x}"


def test_plain_clients_get_through_the_tunnel_with_the_nodes_certificate(pki, echo_server, tmp_path):
    """A plain TCP client and Node.js's net module dial the node's loopback port and reach the
    upstream; the gateway sees node tw with TW's serial, both sides log the connection."""
    with _chain(pki.gateway, pki.node, pki.home, echo_server.port, tmp_path) as (gateway, node, gw_port, port):
        assert _exchange(port, b"hello through the tunnel") == b"hello through the tunnel"
        gateway.log.wait_for(rf"accepted peer=127\.0\.0\.1:\d+ node=tw serial={_serial(pki.node)}\b")
        node.log.wait_for(rf"tunnel closed local=127\.0\.0\.1:\d+ gateway=127\.0\.0\.1:{gw_port} serial={_serial(pki.node)} "
                          r"bytes_up=24 bytes_down=24")
        nodejs = shutil.which("node")
        assert nodejs, "node (Node.js) is required for this interop test"
        ran = subprocess.run([nodejs, "-e", NODE_NET_CLIENT, str(port)], capture_output=True, text=True, timeout=DEADLINE)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "plain from node.js"
        assert "refused" not in gateway.log.text() and "authentication failure" not in node.log.text()


def test_after_renewal_new_tunnel_connections_present_the_new_certificate(tmp_path):
    """Node TW's agent renews its 9-second certificate at 2/3 of its life: the next tunnel
    connection presents the new serial to the gateway, and one opened before keeps working."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(node_lifetime=dt.timedelta(seconds=9)))
    gw = ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"]).directory
    tw = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    first = _serial(tw)
    with EchoServer() as echo:
        with _chain(gw, tw, ca.home, echo.port, tmp_path, node_check="1s") as (gateway, node, gw_port, port):
            before = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            before.sendall(b"opened before")
            assert before.recv(100) == b"opened before"
            gateway.log.wait_for(rf"accepted peer=\S+ node=tw serial={first}\b")
            renewed = node.log.wait_for(r"renewed TW: serial ([0-9a-f]+) -> ([0-9a-f]+)")
            assert renewed.group(1) == first != renewed.group(2)
            mark = gateway.log.mark()
            assert _exchange(port, b"after renewal") == b"after renewal"
            # a newer serial: with 9-second certificates a second renewal may already have come
            gateway.log.wait_for(rf"accepted peer=\S+ node=tw serial=(?!{first}\b)[0-9a-f]+\b", start=mark)
            before.sendall(b"still here")
            assert before.recv(100) == b"still here"
            before.close()
    ca.close()


def test_an_expired_gateway_certificate_is_named_as_expired_by_the_tunnel(pki, echo_server, tmp_path):
    """A gateway serving an expired certificate of our CA is reported by the node as expired and
    not renewed (where to look), not as a server from another CA."""
    from pkictl.clock import FixedClock

    pki.ca.clock = FixedClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=100))
    stale = pki.ca.enroll("gateway", "stale", out=tmp_path / "stale", ip_addresses=["127.0.0.1"]).directory
    with _chain(stale, pki.node, pki.home, echo_server.port, tmp_path) as (gateway, node, gw_port, port):
        assert _exchange(port, b"secret") == b""
        line = node.log.wait_for(r"tunnel gateway certificate rejected .*").group(0)
        assert "the gateway's certificate has expired: its agent has not renewed it" in line, line
        assert "not from the CA this node trusts" not in line


def test_gateway_certificate_for_another_address_is_refused_by_the_tunnel(pki, echo_server, tmp_path):
    """A gateway whose certificate names 127.0.0.2 while the tunnel dials 127.0.0.1 gets no
    bytes: the node logs the gateway's certificate as rejected, and the local client gets EOF;
    with server_name 127.0.0.2 the same gateway is accepted."""
    other = pki.ca.enroll("gateway", "other", out=tmp_path / "other", ip_addresses=["127.0.0.2"]).directory
    with _chain(other, pki.node, pki.home, echo_server.port, tmp_path) as (gateway, node, gw_port, port):
        assert _exchange(port, b"secret") == b""
        node.log.wait_for(r"tunnel gateway certificate rejected local=\S+ gateway=127\.0\.0\.1:\d+ detail=.IP address mismatch")
        assert "accepted" not in gateway.log.text()
        node.stop()  # one agent per credential directory (its PID file lock)
        (tmp_path / "named").mkdir()
        named, named_port = _node(pki.node, pki.home, gw_port, tmp_path / "named", server_name="127.0.0.2")
        try:
            assert _exchange(named_port, b"named") == b"named"
        finally:
            named.stop()


def test_revoked_node_is_logged_as_an_authentication_failure(pki, echo_server, tmp_path):
    """After 'pkictl revoke TW' reaches our gateway, a new tunnel connection is refused: the
    gateway logs 'revoked', and the node an authentication failure with the reason of the
    gateway's TLS alert, not a network error."""
    with _chain(pki.gateway, pki.node, pki.home, echo_server.port, tmp_path, gateway_check="1s") as (gateway, node, gw_port, port):
        assert _exchange(port, b"before") == b"before"
        revoked = subprocess.run([command("pkictl"), "--home", str(pki.home), "revoke", "TW"], capture_output=True, text=True, timeout=DEADLINE)
        assert revoked.returncode == 0, revoked.stderr
        gateway.log.wait_for(r"CRL loaded: 1 revoked")
        assert _exchange(port, b"after") == b""
        gateway.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='revoked'")
        node.log.wait_for(rf"tunnel authentication failure: the gateway refused this node's certificate local=\S+ "
                          rf"gateway=127\.0\.0\.1:{gw_port} serial={_serial(pki.node)} reason='revoked' "
                          r"detail='SSLV3_ALERT_CERTIFICATE_REVOKED'")
        assert "unreachable" not in node.log.text()


def _haproxy_gateway(pki, upstream: int, directory: Path):
    """haproxy (verify required, CRL) as the gateway, with the benchmark's config generator; unlike
    our listener and nginx it refuses a client certificate with a TLS alert that names the reason."""
    peer = peers.PEERS["haproxy"]
    program = peer.find()
    assert program, f"haproxy is required for this interop test: {peer.install} (.ci/run does)"
    directory.mkdir()
    port = peers.free_port()
    config = peer.configure(directory, peers.make_material(pki.ca, pki.gateway, directory / "material"), port, upstream)
    proc = subprocess.Popen(peer.argv(program, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    peers.wait_listening(port, proc, DEADLINE)
    return proc, port


def test_tunnel_names_the_reason_a_gateway_gives_in_its_tls_alert(pki, echo_server, tmp_path):
    """Through haproxy as the gateway TW's bytes get through; once TW is revoked haproxy refuses
    it with a 'certificate revoked' alert, and the tunnel logs reason 'revoked'."""
    haproxy, gw_port = _haproxy_gateway(pki, echo_server.port, tmp_path / "haproxy-before")
    node, port = _node(pki.node, pki.home, gw_port, tmp_path)
    try:
        assert _exchange(port, b"via haproxy") == b"via haproxy"
        peers.stop(haproxy)
        pki.ca.revoke("TW")
        haproxy, gw_port = _haproxy_gateway(pki, echo_server.port, tmp_path / "haproxy-after")
        node.stop()
        node, port = _node(pki.node, pki.home, gw_port, tmp_path)
        assert _exchange(port, b"revoked now") == b""
        node.log.wait_for(rf"tunnel authentication failure: the gateway refused this node's certificate local=\S+ "
                          rf"gateway=127\.0\.0\.1:{gw_port} serial={_serial(pki.node)} reason='revoked' "
                          r"detail='SSLV3_ALERT_CERTIFICATE_REVOKED'")
    finally:
        node.stop()
        peers.stop(haproxy)


def _node_without_eku(pki, directory: Path) -> Path:
    """A credential for node tw from our issuing CA but without extendedKeyUsage: OpenSSL admits it
    and the gateway refuses it after the handshake (docs/design.md), with a plain close, no alert."""
    key_path = pki.home / "issuing" / "key.pem"
    issuing_key = load_private_key(read_private_file(key_path), None, source=str(key_path))
    key, now = generate_key(), dt.datetime.now(dt.timezone.utc)
    ski = pki.ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tw")]))
            .issuer_name(pki.ca.issuing.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{pki.ca.settings.trust_domain}/node/tw")]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(issuing_key, hashes.SHA256()))
    CredentialStore.create(directory, Credential(key, cert, pki.ca.chain), pki.ca.trust_anchors)
    return directory


def test_refusal_after_the_handshake_without_an_alert_is_an_authentication_failure(pki, echo_server, tmp_path):
    """A gateway that checks the identity after the handshake and just closes (no EKU here) is
    logged by the tunnel as an authentication failure, not as a network error."""
    bundle = _node_without_eku(pki, tmp_path / "no-eku")
    with _chain(pki.gateway, bundle, pki.home, echo_server.port, tmp_path) as (gateway, node, gw_port, port):
        assert _exchange(port, b"ping") == b""
        gateway.log.wait_for(r"refused peer=\S+ reason='wrong purpose'")
        node.log.wait_for(r"tunnel authentication failure: .* reason='closed by the gateway before any data'")


def test_unreachable_gateway_is_logged_as_such(pki, tmp_path):
    """With nothing listening at the gateway's address the local client gets EOF and the node
    logs 'gateway unreachable', not an authentication failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    node, port = _node(pki.node, pki.home, closed_port, tmp_path)
    try:
        assert _exchange(port, b"anyone?") == b""
        node.log.wait_for(rf"tunnel gateway unreachable local=\S+ gateway=127\.0\.0\.1:{closed_port} error=")
        assert "authentication failure" not in node.log.text()
    finally:
        node.stop()


@pytest.mark.parametrize("change, message", [
    ({"kind": "gateway"}, "tunnel: only a node runs the tunnel"),
    ({"tunnel": {"listen": "0.0.0.0:18789", "gateway": "gw.example.lan:8443"}}, "tunnel.listen: .*loopback only"),
    ({"tunnel": {"listen": "127.0.0.1:18789", "gateway": "gw.example.lan"}}, "tunnel.gateway: .*want HOST:PORT"),
])
def test_tunnel_config_errors_name_the_field(change, message, tmp_path):
    """A tunnel on a gateway, a tunnel listening beyond loopback, or a gateway without a port
    is refused at load time with the file and field named."""
    data = {"name": "TW", "kind": "node", "tunnel": {"listen": "127.0.0.1:18789", "gateway": "gw.example.lan:8443"}, **change}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + message):
        load_config(path)
    del data["kind"], data["tunnel"]
    data.update(kind="node", tunnel={"listen": "[::1]:18789", "gateway": "192.168.1.10:8443"})
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).tunnel.gateway == ("192.168.1.10", 8443)


# -- the enroll commands write the tunnel: section -------------------------------------------------


def test_pkictl_enroll_node_tunnel_option_writes_a_tunnel_the_agent_loads(tmp_path):
    """'pkictl enroll-node TW --tunnel 127.0.0.1:18789=gw.example.lan:8443' writes a bundle whose
    agent.yaml holds that tunnel; a non-loopback LISTEN or --tunnel with --token exits 2 and writes nothing."""
    home = tmp_path / "ca"
    runner = CliRunner()
    assert runner.invoke(pkictl_cli, ["--home", str(home), "init-ca"]).exit_code == 0
    ok = runner.invoke(pkictl_cli, ["--home", str(home), "enroll-node", "TW", "--tunnel", "127.0.0.1:18789=gw.example.lan:8443"])
    assert ok.exit_code == 0, ok.output
    tunnel = load_config(home / "bundles" / "TW" / "agent.yaml").tunnel
    assert (tunnel.listen, tunnel.gateway) == (("127.0.0.1", 18789), ("gw.example.lan", 8443))
    wide = runner.invoke(pkictl_cli, ["--home", str(home), "enroll-node", "n2", "--tunnel", "0.0.0.0:18789=gw.example.lan:8443"])
    assert wide.exit_code == 2 and "loopback only" in wide.output
    assert not (home / "bundles" / "n2").exists() and "n2" not in {r.name for r in CertificateAuthority.load(home).inventory.records()}
    token = runner.invoke(pkictl_cli, ["--home", str(home), "enroll-node", "n3", "--token", "--tunnel", "127.0.0.1:1=gw:8443"])
    assert token.exit_code == 2 and "pki-agent enroll" in token.output


def test_pki_agent_enroll_tunnel_option_over_est(tmp_path):
    """'pki-agent enroll --tunnel' over EST writes the tunnel into the node's agent.yaml; a
    malformed --tunnel exits 2 before anything is asked of the CA."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    runner = CliRunner()
    service = RunningService(ca.home).start()
    try:
        args = ["enroll", "--ca-url", service.url, "--fingerprint", root_fingerprint(ca.root), "--name", "TW"]
        bad = runner.invoke(agent_cli, [*args, "--token", ca.create_token("TW")[0], "--dir", str(tmp_path / "bad"),
                                        "--tunnel", "127.0.0.1:18789"])
        assert bad.exit_code == 2 and "LISTEN=GATEWAY" in bad.output and not (tmp_path / "bad").exists()
        ok = runner.invoke(agent_cli, [*args, "--token", ca.create_token("TW")[0], "--dir", str(tmp_path / "TW"),
                                       "--tunnel", "[::1]:18789=192.168.1.10:8443"])
        assert ok.exit_code == 0, ok.output
        config = load_config(tmp_path / "TW" / "agent.yaml")
        assert (config.tunnel.listen, config.tunnel.gateway) == (("::1", 18789), ("192.168.1.10", 8443))
        assert config.renewal.ca_url == service.url
    finally:
        service.stop()
        ca.close()


def test_stopping_the_node_agent_with_a_connection_open_logs_no_error(pki, echo_server, tmp_path):
    """SIGTERM while a tunnelled connection is open (and one closed a moment ago lingers) ends
    the agent with status 0, the open connection closed, and no ERROR or traceback in its log."""
    with _chain(pki.gateway, pki.node, pki.home, echo_server.port, tmp_path) as (gateway, node, gw_port, port):
        assert _exchange(port, b"closed just now") == b"closed just now"  # lingers up to 5 s in the tunnel
        open_one = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        open_one.sendall(b"still open")
        assert open_one.recv(100) == b"still open"
        assert node.stop() == 0
        assert open_one.recv(100) == b""
        open_one.close()
        log = node.log.text()
        assert "Traceback" not in log and " ERROR " not in log, log
