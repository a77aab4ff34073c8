"""fleet_view over a real inventory: certificate states, the gateways' reports joined, what needs
attention, and pkictl nodes' exit status and JSON shape."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from pkictl.fleet import NodeRow, fleet_view
from pkictl.fleet_report import GatewayReport, store_report

from est_support import pkictl

UTC = dt.timezone.utc


def _report(pki, at: dt.datetime, nodes: list[dict], interval: float = 10.0) -> None:
    report = GatewayReport(version=1, interval=interval, generated_at=at, nodes=nodes)
    store_report(pki.ca.inventory, "gw", 1, report, at)


def _node(name: str, open_connections: int, last_seen: dt.datetime, **extra) -> dict:
    return {"node": name, "open_connections": open_connections, "bytes_in": 1, "bytes_out": 2, "last_seen": last_seen.isoformat(),
            "connected_since": last_seen.isoformat() if open_connections else None, "peer": "127.0.0.1:4000", **extra}


def _rows(pki, now: dt.datetime, **kwargs) -> dict[str, NodeRow]:
    return {r.name: r for r in fleet_view(pki.ca, now=now, disconnected_after=dt.timedelta(minutes=10), **kwargs)}


def test_a_node_gone_longer_than_the_threshold_needs_attention(pki):
    """TW seen 5 minutes ago is fine, 11 minutes ago needs attention; connected it never does.
    (Mutation: comparing with '<' instead of '>' flips both.)"""
    now = dt.datetime.now(UTC)
    _report(pki, now, [_node("tw", 0, now - dt.timedelta(minutes=5))])
    assert _rows(pki, now)["TW"].attention is None and _rows(pki, now)["TW"].connected is False
    _report(pki, now, [_node("tw", 0, now - dt.timedelta(minutes=11))])
    assert _rows(pki, now)["TW"].attention.startswith("not connected since")
    _report(pki, now, [_node("tw", 1, now - dt.timedelta(hours=2))])
    row = _rows(pki, now)["TW"]
    assert row.connected is True and row.attention is None and row.peer == "127.0.0.1:4000" and row.bytes_out == 2


def test_a_stale_report_makes_connections_unknown_not_disconnected(pki):
    """A report older than three heartbeats: connected is None and nothing is flagged for it."""
    now = dt.datetime.now(UTC)
    _report(pki, now - dt.timedelta(seconds=31), [_node("tw", 0, now - dt.timedelta(hours=1))])
    row = _rows(pki, now)["TW"]
    assert row.connected is None and row.attention is None


def test_certificate_states_that_need_attention(pki, tmp_path):
    """A revoked node and an expected node that is not enrolled need attention; TW is 'ok' and
    has its renewal point at 2/3 of its lifetime."""
    pki.ca.enroll("node", "gone", out=tmp_path / "gone")
    pki.ca.revoke("gone", reason="key-compromise")
    now = dt.datetime.now(UTC)
    rows = _rows(pki, now, expected=["ghost"])
    assert rows["gone"].certificate_state == "revoked" and rows["gone"].attention == "certificate revoked"
    assert rows["ghost"].certificate_state == "none" and "enroll-node ghost" in rows["ghost"].attention
    tw = rows["TW"]
    assert tw.certificate_state == "ok" and tw.attention is None and tw.connected is None
    assert tw.renewal_due == tw.not_valid_before + (tw.not_valid_after - tw.not_valid_before) * 2 / 3


def test_pkictl_nodes_exit_status_and_json_shape(pki, tmp_path):
    """pkictl nodes exits 0 for a healthy fleet and 3 once a node is revoked; --json is an object
    of 'nodes' (every NodeRow field, in order) and 'gateways'."""
    result = pkictl(pki.home, "nodes", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    shape = json.loads(result.stdout)
    assert list(shape) == ["nodes", "gateways"]
    assert list(shape["nodes"][0]) == [f.name for f in dataclasses.fields(NodeRow)]
    pki.ca.enroll("node", "gone", out=tmp_path / "gone")
    pki.ca.revoke("gone")
    result = pkictl(pki.home, "nodes", check=False)
    assert result.returncode == 3 and "certificate revoked" in result.stdout
    bad = pkictl(pki.home, "nodes", "--disconnected-after", "soon", check=False)
    assert bad.returncode == 2 and "--disconnected-after" in bad.stderr
