"""A node whose certificate can no longer renew (revoked) re-pairs by itself: it says why, makes a
new key, files a pairing request, and installs the certificate the operator approves; the same
key and code survive a restart; a denial stops it until SIGHUP; without ``reenroll: approval`` it
only says what to do. Every part is a real process: pkictl serve, pki-agent, pkictl."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from pkictl.store import CredentialStore

from support import DEADLINE, AgentProcess, EchoServer, LogWatcher, command, live_files

CODE = r"([A-Z2-7]{4}-[A-Z2-7]{4})"


def pkictl(home: Path, *args: str) -> str:
    result = subprocess.run([command("pkictl"), "--home", str(home), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"pkictl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def edit(config: Path, **renewal) -> None:
    data = yaml.safe_load(config.read_text())
    data["renewal"].update(renewal)
    config.write_text(yaml.safe_dump(data))


@pytest.fixture
def ca(tmp_path):
    """A CA (hour-long certificates: no renewal comes due during a test) served by a real pkictl serve."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca", "--node-lifetime", "1h", "--gateway-lifetime", "1h")
    serve = subprocess.Popen([command("pkictl"), "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--check-interval", "1",
                              "--retry-after", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = LogWatcher(serve.stderr)
    try:
        url = "https://127.0.0.1:" + log.wait_for(r"ready: EST on https://127\.0\.0\.1:(\d+)").group(1)
        yield home, url
    finally:
        serve.terminate()
        serve.wait(DEADLINE)


def enroll_by_token(home: Path, url: str, name: str, directory: Path, *extra: str) -> Path:
    out = pkictl(home, "enroll-node", name, "--token")
    token = out.splitlines()[1].strip()
    fingerprint = re.search(r"root fingerprint: (sha256:[0-9a-f]{64})", out).group(1)
    enrolled = subprocess.run([command("pki-agent"), "enroll", "--ca-url", url, "--fingerprint", fingerprint, "--name", name,
                               "--token", token, "--dir", str(directory), *extra], capture_output=True, text=True, timeout=60)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    return directory / "agent.yaml"


def serial(bundle: Path) -> int:
    return CredentialStore(bundle).load().certificate.serial_number


def pending_codes(home: Path, name: str) -> list[str]:
    return re.findall(rf"^{name}\s+{CODE}\s", pkictl(home, "requests"), re.M)


def test_a_revoked_node_re_pairs_by_approval_and_keeps_its_code_across_a_restart(ca, tmp_path):
    """pki-agent enroll writes 'reenroll: approval'; after 'pkictl revoke N2' the agent says its
    certificate is revoked, files one pairing request (the code it logs is the one 'pkictl
    requests' lists), asks again with the same code after a restart, and installs the approved
    certificate: a new key, a new serial, the old one revoked, renewal scheduled again."""
    home, url = ca
    config = enroll_by_token(home, url, "N2", tmp_path / "N2")
    assert yaml.safe_load(config.read_text())["renewal"]["reenroll"] == "approval"
    edit(config, check_interval="1s", refresh_interval="1s")
    old_serial = serial(tmp_path / "N2")
    old_key = live_files(tmp_path / "N2")["privkey"].read_bytes()

    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        assert pending_codes(home, "N2") == []
        pkictl(home, "revoke", "N2", "--reason", "key-compromise")
        agent.log.wait_for(rf"ERROR .*the certificate of N2 \(serial {old_serial:x}\) can no longer renew: revoked "
                           r"\(serial [0-9a-f]+ is on the CRL of .* \(reason key_compromise\)\)")
        code = agent.log.wait_for(rf"pairing request of N2: a new key was made here; its code is {CODE}; on the CA host run "
                                  r"'pkictl requests', then 'pkictl approve N2 --code \1'").group(1)
        assert pending_codes(home, "N2") == [code]
        status = subprocess.run([command("pki-agent"), "status", "--config", str(config)], capture_output=True, text=True, timeout=30)
        assert status.returncode == 3 and f"pkictl approve N2 --code {code}" in status.stdout, status.stdout
        assert agent.stop() == 0

        agent = AgentProcess(config)  # restarted while it waits: same key, same code, still one request
        agent.wait_ready()
        assert agent.log.wait_for(rf"its code is {CODE}").group(1) == code
        assert pending_codes(home, "N2") == [code]

        pkictl(home, "approve", "N2", "--code", code)
        match = agent.log.wait_for(rf"re-enrolled N2: serial {old_serial:x} -> ([0-9a-f]+) \(approved at the CA\)")
        new_serial = int(match.group(1), 16)
        agent.log.wait_for(rf"credential N2 serial {new_serial:x}, not after .*, renewal due")
        assert serial(tmp_path / "N2") == new_serial
        assert live_files(tmp_path / "N2")["privkey"].read_bytes() != old_key
        assert not (tmp_path / "N2" / ".pairing-key.pem").exists()
        status = subprocess.run([command("pki-agent"), "status", "--config", str(config)], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout
        report = pkictl(home, "status", "--all")
        short = lambda number: f"{number:x}"[:16]  # noqa: E731 - the table shows 16 hex digits
        assert re.search(rf"{short(old_serial)}.*revoked", report) and re.search(rf"{short(new_serial)}.*\bok\b", report), report
    finally:
        agent.stop()


def test_a_denied_pairing_request_stops_until_sighup_which_asks_again_with_a_new_key(ca, tmp_path):
    """'pkictl deny N2' makes the agent say so and stop asking; SIGHUP files a new request with
    a new code."""
    home, url = ca
    config = enroll_by_token(home, url, "N2", tmp_path / "N2")
    edit(config, check_interval="1s", refresh_interval="1s")
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        pkictl(home, "revoke", "N2")
        first = agent.log.wait_for(rf"its code is {CODE}").group(1)
        mark = agent.log.mark()
        pkictl(home, "deny", "N2")
        agent.log.wait_for(rf"the pairing request of N2 \(code {first}\) was refused: .*denied.*asks again with a new key after SIGHUP",
                           start=mark)
        assert pending_codes(home, "N2") == []
        agent.proc.send_signal(signal.SIGHUP)
        second = agent.log.wait_for(rf"its code is {CODE}", start=mark).group(1)
        assert second != first and pending_codes(home, "N2") == [second]
    finally:
        agent.stop()


def test_without_reenroll_the_agent_only_says_what_to_do(ca, tmp_path):
    """Negative twin: with 'reenroll: off' a revoked node says which commands get it a new
    certificate (options that exist) and files no pairing request."""
    home, url = ca
    config = enroll_by_token(home, url, "N2", tmp_path / "N2")
    edit(config, check_interval="1s", refresh_interval="1s", reenroll="off")
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        pkictl(home, "revoke", "N2")
        line = agent.log.wait_for(r"can no longer renew: revoked .*").group(0)
        assert "set 'reenroll: approval' under renewal:" in line and "pkictl enroll-node N2 --token" in line
        assert "pki-agent enroll --token TOKEN" in line and "--replace" not in line
        agent.proc.send_signal(signal.SIGUSR1)  # a renewal attempt says the same, and files nothing
        agent.log.wait_for(r"renewal of N2 failed \(revoked: the EST server refused the renewal: .*is revoked")
        assert pending_codes(home, "N2") == []
        assert not (tmp_path / "N2" / ".pairing-key.pem").exists()
    finally:
        agent.stop()


def test_a_refusal_by_the_gateway_makes_the_node_check_its_revocation_at_once(ca, tmp_path):
    """A node that checks the CRL only hourly learns of its revocation from the gateway's refusal
    of its tunnel connection: the tunnel's refusal makes the agent look itself up in the CRL and
    re-pair within seconds."""
    import socket

    home, url = ca
    with EchoServer() as upstream:
        pkictl(home, "enroll-gateway", "gw", "--ip", "127.0.0.1", "--out", str(tmp_path / "gw"), "--listen", "127.0.0.1:0",
               "--upstream", f"127.0.0.1:{upstream.port}", "--ca-url", url)
        edit(tmp_path / "gw" / "agent.yaml", check_interval="1s", crl_refresh_interval="1s")
        gateway = AgentProcess(tmp_path / "gw" / "agent.yaml")
        node = None
        try:
            _, port = gateway.wait_ready()
            config = enroll_by_token(home, url, "N2", tmp_path / "N2", "--tunnel", f"127.0.0.1:0=127.0.0.1:{port}")
            edit(config, check_interval="1s")  # refresh_interval stays 1h: only the refusal can tell it soon
            node = AgentProcess(config)
            match = node.log.wait_for(r"tunnel 127\.0\.0\.1:(\d+) ->")
            tunnel_port = int(match.group(1))
            node.log.wait_for(r"serial [0-9a-f]+ is not on the CRL of https://")  # its check at start; the next in 1 h

            def through() -> bytes:
                with socket.create_connection(("127.0.0.1", tunnel_port), timeout=DEADLINE) as s:
                    s.sendall(b"ping")
                    return s.recv(4)

            assert through() == b"ping"
            mark = gateway.log.mark()
            pkictl(home, "revoke", "N2")
            gateway.log.wait_for(r"CRL loaded: 1 revoked", start=mark)
            assert through() == b""
            node.log.wait_for(r"tunnel authentication failure: the gateway refused this node's certificate .*reason='revoked'")
            node.log.wait_for(r"can no longer renew: revoked", timeout=10)
            code = node.log.wait_for(rf"its code is {CODE}").group(1)
            pkictl(home, "approve", "N2", "--code", code)
            node.log.wait_for(r"re-enrolled N2: serial")
            node.log.wait_for(r"credential N2 serial")
            assert through() == b"ping"
            new = x509.load_pem_x509_certificate(live_files(tmp_path / "N2")["cert"].read_bytes())
            gateway.log.wait_for(rf"accepted .*node=n2 serial={new.serial_number:x}")
        finally:
            if node is not None:
                node.stop()
            gateway.stop()
