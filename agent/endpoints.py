"""The network endpoints an agent serves (gateway listener, node tunnel, health and metrics):
started in order, and all closed again when one of them cannot start."""

from __future__ import annotations

import logging
import ssl
from typing import Protocol

from .errors import AgentError
from .listener.fleet_push import FleetReporter, ReporterHost
from .listener.server import GatewayListener
from .metrics import MetricsHost, StatusServer
from .listener.tls import ServerTLS
from .tunnel import NodeTunnel
from .rotation.upkeep import ESTUpkeep

__all__ = ["EndpointsHost", "start_endpoints", "close_endpoints", "describe_endpoints"]

log = logging.getLogger("pki_agent")


class EndpointsHost(MetricsHost, ReporterHost, Protocol):
    """The agent whose endpoints these are (:class:`pki_agent.daemon.Agent`): what they are
    built from, and where the started ones are kept."""

    upkeep: ESTUpkeep | None
    tunnel: NodeTunnel | None
    status_server: StatusServer | None
    fleet_reporter: FleetReporter | None

    def current_tls(self) -> ServerTLS: ...

    def current_client_tls(self) -> tuple[ssl.SSLContext, int]: ...


async def start_endpoints(agent: EndpointsHost) -> None:
    """Start what ``agent.config`` asks for and set ``agent.listener``, ``agent.tunnel`` and
    ``agent.status_server``.

    Raises:
        AgentError: an endpoint cannot bind its address; those started before it are closed.
    """
    config = agent.config
    wanted: list[tuple[str, tuple[str, int], GatewayListener | NodeTunnel | StatusServer]] = []
    if config.listener is not None:
        wanted.append(("listener", config.listener.listen, GatewayListener(config.listener, agent.current_tls, config.trust_domain, agent.clock)))
    if config.tunnel is not None:
        wanted.append(("tunnel", config.tunnel.listen, NodeTunnel(config.tunnel, agent.current_client_tls,
                                                                        agent.upkeep.note_gateway_refusal if agent.upkeep else None)))
    if config.metrics is not None:
        wanted.append(("status_server", config.metrics.listen, StatusServer(agent, config.metrics.listen)))
    names = {"listener": "listener", "tunnel": "tunnel", "status_server": "metrics"}
    for attribute, (host, port), endpoint in wanted:
        try:
            await endpoint.start()
        except OSError as exc:
            await close_endpoints(agent)
            raise AgentError(f"{names[attribute]}: cannot listen on {host}:{port}: {exc}") from None
        setattr(agent, attribute, endpoint)
    if agent.listener is not None:
        agent.fleet_reporter = FleetReporter(agent, agent.listener)
        agent.fleet_reporter.start()
    if agent.status_server is not None:
        log.info("metrics and health on %s", ", ".join(f"http://{h}:{p}/metrics" for h, p in agent.status_server.addresses))


async def close_endpoints(agent: EndpointsHost) -> None:
    """Close every endpoint :func:`start_endpoints` started (open connections end)."""
    if agent.fleet_reporter is not None:
        await agent.fleet_reporter.close()
    for attribute in ("listener", "tunnel", "status_server"):
        endpoint = getattr(agent, attribute)
        if endpoint is not None:
            await endpoint.close()


def describe_endpoints(agent: EndpointsHost) -> str:
    """What the ready line says: ``listening on HOST:PORT`` or ``no listener``, and the tunnel."""
    where = ", ".join(f"{h}:{p}" for h, p in agent.listener.addresses) if agent.listener else "no listener"
    if agent.tunnel is not None:
        where += ", tunnel " + ", ".join(f"{h}:{p}" for h, p in agent.tunnel.addresses) + f" -> {agent.tunnel.gateway}"
    return f"listening on {where}" if agent.listener else where
