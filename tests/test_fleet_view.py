"""The fleet view end to end, every part a real process: pkictl serve, a gateway agent reporting
its connection table over mTLS (or into the CA home), a node connecting with its bundle, and
``pkictl nodes`` polled with a bounded wait."""

from __future__ import annotations

import json
import subprocess
import time

import yaml

from est_support import ServeProcess
from support import DEADLINE, AgentProcess, EchoServer, TLSClient, bundle_context, command

BOUND = 5.0  # seconds: a connection is shown, and a close is shown as gone, within this


def nodes(home, *args: str) -> tuple[int, dict | str]:
    """``pkictl nodes`` (JSON unless ``args`` say otherwise): exit status and output."""
    result = subprocess.run([command("pkictl"), "--home", str(home), "nodes", *(args or ("--json",))], capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode in (0, 3, 4), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout) if not args else result.stdout


def row(home, name: str = "TW") -> dict:
    return next(r for r in nodes(home)[1]["nodes"] if r["name"] == name)


def poll(home, predicate, bound: float, what: str) -> tuple[dict, float]:
    """Poll ``pkictl nodes --json`` until ``predicate(row of TW)``; fail after ``bound`` s. Returns the row and the time taken."""
    started = time.monotonic()
    while True:
        found = row(home)
        if predicate(found):
            return found, time.monotonic() - started
        if time.monotonic() - started > bound:
            raise AssertionError(f"{what} not shown within {bound} s: {found}")


def _gateway_config(pki, upstream: int, renewal: dict) -> None:
    (pki.gateway / "agent.yaml").write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": ".", "renewal": {"check_interval": "1h", **renewal},
        "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream}", "crl": str(pki.ca.crl_path), "allow": ["*"],
                     "report_interval": "1s"},
        "metrics": {"listen": "127.0.0.1:0"},
    }))


def _connected_then_gone(pki, gateway: AgentProcess, port: int) -> None:
    client = TLSClient(port, bundle_context(pki.node))
    assert client.echo(b"through the gateway") == b"through the gateway"
    shown, took = poll(pki.home, lambda r: r["connected"] is True, BOUND, "TW connected")
    assert took <= BOUND
    print(f"connected shown after {took:.2f} s")
    assert shown["open_connections"] == 1 and shown["peer"].startswith("127.0.0.1:") and shown["connected_since"]
    assert shown["bytes_in"] == len(b"through the gateway") and shown["attention"] is None
    client.close()
    gateway.log.wait_for(r"closed peer=127\.0\.0\.1:\d+ node=tw")  # the gateway noticed
    gone, took = poll(pki.home, lambda r: r["connected"] is False, BOUND, "TW gone")
    print(f"gone shown after {took:.2f} s")
    assert gone["open_connections"] == 0 and gone["last_seen"] and gone["bytes_out"] == len(b"through the gateway")


def test_connection_shown_within_bound_and_gone_within_bound_over_est(pki):
    """A gateway renewing over EST reports to pkictl serve: TW's connection is shown within 5 s,
    its close within 5 s, and once the gateway stops, the gateway is 'not reporting', TW's
    connection is unknown and the exit status is 3. (Mutations: GatewayListener.note not
    applying its event to the table fails the 5 s bound; a report never stale fails the end.)"""
    serve = ServeProcess(pki.home, "--check-interval", "1")
    try:
        with EchoServer() as upstream:
            _gateway_config(pki, upstream.port, {"ca_url": serve.url})
            gateway = AgentProcess(pki.gateway / "agent.yaml")
            try:
                _, port = gateway.wait_ready()
                poll(pki.home, lambda r: r["connected"] is False, DEADLINE, "the first report")
                _connected_then_gone(pki, gateway, port)
                code, _ = nodes(pki.home, "--disconnected-after", "1h")
                assert code == 0
            finally:
                gateway.stop()
        # Stale after three 1 s heartbeats: unknown, never "not connected".
        stale, _ = poll(pki.home, lambda r: r["connected"] is None, DEADLINE, "the gateway's report going stale")
        assert stale["open_connections"] == 0 and stale["attention"] is None
        code, text = nodes(pki.home, "--disconnected-after", "1h")
        assert code == 3 and "gateway gw NOT REPORTING" in text
        assert "unknown" in text.splitlines()[1]
    finally:
        serve.stop()


def test_gateway_on_the_ca_host_writes_its_report_into_the_inventory(pki):
    """A gateway renewing from the CA home (no EST) writes its table into the CA home's inventory:
    TW shown connected, then gone, within 5 s each, with no pkictl serve running."""
    with EchoServer() as upstream:
        _gateway_config(pki, upstream.port, {"ca_home": str(pki.home)})
        gateway = AgentProcess(pki.gateway / "agent.yaml")
        try:
            _, port = gateway.wait_ready()
            poll(pki.home, lambda r: r["connected"] is False, DEADLINE, "the first report")
            _connected_then_gone(pki, gateway, port)
            status = subprocess.run([command("pki-agent"), "status", "--config", str(pki.gateway / "agent.yaml"), "--json"],
                                    capture_output=True, text=True, timeout=DEADLINE)
            table = json.loads(status.stdout)["connections"]
            assert [(n["node"], n["open_connections"], n["bytes_in"]) for n in table] == [("tw", 0, len(b"through the gateway"))]
            client = TLSClient(port, bundle_context(pki.node))
            assert client.echo(b"again") == b"again"
            text = subprocess.run([command("pki-agent"), "status", "--config", str(pki.gateway / "agent.yaml")],
                                  capture_output=True, text=True, timeout=DEADLINE).stdout
            client.close()
            assert "connections    1 open, 1 node(s) seen" in text and "tw: 1 open since" in text, text
        finally:
            gateway.stop()
