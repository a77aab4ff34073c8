"""The installed `pkictl doctor` and `pki-agent doctor` as subprocesses: output lines, JSON and exit status, against a real gateway process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from support import DEADLINE, AgentProcess, EchoServer, command


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([command(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=DEADLINE)


def test_pkictl_doctor_healthy_then_a_key_readable_by_others(tmp_path: Path) -> None:
    """pkictl doctor exits 0 on a new CA, then 4 with one ca-keys line once issuing/key.pem is 0644; --json says the same."""
    home = tmp_path / "ca"
    assert run("pkictl", "--home", str(home), "init-ca").returncode == 0
    healthy = run("pkictl", "--home", str(home), "doctor")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.strip().endswith("0 errors, 0 warnings, nothing to fix")
    (home / "issuing" / "key.pem").chmod(0o644)
    broken = run("pkictl", "--home", str(home), "doctor")
    lines = broken.stdout.strip().splitlines()
    assert broken.returncode == 4 and len(lines) == 2, broken.stdout
    assert lines[0].startswith("error   ca-keys") and f"chmod 600 {home / 'issuing' / 'key.pem'}" in lines[0]
    report = json.loads(run("pkictl", "--home", str(home), "doctor", "--json").stdout)
    assert report["exit_status"] == 4 and [f["check"] for f in report["findings"] if f["severity"] == "error"] == ["ca-keys"]


def test_pki_agent_doctor_on_a_bundle_and_against_a_running_gateway(tmp_path: Path) -> None:
    """pki-agent doctor on TW's bundle exits 0 with --gateway at a running gateway agent, 4 when the name dialed is not on the
    gateway's certificate, and 4 with a key-match line once the key is swapped."""
    home = tmp_path / "ca"
    assert run("pkictl", "--home", str(home), "init-ca").returncode == 0
    assert run("pkictl", "--home", str(home), "enroll-node", "TW", "--out", str(tmp_path / "TW")).returncode == 0
    with EchoServer() as echo:
        enrolled = run("pkictl", "--home", str(home), "enroll-gateway", "gw", "--ip", "127.0.0.1", "--listen", "127.0.0.1:0",
                       "--upstream", f"127.0.0.1:{echo.port}", "--out", str(tmp_path / "gw"))
        assert enrolled.returncode == 0, enrolled.stderr
        gateway = AgentProcess(tmp_path / "gw" / "agent.yaml")
        try:
            _, port = gateway.wait_ready()
            config = str(tmp_path / "TW" / "agent.yaml")
            healthy = run("pki-agent", "doctor", "--config", config, "--gateway", f"127.0.0.1:{port}", "--all")
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr
            assert any(line.startswith("ok      gateway") and "accepted CN=TW" in line for line in healthy.stdout.splitlines())
            misnamed = run("pki-agent", "doctor", "--config", config, "--gateway", f"127.0.0.1:{port}", "--server-name", "gw.example.lan")
            assert misnamed.returncode == 4 and "lacks the name this node dials" in misnamed.stdout, misnamed.stdout
        finally:
            assert gateway.stop() == 0
    version = tmp_path / "TW" / os.readlink(tmp_path / "TW" / "live")
    other = tmp_path / "other"
    assert run("pkictl", "--home", str(home), "enroll-node", "other", "--out", str(other)).returncode == 0
    (version / "privkey.pem").write_bytes((other / "privkey.pem").read_bytes())
    swapped = run("pki-agent", "doctor", "--config", config)
    assert swapped.returncode == 4
    assert [line.split()[1] for line in swapped.stdout.splitlines() if line.startswith("error")] == ["key-match"]
