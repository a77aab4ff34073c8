"""'pki-agent doctor' on the gateway tests its listener without adding refusals to the gateway's
log: its test connection presents the gateway's own certificate (only the holder of the
gateway's key can) and is logged at INFO as a 'doctor probe'; real refused clients, and a client
with another certificate of this CA that is not the one served, are still WARNING refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pkictl.diagnosis.credential_facts import fingerprint

from support import DEADLINE, AgentProcess, bundle_context, client_context, command, refused


def _config(pki, path: Path, port: int, upstream: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": str(pki.gateway), "trust_anchor_sha256": fingerprint(pki.ca.root),
        "renewal": {"ca_home": str(pki.home), "check_interval": "1h"},
        "listener": {"listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream}", "crl": str(pki.ca.crl_path),
                     "allow": ["*"]},
    }))
    return path


def _doctor(config: Path) -> list[dict]:
    done = subprocess.run([command("pki-agent"), "doctor", "--config", str(config), "--json"],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)["findings"]


def _refusals(agent: AgentProcess) -> list[str]:
    return [line for line in agent.log.lines if " WARNING " in line and "refused peer=" in line]


def test_doctor_run_leaves_no_refusal_in_the_gateways_log(pki, echo_server, tmp_path):
    """A doctor run against the running gateway (a real process) finds its listener serving the
    live certificate and leaves one INFO 'doctor probe' line and no WARNING refusal; a client
    without a certificate right after is still a WARNING refusal."""
    agent = AgentProcess(_config(pki, tmp_path / "run.yaml", 0, echo_server.port))
    try:
        _, port = agent.wait_ready()
        findings = _doctor(_config(pki, tmp_path / "doctor.yaml", port, echo_server.port))
        listener = [f for f in findings if f["check"] == "listener"]
        assert listener and all(f["severity"] == "ok" for f in listener), listener
        agent.log.wait_for(r" INFO pki_agent\.listener: probe peer=127\.0\.0\.1:\d+ reason='doctor probe' serial=\w+")
        assert _refusals(agent) == [], agent.log.text()

        refused(port, client_context(pki.node / "ca.pem"))
        agent.log.wait_for(r" WARNING pki_agent\.listener: refused peer=127\.0\.0\.1:\d+ reason='no client certificate'")
    finally:
        agent.stop()


def test_another_certificate_of_this_ca_is_not_taken_for_a_probe(pki, echo_server, tmp_path):
    """The spoofing twin: a client presenting another gateway certificate of this CA (valid, with
    its own key, but not the one the listener serves) is refused and logged at WARNING, never
    as a doctor probe."""
    impostor = pki.ca.enroll("gateway", "gw2", out=tmp_path / "gw2", ip_addresses=["127.0.0.1"]).directory
    agent = AgentProcess(_config(pki, tmp_path / "run.yaml", 0, echo_server.port))
    try:
        _, port = agent.wait_ready()
        refused(port, bundle_context(impostor))
        agent.log.wait_for(r" WARNING pki_agent\.listener: refused peer=127\.0\.0\.1:\d+ reason='no node identity' node=gw2")
        assert "doctor probe" not in agent.log.text()
    finally:
        agent.stop()
