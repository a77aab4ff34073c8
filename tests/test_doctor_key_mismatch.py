"""A private key that is not the certificate's is an operator's mix-up, and both doctors say so
with the files and the fix; no check fails on it (no "report this as a bug" finding)."""

from __future__ import annotations

import datetime as dt
import subprocess

from pkictl.clock import FixedClock
from pkictl.diagnosis.credential_facts import fingerprint
from pkictl.diagnosis.findings import EXIT_ERROR
from pkictl.pem import private_key_to_pem
from pkictl.profile import generate_key

from pki_agent.doctor.checks import diagnose_agent

from doctor_support import live_version, problems, replace_file, write_config
from support import DEADLINE, command

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def _node_config(pki, tmp_path):
    return write_config(tmp_path / "node.yaml", {"name": "TW", "kind": "node", "trust_anchor_sha256": fingerprint(pki.ca.root),
                                                 "credential_dir": str(pki.node), "renewal": {"ca_home": str(pki.home)}})


def test_node_with_a_swapped_key_tested_against_the_gateway(pki, tmp_path, gateway_agent) -> None:
    """A node whose privkey.pem is another key, tested against the running gateway, gets one
    key-match error naming the version and the fix, and a gateway finding that it was not
    tested, not a failed check; the same node with its own key is accepted (the twin)."""
    config = _node_config(pki, tmp_path)
    gateway = f"127.0.0.1:{gateway_agent.port}"
    [accepted] = [f for f in diagnose_agent(config, clock=FixedClock(NOW), gateway=gateway) if f.check == "gateway"]
    assert accepted.problem.startswith("accepted CN=TW")

    version = live_version(pki.node)
    replace_file(version / "privkey.pem", private_key_to_pem(generate_key()), 0o600)
    findings = diagnose_agent(config, clock=FixedClock(NOW), gateway=gateway)
    assert problems(findings) == [("key-match", "error")], "\n".join(f.line() for f in findings)
    [found] = [f for f in findings if f.check == "key-match"]
    assert found.subject == str(version) and "privkey.pem is not the key of cert.pem" in found.problem
    assert "copy the whole bundle again" in found.fix
    assert not [f for f in findings if "bug" in f.line()]
    [gateway_finding] = [f for f in findings if f.check == "gateway"]
    assert "not checked: privkey.pem is not the key of cert.pem" in gateway_finding.problem


def test_pki_agent_doctor_command_on_a_swapped_key(pki, tmp_path) -> None:
    """The installed 'pki-agent doctor' prints the key-match error with the fix and exits with EXIT_ERROR, with no bug report line."""
    replace_file(live_version(pki.node) / "privkey.pem", private_key_to_pem(generate_key()), 0o600)
    done = subprocess.run([command("pki-agent"), "doctor", "--config", str(_node_config(pki, tmp_path)), "--offline"],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == EXIT_ERROR, done.stdout + done.stderr
    assert "privkey.pem is not the key of cert.pem" in done.stdout and "copy the whole bundle again" in done.stdout
    assert "report this as a bug" not in done.stdout
