"""pki-agent as a real process: SIGHUP reloads from disk, a Node.js client gets through, a broken
configuration stops it at start with the file and field named."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import yaml

from pki_agent.rotation.rotate import LocalCA, rotate
from pkictl.clock import SystemClock
from pkictl.store import CredentialStore

from support import DEADLINE, AgentProcess, TLSClient, bundle_context, client_context, command, live_files, refused

NODE_CLIENT = r"""
const tls = require('tls'); const fs = require('fs');
const [port, cert, key, ca] = process.argv.slice(1);
const sock = tls.connect({host: '127.0.0.1', port: +port, cert: fs.readFileSync(cert),
  key: fs.readFileSync(key), ca: fs.readFileSync(ca)}, () => sock.write('hello from node.js'));
let got = '';
sock.on('data', d => { got += d; if (got.length >= 18) { console.log(got); sock.end(); } });
sock.on('error', e => { console.error('error: ' + e.message); process.exit(1); });
"""


def _gateway_config(pki, upstream_port: int, check_interval: str = "1h", **settings) -> Path:
    config = pki.gateway / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": ".",
        "renewal": {"ca_home": str(pki.home), "check_interval": check_interval},
        "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream_port}", "crl": str(pki.ca.crl_path),
                     "allow": ["*"]},
        **settings,
    }))
    return config


def test_pkictl_revoke_locks_the_node_out_of_the_running_gateway(pki, echo_server):
    """'pkictl revoke TW' while pki-agent runs: within the check interval the agent reloads the
    CRL, TW is refused as 'revoked', and another node is still served; no restart."""
    other = pki.ca.enroll("node", "other", out=pki.home.parent / "other").directory
    agent = AgentProcess(_gateway_config(pki, echo_server.port, check_interval="1s"))
    try:
        _, port = agent.wait_ready()
        client = TLSClient(port, bundle_context(pki.node))
        assert client.echo(b"before") == b"before"
        client.close()
        result = subprocess.run([command("pkictl"), "--home", str(pki.home), "revoke", "TW", "--reason", "key-compromise"],
                                capture_output=True, text=True, timeout=DEADLINE)
        assert result.returncode == 0, result.stderr
        agent.log.wait_for(r"CRL loaded: 1 revoked")
        refused(port, bundle_context(pki.node))
        agent.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='revoked'")
        still = TLSClient(port, bundle_context(other))
        assert still.echo(b"other node") == b"other node"
        still.close()
    finally:
        agent.stop()


def test_sighup_reloads_the_credential_from_disk(pki, echo_server):
    """A credential installed behind the agent's back is served only after SIGHUP, and SIGTERM
    then stops the agent with exit status 0."""
    agent = AgentProcess(_gateway_config(pki, echo_server.port, watch=False))
    try:
        _, port = agent.wait_ready()
        first = TLSClient(port, bundle_context(pki.node))
        old_serial = first.server_serial()

        store = CredentialStore(pki.gateway)
        new_serial = rotate(store, store.load(), LocalCA(pki.home, SystemClock()), SystemClock()).certificate.serial_number
        unchanged = TLSClient(port, bundle_context(pki.node))
        assert unchanged.server_serial() == old_serial  # nothing reloads on its own here
        unchanged.close()

        mark = agent.log.mark()
        agent.proc.send_signal(signal.SIGHUP)
        agent.log.wait_for(rf"credential gw serial {new_serial:x}", start=mark)
        after = TLSClient(port, bundle_context(pki.node))
        assert after.server_serial() == new_serial
        assert after.echo(b"after SIGHUP") == b"after SIGHUP"
        assert first.echo(b"opened before") == b"opened before"
        first.close()
        after.close()
        assert agent.stop() == 0
    finally:
        agent.stop()


def test_node_js_tls_client_reaches_the_upstream(pki, echo_server):
    """Node.js's tls module, with TW's full chain and key, exchanges bytes through the listener;
    without a client certificate it gets nothing."""
    node = shutil.which("node")
    assert node, "node (Node.js) is required for this interop test"
    agent = AgentProcess(_gateway_config(pki, echo_server.port))
    try:
        _, port = agent.wait_ready()
        files = live_files(pki.node)
        ok = subprocess.run([node, "-e", NODE_CLIENT, str(port), str(files["fullchain"]), str(files["privkey"]), str(pki.node / "ca.pem")],
                            capture_output=True, text=True, timeout=DEADLINE)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "hello from node.js"
        agent.log.wait_for(r"accepted peer=127\.0\.0\.1:\d+ node=tw")

        no_cert = NODE_CLIENT.replace("cert: fs.readFileSync(cert),\n  key: fs.readFileSync(key), ", "")
        assert "readFileSync(key)" not in no_cert
        bad = subprocess.run([node, "-e", no_cert, str(port), "-", "-", str(pki.node / "ca.pem")],
                             capture_output=True, text=True, timeout=DEADLINE)
        assert "hello from node.js" not in bad.stdout
        agent.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='no client certificate'")
    finally:
        agent.stop()


def test_broken_configuration_is_refused_at_start(tmp_path):
    """An unknown key and a malformed address stop pki-agent with exit status 1 and a message
    naming the file, the fields and what was expected."""
    config = tmp_path / "agent.yaml"
    config.write_text("name: TW\nkind: gateway\nlisten_port: 8443\nlistener:\n  listen: nowhere\n  upstream: 127.0.0.1:1\n")
    result = subprocess.run([command("pki-agent"), "run", "--config", str(config)], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1
    assert str(config) in result.stderr
    assert "listen_port" in result.stderr and "Extra inputs are not permitted" in result.stderr
    assert "listener.listen" in result.stderr and "HOST:PORT" in result.stderr


def test_missing_credential_is_refused_at_start(tmp_path):
    """A configuration pointing at an empty directory stops pki-agent with a message saying
    there is no credential and to enroll first."""
    config = tmp_path / "agent.yaml"
    config.write_text("name: TW\nkind: node\ncredential_dir: nothing-here\n")
    (tmp_path / "nothing-here").mkdir()
    result = subprocess.run([command("pki-agent"), "run", "--config", str(config)], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1
    assert "no credential" in result.stderr and "enroll" in result.stderr


def test_json_log_format_writes_one_object_per_line_with_the_event_fields(pki, echo_server):
    """With log_format: json every line pki-agent writes is a JSON object; a refusal carries
    peer and reason, a closed connection node, serial, bytes and duration."""
    agent = AgentProcess(_gateway_config(pki, echo_server.port, log_format="json"))
    try:
        _, port = agent.wait_ready()
        refused(port, client_context(pki.node / "ca.pem"))
        client = TLSClient(port, bundle_context(pki.node))
        assert client.echo(b"json") == b"json"
        client.close()
        agent.log.wait_for(r'"event": "closed"')
        entries = [json.loads(line) for line in agent.log.lines]  # every line parses
        refusal = next(e for e in entries if e.get("event") == "refused")
        assert refusal["reason"] == "no client certificate" and refusal["peer"].startswith("127.0.0.1:")
        assert refusal["level"] == "warning" and "T" in refusal["time"]
        closed = next(e for e in entries if e.get("event") == "closed")
        assert (closed["node"], closed["bytes_in"], closed["bytes_out"]) == ("tw", 4, 4) and closed["duration"] >= 0
    finally:
        agent.stop()
