"""``listener.workers``: pki-agent's listener as several real worker processes on one port.

Which worker served a connection is read from its ``accepted`` line (`` worker=PID``), matched
by the client's own port. Every test runs ``pki-agent run`` as a real process with 2 workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pki_agent.config import ListenerConfig, default_workers, load_config
from pki_agent.errors import ConfigError
from pki_agent.listener.nodetable import NodeEntry, NodeTable, entry_from_wire, entry_to_wire, merge_tables
from pki_agent.listener.tls import server_context
from pki_agent.listener.worker_process import held_from_wire, held_to_wire, listener_from_wire, listener_to_wire
from pki_agent.rotation.rotate import LocalCA, rotate
from pkictl.clock import SystemClock
from pkictl.store import CredentialStore

from support import DEADLINE, AgentProcess, TLSClient, bundle_context, client_context, close_pipes, command, holds_within, refused, wait_until

WORKERS = 2
_SERVING = r"listener worker (\d+) \(pid (\d+)\) serving serial (\w+)"


def _config(pki, upstream: int, workers: int = WORKERS, **settings) -> Path:
    config = pki.gateway / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": ".",
        "renewal": {"ca_home": str(pki.home), "check_interval": "1h"}, "watch": False,
        "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream}", "crl": str(pki.ca.crl_path),
                     "allow": ["*"], "workers": workers},
        **settings,
    }))
    return config


class Gateway:
    """A started ``pki-agent run`` with its workers' pids; ``started`` gets it before it is
    ready, so that whatever fails, the fixture stops it."""

    def __init__(self, config: Path, workers: int, started: list) -> None:
        self.agent = AgentProcess(config)
        self.clients: list[TLSClient] = []  # closed at stop()
        self.stopped = False
        started.append(self)
        self.log = self.agent.log
        _, self.port = self.agent.wait_ready()
        self.workers: dict[int, int] = {}  # index -> pid, from the "serving" lines
        for match in re.finditer(_SERVING, self.log.text()):
            self.workers[int(match.group(1))] = int(match.group(2))
        assert len(self.workers) == workers, self.log.text()

    def served_by(self, client: TLSClient) -> int:
        """The pid of the worker that accepted ``client`` (its accepted line, by the client's port)."""
        local = client.sock.getsockname()[1]
        return int(self.log.wait_for(rf"accepted peer=127\.0\.0\.1:{local} .* worker=(\d+)$").group(1))

    def spread(self, ctx: ssl.SSLContext, count: int = 24) -> list[tuple[TLSClient, int]]:
        """``count`` open connections, each with the pid of its worker (echo checked)."""
        opened = []
        for _ in range(count):
            client = TLSClient(self.port, ctx)
            self.clients.append(client)
            assert client.echo(b"x") == b"x"
            opened.append(client)
        return [(c, self.served_by(c)) for c in opened]

    def stop(self) -> int | None:
        """SIGTERM the agent and wait; a worker still running then is killed (by its pid) and
        fails the test, rather than hold the log pipe open and hang it."""
        for client in self.clients:
            client.close()  # closing twice is harmless
        self.stopped = True
        proc = self.agent.proc
        if proc.poll() is None:
            proc.terminate()
        try:
            code: int | None = proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(DEADLINE)
            code = None
        workers = {int(m.group(2)) for m in re.finditer(_SERVING, self.log.text())}
        gone = holds_within(lambda: not any(_alive(pid) for pid in workers), 5.0)
        leftover = [pid for pid in workers if _alive(pid)]
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        close_pipes(proc)
        assert gone, f"listener workers {leftover} outlived the agent"
        assert code is not None, "the agent did not stop on SIGTERM"
        return code


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def gateway(pki, echo_server):
    started: list[Gateway] = []

    def start(**settings) -> Gateway:
        workers = settings.get("workers", WORKERS)
        return Gateway(_config(pki, echo_server.port, **settings), workers if workers > 1 else 0, started)

    yield start
    for running in started:
        if not running.stopped:
            running.stop()


def test_workers_default_to_the_cpus_and_refuse_zero(tmp_path):
    """Unset, ``workers`` is the number of CPUs the agent may run on; 0 is refused at load, naming the field."""
    config = ListenerConfig(listen="127.0.0.1:0", upstream="127.0.0.1:1", allow=["*"])
    assert config.worker_count == default_workers() >= 1
    assert ListenerConfig(listen="127.0.0.1:0", upstream="127.0.0.1:1", allow=["*"], workers=1).worker_count == 1
    path = tmp_path / "agent.yaml"
    path.write_text("name: gw\nkind: gateway\nlistener:\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:1\n  allow: ['*']\n  workers: 0\n")
    with pytest.raises(ConfigError, match=r"listener\.workers.*greater than or equal to 1"):
        load_config(path)


def test_what_the_agent_hands_a_worker_arrives_as_it_was(pki):
    """Every listener setting (none at its default) and the CRL numbers in service cross the
    JSON link unchanged, and so does a node's table entry, its connection ids offset."""
    config = ListenerConfig(listen="127.0.0.1:8443", upstream="127.0.0.1:18789", allow=["tw", "b"], crl=pki.ca.crl_path,
                            handshake_timeout=3, max_connections=64, max_connections_per_peer=8, idle_timeout=90,
                            max_connection_age=3600, report_interval=5, workers=3)
    defaults = ListenerConfig(listen="127.0.0.1:8443", upstream="127.0.0.1:18789", allow=["*"])
    assert all(getattr(config, k) != getattr(defaults, k) for k in ListenerConfig.model_fields if k not in ("listen", "upstream"))
    assert listener_from_wire(json.loads(json.dumps(listener_to_wire(config)))) == config
    held = server_context(CredentialStore(pki.gateway), pki.ca.crl_path).crl_numbers
    assert held and held_from_wire(json.loads(json.dumps(held_to_wire(held)))) == held
    at = dt.datetime(2026, 12, 3, 10, 0, 0, 250000, tzinfo=dt.timezone.utc)
    entry = NodeEntry(open={7: (at, "10.0.0.1:5000")}, latest_peer="10.0.0.1:5000", bytes_in=3, bytes_out=4, last_seen=at,
                      opened_total=2, refusals={"revoked": 1}, last_refusal_reason="revoked", last_refusal_at=at)
    back = entry_from_wire(json.loads(json.dumps(entry_to_wire(entry))), 1 << 48)
    assert back == dataclasses.replace(entry, open={(1 << 48) + 7: (at, "10.0.0.1:5000")})


def test_merged_table_sums_counts_and_keeps_the_latest(pki):
    """Two workers' entries of one node: open connections together, counts summed, the latest
    peer, last seen and refusal win."""
    early, late = (dt.datetime(2026, 12, 3, h, tzinfo=dt.timezone.utc) for h in (9, 10))
    a, b = NodeTable(), NodeTable()
    a.nodes["tw"] = NodeEntry(open={1: (early, "p1")}, latest_peer="p1", bytes_in=1, last_seen=early, opened_total=1,
                              refusals={"revoked": 1}, last_refusal_reason="revoked", last_refusal_at=late)
    b.nodes["tw"] = NodeEntry(open={2: (late, "p2")}, latest_peer="p2", bytes_in=2, last_seen=late, opened_total=3,
                              refusals={"revoked": 2, "not allowed": 1}, last_refusal_reason="not allowed", last_refusal_at=early)
    a.anonymous_refusals, b.anonymous_refusals = {"no client certificate": 2}, {"no client certificate": 3}
    merged = merge_tables([a, b])
    tw = merged.nodes["tw"]
    assert (set(tw.open), tw.latest_peer, tw.bytes_in, tw.last_seen, tw.opened_total) == ({1, 2}, "p2", 3, late, 4)
    assert (tw.refusals, tw.last_refusal_reason, tw.last_refusal_at) == ({"revoked": 3, "not allowed": 1}, "revoked", late)
    assert merged.anonymous_refusals == {"no client certificate": 5}


def test_several_workers_accept_on_one_port(pki, gateway):
    """Connections to the one port are served by both workers, none by the agent's own process;
    with ``workers: 1`` the agent serves them itself (no worker process, no ``worker=`` field)."""
    running = gateway()
    pids = {pid for _, pid in running.spread(bundle_context(pki.node))}
    assert pids == set(running.workers.values())
    assert running.agent.proc.pid not in pids


def test_one_worker_is_the_agent_itself(pki, gateway):
    running = gateway(workers=1)
    client = TLSClient(running.port, bundle_context(pki.node))
    running.clients.append(client)
    assert client.echo(b"one") == b"one"
    local = client.sock.getsockname()[1]
    line = running.log.wait_for(rf"accepted peer=127\.0\.0\.1:{local} ").string
    assert "worker=" not in line
    client.close()


def test_a_killed_worker_is_replaced_and_the_others_connections_survive(pki, gateway):
    """SIGKILL of one worker: its connections end, the other worker's stay open and forward, a
    replacement starts on the same socket and serves the connections that queued on it
    meanwhile and new ones; the agent keeps running."""
    running = gateway()
    opened = running.spread(bundle_context(pki.node))
    victim, survivor = running.workers[0], running.workers[1]
    mark = running.log.mark()
    running_pids = set(running.workers.values())
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not _alive(victim), what="the killed worker gone")
    # Before its replacement serves: the connections hashed to its socket wait in the queue the
    # agent kept open, and the replacement takes them; not one is reset.
    meanwhile = [TLSClient(running.port, bundle_context(pki.node)) for _ in range(16)]
    running.clients.extend(meanwhile)
    assert all(c.echo(b"queued") == b"queued" for c in meanwhile)
    running.log.wait_for(rf"listener worker 0 \(pid {victim}\) was killed by signal 9; starting a replacement", start=mark)
    replacement = int(running.log.wait_for(r"listener worker 0 \(pid (\d+)\) serving serial", start=mark).group(1))
    assert replacement not in running_pids
    assert replacement in {running.served_by(c) for c in meanwhile}  # some waited for it
    for client, pid in opened:
        if pid == survivor:
            assert client.echo(b"still here") == b"still here"
        else:
            try:
                assert client.echo(b"gone") == b""
            except (ssl.SSLError, ConnectionError):
                pass  # reset: the process holding it was killed
        client.close()
    pids = {pid for _, pid in running.spread(bundle_context(pki.node))}
    assert replacement in pids and survivor in pids and victim not in pids
    assert running.agent.proc.poll() is None


