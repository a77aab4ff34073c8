"""pki-agent doctor on a node, where it used to say "nothing to fix" or blame the wrong thing: who
holds the tunnel's port, a ca.pem that is not the pinned root, the gateway's three ways of ending
a test connection, and a certificate from the future judged against the EST server's clock."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess

import pytest
import trustme

from pki_agent.doctor.checks import diagnose_agent
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock, SystemClock
from pkictl.diagnosis.credential_facts import fingerprint

from doctor_support import problems, replace_file, write_config
from est_support import RunningService
from support import DEADLINE, AgentProcess, wait_record, free_port

# A stale gateway client left on the tunnel's port: answers every request "401 Unauthorized".
STALE_401 = r"""
const http = require('http');
const server = http.createServer((req, res) => { res.writeHead(401, {'WWW-Authenticate': 'Bearer'}); res.end('token expired'); });
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
"""


def node_config(pki, tmp_path, **changes):
    data = {"name": "TW", "kind": "node", "trust_anchor_sha256": fingerprint(pki.ca.root),
            "credential_dir": str(pki.node), "renewal": {"ca_home": str(pki.home), "check_interval": "1h", "jitter": 0}}
    data.update(changes)
    return write_config(tmp_path / "node.yaml", data)


def finding(findings, check: str):
    [found] = [f for f in findings if f.check == check]
    return found


@pytest.fixture
def stale_node_server():
    """A Node.js HTTP server on 127.0.0.1 (port 0) answering 401; yields (process, port)."""
    node = shutil.which("node")
    assert node, "node (Node.js) is required for the stale-server test"
    proc = subprocess.Popen([node, "-e", STALE_401], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # readiness: it prints its port once listening
        assert line.strip().isdigit(), f"the Node.js server did not start: {line!r}"
        yield proc, int(line)
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        proc.stdout.close()


def test_tunnel_port_held_by_a_stale_node_process(pki, tmp_path, stale_node_server) -> None:
    """A Node.js server answering 401 on tunnel.listen, no agent running: a tunnel error naming its pid, command, answer and the kill."""
    proc, port = stale_node_server
    path = node_config(pki, tmp_path, tunnel={"listen": f"127.0.0.1:{port}", "gateway": f"127.0.0.1:{free_port()}"})
    found = finding(diagnose_agent(path, clock=SystemClock(), settle=DEADLINE / 10), "tunnel")
    assert found.severity.label == "error", found.line()
    assert found.subject == f"127.0.0.1:{port}"
    assert f"held by pid {proc.pid} (" in found.problem and "node -e" in found.problem, found.line()
    assert "not by pki-agent, which is not running" in found.problem, found.line()
    assert "it answers 'HTTP/1.1 401 Unauthorized'" in found.problem, found.line()
    assert f"kill {proc.pid}" in found.fix and "systemctl enable --now pki-agent" in found.fix


def test_tunnel_port_with_no_agent_running(pki, tmp_path) -> None:
    """Nothing on tunnel.listen and no agent: a tunnel error saying pki-agent is not running and how to start it."""
    path = node_config(pki, tmp_path, tunnel={"listen": f"127.0.0.1:{free_port()}", "gateway": f"127.0.0.1:{free_port()}"})
    found = finding(diagnose_agent(path, clock=SystemClock()), "tunnel")
    assert found.severity.label == "error" and "nothing listens" in found.problem and "pki-agent is not running" in found.problem
    assert "systemctl enable --now pki-agent" in found.fix and f"pki-agent run --config {path}" in found.fix


def test_tunnel_port_held_by_the_running_agent(pki, tmp_path, gateway_agent) -> None:
    """Negative control: the real node agent (a subprocess) holds tunnel.listen: the tunnel finding is ok with its pid, and
    the whole node reports nothing to fix."""
    port = free_port()
    path = node_config(pki, tmp_path, tunnel={"listen": f"127.0.0.1:{port}", "gateway": f"127.0.0.1:{gateway_agent.port}"})
    agent = AgentProcess(path)
    try:
        agent.log.wait_for(rf"ready: node TW, no listener, tunnel 127\.0\.0\.1:{port} ")
        findings = diagnose_agent(path, clock=SystemClock())
        assert problems(findings) == [], "\n".join(f.line() for f in findings)
        assert finding(findings, "tunnel").problem == f"held by pki-agent (pid {agent.proc.pid}), forwarding to 127.0.0.1:{gateway_agent.port}"
    finally:
        assert agent.stop() == 0


def test_swapped_ca_pem_is_the_first_finding(pki, tmp_path, gateway_agent) -> None:
    """ca.pem replaced by another CA's root: the pin mismatch is the first finding, calling it possible tampering; no issuer
    error, and the gateway finding points at it instead of suggesting fullchain.pem. Negative control: the real ca.pem."""
    path = node_config(pki, tmp_path)
    assert problems(diagnose_agent(path, clock=SystemClock(), gateway=f"127.0.0.1:{gateway_agent.port}")) == []
    replace_file(pki.node / "ca.pem", trustme.CA().cert_pem.bytes())
    findings = diagnose_agent(path, clock=SystemClock(), gateway=f"127.0.0.1:{gateway_agent.port}")
    first = findings[0]
    assert (first.check, first.severity.label) == ("trust-anchor", "error"), "\n".join(f.line() for f in findings)
    assert "not the pinned root" in first.problem and "tampering" in first.problem
    assert "restore ca.pem from the CA host" in first.fix and "out of band" in first.fix
    assert problems(findings) == [("trust-anchor", "error"), ("gateway", "error")], "\n".join(f.line() for f in findings)
    gateway = finding(findings, "gateway")
    assert "ca.pem is not the pinned root (the trust-anchor finding)" in gateway.problem
    assert all("fullchain" not in f.fix and "get a new certificate" not in f.fix for f in findings if f.check != "trust-anchor")


@pytest.fixture
def est(pki):
    service = RunningService(pki.home).start()
    yield service
    service.stop()


def test_gateway_refused_the_certificate(pki, tmp_path, start_gateway_agent) -> None:
    """The gateway's CRL lists TW but this node's does not (a copy of the CA home from before): the gateway refuses the
    certificate with the certificate_revoked alert, and the finding says so, not "allow list"."""
    before = tmp_path / "ca-before"
    shutil.copytree(pki.home, before)
    running = start_gateway_agent()
    pki.ca.revoke("TW")
    assert running.call(running.agent.reload)
    path = node_config(pki, tmp_path, renewal={"ca_home": str(before)})
    findings = diagnose_agent(path, clock=SystemClock(), gateway=f"127.0.0.1:{running.port}")
    assert problems(findings) == [("gateway", "error")], "\n".join(f.line() for f in findings)
    found = finding(findings, "gateway")
    assert "refused this node's certificate during the handshake (SSLV3_ALERT_CERTIFICATE_REVOKED)" in found.problem
    assert "listener.allow" not in found.problem + found.fix


@pytest.mark.parametrize("situation", ["not allowed", "upstream down"])
def test_gateway_closed_after_the_handshake(pki, tmp_path, start_gateway_agent, caplog, situation) -> None:
    """TW not in listener.allow, or the gateway's upstream down: the handshake completes and the gateway closes without an
    alert; the finding names both causes honestly (not "refused the certificate") and where the gateway's log tells them
    apart, and that log does."""
    if situation == "not allowed":
        running = start_gateway_agent(allow=["someone-else"])
    else:
        running = start_gateway_agent(upstream=f"127.0.0.1:{free_port()}")
    findings = diagnose_agent(node_config(pki, tmp_path), clock=SystemClock(), gateway=f"127.0.0.1:{running.port}")
    assert problems(findings) == [("gateway", "error")], "\n".join(f.line() for f in findings)
    found = finding(findings, "gateway")
    assert "accepted the TLS handshake and then closed without an alert" in found.problem, found.line()
    assert "either TW is not in its listener.allow or its upstream is down" in found.problem
    assert "refused this node's certificate" not in found.problem
    assert "journalctl -u pki-agent" in found.fix
    said = "not allowed" if situation == "not allowed" else "upstream unreachable"
    wait_record(caplog, lambda r: said in r.getMessage() and r.levelno >= logging.WARNING, f"the gateway's {said!r} record")


def test_gateway_accepts_the_healthy_node(pki, tmp_path, gateway_agent) -> None:
    """Control of the refusal tests: the same node, allowed, with the upstream up, is accepted."""
    findings = diagnose_agent(node_config(pki, tmp_path), clock=SystemClock(), gateway=f"127.0.0.1:{gateway_agent.port}")
    assert problems(findings) == []
    assert finding(findings, "gateway").problem.startswith("accepted CN=TW")


def test_not_yet_valid_blames_the_ca_clock_when_this_host_agrees_with_the_est_server(pki, tmp_path, est) -> None:
    """A certificate signed by a CA whose clock ran an hour ahead, judged by a host whose clock agrees with the EST server's
    Date (both the wall clock): the validity finding blames the CA host's clock, not this host's."""
    now = dt.datetime.now(dt.timezone.utc)
    ahead = CertificateAuthority.load(pki.home, clock=FixedClock(now + dt.timedelta(hours=1)))
    try:
        bundle = ahead.enroll("node", "TF", out=tmp_path / "TF").directory
    finally:
        ahead.close()
    path = node_config(pki, tmp_path, name="TF", credential_dir=str(bundle), renewal={"ca_url": est.url})
    found = finding(diagnose_agent(path, clock=SystemClock()), "validity")
    assert found.severity.label == "error" and "is not valid before" in found.problem
    assert "agrees with the EST server's" in found.problem and "the CA's clock was ahead when it signed" in found.problem
    assert "this host's clock is behind" not in found.problem
    assert found.fix.startswith("fix the CA host's clock")


def test_not_yet_valid_blames_this_host_when_it_is_behind_the_est_server(pki, tmp_path, est) -> None:
    """Twin: TW's certificate signed at the right time, judged by a doctor whose clock is 2 hours behind the EST server's
    Date: the validity finding blames this host's clock, by how far it is behind."""
    path = node_config(pki, tmp_path, renewal={"ca_url": est.url})
    behind = FixedClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
    found = finding(diagnose_agent(path, clock=behind), "validity")
    assert found.severity.label == "error" and "this host's clock is behind" in found.problem
    assert "s behind the EST server's" in found.problem and "CA's clock" not in found.problem
    assert found.fix.startswith("fix this host's clock")
