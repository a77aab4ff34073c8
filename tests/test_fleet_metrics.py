"""Per-node Prometheus series of the gateway listener, scraped over real HTTP: connected,
connections opened and refusals by reason, bounded by the allow list whatever clients present."""

from __future__ import annotations

import socket
import ssl
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support import DEADLINE, TLSClient, bundle_context, refusal_record, wait_until

FAMILIES = ("pki_agent_listener_node_connected", "pki_agent_listener_node_connections_opened_total", "pki_agent_listener_node_refusals_total")


def _node_series(running) -> dict[tuple, float]:
    host, port = running.agent.status_server.addresses[0]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=DEADLINE) as response:
        body = response.read().decode()
    return {(s.name, s.labels["node"], s.labels.get("reason")): s.value
            for f in text_string_to_metric_families(body) for s in f.samples if s.name in FAMILIES}


def _refused_from(port: int, ctx: ssl.SSLContext, source: str) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    try:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:  # raw is detached into sock
            sock.sendall(b"x")
            sock.recv(10)
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        raw.close()


def test_node_series_are_bounded_by_the_allow_list(pki, start_gateway_agent, caplog, tmp_path):
    """With allow [tw]: TW connected gives connected=1 and opened=1 under node 'tw'; twelve other
    nodes of this CA refused from twelve addresses add no series of their own: they count under
    'other'. (Mutation: node_label returning the name itself adds twelve series and fails.)"""
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"}, allow=["tw"])
    strangers = [pki.ca.enroll("node", f"n{i}", out=tmp_path / f"n{i}").directory for i in range(12)]
    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"ping") == b"ping"
    wait_until(lambda: _node_series(running).get(("pki_agent_listener_node_connected", "tw", None)) == 1, what="tw connected")
    before = set(_node_series(running))
    for i, bundle in enumerate(strangers):
        _refused_from(running.port, bundle_context(bundle), f"127.0.0.{i + 2}")
    wait_until(lambda: _node_series(running).get(("pki_agent_listener_node_refusals_total", "other", "not allowed")) == 12,
               what="twelve refusals under 'other'")
    series = _node_series(running)
    assert {node for _, node, _ in series} == {"tw", "other"}
    assert {(name, node) for name, node, _ in set(series) - before} <= {(family, "other") for family in FAMILIES}
    assert len(set(series) - before) <= len(FAMILIES)
    assert series[("pki_agent_listener_node_connections_opened_total", "tw", None)] == 1
    table = {r["node"]: r for r in running.call(running.agent.listener.connection_table)}
    assert table["n3"]["last_refusal_reason"] == "not allowed" and table["n3"]["open_connections"] == 0  # attributed to its node
    assert table["tw"]["open_connections"] == 1 and table["tw"]["bytes_in"] == 4  # an open connection's bytes count
    client.close()
    wait_until(lambda: _node_series(running).get(("pki_agent_listener_node_connected", "tw", None)) == 0, what="tw gone")
    refusal_record(caplog, "not allowed")
