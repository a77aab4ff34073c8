"""The main job end to end with the installed commands as real processes: init-ca, enroll TW and
the gateway, pki-agent with its mTLS listener in front of an upstream, rotation, status."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import trustme
import yaml

from support import (
    AgentProcess,
    EchoServer,
    TLSClient,
    bundle_context,
    client_context,
    command,
    openssl_echo,
    refused,
)

LIFETIME_S = 12  # renewal at 2/3: every ~8 s, so a rotation happens within the test


def pkictl(home: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    result = subprocess.run([command("pkictl"), "--home", str(home), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode in ok, f"pkictl {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result.stdout


def _fast_checks(config: Path) -> None:
    data = yaml.safe_load(config.read_text())
    data["renewal"]["check_interval"] = "1s"
    config.write_text(yaml.safe_dump(data))


def test_main_job_end_to_end(tmp_path):
    """Through the installed pkictl and pki-agent: TW reaches the upstream through mTLS with
    openssl s_client and Python ssl; no certificate, a foreign CA and the gateway's server
    certificate are refused with logged reasons; the gateway and TW rotate on schedule, new
    connections see the new serials, a connection opened before still works; SIGTERM stops the
    agent; status lists the current certificates."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca", "--gateway-lifetime", f"{LIFETIME_S}s", "--node-lifetime", f"{LIFETIME_S}s")
    pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW"))
    with EchoServer() as upstream:
        pkictl(home, "enroll-gateway", "gw", "--ip", "127.0.0.1", "--out", str(tmp_path / "gw"),
               "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream.port}")
        pkictl(home, "enroll-gateway", "gw2", "--ip", "127.0.0.1", "--out", str(tmp_path / "gw2"))
        gw_bundle, tw_bundle = tmp_path / "gw", tmp_path / "TW"
        _fast_checks(gw_bundle / "agent.yaml")
        _fast_checks(tw_bundle / "agent.yaml")

        gateway = AgentProcess(gw_bundle / "agent.yaml")
        node = None
        try:
            _, port = gateway.wait_ready()
            first_serial = int(gateway.log.wait_for(r"credential gw serial ([0-9a-f]+)").group(1), 16)

            # openssl s_client, not our code, as the node's TLS client
            assert "hello-over-mtls" in openssl_echo(port, tw_bundle)
            # Python ssl, and the server certificate it sees
            before = TLSClient(port, bundle_context(tw_bundle))
            assert before.echo(b"opened before the renewal") == b"opened before the renewal"
            assert before.server_serial() == first_serial

            # negative controls, each refused with its reason in the agent's log
            refused(port, client_context(tw_bundle / "ca.pem"))
            gateway.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='no client certificate'")
            foreign = trustme.CA().issue_cert("tw.example")
            foreign.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "foreign.pem"))
            refused(port, client_context(tw_bundle / "ca.pem", fullchain=tmp_path / "foreign.pem", key=tmp_path / "foreign.pem"))
            gateway.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='unknown CA'")
            refused(port, bundle_context(tmp_path / "gw2"))  # a gateway's certificate is no node's
            gateway.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='no node identity' node=gw2")
            refused(port, bundle_context(gw_bundle))  # its own: the doctor's probe, closed, never forwarded
            gateway.log.wait_for(r"probe peer=127\.0\.0\.1:\d+ reason='doctor probe'")

            # the gateway rotates on schedule and hot-reloads its listener
            renewed = gateway.log.wait_for(r"renewed gw: serial ([0-9a-f]+) -> ([0-9a-f]+)")
            assert int(renewed.group(1), 16) == first_serial
            second_serial = int(renewed.group(2), 16)
            gateway.log.wait_for(rf"credential gw serial {renewed.group(2)}")
            after = TLSClient(port, bundle_context(tw_bundle))
            assert after.server_serial() == second_serial
            assert after.echo(b"after") == b"after"
            assert before.echo(b"still open after the renewal") == b"still open after the renewal"
            before.close()
            after.close()

            # node TW's agent rotates TW's certificate; the gateway accepts the new one
            node = AgentProcess(tw_bundle / "agent.yaml")
            assert node.wait_ready() is None
            tw_renewed = node.log.wait_for(r"renewed TW: serial ([0-9a-f]+) -> ([0-9a-f]+)")
            mark = gateway.log.mark()
            client = TLSClient(port, bundle_context(tw_bundle))
            assert client.echo(b"with the renewed TW certificate") == b"with the renewed TW certificate"
            client.close()
            accepted = gateway.log.wait_for(r"accepted peer=\S+ node=tw serial=([0-9a-f]+)", start=mark)
            assert accepted.group(1) != tw_renewed.group(1)

            assert node.stop() == 0
            assert gateway.stop() == 0
            assert "stopping" in gateway.log.text()
        finally:
            gateway.stop()
            if node is not None:
                node.stop()

    # 12-second certificates left without their agents may read "expiring" (exit 3) by now.
    rows = {(r["kind"], r["name"]): r for r in json.loads(pkictl(home, "status", "--json", ok=(0, 3)))}
    assert set(rows) >= {("gateway", "gw"), ("node", "TW")} and {k for k, _ in rows} == {"root", "issuing", "gateway", "node", "crl"}
    assert int(rows[("gateway", "gw")]["serial"], 16) != first_serial  # the inventory follows rotations
    assert rows[("node", "TW")]["serial"] != tw_renewed.group(1)
    table = pkictl(home, "status", ok=(0, 3))
    assert re.search(r"^TW\s+node\s+[0-9a-f]+", table, re.M)
