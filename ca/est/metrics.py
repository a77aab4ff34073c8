"""pkictl serve's local HTTP endpoint: ``/healthz`` and Prometheus ``/metrics`` (prometheus_client).

Named like the agent's (``pki_agent_...``) under the ``pkictl_serve_`` prefix: what was issued
and refused (by reason, TLS handshakes included), request latency by endpoint, pending
enrollment requests, the CRLs' age and nextUpdate, the service certificate's notAfter, the
signing workers alive and wanted, and the connections open. Counters are bumped on the event
loop as requests end; the rest is read at scrape time.
"""

from __future__ import annotations

import logging
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..authority import CertificateAuthority
from .wire import EST_PREFIX
from .front import TLSFront
from .signers import SignerPool
from ..status_http import HealthMetricsServer
from ..store import Credential

__all__ = ["ServiceMetrics", "ServiceState", "service_health", "StatusServer"]

log = logging.getLogger("pkictl.serve")

# The endpoints a latency is kept for: a fixed set, so that a client cannot mint label values.
_ENDPOINTS = {f"{EST_PREFIX}/{name}": name for name in ("cacerts", "csrattrs", "simpleenroll", "simplereenroll")}
_ENDPOINTS.update({"/crl": "crl", "/crl.pem": "crl.pem"})
_ISSUING = {f"{EST_PREFIX}/simpleenroll": "simple_enroll", f"{EST_PREFIX}/simplereenroll": "simple_reenroll"}


class ServiceState(Protocol):
    """What the metrics read of the EST service (:class:`pkictl.est.serve.ESTService`)."""

    ca: CertificateAuthority
    credential: Credential | None
    signers: SignerPool | None

    @property
    def front(self) -> TLSFront | None: ...

    @property
    def metrics(self) -> "ServiceMetrics": ...


def _endpoint(path: str) -> str:
    return _ENDPOINTS.get(path, "other")


class ServiceMetrics:
    """The service's counters and its registry (one per service, never the global one)."""

    def __init__(self, service: ServiceState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.issued = Counter("pkictl_serve_certificates_issued", "Certificates issued over EST, by operation.",
                              ["operation"], registry=self.registry)
        self.refused = Counter("pkictl_serve_requests_refused", "Clients refused, by reason (EST requests and TLS handshakes).",
                               ["reason"], registry=self.registry)
        self.latency = Histogram("pkictl_serve_request_duration_seconds", "Time to answer an EST request, by endpoint.",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.registry.register(_StateCollector(service))

    def answered(self, path: str, status: int, reason: str | None, seconds: float) -> None:
        """Count one EST answer (the access log calls this for every request)."""
        self.latency.labels(_endpoint(path)).observe(seconds)
        if status >= 400:
            self.refused.labels(reason or "refused").inc()
        elif status == 200 and path in _ISSUING:
            self.issued.labels(_ISSUING[path]).inc()

    def refused_handshake(self, reason: str) -> None:
        """Count a client refused before HTTP (handshake, caps, timeouts)."""
        self.refused.labels(reason).inc()


class _StateCollector:
    """Gauges read from the service at scrape time."""

    def __init__(self, service: ServiceState) -> None:
        self.service = service

    def describe(self):
        return []  # read at scrape time only, not when registered (the service is still being built)

    def collect(self):
        service = self.service
        now = service.ca.clock.now()

        def gauge(name: str, doc: str, value: float | None, **labels: str):
            family = GaugeMetricFamily(f"pkictl_serve_{name}", doc, labels=list(labels))
            if value is not None:
                family.add_metric(list(labels.values()), value)
            return family

        yield gauge("pending_requests", "Enrollment requests waiting for pkictl approve.", len(service.ca.inventory.pending_requests()))
        crls = service.ca.inventory.crls()
        age = GaugeMetricFamily("pkictl_serve_crl_age_seconds", "Seconds since the CRL was signed, by issuer.", labels=["issuer"])
        due = GaugeMetricFamily("pkictl_serve_crl_next_update_timestamp_seconds", "The CRL's nextUpdate, Unix time, by issuer.",
                                labels=["issuer"])
        for _, issuer, _, this_update, next_update in crls:
            age.add_metric([issuer], (now - this_update).total_seconds())
            due.add_metric([issuer], next_update.timestamp())
        yield age
        yield due
        credential = service.credential
        yield gauge("certificate_expiration_timestamp_seconds", "The notAfter of the service's own certificate, Unix time.",
                    credential.certificate.not_valid_after_utc.timestamp() if credential else None)
        signers = service.signers
        yield gauge("signing_workers", "Signing worker processes alive.", signers.alive if signers else 0)
        yield gauge("signing_workers_wanted", "Signing worker processes configured (--workers).", signers.workers if signers else 0)
        front = service.front
        yield gauge("connections_open", "Connections open now, handshaking ones included.", front.admission.open if front else 0)


def service_health(service: ServiceState) -> list[str]:
    """What is wrong with the service now, as messages for the operator; empty when healthy.

    Unhealthy: not accepting connections, its own certificate expired or not yet valid, a CRL
    past its nextUpdate (gateways checking it refuse every node), or no signing worker alive
    while some are configured (every issuance gets 503).
    """
    now = service.ca.clock.now()
    problems = []
    front = service.front
    if front is None or not front.addresses:
        problems.append("the EST service is not accepting connections")
    credential = service.credential
    if credential is not None:
        cert = credential.certificate
        if now >= cert.not_valid_after_utc:
            problems.append(f"the service certificate serial {cert.serial_number:x} expired at {cert.not_valid_after_utc.isoformat()}")
        elif now < cert.not_valid_before_utc:
            problems.append(f"the service certificate serial {cert.serial_number:x} is not valid before {cert.not_valid_before_utc.isoformat()}")
    for _, issuer, _, _, next_update in service.ca.inventory.crls():
        if now >= next_update:
            problems.append(f"the CRL of {issuer} is past its nextUpdate {next_update.isoformat()}: run pkictl sign-crl")
    signers = service.signers
    if signers is not None and signers.alive == 0:
        problems.append(f"no signing worker alive of {signers.workers}: issuance answers 503 until one is back")
    return problems


class StatusServer(HealthMetricsServer):
    """The service's ``/healthz`` (:func:`service_health`) and ``/metrics`` (:class:`ServiceMetrics`).

    Args:
        service: whose state to report.
        listen: ``(host, port)``; port 0 picks a free port.
    """

    def __init__(self, service: ServiceState, listen: tuple[str, int]) -> None:
        super().__init__(listen, lambda: service_health(service), service.metrics.registry)
        self.service = service
