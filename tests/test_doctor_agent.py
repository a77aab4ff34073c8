"""pki-agent doctor on a node: the configuration, the files it names, and the EST server (reachable, our CA, its clock, its CRL)."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from pki_agent.doctor.checks import diagnose_agent, gateway_target
from pki_agent.config import load_config
from pki_agent.doctor.probe import probe_est
from pkictl.clock import FixedClock, SystemClock
from pkictl.diagnosis.credential_facts import fingerprint

from doctor_support import only, problems, snapshot, write_config
from est_support import RunningService
from support import free_port

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def node_config(pki, tmp_path, **changes) -> dict:
    data = {"name": "TW", "kind": "node", "trust_anchor_sha256": f"sha256:{fingerprint(pki.ca.root)}",
            "credential_dir": str(pki.node), "renewal": {"ca_home": str(pki.home)}}
    data.update(changes)
    return data


def doctor(path, *, now=None, **kwargs):
    return diagnose_agent(path, clock=FixedClock(now or NOW), **kwargs)


@pytest.fixture
def est(pki):
    with_service = RunningService(pki.home).start()
    yield with_service
    with_service.stop()


def test_healthy_node_reports_nothing_and_changes_nothing(pki, tmp_path) -> None:
    """Node TW renewing with the CA home passes every check, and neither its bundle nor the CA changed."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path))
    before = snapshot(tmp_path)
    findings = doctor(path)
    assert problems(findings) == []
    assert {f.check for f in findings} >= {"config-files", "live-link", "key-match", "chain", "issuer", "trust-anchor", "revocation",
                                          "crl", "est-server", "clock-skew", "gateway", "service-files"}
    assert snapshot(tmp_path) == before


def test_config_that_does_not_load(pki, tmp_path) -> None:
    """An unknown key is one config error naming the field; nothing else is checked."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewl={"ca_home": "x"}))
    findings = doctor(path)
    found = only(findings, "config")
    assert "renewl" in found.problem and str(path) in found.fix
    assert {f.check for f in findings} == {"config", "service-files"}


def test_missing_credential_dir_is_one_finding(pki, tmp_path) -> None:
    """credential_dir pointing nowhere is exactly one config-files error; the credential checks do not repeat it."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, credential_dir=str(tmp_path / "nowhere")))
    found = only(doctor(path), "config-files")
    assert "credential_dir does not exist" in found.problem and "correct credential_dir" in found.fix


def test_missing_ca_home_and_passphrase_file(pki, tmp_path) -> None:
    """A renewal.ca_home without a CA and a passphrase file that is missing, then 0644, are config-files errors."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_home": str(tmp_path / "no-ca")}))
    assert "CA home (renewal.ca_home) does not exist" in only(doctor(path), "config-files").problem
    secret_file = tmp_path / "pass"
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_home": str(pki.home),
                                                                                    "ca_passphrase_file": str(secret_file)}))
    assert "passphrase file" in only(doctor(path), "config-files").problem
    secret_file.write_text("correct horse battery staple\n")
    secret_file.chmod(0o644)
    assert only(doctor(path), "config-files").fix == f"chmod 600 {secret_file}"


def test_hooks_that_cannot_run(pki, tmp_path) -> None:
    """A hook program not on its PATH is an error; a SIGHUP PID file that is missing, or names no running process, a warning."""
    pid_file = tmp_path / "nginx.pid"
    hooks = [{"run": ["no-such-reloader", "now"]}, {"sighup_pid_file": str(pid_file)}]
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, hooks=hooks))
    assert problems(doctor(path)) == [("config-files", "error"), ("config-files", "warning")]
    pid_file.write_text("999999999\n")
    assert "is not running" in [f.problem for f in doctor(path) if f.severity.label == "warning"][0]
    pid_file.write_text(f"{os.getpid()}\n")  # a running process: this test's
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, hooks=[{"run": ["true"]}, {"sighup_pid_file": str(pid_file)}]))
    assert problems(doctor(path)) == []


def test_pinned_trust_anchor_mismatch(pki, tmp_path) -> None:
    """trust_anchor_sha256 of another root (ca.pem untouched) is exactly one trust-anchor error naming the pinned value."""
    other = "ab" * 32
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, trust_anchor_sha256=other))
    found = only(doctor(path), "trust-anchor")
    assert found.expected == f"sha256:{other}" and f"set trust_anchor_sha256 in {path}" in found.fix


def test_revoked_node_by_the_ca_homes_crl(pki, tmp_path) -> None:
    """After pkictl revoke TW, the CA home's crl.pem makes exactly one revocation error."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path))
    pki.ca.revoke("TW")
    assert "was revoked" in only(doctor(path), "revocation").problem


