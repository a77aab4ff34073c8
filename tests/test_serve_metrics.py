"""pkictl serve's /healthz and Prometheus /metrics (--metrics-listen), scraped over real HTTP from
the installed command: issued and refused by reason, pending requests, the CRLs' age, the
signing workers, latency; and /healthz naming what is wrong."""

from __future__ import annotations

import datetime as dt
import json
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pkictl.clock import FixedClock
from pkictl.revocation import load_crls

from est_support import EST, RunningService, ServeProcess, curl, est_body, make_csr, pkictl
from support import DEADLINE


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(base: str) -> dict[tuple, float]:
    status, body = _get(base + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_metrics_count_what_the_service_did(pki, tmp_path):
    """After one enrollment with a token, one with a wrong token, one waiting for approval and
    one client that is not TLS at all, /metrics says 1 issued (simple_enroll), 1 refused 'bad
    token', 1 refused in the handshake, 1 pending request, the CRL's age, 1 of 1 signing
    workers, and latency observations for simpleenroll; /healthz is 200."""
    service = ServeProcess(pki.home, "--workers", "1", "--metrics-listen", "127.0.0.1:0")
    try:
        base = service.log.wait_for(r"metrics and health on (http://127\.0\.0\.1:\d+)/metrics").group(1)
        before = _samples(base)
        assert before[("pkictl_serve_signing_workers", ())] == 1 == before[("pkictl_serve_signing_workers_wanted", ())]
        assert before[("pkictl_serve_pending_requests", ())] == 0
        token = pkictl(pki.home, "enroll-node", "n2", "--token").stdout.splitlines()[1].strip()
        csr, _ = make_csr(tmp_path, subject="/CN=n2")
        url = service.url + EST + "/simpleenroll"
        assert curl(url, "-u", f"n2:{token}", cacert=pki.home / "ca.pem", data=est_body(csr), content_type="application/pkcs10").status == 200
        other, _ = make_csr(tmp_path / "n3", subject="/CN=n3")
        assert curl(url, "-u", "n3:wrong", cacert=pki.home / "ca.pem", data=est_body(other), content_type="application/pkcs10").status == 401
        waiting, _ = make_csr(tmp_path / "n4", subject="/CN=n4")
        assert curl(url, cacert=pki.home / "ca.pem", data=est_body(waiting), content_type="application/pkcs10").status == 202
        with socket.create_connection(("127.0.0.1", service.port), timeout=DEADLINE) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            plain.recv(100)
        service.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='not TLS'")
        after = _samples(base)
        assert after[("pkictl_serve_certificates_issued_total", (("operation", "simple_enroll"),))] == 1
        assert after[("pkictl_serve_requests_refused_total", (("reason", "bad token"),))] == 1
        assert after[("pkictl_serve_requests_refused_total", (("reason", "not TLS"),))] == 1
        assert after[("pkictl_serve_pending_requests", ())] == 1
        assert after[("pkictl_serve_request_duration_seconds_count", (("endpoint", "simpleenroll"),))] == 3
        ages = [v for (name, _), v in after.items() if name == "pkictl_serve_crl_age_seconds"]
        assert ages and all(0 <= age < 3600 for age in ages)
        status, body = _get(base + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        assert service.stop() == 0


def test_healthz_names_an_overdue_crl(pki):
    """With the service's clock one second past the CRL's nextUpdate (no maintenance run since),
    /healthz is 503 naming the CRL and the command that re-signs it; before, 200 (control)."""
    next_update = min(c.next_update_utc for c in load_crls(pki.ca.crl_path))
    clock = FixedClock(next_update - dt.timedelta(seconds=1))
    running = RunningService(pki.home, clock=clock, metrics_listen=("127.0.0.1", 0), check_interval=3600).start()
    try:
        assert running.service is not None and running.service.status_server is not None
        host, port = running.service.status_server.addresses[0]
        assert _get(f"http://{host}:{port}/healthz")[0] == 200
        # the service re-signed the CRL as it started (it was past half its validity): its new one is the one to pass
        next_update = min(c.next_update_utc for c in load_crls(pki.ca.crl_path))
        clock.set(next_update + dt.timedelta(seconds=1))
        status, body = _get(f"http://{host}:{port}/healthz")
        answer = json.loads(body)
        assert status == 503 and any("past its nextUpdate" in p and "pkictl sign-crl" in p for p in answer["problems"]), answer
    finally:
        running.stop()
