"""Enrollment requests that wait for approval are bounded: per node name and in total (429,
nothing recorded), they expire after pending_request_ttl (dropped and audited), and 'pkictl
requests' shows who filed each one: address, time, code."""

from __future__ import annotations

import datetime as dt
import json

from cryptography import x509

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.errors import PendingApproval, RequestLimitError

import pytest

from est_support import EST, ServeProcess, curl, est_body, make_csr, pkictl

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


def _ask(service: ServeProcess, pki, directory, name: str):
    csr, _ = make_csr(directory, subject=f"/CN={name}")
    return curl(service.url + EST + "/simpleenroll", cacert=pki.home / "ca.pem", data=est_body(csr), content_type="application/pkcs10")


def test_requests_per_name_and_in_all_are_capped_and_listed_with_who_filed_them(pki, tmp_path):
    """Against the installed pkictl serve (pending_requests_total 5): five new keys asking as n9
    get three 202 and two 429 saying three wait already and how to clear them; two more names
    fill the total and the next request is a 429 saying so; 'pkictl requests' lists the five
    with address, filing time and code, and the audit log has a refusal for each 429."""
    with (pki.home / "ca.yaml").open("a") as settings:
        settings.write("pending_requests_total: 5\n")
    service = ServeProcess(pki.home, "--workers", "0", "--rate", "1000", "--burst", "1000")
    try:
        answers = [_ask(service, pki, tmp_path / f"n9-{i}", "n9") for i in range(5)]
        assert [a.status for a in answers] == [202, 202, 202, 429, 429]
        assert "3 requests for n9 wait for approval already (at most 3)" in answers[3].text
        assert "pkictl deny n9" in answers[3].text
        assert [_ask(service, pki, tmp_path / f"m{i}", f"m{i}").status for i in range(2)] == [202, 202]
        full = _ask(service, pki, tmp_path / "late", "late")
        assert full.status == 429 and "5 requests wait for approval already" in full.text
        service.log.wait_for(r"status=429 reason='too many pending requests'")
    finally:
        service.stop()
    listing = pkictl(pki.home, "requests").stdout
    rows = [line for line in listing.splitlines() if line.startswith(("n9 ", "m0 ", "m1 "))]
    assert len(rows) == 5 and all("127.0.0.1" in row and f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}" in row for row in rows)
    assert "5 waiting (at most 3 per name and 5 in all; each expires after 1d)" in listing
    refused = [json.loads(line) for line in (pki.home / "audit.log").read_text().splitlines()]
    assert sum(r["event"] == "refused" and r.get("error") == "RequestLimitError" for r in refused) == 3


def test_a_request_expires_after_the_ttl_and_is_audited(tmp_path):
    """With an injected clock: a request one second short of pending_request_ttl (a day) still
    waits and still counts; one second past it, the next request drops it, the audit log says
    approval-request-expired with its code and address, and it is no longer listed."""
    clock = FixedClock(NOW)
    ca = CertificateAuthority.init(tmp_path / "ca", clock=clock)
    try:
        def ask(name: str, peer: str) -> str:
            csr, _ = make_csr(tmp_path / name / str(clock.now().timestamp()), subject=f"/CN={name}")
            with pytest.raises(PendingApproval) as waiting:
                ca.simple_enroll(x509.load_der_x509_csr(csr.read_bytes()), name=None, token=None, peer=peer)
            return waiting.value.code

        codes = [ask("n9", f"192.0.2.{i}:5000") for i in range(3)]
        clock.set(NOW + dt.timedelta(days=1, seconds=-1))
        csr, _ = make_csr(tmp_path / "fourth", subject="/CN=n9")
        with pytest.raises(RequestLimitError):
            ca.simple_enroll(x509.load_der_x509_csr(csr.read_bytes()), name=None, token=None, peer="192.0.2.9:5000")
        assert len(ca.inventory.pending_requests(now=clock.now(), ttl=ca.settings.pending_request_ttl)) == 3
        clock.set(NOW + dt.timedelta(days=1, seconds=1))
        assert ca.inventory.pending_requests(now=clock.now(), ttl=ca.settings.pending_request_ttl) == []
        fresh = ask("n9", "192.0.2.20:5000")
        assert [r["code"] for r in ca.inventory.pending_requests()] == [fresh]
        records = [json.loads(line) for line in (tmp_path / "ca" / "audit.log").read_text().splitlines()]
        expired = [r for r in records if r["event"] == "approval-request-expired"]
        assert sorted(r["code"] for r in expired) == sorted(codes) and {r["peer"] for r in expired} == {f"192.0.2.{i}:5000" for i in range(3)}
    finally:
        ca.close()


@pytest.mark.parametrize("settings, message", [
    ({"pending_requests_per_name": 0}, "want a whole number of at least 1"),
    ({"pending_requests_per_name": "many"}, "want a whole number"),
    ({"pending_requests_per_name": 7, "pending_requests_total": 5}, r"want at most pending_requests_total \(5\)"),
    ({"pending_request_ttl": "0s"}, "pending_request_ttl"),
])
def test_contradictory_request_limits_are_refused(settings, message):
    """A cap below 1, not a number, a per-name cap above the total, or a zero ttl is a SettingsError naming the field."""
    from pkictl.errors import SettingsError
    from pkictl.settings import CASettings

    with pytest.raises(SettingsError, match=message):
        CASettings.from_dict(settings)
