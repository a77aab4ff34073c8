"""pki-agent as a real process for an operator: renew-now with and without a running agent, status
and its exit codes, one agent per credential, renewal after the process was paused past its due
time, and crash-safe rotation under kill -9 at random moments."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import select
import signal
import subprocess
import time
from pathlib import Path

import yaml
from cryptography.x509 import verification

from pkictl.authority import CertificateAuthority
from pkictl.settings import CASettings
from pkictl.store import CredentialStore

from support import DEADLINE, AgentProcess, command

ROOT = Path(__file__).resolve().parent.parent


def _node(tmp_path: Path, settings: CASettings | None = None, check_interval: str = "1h") -> tuple[Path, Path]:
    """A CA and node TW's bundle whose agent renews with the CA home; returns (config, bundle)."""
    ca = CertificateAuthority.init(tmp_path / "ca", settings or CASettings())
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    config = bundle / "agent.yaml"
    config.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "credential_dir": ".",
                                      "renewal": {"ca_home": str(tmp_path / "ca"), "check_interval": check_interval}}))
    return config, bundle


def agent_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([command("pki-agent"), *args], capture_output=True, text=True, timeout=DEADLINE + 10)


def _serial(bundle: Path) -> str:
    return f"{CredentialStore(bundle).load().certificate.serial_number:x}"


