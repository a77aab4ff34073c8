"""The agent's local HTTP endpoint: ``/healthz`` and Prometheus ``/metrics`` (prometheus_client).

Values are read from the agent at scrape time (a custom collector), so the hot paths only bump
plain integers. Metric names follow cert-manager's (``certmanager_certificate_expiration_timestamp_seconds``)
under the ``pki_agent_`` prefix, so dashboards and alerts written for it carry over.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pkictl.clock import Clock
from pkictl.status_http import HealthMetricsServer
from pkictl.store import Credential

from .config import AgentConfig
from .listener.nodetable import OTHER
from .listener.tls import ServerTLS

if TYPE_CHECKING:
    from .listener.server import GatewayListener

__all__ = ["AgentCounters", "AgentCollector", "MetricsHost", "health", "node_label", "StatusServer"]

log = logging.getLogger("pki_agent")


@dataclasses.dataclass
class AgentCounters:
    """What the agent counts between scrapes (plain ints; the agent's loop is the only writer)."""

    renewals: int = 0
    renewal_failures: int = 0
    reloads: int = 0
    reload_failures: int = 0


class MetricsHost(Protocol):
    """What the endpoint reads of the agent it reports on (:class:`pki_agent.daemon.Agent`),
    at each scrape."""

    config: AgentConfig
    clock: Clock
    credential: Credential | None
    counters: AgentCounters
    _tls: ServerTLS | None  # the listener's context, its CRL and the CRL's next update
    listener: GatewayListener | None

    @property
    def next_attempt(self) -> dt.datetime | None: ...


class AgentCollector:
    """Turns one agent's state into Prometheus metric families at each scrape."""

    def __init__(self, agent: MetricsHost) -> None:
        self.agent = agent

    def collect(self):
        agent = self.agent
        labels = ["name", "kind"]
        values = [agent.config.name, agent.config.kind]

        def gauge(name: str, doc: str, value: float | None, extra: dict | None = None):
            family = GaugeMetricFamily(f"pki_agent_{name}", doc, labels=labels + list(extra or {}))
            if value is not None:
                family.add_metric(values + list((extra or {}).values()), value)
            return family

        def counter(name: str, doc: str, value: int):
            family = CounterMetricFamily(f"pki_agent_{name}", doc, labels=labels)
            family.add_metric(values, value)
            return family

        cert = agent.credential.certificate if agent.credential is not None else None
        yield gauge("certificate_expiration_timestamp_seconds", "The notAfter of the certificate in service, Unix time.",
                    cert.not_valid_after_utc.timestamp() if cert else None)
        yield gauge("certificate_not_before_timestamp_seconds", "The notBefore of the certificate in service, Unix time.",
                    cert.not_valid_before_utc.timestamp() if cert else None)
        yield gauge("certificate_renewal_timestamp_seconds", "When the next renewal attempt is due, Unix time.",
                    agent.next_attempt.timestamp() if agent.next_attempt else None)
        counters = agent.counters
        yield counter("renewals", "Renewals installed and taken into service.", counters.renewals)
        yield counter("renewal_failures", "Renewal attempts that failed (the current certificate stayed in service).",
                      counters.renewal_failures)
        yield counter("reloads", "Reloads of the credential, trust anchors and CRL from disk that succeeded.", counters.reloads)
        yield counter("reload_failures", "Reloads that failed and kept the previous state.", counters.reload_failures)
        tls = agent._tls
        if tls is not None and tls.crl_next_update is not None:
            yield gauge("crl_next_update_timestamp_seconds", "The earliest nextUpdate of the CRLs loaded, Unix time.",
                        tls.crl_next_update.timestamp())
        listener = agent.listener
        if listener is None:
            return
        stats = listener.stats
        yield counter("listener_connections_accepted", "Connections authorized and forwarded to the upstream.", stats.accepted)
        refused = CounterMetricFamily("pki_agent_listener_connections_refused", "Connections refused, by reason.",
                                      labels=labels + ["reason"])
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric(values + [reason], count)
        yield refused
        yield gauge("listener_connections_open", "Connections open now, handshaking ones included.", listener.active_connections)
        upstream, downstream = listener.bytes_forwarded()
        forwarded = CounterMetricFamily("pki_agent_listener_forwarded_bytes", "Bytes forwarded, by direction.",
                                        labels=labels + ["direction"])
        forwarded.add_metric(values + ["to_upstream"], upstream)
        forwarded.add_metric(values + ["to_node"], downstream)
        yield forwarded
        yield from _node_families(listener, labels, values)


def node_label(listener: "GatewayListener", name: str) -> str:
    """The ``node`` label of ``name``: itself when it is in the allow list (or, with ``['*']``,
    once it has connected: a certificate of this CA, an enrolled node), else ``other``. So
    the series are bounded by the enrolled nodes, whatever names or addresses refused clients use."""
    allow = listener.authorizer.allow
    if allow is not None:
        return name if name in allow else OTHER
    entry = listener.table.nodes.get(name)
    return name if entry is not None and entry.opened_total else OTHER


def _node_families(listener: "GatewayListener", labels: list[str], values: list[str]):
    """Per-node series: connected (0/1), connections opened, refusals by reason."""
    connected: dict[str, int] = {name: 0 for name in listener.authorizer.allow or ()}
    opened: dict[str, int] = dict(connected)
    refusals: dict[tuple[str, str], int] = {}
    for name, entry in listener.table.nodes.items():
        label = node_label(listener, name)
        connected[label] = max(connected.get(label, 0), 1 if entry.open else 0)
        opened[label] = opened.get(label, 0) + entry.opened_total
        for reason, count in entry.refusals.items():
            refusals[(label, reason)] = refusals.get((label, reason), 0) + count
    family = GaugeMetricFamily("pki_agent_listener_node_connected", "1 while the node has a connection open, else 0.",
                               labels=labels + ["node"])
    for name in sorted(connected):
        family.add_metric(values + [name], connected[name])
    yield family
    counter = CounterMetricFamily("pki_agent_listener_node_connections_opened", "Connections of the node authorized and forwarded.",
                                  labels=labels + ["node"])
    for name in sorted(opened):
        counter.add_metric(values + [name], opened[name])
    yield counter
    refused = CounterMetricFamily("pki_agent_listener_node_refusals", "Connections refused once the node's identity was known, by reason.",
                                  labels=labels + ["node", "reason"])
    for (name, reason), count in sorted(refusals.items()):
        refused.add_metric(values + [name, reason], count)
    yield refused


def health(agent: MetricsHost) -> list[str]:
    """What is wrong with the agent now, as messages for the operator; empty when healthy.

    Unhealthy: no credential loaded, the certificate is expired or not yet valid, the CRL is
    past its nextUpdate (every client would be refused), or the listener is not accepting.
    """
    now = agent.clock.now()
    if agent.credential is None:
        return ["no credential loaded"]
    cert = agent.credential.certificate
    problems = []
    if now >= cert.not_valid_after_utc:
        problems.append(f"certificate serial {cert.serial_number:x} expired at {cert.not_valid_after_utc.isoformat()}")
    elif now < cert.not_valid_before_utc:
        problems.append(f"certificate serial {cert.serial_number:x} is not valid before {cert.not_valid_before_utc.isoformat()}")
    tls = agent._tls
    if tls is not None and tls.crl_next_update is not None and now >= tls.crl_next_update:
        problems.append(f"CRL past its nextUpdate {tls.crl_next_update.isoformat()}: every client is refused")
    if agent.config.listener is not None and (agent.listener is None or not agent.listener.addresses):
        problems.append("the listener is not accepting connections")
    return problems


class StatusServer(HealthMetricsServer):
    """The agent's ``GET /healthz`` (:func:`health`) and ``GET /metrics`` (:class:`AgentCollector`).

    Args:
        agent: whose state to report.
        listen: ``(host, port)``; port 0 picks a free port (see :attr:`addresses`).
    """

    def __init__(self, agent: MetricsHost, listen: tuple[str, int]) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(AgentCollector(agent))
        super().__init__(listen, lambda: health(agent), registry,
                         json_routes={"/connections": lambda: agent.listener.connection_table() if agent.listener else []})
        self.agent = agent
