"""pki-agent doctor over real TLS: a node's test connection to the gateway (our listener and an
OpenSSL server), and a gateway's own listener and upstream."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess

import pytest
import trustme

from pki_agent.config import AgentConfig, ListenerConfig, RenewalConfig
from pki_agent.daemon import Agent
from pki_agent.doctor.checks import diagnose_agent
from pki_agent.doctor.probe import probe_gateway
from pkictl.clock import FixedClock
from pkictl.diagnosis.credential_facts import fingerprint
from pkictl.revocation import load_crls

from conftest import RunningAgent
from doctor_support import live_version, only, problems, replace_file, snapshot, write_config
from support import DEADLINE, live_files, free_port, wait_until

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def node_config(pki, tmp_path, **changes):
    data = {"name": "TW", "kind": "node", "trust_anchor_sha256": f"sha256:{fingerprint(pki.ca.root)}",
            "credential_dir": str(pki.node), "renewal": {"ca_home": str(pki.home)}}
    data.update(changes)
    return write_config(tmp_path / "node.yaml", data)


def gateway_config(pki, tmp_path, port: int, upstream: int):
    return write_config(tmp_path / "gw.yaml", {
        "name": "gw", "kind": "gateway", "trust_anchor_sha256": fingerprint(pki.ca.root), "credential_dir": str(pki.gateway),
        "renewal": {"ca_home": str(pki.home)},
        "listener": {"listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream}", "crl": str(pki.ca.crl_path),
                     "allow": ["tw"]}})


def doctor(path, **kwargs):
    return diagnose_agent(path, clock=FixedClock(kwargs.pop("now", NOW)), **kwargs)


def closed_port() -> int:
    return free_port()


def test_node_accepted_by_the_gateway(pki, tmp_path, gateway_agent) -> None:
    """A test connection of node TW to the running listener is accepted: nothing to report, the gateway finding says accepted."""
    findings = doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{gateway_agent.port}")
    assert problems(findings) == []
    [gateway] = [f for f in findings if f.check == "gateway"]
    assert gateway.problem.startswith("accepted CN=TW") and "TLSv1.3" in gateway.problem


def test_gateway_certificate_without_the_ip_dialed(pki, tmp_path, echo_server) -> None:
    """A gateway certificate with only DNS:gw.example.lan, dialed at 127.0.0.1, is one gateway error whose fix adds --ip 127.0.0.1;
    dialed by its DNS name it is accepted (positive control)."""
    bundle = pki.ca.enroll("gateway", "gw2", out=tmp_path / "gw2", dns_names=["gw.example.lan"]).directory
    config = AgentConfig(name="gw2", kind="gateway", credential_dir=bundle, renewal=RenewalConfig(check_interval=3600, jitter=0),
                         listener=ListenerConfig(listen="127.0.0.1:0", upstream=f"127.0.0.1:{echo_server.port}", crl=pki.ca.crl_path,
                                                 allow=["tw"]))
    running = RunningAgent(Agent(config)).start()
    try:
        path = node_config(pki, tmp_path)
        found = only(doctor(path, gateway=f"127.0.0.1:{running.port}"), "gateway")
        assert "lacks the name this node dials" in found.problem and "DNS:gw.example.lan" in found.problem
        assert "pkictl enroll-gateway gw2 --ip 127.0.0.1" in found.fix
        assert problems(doctor(path, gateway=f"127.0.0.1:{running.port}", server_name="gw.example.lan")) == []
    finally:
        running.stop()


def test_node_sending_its_leaf_without_the_chain(pki, tmp_path, gateway_agent) -> None:
    """chain.pem emptied and fullchain.pem cut to the leaf: the chain error, and the gateway refusal naming that cause."""
    version = live_version(pki.node)
    replace_file(version / "chain.pem", b"")
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes())
    findings = doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{gateway_agent.port}")
    assert problems(findings) == [("chain", "error"), ("gateway", "error")]
    [gateway] = [f for f in findings if f.check == "gateway"]
    assert "the gateway refused this node" in gateway.problem and "without the chain" in gateway.problem


def test_revoked_node_refused_by_the_gateway(pki, tmp_path, gateway_agent) -> None:
    """After pkictl revoke TW and a listener reload, the node's doctor reports the revocation and the gateway's refusal for that cause."""
    pki.ca.revoke("TW")
    assert gateway_agent.call(gateway_agent.agent.reload)
    findings = doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{gateway_agent.port}")
    assert problems(findings) == [("revocation", "error"), ("gateway", "error")]
    assert "was revoked" in [f.problem for f in findings if f.check == "gateway"][0]


def test_unreachable_gateway(pki, tmp_path) -> None:
    """--gateway on a closed port is one gateway error: cannot connect."""
    found = only(doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{closed_port()}"), "gateway")
    assert found.problem.startswith("cannot connect")


class OpenSSLServer:
    """``openssl s_server`` on 127.0.0.1 as a gateway that wants client certificates from ``cafile``
    (an OpenSSL peer, unlike our listener, sends alerts)."""

    def __init__(self, cert, key, cafile, chain=None) -> None:
        self.port = closed_port()
        argv = [shutil.which("openssl"), "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", str(cert), "-key", str(key),
                "-CAfile", str(cafile), "-Verify", "3", "-verify_return_error", "-quiet"]
        if chain is not None:
            argv += ["-cert_chain", str(chain)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def accepting() -> bool:  # readiness: the port accepts connections
            assert self.proc.poll() is None, "openssl s_server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(accepting, what="openssl s_server accepting connections", interval=0.02)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(DEADLINE)
        assert self.proc.stdin is not None
        self.proc.stdin.close()


@pytest.fixture
def openssl_gateway(pki):
    files = live_files(pki.gateway)
    server = OpenSSLServer(files["cert"], files["privkey"], pki.gateway / "ca.pem", chain=files["chain"])
    yield server.port
    server.stop()


def test_gateway_sending_its_leaf_without_the_chain(pki, tmp_path) -> None:
    """A gateway serving cert.pem without chain.pem is one gateway error saying so (its issuer is our issuing CA)."""
    files = live_files(pki.gateway)
    server = OpenSSLServer(files["cert"], files["privkey"], pki.gateway / "ca.pem")
    try:
        found = only(doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{server.port}"), "gateway")
    finally:
        server.stop()
    assert "sends its certificate without the chain" in found.problem and "fullchain.pem" in found.fix


def test_gateway_with_a_foreign_certificate(pki, tmp_path) -> None:
    """A server with a trustme certificate for 127.0.0.1 is one gateway error: its certificate does not chain to our trust anchor."""
    foreign = trustme.CA()
    leaf = foreign.issue_cert("127.0.0.1")
    cert, key = tmp_path / "foreign.pem", tmp_path / "foreign.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    server = OpenSSLServer(cert, key, pki.gateway / "ca.pem")
    try:
        found = only(doctor(node_config(pki, tmp_path), gateway=f"127.0.0.1:{server.port}"), "gateway")
    finally:
        server.stop()
    assert "does not chain to our trust anchor" in found.problem


def test_openssl_gateway_names_the_missing_chain_by_its_alert(pki, openssl_gateway) -> None:
    """Against an OpenSSL server a leaf without chain comes back as the unknown-CA alert, which the probe reports; the full chain is accepted."""
    version = live_version(pki.node)
    accepted = probe_gateway(version, pki.node / "ca.pem", ("127.0.0.1", openssl_gateway), "127.0.0.1", settle=0.5)
    assert accepted.outcome == "accepted", accepted
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes())
    refused = probe_gateway(version, pki.node / "ca.pem", ("127.0.0.1", openssl_gateway), "127.0.0.1", settle=0.5)
    assert (refused.outcome, refused.detail) == ("refused", "TLSV1_ALERT_UNKNOWN_CA")


def test_our_listener_names_the_missing_chain_by_its_alert(pki, gateway_agent) -> None:
    """pki-agent's listener, like OpenSSL's server, answers a leaf without chain with the unknown-CA alert."""
    version = live_version(pki.node)
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes())
    refused = probe_gateway(version, pki.node / "ca.pem", ("127.0.0.1", gateway_agent.port), "127.0.0.1")
    assert (refused.outcome, refused.detail, refused.version) == ("refused", "TLSV1_ALERT_UNKNOWN_CA", "TLSv1.3")


def test_our_listener_refuses_a_node_not_allowed_without_an_alert(pki, start_gateway_agent) -> None:
    """A refusal by the listener's own checks (here: not in listener.allow) comes after a completed
    handshake, as a close without alert; the probe says so instead of calling it accepted."""
    running = start_gateway_agent(allow=["someone-else"])
    refused = probe_gateway(live_version(pki.node), pki.node / "ca.pem", ("127.0.0.1", running.port), "127.0.0.1")
    assert refused.outcome == "closed" and "without an alert" in refused.detail and refused.version == "TLSv1.3"


def test_gateway_host_listener_and_upstream_healthy(pki, tmp_path, gateway_agent, echo_server) -> None:
    """The gateway's doctor finds its listener serving the live certificate and the upstream up, and changes nothing."""
    path = gateway_config(pki, tmp_path, gateway_agent.port, echo_server.port)
    before = snapshot(pki.home.parent)
    findings = doctor(path)
    assert problems(findings) == []
    assert {"listener", "upstream", "crl"} <= {f.check for f in findings} and "gateway" not in {f.check for f in findings}
    assert snapshot(pki.home.parent) == before