def test_renew_now_asks_the_running_agent_and_status_reports_it(tmp_path):
    """With the agent running, renew-now has it renew (the new serial in service and on disk),
    status shows the agent, the serial and the renew-now attempt with exit 0; once the agent is
    stopped, status says no agent runs and exits 3."""
    config, bundle = _node(tmp_path)
    before = _serial(bundle)
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        result = agent_cli("renew-now", "--config", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        after = _serial(bundle)
        assert after != before
        assert f"renewed by the running agent (pid {agent.proc.pid}): serial {after}" in result.stdout
        agent.log.wait_for(rf"renewed TW: serial {before} -> {after}")

        status = agent_cli("status", "--config", str(config))
        assert status.returncode == 0, status.stdout
        assert f"running (pid {agent.proc.pid})" in status.stdout
        assert f"serial {after}" in status.stdout and "(renew-now): renewed" in status.stdout
        report = json.loads(agent_cli("status", "--config", str(config), "--json").stdout)
        assert report["agent"] == {"running": True, "pid": agent.proc.pid} and report["credential"]["serial"] == after
    finally:
        assert agent.stop() == 0
    stopped = agent_cli("status", "--config", str(config))
    assert stopped.returncode == 3 and "no pki-agent runs" in stopped.stdout, stopped.stdout


def test_renew_now_without_an_agent_renews_here_and_a_failure_exits_1(tmp_path):
    """Without an agent, renew-now renews by itself (exit 0); with the CA gone it exits 1, says why,
    leaves the certificate in place, and status shows the failed attempt with exit 3."""
    config, bundle = _node(tmp_path)
    before = _serial(bundle)
    result = agent_cli("renew-now", "--config", str(config))
    assert result.returncode == 0 and "renewed by this command (no agent runs for this credential)" in result.stdout, result.stdout + result.stderr
    assert "by renewed" not in result.stdout
    renewed = _serial(bundle)
    assert renewed != before

    (tmp_path / "ca" / "ca.yaml").rename(tmp_path / "ca" / "ca.yaml.away")
    failed = agent_cli("renew-now", "--config", str(config))
    assert failed.returncode == 1 and "failed" in failed.stdout and str(tmp_path / "ca") in failed.stdout, failed.stdout
    assert _serial(bundle) == renewed
    status = agent_cli("status", "--config", str(config))
    assert status.returncode == 3 and "FAILED" in status.stdout, status.stdout


def test_a_second_agent_for_the_same_credential_is_refused(tmp_path):
    """While one agent runs, a second one on the same credential directory exits 1 naming the first."""
    config, _ = _node(tmp_path)
    first = AgentProcess(config)
    try:
        first.wait_ready()
        second = agent_cli("run", "--config", str(config))
        assert second.returncode == 1
        assert f"another pki-agent (pid {first.proc.pid}) already runs" in second.stderr, second.stderr
    finally:
        first.stop()


def test_an_agent_paused_past_its_due_time_renews_when_it_resumes(tmp_path):
    """SIGSTOP the agent before its certificate is due and SIGCONT it after: it renews at once
    (no misfire skipped the job), instead of waiting for a check that may never come."""
    settings = CASettings(node_lifetime=dt.timedelta(seconds=9), gateway_lifetime=dt.timedelta(seconds=9))
    config, bundle = _node(tmp_path, settings, check_interval="1h")  # no periodic check to help
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        due = agent.log.wait_for(r"renewal due (\S+)").group(1)
        due_at = dt.datetime.fromisoformat(due).timestamp()
        os.kill(agent.proc.pid, signal.SIGSTOP)
        # The pause is the point of this test: the agent must sleep through its due time.
        while time.time() < due_at + 1.5:
            assert time.time() < due_at + DEADLINE
            time.sleep(0.1)
        mark = agent.log.mark()
        os.kill(agent.proc.pid, signal.SIGCONT)
        agent.log.wait_for(r"renewed TW: serial", start=mark, timeout=10)
    finally:
        agent.stop()


# -- crash safety ---------------------------------------------------------------------------------

def _rotate_forever(bundle: Path, home: Path, progress: int) -> None:
    """The agent's rotate() and CredentialStore.install in a loop, in a forked child, with the CA
    kept loaded so that a rotation takes milliseconds; one byte on ``progress`` when it starts
    and after each rotation."""
    from pki_agent.rotation.rotate import rotate
    from pkictl.clock import SystemClock

    clock = SystemClock()
    store, ca = CredentialStore(bundle, keep=3), CertificateAuthority.load(home, clock=clock)

    class HeldCA:
        def simple_reenroll(self, csr, current):
            return ca.simple_reenroll(csr, current.certificate), ca.chain

    os.write(progress, b"r")
    while True:
        rotate(store, store.load(), HeldCA(), clock)
        os.write(progress, b".")


def _read_byte(fd: int) -> float:
    """Wait (bounded) for one byte from the rotating child; return when it came (monotonic s)."""
    readable, _, _ = select.select([fd], [], [], DEADLINE)
    assert readable and os.read(fd, 1), "the rotating child stopped or stalled"
    return time.monotonic()


def _interrupted_install(bundle: Path) -> bool:
    """Whether a kill left an install half done: a version newer than ``live``, or a temp link."""
    store = CredentialStore(bundle)
    live = int(os.readlink(store.live).split("/")[1])
    return max(store.versions()) > live or any(bundle.glob(".live.*.tmp"))


def _check_live(bundle: Path, anchors) -> int:
    """``live`` holds a complete version whose key matches its certificate and whose chain
    verifies to the trust anchor; returns its serial."""
    store = CredentialStore(bundle)
    credential = store.load()  # raises on a missing file or a key that does not match
    now = credential.certificate.not_valid_before_utc + (credential.certificate.not_valid_after_utc - credential.certificate.not_valid_before_utc) / 2
    verifier = verification.PolicyBuilder().store(verification.Store(anchors)).time(now).build_client_verifier()
    verifier.verify(credential.certificate, list(credential.chain))
    return credential.certificate.serial_number


def test_kill_9_at_random_moments_never_leaves_a_broken_live_credential(tmp_path):
    """A process rotating TW's credential in a loop (the agent's rotate and install) is SIGKILLed
    at 300 random moments; after every kill ``live`` holds a matching key and certificate that
    verify to the trust anchor, and rotation goes on from there; old versions are pruned."""
    _, bundle = _node(tmp_path)
    anchors = CredentialStore(bundle).load_trust_anchors()
    rng = random.Random(20261201)
    serials = {_check_live(bundle, anchors)}
    kills, interrupted = 300, 0
    for _ in range(kills):
        progress_r, progress_w = os.pipe()
        pid = os.fork()  # ~ms, where a new interpreter would take ~0.2 s per kill
        if pid == 0:
            try:
                _rotate_forever(bundle, tmp_path / "ca", progress_w)
            finally:
                os._exit(1)
        os.close(progress_w)
        # Kill at a uniformly random moment of a rotation, whatever a rotation takes on this
        # machine now: after 0 to 2 whole rotations, a random share of the last one's duration.
        marks = [_read_byte(progress_r)] + [_read_byte(progress_r) for _ in range(rng.randint(1, 3))]
        time.sleep(rng.uniform(0, marks[-1] - marks[-2]))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(progress_r)
        interrupted += _interrupted_install(bundle)
        serials.add(_check_live(bundle, anchors))
    # The kills must have hit the dangerous window, not only the CA's work before it.
    assert interrupted >= 5, f"only {interrupted} of {kills} kills interrupted an install"
    assert len(serials) > kills, f"only {len(serials)} distinct serials: rotation did not go on between kills"
    assert len(CredentialStore(bundle).versions()) <= 3 + 1  # keep=3, plus at most one half-written version


def test_the_floor_between_renewals_holds_across_a_restart(tmp_path):
    """With certificates that are due as soon as they are issued, the agent renews at start;
    killed (kill -9) and started again, it schedules its next renewal min_interval after that
    renewal (the time kept in its state file) instead of renewing at once; with the state file
    gone, a start renews at once (the negative control)."""
    settings = CASettings(node_lifetime=dt.timedelta(seconds=100), gateway_lifetime=dt.timedelta(seconds=100))
    config, bundle = _node(tmp_path, settings, check_interval="1s")
    data = yaml.safe_load(config.read_text())
    data["renewal"].update({"fraction": 0.01, "jitter": 0, "min_interval": "8s"})  # due 10 s before it is even issued
    config.write_text(yaml.safe_dump(data))

    agent = AgentProcess(config)
    agent.log.wait_for(r"renewed TW: serial")
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(DEADLINE)
    last = dt.datetime.fromisoformat(json.loads((bundle / ".pki-agent.state.json").read_text())["last_renewal"])

    again = AgentProcess(config)
    try:
        due = dt.datetime.fromisoformat(again.log.wait_for(r"credential TW serial [0-9a-f]+, not after \S+, renewal due (\S+)").group(1))
        assert due >= last + dt.timedelta(seconds=8), (due, last)
        again.wait_ready()
    finally:
        assert again.stop() == 0

    (bundle / ".pki-agent.state.json").unlink()
    fresh = AgentProcess(config)
    try:
        due = dt.datetime.fromisoformat(fresh.log.wait_for(r"credential TW serial [0-9a-f]+, not after \S+, renewal due (\S+)").group(1))
        assert due <= dt.datetime.now(dt.timezone.utc), due
        fresh.log.wait_for(r"renewed TW: serial")
    finally:
        assert fresh.stop() == 0