def test_node_over_est_healthy_with_clock_and_crl_from_the_server(pki, tmp_path, est) -> None:
    """A node renewing over EST: the server answers as our CA, the clocks agree (real clocks), its CRL is consulted: nothing to report."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": est.url}))
    findings = diagnose_agent(path, clock=SystemClock())
    assert problems(findings) == []
    [skew] = [f for f in findings if f.check == "clock-skew"]
    assert "s against the EST server" in skew.problem
    [revocation] = [f for f in findings if f.check == "revocation"]
    assert revocation.problem == "passed"


def test_clock_ahead_of_the_est_server(pki, tmp_path, est) -> None:
    """This host's clock 10 minutes ahead of the EST server's Date is exactly one clock-skew error; 2 minutes a warning."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": est.url}))
    found = only(diagnose_agent(path, clock=FixedClock(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10))), "clock-skew")
    assert found.severity.label == "error" and "ahead of the EST server" in found.problem
    found = only(diagnose_agent(path, clock=FixedClock(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=2))), "clock-skew")
    assert found.severity.label == "warning"


@pytest.mark.parametrize(("seconds", "severity"), [
    (59, "ok"), (60, "ok"), (61, "warning"),  # SKEW_WARNING: 60 s, the clock agreement certificates allow
    (299, "warning"), (300, "warning"), (301, "error"),  # SKEW_ERROR: 5 min, the backdating of certificates and CRLs
])
@pytest.mark.parametrize("side", ["behind", "ahead of"])
def test_clock_skew_thresholds_one_second_either_side(pki, tmp_path, seconds, severity, side) -> None:
    """The clock-skew check's verdict on a measured skew (server clock minus ours, as probe_est
    measures it) one second either side of its two thresholds, both ways: at most 60 s is ok, up
    to 5 minutes a warning, beyond an error, and the finding says which side this host is on.

    Mutations: ``abs(probe.skew) < SKEW_WARNING`` (60 s a warning) and ``abs(probe.skew) >=
    SKEW_ERROR`` (300 s an error) each fail one case."""
    from pki_agent.doctor.checks import AgentFacts, check_clock_skew
    from pki_agent.doctor.probe import ESTProbe

    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": "https://127.0.0.1:9"}))
    facts = AgentFacts(path, load_config(path), FixedClock(NOW), offline=True)
    skew = dt.timedelta(seconds=seconds if side == "behind" else -seconds)
    facts.__dict__["est"] = ESTProbe(skew=skew)  # the measured exchange (functools.cached_property's slot)
    [found] = check_clock_skew(facts)
    assert found.severity.label == severity, found
    if severity == "ok":
        assert found.problem == f"{skew.total_seconds():+.0f} s against the EST server"
    else:
        assert found.problem.startswith(f"{seconds} s {side} the EST server's (https://127.0.0.1:9)"), found


def test_revoked_node_by_the_crl_fetched_from_est(pki, tmp_path, est) -> None:
    """With no CRL on disk, the CRL fetched from the EST server shows the revocation: exactly one revocation error."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": est.url}))
    pki.ca.revoke("TW")
    found = only(diagnose_agent(path, clock=SystemClock()), "revocation")
    assert f"CRL from {est.url}/crl.pem" in found.problem


def test_est_server_that_does_not_name_the_host_dialed(pki, tmp_path, est) -> None:
    """renewal.ca_url by a name the service certificate lacks (localhost; it names 127.0.0.1) is one est-server error."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": f"https://localhost:{est.port}"}))
    found = only(diagnose_agent(path, clock=SystemClock()), "est-server")
    assert found.severity.label == "error" and "does not prove it is our CA" in found.problem