def test_listener_that_has_not_reloaded(pki, tmp_path, gateway_agent, echo_server) -> None:
    """A new gateway certificate installed behind the running listener's back is one listener warning naming both serials."""
    new = pki.ca.enroll("gateway", "gw", out=pki.gateway, ip_addresses=["127.0.0.1"], replace=True).certificate
    found = only(doctor(gateway_config(pki, tmp_path, gateway_agent.port, echo_server.port)), "listener")
    assert f"serial {new.serial_number:x}"[:40] in found.problem and "systemctl reload pki-agent" in found.fix


def test_listener_down_and_upstream_down(pki, tmp_path) -> None:
    """With nothing on the listen port a listener warning; with nothing on the upstream port an upstream error."""
    findings = doctor(gateway_config(pki, tmp_path, closed_port(), closed_port()))
    assert problems(findings) == [("listener", "warning"), ("upstream", "error")]


def test_gateway_crl_overdue_by_the_clock(pki, tmp_path, gateway_agent, echo_server) -> None:
    """Judged past half the CRL's validity the gateway's crl check warns, pointing at pkictl sign-crl on the CA home."""
    crl = load_crls(pki.ca.crl_path)[0]
    later = crl.last_update_utc + (crl.next_update_utc - crl.last_update_utc) * 0.6
    found = only(doctor(gateway_config(pki, tmp_path, gateway_agent.port, echo_server.port), now=later), "crl")
    assert "overdue" in found.problem and f"pkictl --home {pki.home} sign-crl" in found.fix