def test_crl_reload_reaches_every_worker(pki, gateway):
    """After 'revoke TW' and SIGHUP, TW is refused as revoked by both workers and its open
    connections on both are closed; another node is still served by both."""
    other = pki.ca.enroll("node", "other", out=pki.home.parent / "other").directory
    running = gateway()
    before = running.spread(bundle_context(pki.node), 12)
    assert {pid for _, pid in before} == set(running.workers.values())  # the control: TW was served by both

    pki.ca.revoke("TW", reason="key-compromise")
    mark = running.log.mark()
    running.agent.proc.send_signal(signal.SIGHUP)
    running.log.wait_for(r"CRL loaded: 1 revoked", start=mark)
    for client, _ in before:  # closed by the worker that held it, at its reload
        try:
            assert client.echo(b"revoked?") == b""
        except (ssl.SSLError, ConnectionError):
            pass
        client.close()
    for _ in range(24):
        refused(running.port, bundle_context(pki.node))

    def refusing() -> set[int]:
        return {int(m.group(1)) for m in re.finditer(r"refused peer=\S+ reason='revoked' .* worker=(\d+)$", running.log.text(), re.M)}

    wait_until(lambda: refusing() == set(running.workers.values()), what="both workers refusing TW as revoked")
    still = running.spread(bundle_context(other), 12)
    assert {pid for _, pid in still} == set(running.workers.values())
    for client, _ in still:
        client.close()


