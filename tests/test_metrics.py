"""The agent's /healthz and Prometheus /metrics endpoint, scraped over real HTTP on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pkictl.clock import FixedClock
from pkictl.revocation import load_crls
from pkictl.store import CredentialStore

from support import DEADLINE, TLSClient, bundle_context, client_context, refusal_record, refused, wait_until


def _get(running, path: str) -> tuple[int, bytes]:
    host, port = running.agent.status_server.addresses[0]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=DEADLINE) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(running) -> dict[tuple, float]:
    """``{(sample name, ((label, value), ...) without name/kind): value}`` from one scrape."""
    status, body = _get(running, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            assert (sample.labels["name"], sample.labels["kind"]) == ("gw", "gateway")
            rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("name", "kind")))
            out[(sample.name, rest)] = sample.value
    return out


def test_metrics_report_certificate_times_connections_and_bytes(pki, start_gateway_agent, caplog):
    """/metrics gives the served certificate's notAfter and planned renewal, one accepted and one
    refused connection by reason, the bytes forwarded each way, and a renewal once it happened."""
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"})
    cert = CredentialStore(pki.gateway).load().certificate
    before = _samples(running)
    assert before[("pki_agent_certificate_expiration_timestamp_seconds", ())] == cert.not_valid_after_utc.timestamp()
    assert before[("pki_agent_certificate_renewal_timestamp_seconds", ())] == running.agent.next_attempt.timestamp()
    assert before[("pki_agent_listener_connections_accepted_total", ())] == 0

    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"12345") == b"12345"
    client.close()
    refused(running.port, client_context(pki.node / "ca.pem"))
    refusal_record(caplog, "no client certificate")
    wait_until(lambda: running.call(lambda: running.agent.listener.active_connections) == 0)
    after = _samples(running)
    assert after[("pki_agent_listener_connections_accepted_total", ())] == 1
    assert after[("pki_agent_listener_connections_refused_total", (("reason", "no client certificate"),))] == 1
    assert after[("pki_agent_listener_forwarded_bytes_total", (("direction", "to_upstream"),))] == 5
    assert after[("pki_agent_listener_forwarded_bytes_total", (("direction", "to_node"),))] == 5
    assert after[("pki_agent_renewals_total", ())] == 0

    assert running.call(running.agent.renew()) is True
    renewed = _samples(running)
    new = CredentialStore(pki.gateway).load().certificate
    assert renewed[("pki_agent_renewals_total", ())] == 1 and renewed[("pki_agent_renewal_failures_total", ())] == 0
    assert renewed[("pki_agent_certificate_expiration_timestamp_seconds", ())] == new.not_valid_after_utc.timestamp()


def test_healthz_is_ok_while_valid_and_503_with_the_reason_once_expired(pki, start_gateway_agent):
    """/healthz answers 200 while the certificate and CRL are valid; with the agent's clock past
    notAfter it answers 503 and names the expired certificate and the overdue CRL."""
    cert = CredentialStore(pki.gateway).load().certificate
    clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"}, clock=clock)
    status, body = _get(running, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    clock.set(cert.not_valid_after_utc)
    status, body = _get(running, "/healthz")
    answer = json.loads(body)
    assert status == 503 and answer["status"] == "failing"
    assert any("expired" in p for p in answer["problems"]) and any("CRL" in p for p in answer["problems"])
    assert _get(running, "/nothing")[0] == 404


def test_an_expired_crl_is_an_error_when_loaded_and_in_healthz(pki, start_gateway_agent, caplog):
    """A crl.pem past its nextUpdate (the agent's clock one second after it, the certificate still
    valid) is logged at ERROR when loaded, saying every node is refused, and /healthz is 503
    naming the CRL; at a time before nextUpdate the load is an INFO line (control)."""
    next_update = min(c.next_update_utc for c in load_crls(pki.ca.crl_path))
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"}, clock=FixedClock(next_update + dt.timedelta(seconds=1)))
    record = next(r for r in caplog.records if "CRL loaded" in r.getMessage())
    assert record.levelname == "ERROR" and "EXPIRED" in record.getMessage() and "every node is refused" in record.getMessage()
    status, body = _get(running, "/healthz")
    assert status == 503 and any("CRL past its nextUpdate" in p for p in json.loads(body)["problems"])
    running.stop()
    caplog.clear()
    start_gateway_agent(clock=FixedClock(next_update - dt.timedelta(seconds=1)))
    record = next(r for r in caplog.records if "CRL loaded" in r.getMessage())
    assert record.levelname == "INFO"


def test_metrics_report_not_before_crl_next_update_reloads_and_open_connections(pki, start_gateway_agent):
    """/metrics gives the served certificate's notBefore, the loaded CRL's nextUpdate, the reloads
    that succeeded and failed (a damaged crl.pem is one failure), and the connections open now
    (one while a node is connected, none after).

    Mutations: each of ``certificate_not_before_timestamp_seconds`` (notAfter instead),
    ``crl_next_update_timestamp_seconds`` (left out), ``reloads``/``reload_failures`` (the
    counters swapped) and ``listener_connections_open`` (``stats.accepted`` instead) fails it."""
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"})
    cert = CredentialStore(pki.gateway).load().certificate
    next_update = min(c.next_update_utc for c in load_crls(pki.ca.crl_path))
    first = _samples(running)
    assert first[("pki_agent_certificate_not_before_timestamp_seconds", ())] == cert.not_valid_before_utc.timestamp()
    assert first[("pki_agent_crl_next_update_timestamp_seconds", ())] == next_update.timestamp()
    assert (first[("pki_agent_reloads_total", ())], first[("pki_agent_reload_failures_total", ())]) == (1, 0)  # the first load
    assert first[("pki_agent_listener_connections_open", ())] == 0

    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"open") == b"open"
    assert _samples(running)[("pki_agent_listener_connections_open", ())] == 1
    client.close()
    wait_until(lambda: _samples(running)[("pki_agent_listener_connections_open", ())] == 0, what="the connection counted as closed")

    assert running.call(running.agent.reload) is True
    pki.ca.crl_path.write_text("not a CRL\n")
    assert running.call(running.agent.reload) is False
    counts = _samples(running)
    assert (counts[("pki_agent_reloads_total", ())], counts[("pki_agent_reload_failures_total", ())]) == (2, 1)


def test_healthz_names_a_certificate_not_yet_valid_one_second_before_its_not_before(pki, start_gateway_agent):
    """With the agent's clock one second before the certificate's notBefore /healthz is 503 saying
    it is not valid before that time; at notBefore itself it is 200 again (the boundary).

    Mutation: ``health`` without its notBefore check (``elif now < cert.not_valid_before_utc``)
    answers 200 before notBefore and fails this test."""
    cert = CredentialStore(pki.gateway).load().certificate
    clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"}, clock=clock)
    clock.set(cert.not_valid_before_utc - dt.timedelta(seconds=1))
    status, body = _get(running, "/healthz")
    answer = json.loads(body)
    assert status == 503 and answer["status"] == "failing", answer
    assert answer["problems"] == [f"certificate serial {cert.serial_number:x} is not valid before {cert.not_valid_before_utc.isoformat()}"]
    clock.set(cert.not_valid_before_utc)
    assert _get(running, "/healthz")[0] == 200


def test_healthz_names_a_listener_that_stopped_accepting(pki, start_gateway_agent):
    """Once the listener's sockets are closed (nodes get 'connection refused') /healthz is 503
    saying the listener is not accepting connections; before, 200 (control).

    Mutation: ``health`` without its listener check answers 200 and fails this test."""
    running = start_gateway_agent(metrics={"listen": "127.0.0.1:0"})
    port = running.port
    assert _get(running, "/healthz")[0] == 200
    running.call(running.agent.listener._close_sockets)  # what a listener that lost its sockets looks like
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
    status, body = _get(running, "/healthz")
    assert (status, json.loads(body)) == (503, {"status": "failing", "problems": ["the listener is not accepting connections"]})
