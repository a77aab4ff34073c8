"""Network enrollment and renewal end to end, every part a real process: pkictl serve, a
gateway agent and two node agents; one node bootstraps with a token, the other by approval."""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from support import DEADLINE, AgentProcess, EchoServer, LogWatcher, TLSClient, bundle_context, command, refused

LIFETIME_S = 12  # nodes renew every ~8 s, so renewals happen during the test


def pkictl(home, *args: str) -> str:
    result = subprocess.run([command("pkictl"), "--home", str(home), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"pkictl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def _fast(config) -> None:
    data = yaml.safe_load(config.read_text())
    data["renewal"].update(check_interval="1s", refresh_interval="1s")
    if "listener" in data:
        data["renewal"]["crl_refresh_interval"] = "1s"
    config.write_text(yaml.safe_dump(data))


def test_token_and_approval_bootstrap_then_renewal_and_revocation_over_est(tmp_path):
    """TW enrolls with a one-time token and n2 by approval, both through pki-agent enroll; their
    agents renew over EST; the gateway (renewing and fetching its CRL over EST too) serves both;
    after 'pkictl revoke n2' the gateway refuses n2 and the CA refuses n2's renewal."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca", "--node-lifetime", f"{LIFETIME_S}s")
    serve = subprocess.Popen([command("pkictl"), "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--check-interval", "1",
                              "--retry-after", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    serve_log = LogWatcher(serve.stderr)
    processes = []
    try:
        url = "https://127.0.0.1:" + serve_log.wait_for(r"ready: EST on https://127\.0\.0\.1:(\d+)").group(1)
        with EchoServer() as upstream:
            pkictl(home, "enroll-gateway", "gw", "--ip", "127.0.0.1", "--out", str(tmp_path / "gw"), "--listen", "127.0.0.1:0",
                   "--upstream", f"127.0.0.1:{upstream.port}", "--ca-url", url)
            _fast(tmp_path / "gw" / "agent.yaml")
            gateway = AgentProcess(tmp_path / "gw" / "agent.yaml")
            processes.append(gateway)
            _, port = gateway.wait_ready()

            # TW: a one-time token and the root fingerprint, handed to the node out of band
            out = pkictl(home, "enroll-node", "TW", "--token")
            token = out.splitlines()[1].strip()
            fingerprint = re.search(r"root fingerprint: (sha256:[0-9a-f]{64})", out).group(1)
            enrolled = subprocess.run([command("pki-agent"), "enroll", "--ca-url", url, "--fingerprint", fingerprint, "--name", "TW",
                                       "--token", token, "--dir", str(tmp_path / "TW")], capture_output=True, text=True, timeout=60)
            assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr

            # n2: no token; the operator compares the code and approves
            waiting = subprocess.Popen([command("pki-agent"), "enroll", "--ca-url", url, "--fingerprint", fingerprint, "--name", "n2",
                                        "--dir", str(tmp_path / "n2"), "--wait", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = LogWatcher(waiting.stdout).wait_for(r"waiting for approval: code ([A-Z2-7]{4}-[A-Z2-7]{4})").group(1)
            assert re.search(rf"^n2\s+{code}\s", pkictl(home, "requests"), re.M)
            pkictl(home, "approve", "n2", "--code", code)
            assert waiting.wait(DEADLINE) == 0

            for name in ("TW", "n2"):
                _fast(tmp_path / name / "agent.yaml")
            tw, n2 = AgentProcess(tmp_path / "TW" / "agent.yaml"), AgentProcess(tmp_path / "n2" / "agent.yaml")
            processes += [tw, n2]
            tw.log.wait_for(r"renewed TW: serial")
            n2.log.wait_for(r"renewed n2: serial")

            for bundle in (tmp_path / "TW", tmp_path / "n2"):
                client = TLSClient(port, bundle_context(bundle))
                assert client.echo(b"through the gateway") == b"through the gateway"
                client.close()

            mark = n2.log.mark()
            pkictl(home, "revoke", "n2", "--reason", "key-compromise")
            gateway.log.wait_for(r"CRL loaded: [1-9]\d* revoked")  # n2 and, if still unexpired, its predecessor
            refused(port, bundle_context(tmp_path / "n2"))
            gateway.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='revoked'")
            n2.log.wait_for(r"the certificate of n2 \(serial [0-9a-f]+\) can no longer renew: revoked \(", start=mark)
            n2.log.wait_for(r"pairing request of n2: a new key was made here; its code is [A-Z2-7]{4}-[A-Z2-7]{4}", start=mark)
            client = TLSClient(port, bundle_context(tmp_path / "TW"))
            assert client.echo(b"TW still in") == b"TW still in"
            client.close()
    finally:
        for process in processes:
            process.stop()
        serve.terminate()
        serve.wait(DEADLINE)