def test_renewed_server_certificate_is_presented_by_every_worker(pki, gateway):
    """Both workers present the gateway certificate; after a new one is installed and SIGHUP,
    both present the new one, and connections opened before keep forwarding."""
    running = gateway()
    store = CredentialStore(pki.gateway)
    old = store.load().certificate.serial_number
    unchanged = running.spread(bundle_context(pki.node), 12)
    assert {c.server_serial() for c, _ in unchanged} == {old}
    assert {pid for _, pid in unchanged} == set(running.workers.values())
    new = rotate(store, store.load(), LocalCA(pki.home, SystemClock()), SystemClock()).certificate.serial_number
    mark = running.log.mark()
    running.agent.proc.send_signal(signal.SIGHUP)
    running.log.wait_for(rf"credential gw serial {new:x}", start=mark)
    after = running.spread(bundle_context(pki.node), 24)
    assert {c.server_serial() for c, _ in after} == {new}
    assert {pid for _, pid in after} == set(running.workers.values())
    for client, _ in unchanged:
        assert client.echo(b"opened before") == b"opened before"  # established ones keep theirs
        client.close()
    for client, _ in after:
        client.close()


def test_reload_under_a_handshake_flood_fails_no_handshake(pki, gateway):
    """Six client threads connect, handshake and echo in a loop while the gateway certificate is
    rotated five times (SIGHUP each): not one handshake fails, both workers serve the flood, and
    the newest certificate is presented afterwards."""
    running = gateway()
    ctx = bundle_context(pki.node)
    stop = threading.Event()
    ok, failed, serials = [0], [], set()
    lock = threading.Lock()

    def flood() -> None:
        while not stop.is_set():
            try:
                client = TLSClient(running.port, ctx)
                serial = client.server_serial()
                answer = client.echo(b"f")
                client.close()
            except (OSError, ssl.SSLError) as exc:
                with lock:
                    failed.append(repr(exc))
                continue
            with lock:
                if answer == b"f":
                    ok[0] += 1
                    serials.add(serial)
                else:
                    failed.append(f"echo {answer!r}")

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    store = CredentialStore(pki.gateway)
    installed = []
    try:
        wait_until(lambda: ok[0] >= 50, what="the flood under way")
        for _ in range(5):
            serial = rotate(store, store.load(), LocalCA(pki.home, SystemClock()), SystemClock()).certificate.serial_number
            installed.append(serial)
            mark = running.log.mark()
            running.agent.proc.send_signal(signal.SIGHUP)
            running.log.wait_for(rf"credential gw serial {serial:x}", start=mark)
            seen = ok[0]
            wait_until(lambda seen=seen: ok[0] >= seen + 30, what="handshakes after the reload")
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert failed == []
    assert installed[-1] in serials and len(serials & set(installed)) >= 2
    flood_pids = {int(m.group(1)) for m in re.finditer(r"accepted peer=\S+ node=tw .* worker=(\d+)$", running.log.text(), re.M)}
    assert flood_pids == set(running.workers.values())
    last = TLSClient(running.port, ctx)
    running.clients.append(last)
    assert last.server_serial() == installed[-1]


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_and_connection_table_sum_every_worker(pki, gateway, tmp_path):
    """/metrics counts the connections and refusals of both workers, and /connections and the
    report to the CA (``pkictl nodes``) list TW's open connections of both; after SIGKILL of one
    worker its connections leave both tables and its counts stay."""
    running = gateway(metrics={"listen": "127.0.0.1:0"})
    url = running.log.wait_for(r"metrics and health on (http://\S+/metrics)").group(1)
    opened = running.spread(bundle_context(pki.node), 16)
    per_worker = {pid: sum(1 for _, p in opened if p == pid) for pid in running.workers.values()}
    assert all(per_worker.values())  # both served some: the sums below add two workers' counts
    nobody = client_context(pki.node / "ca.pem")
    for _ in range(6):
        refused(running.port, nobody)
    accepted = 'pki_agent_listener_connections_accepted_total{kind="gateway",name="gw"}'
    no_cert = 'pki_agent_listener_connections_refused_total{kind="gateway",name="gw",reason="no client certificate"}'
    connected = 'pki_agent_listener_node_connected{kind="gateway",name="gw",node="tw"}'
    wait_until(lambda: (m := _scrape(url)).get(accepted) == 16 and m.get(no_cert) == 6 and m.get(connected) == 1,
               what="metrics of both workers")
    assert _scrape(url)['pki_agent_listener_connections_open{kind="gateway",name="gw"}'] == 16
    workers = 'pki_agent_listener_workers{kind="gateway",name="gw"}'
    restarts = 'pki_agent_listener_worker_restarts_total{kind="gateway",name="gw"}'
    assert (_scrape(url)[workers], _scrape(url)[restarts]) == (2, 0)
    table = url.replace("/metrics", "/connections")

    def tw_open() -> int:
        with urllib.request.urlopen(table, timeout=DEADLINE) as response:
            rows = {r["node"]: r for r in json.loads(response.read())}
        return rows["tw"]["open_connections"] if "tw" in rows else -1

    wait_until(lambda: tw_open() == 16, what="TW's 16 open connections in the table")

    def at_the_ca() -> int:
        """TW's open connections as the CA shows them (``pkictl nodes``: the gateway's report)."""
        shown = subprocess.run([command("pkictl"), "--home", str(pki.home), "nodes", "--json"], capture_output=True, text=True,
                               timeout=DEADLINE)
        return next(r for r in json.loads(shown.stdout)["nodes"] if r["name"] == "TW")["open_connections"]

    wait_until(lambda: at_the_ca() == 16, 5.0, "TW's 16 connections of both workers at the CA within 5 s")
    victim = running.workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: tw_open() == 16 - per_worker[victim], what="the killed worker's connections leaving the table")
    wait_until(lambda: at_the_ca() == 16 - per_worker[victim], 5.0, "the killed worker's connections gone at the CA within 5 s")
    assert _scrape(url)[accepted] == 16  # what the dead worker counted stays counted
    wait_until(lambda: (m := _scrape(url))[restarts] == 1 and m[workers] == 2, what="the replacement counted and serving")
    for client, _ in opened:
        client.close()


