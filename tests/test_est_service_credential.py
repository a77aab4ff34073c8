"""The EST service's own certificate renews through the CA's renewal policy (simple_reenroll,
RFC 7030 4.2.2) like everyone's, and is issued afresh, with a WARNING, only when it cannot renew."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

from cryptography import x509

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.est.serve import ESTService

from est_support import ServeProcess, pkictl
from test_est_server import server_serial_openssl


def issued_records(home) -> list[dict]:
    lines = (home / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "issued" and r["name"] == "est"]


def test_a_due_service_certificate_renews_through_simple_reenroll(pki, caplog):
    """One second before its renewal time the service keeps its certificate; one second after, it
    renews through simple_reenroll (the audit record names its predecessor) without a WARNING;
    with other names it is issued afresh, with a WARNING naming the names."""
    caplog.set_level(logging.INFO, logger="pkictl.serve")
    clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    ca = CertificateAuthority.load(pki.home, clock=clock)
    try:
        service = ESTService(ca, listen=("127.0.0.1", 0))
        first = service.ensure_credential().certificate
        due = first.not_valid_before_utc + (first.not_valid_after_utc - first.not_valid_before_utc) * ca.settings.renewal_fraction
        clock.set(due - dt.timedelta(seconds=1))
        assert service.ensure_credential().certificate.serial_number == first.serial_number

        clock.set(due + dt.timedelta(seconds=1))
        second = service.ensure_credential().certificate
        assert second.serial_number != first.serial_number and second.subject == first.subject
        assert issued_records(pki.home)[-1]["lint"] == f"same profile as serial {first.serial_number:x}"  # simple_reenroll's predecessor
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

        moved = ESTService(ca, listen=("127.0.0.1", 0), ip_addresses=["127.0.0.2"])
        third = moved.ensure_credential().certificate
        sans = third.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warning) == 1 and f"serial {second.serial_number:x}" in warning[0] and "names" in warning[0], warning
    finally:
        ca.close()


def test_a_revoked_service_certificate_is_replaced_by_the_running_service(tmp_path):
    """After 'pkictl revoke' of its serial, a running 'pkictl serve' logs a WARNING that it is
    revoked and issues itself a new certificate, which a fresh openssl connection then sees;
    before the revocation its serial does not change (control)."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca")
    serve = ServeProcess(home, "--check-interval", "0.2", "--workers", "0")
    try:
        old = server_serial_openssl(serve.port, home / "ca.pem")
        assert server_serial_openssl(serve.port, home / "ca.pem") == old
        assert "unusable" not in serve.log.text()
        start = serve.log.mark()
        pkictl(home, "revoke", f"{old:x}", "--reason", "key-compromise")
        serve.log.wait_for(rf"WARNING pkictl\.serve: the service certificate \(serial {old:x}\) is unusable: it is revoked "
                           r"\(key-compromise\); issuing a new one", start=start)
        new = int(serve.log.wait_for(r"service certificate serial ([0-9a-f]+), not after \S+ \(issued\)", start=start).group(1), 16)
        assert new != old and server_serial_openssl(serve.port, home / "ca.pem") == new
        assert not re.search("Traceback", serve.log.text())
    finally:
        assert serve.stop() == 0
