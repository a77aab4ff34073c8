"""POST /pkictl/v1/gateway-report on a real pkictl serve, with curl as the client: only a valid,
unrevoked gateway certificate may report, and a bad report is refused and changes nothing."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from pkictl.fleet import fleet_view
from pkictl.inventory import Inventory

from est_support import RunningService, curl, est_body, make_csr, pkictl as run_pkictl
from support import live_files

PATH = "/pkictl/v1/gateway-report"
REPORT = {"version": 1, "interval": 1.0, "generated_at": "2026-12-02T21:00:00+00:00",
          "nodes": [{"node": "tw", "open_connections": 1, "connected_since": "2026-12-02T20:59:00+00:00", "peer": "127.0.0.1:5000",
                     "bytes_in": 5, "bytes_out": 7, "last_seen": "2026-12-02T21:00:00+00:00", "last_refusal_reason": None,
                     "last_refusal_at": None}]}


@pytest.fixture
def service(pki):
    running = RunningService(pki.home).start()
    yield running
    running.stop()


def _post(service, pki, bundle, body: bytes):
    files = live_files(bundle)
    return curl(service.url + PATH, "--cert", str(files["fullchain"]), "--key", str(files["privkey"]), cacert=pki.home / "ca.pem",
                data=body, content_type="application/json")


def _stored(pki) -> list:
    inventory = Inventory(pki.home / "inventory.sqlite3")
    try:
        return inventory.gateway_reports()
    finally:
        inventory.close()


def test_gateway_certificate_reports_and_is_stored(service, pki):
    """The gateway's own certificate gets 204 and its report is the gateway's latest in the inventory."""
    reply = _post(service, pki, pki.gateway, json.dumps(REPORT).encode())
    assert reply.status == 204, reply
    [(name, _, _, interval, report)] = _stored(pki)
    assert (name, interval, json.loads(report)["nodes"][0]["bytes_out"]) == ("gw", 1.0, 7)


def test_node_certificate_cannot_report(service, pki):
    """A node's certificate (valid, of this CA) gets 403 naming why, and nothing is stored.
    (Mutation: dropping the kind check in accept_report stores the node's report: 204.)"""
    reply = _post(service, pki, pki.node, json.dumps(REPORT).encode())
    assert reply.status == 403 and "only a gateway reports" in reply.text, reply
    assert _stored(pki) == []


def test_revoked_gateway_cannot_report(service, pki):
    """A revoked gateway certificate gets 403 'revoked', and nothing is stored. (Mutation: dropping
    the revoked check stores it.)"""
    pki.ca.revoke("gw", reason="key-compromise")
    reply = _post(service, pki, pki.gateway, json.dumps(REPORT).encode())
    assert reply.status == 403 and "revoked" in reply.text, reply
    assert _stored(pki) == []


def test_request_without_certificate_is_refused(service, pki):
    """No client certificate: 401, nothing stored."""
    reply = curl(service.url + PATH, cacert=pki.home / "ca.pem", data=json.dumps(REPORT).encode(), content_type="application/json")
    assert reply.status == 401, reply
    assert _stored(pki) == []


@pytest.mark.parametrize("body, status, said", [
    (b"{not json", 400, "not a gateway report"),
    (json.dumps({**REPORT, "nodes": [{**REPORT["nodes"][0], "peer": "x\ny"}]}).encode(), 400, "nodes.0.peer"),
    (json.dumps({**REPORT, "extra": 1}).encode(), 400, "extra"),
    (json.dumps({**REPORT, "nodes": [{**REPORT["nodes"][0], "bytes_in": -1}]}).encode(), 400, "bytes_in"),
    (b" " * (16 * 1024 + 1), 413, "gateway report is at most"),
])
def test_malformed_or_oversized_report_is_refused_and_changes_nothing(service, pki, body, status, said):
    """A report that is not JSON, carries a control character, an unknown field or a negative count
    gets 400 naming the field; one over 16 KiB gets 413; the stored report stays the previous one."""
    assert _post(service, pki, pki.gateway, json.dumps(REPORT).encode()).status == 204
    before = _stored(pki)
    reply = _post(service, pki, pki.gateway, body)
    assert reply.status == status and said in reply.text, reply
    assert _stored(pki) == before


def test_the_address_an_est_issuance_went_to_is_the_last_renewal_peer(service, pki, tmp_path):
    """A node enrolled over EST (curl, token) shows the address its request came from as its last
    renewal address; TW, enrolled on the CA host, shows none. (Mutation: ESTService._note_peer
    doing nothing leaves it None.)"""
    token = run_pkictl(pki.home, "enroll-node", "n9", "--token").stdout.splitlines()[1].strip()
    csr, _ = make_csr(tmp_path, subject="/CN=n9")
    reply = curl(f"{service.url}/.well-known/est/simpleenroll", "-u", f"n9:{token}", cacert=pki.home / "ca.pem", data=est_body(csr),
                 content_type="application/pkcs10")
    assert reply.status == 200, reply
    rows = {r.name: r for r in fleet_view(pki.ca, now=dt.datetime.now(dt.timezone.utc), disconnected_after=dt.timedelta(minutes=10))}
    assert rows["n9"].last_renewal_peer == "127.0.0.1"
    assert rows["TW"].last_renewal_peer is None