def test_sigterm_stops_every_worker_and_no_worker_outlives_the_agent(pki, gateway):
    """SIGTERM to the agent stops both workers (exit status 0); after SIGKILL of the agent
    itself, its workers notice and stop too."""
    running = gateway()
    pids = set(running.workers.values())
    assert all(_alive(pid) for pid in pids)
    assert running.stop() == 0
    wait_until(lambda: not any(_alive(pid) for pid in pids), what="the workers gone after SIGTERM")

    second = gateway()
    pids = set(second.workers.values())
    client = TLSClient(second.port, bundle_context(pki.node))
    second.clients.append(client)
    assert client.echo(b"x") == b"x"
    second.agent.proc.kill()
    wait_until(lambda: not any(_alive(pid) for pid in pids), what="the workers gone after the agent was killed")
    client.close()


def test_a_replacement_worker_refuses_a_replayed_crl_the_agent_refused(pki, gateway):
    """The CRL revoking TW is in service; an older CRL (without TW) written back over it is
    refused by the agent's reload. A worker killed then is replaced by one that refuses that CRL
    too, so it does not start, and TW is served by no worker: not by the one left (revoked), not
    by the replacement (none runs)."""
    older = pki.ca.crl_path.read_bytes()
    pki.ca.revoke("TW", reason="key-compromise")
    running = gateway(metrics={"listen": "127.0.0.1:0"})
    health = running.log.wait_for(r"metrics and health on (http://\S+)/metrics").group(1) + "/healthz"
    mark = running.log.mark()
    pki.ca.crl_path.write_bytes(older)
    running.agent.proc.send_signal(signal.SIGHUP)
    running.log.wait_for(r"reload refused, still serving serial \w+ with its CRL", start=mark)
    os.kill(running.workers[0], signal.SIGKILL)
    running.log.wait_for(r"cannot start: .*CRL", start=mark)
    running.log.wait_for(r"listener worker 0 \(pid \d+\) exited with status 1; starting a replacement in", start=mark)
    try:
        urllib.request.urlopen(health, timeout=DEADLINE).close()
        raise AssertionError("healthy with a worker that cannot start")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and "1 of 2 listener workers serving" in exc.read().decode()
        exc.close()
    ctx = bundle_context(pki.node)
    for _ in range(8):
        raw = socket.create_connection(("127.0.0.1", running.port), timeout=1)
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"x")
                assert tls.recv(1) == b""  # refused as revoked by the worker left
        except (TimeoutError, ssl.SSLError, ConnectionError):
            pass  # revoked, or waiting on the socket of the worker that cannot start
        finally:
            raw.close()