def test_listen_port_held_by_something_that_is_not_tls(pki, tmp_path, echo_server) -> None:
    """A plain TCP server on the listen port is one listener warning: it answers, but not with TLS."""
    found = only(doctor(gateway_config(pki, tmp_path, echo_server.port, echo_server.port)), "listener")
    assert "not with TLS" in found.problem


def test_gateway_crl_judges_the_root_crl_by_the_root(pki, tmp_path) -> None:
    """In the listener's crl.pem the root's CRL must verify with the trust anchor (a forged one is
    a crl error), and once expired it is a crl error whose fix is pkictl sign-crl --root."""
    from cryptography.hazmat.primitives import serialization

    from pkictl.profile import generate_key
    from pkictl.revocation import build_crl

    issuing, root = load_crls(pki.ca.crl_path)
    config = gateway_config(pki, tmp_path, closed_port(), closed_port())
    expired = [f for f in doctor(config, now=root.next_update_utc + dt.timedelta(seconds=1)) if "root's CRL" in f.problem]
    assert [(f.check, f.severity.label) for f in expired] == [("crl", "error")] and "expired at" in expired[0].problem
    assert f"pkictl --home {pki.home} sign-crl --root" in expired[0].fix

    forged = build_crl(issuer=pki.ca.root, issuer_key=generate_key(), revoked=[], number=7, now=NOW, lifetime=dt.timedelta(days=365))
    pki.ca.crl_path.write_bytes(issuing.public_bytes(serialization.Encoding.PEM) + forged.public_bytes(serialization.Encoding.PEM))
    bad = [f for f in doctor(config) if f.check == "crl" and f.severity.label != "ok"]
    assert [f.severity.label for f in bad] == ["error"] and "the root's CRL" in bad[0].problem and "does not verify" in bad[0].problem