def test_unreachable_est_server_is_a_warning(pki, tmp_path) -> None:
    """renewal.ca_url on a closed port is one est-server warning (the credential still works); --offline skips it."""
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path, renewal={"ca_url": f"https://127.0.0.1:{free_port()}"}))
    assert only(doctor(path), "est-server").severity.label == "warning"
    assert problems(doctor(path, offline=True)) == []


def test_gateway_address_from_option_or_tunnel(pki, tmp_path) -> None:
    """--gateway wins, --server-name overrides the host; without either there is no test connection."""
    config = load_config(write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path)))
    assert gateway_target(config) is None
    assert gateway_target(config, "127.0.0.1:8443") == (("127.0.0.1", 8443), "127.0.0.1")
    assert gateway_target(config, "[::1]:8443", "gw.example.lan") == (("::1", 8443), "gw.example.lan")
    with pytest.raises(ValueError):
        gateway_target(config, "no-port")


def test_plist_holding_a_secret(pki, tmp_path) -> None:
    """A binary plist carrying a password and a random key in EnvironmentVariables: service-files errors that do not repeat the key."""
    import plistlib

    secret = "q3Zx9Lm0PpR7sT2uVwXyZa4bC5dE6fGh"
    plist = tmp_path / "net.pkictl.agent.plist"
    plist.write_bytes(plistlib.dumps({"Label": "net.pkictl.agent", "EnvironmentVariables": {"GATEWAY_PASSWORD": "x", "KEY": secret}},
                                     fmt=plistlib.FMT_BINARY))
    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path))
    found = [f for f in doctor(path, service_files=[plist]) if f.severity.label == "error"]
    assert [f.check for f in found] == ["service-files", "service-files"]
    assert "password" in found[0].problem and "base64 string" in found[1].problem
    assert all(secret not in f.line() for f in found)


def test_agent_state_stopped_agent_failed_attempt_and_failed_hook(pki, tmp_path):
    """With an agent holding the credential and its last attempt fine, the agent check is clean;
    once it stopped, after a failed renewal and a failed hook, each is one warning."""
    import asyncio
    import sys

    from pki_agent.config import AgentConfig, Hook, RenewalConfig
    from pki_agent.daemon import Agent
    from pki_agent.pidfile import PidFile

    path = write_config(tmp_path / "agent.yaml", node_config(pki, tmp_path))
    clock = FixedClock(NOW)
    agent = Agent(AgentConfig(name="TW", kind="node", credential_dir=pki.node, renewal=RenewalConfig(ca_home=pki.home, jitter=0),
                              hooks=[Hook(run=[sys.executable, "-c", "raise SystemExit(4)"], attempts=1)]), clock=clock)
    lock = PidFile(pki.node)
    lock.acquire()  # what pki-agent run holds while it runs
    try:
        agent.reload()
        assert [f for f in doctor(path) if f.check == "agent"][0].problem.startswith(f"pki-agent runs (pid {os.getpid()})")

        async def renew_and_hooks():
            await agent.renew(forced=True)
            await agent.wait_for_hooks()

        asyncio.run(renew_and_hooks())  # renewed, but its hook failed
        hook = only(doctor(path), "agent")
        assert "failed after the last rotation: exit status 4" in hook.problem
        (pki.home / "ca.yaml").rename(pki.home / "ca.yaml.away")
        asyncio.run(agent.renew(forced=True))
    finally:
        lock.release()
    agent_findings = [f for f in doctor(path) if f.check == "agent"]
    problems_found = " | ".join(f.problem for f in agent_findings)
    assert len(agent_findings) == 3, problems_found
    assert "no pki-agent runs" in problems_found and "last renewal attempt" in problems_found and "exit status 4" in problems_found


def test_est_probe_of_a_url_without_a_host_says_so(tmp_path) -> None:
    """ca_url https://:8443 (its pattern lets it through) makes an EST probe that reports the missing host, not a TypeError."""
    probe = probe_est("https://:8443", tmp_path / "ca.pem", SystemClock(), timeout=1.0)
    assert probe.error == "'https://:8443' names no host: want https://HOST[:PORT]"