def test_sigterm_to_every_process_of_the_service_stops_it_without_replacements(pki, gateway):
    """systemctl stop signals the agent and its workers at once: exit status 0, no worker is
    taken for crashed or started again. A worker stopped alone by SIGTERM is replaced."""
    running = gateway()
    mark = running.log.mark()
    os.kill(running.workers[1], signal.SIGTERM)
    running.log.wait_for(rf"listener worker 1 \(pid {running.workers[1]}\) stopped on SIGTERM; starting a replacement", start=mark)
    replacement = int(running.log.wait_for(r"listener worker 1 \(pid (\d+)\) serving serial", start=mark).group(1))
    mark = running.log.mark()
    for pid in (running.agent.proc.pid, running.workers[0], replacement):
        os.kill(pid, signal.SIGTERM)
    assert running.stop() == 0
    after = running.log.text().splitlines()[mark:]
    assert not [line for line in after if "serving serial" in line or " ERROR " in line], "\n".join(after)


def test_workers_do_not_join_another_process_on_the_port(pki, echo_server):
    """A socket of another process of this user listens with SO_REUSEPORT on the port: the agent
    refuses to start and says the port is taken, instead of sharing the port's connections
    with it; on a free port it starts (control)."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    config = _config(pki, echo_server.port)
    text = config.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    assert text != config.read_text()
    config.write_text(text)
    try:
        agent = AgentProcess(config)
        try:
            assert agent.proc.wait(DEADLINE) != 0
            agent.log.wait_for(rf"listener: cannot listen on 127\.0\.0\.1:{port}: .*(?:in use|Address already)")
        finally:
            agent.stop()
    finally:
        squatter.close()
    agent = AgentProcess(config)
    try:
        assert agent.wait_ready() == ("127.0.0.1", port)
    finally:
        assert agent.stop() == 0
