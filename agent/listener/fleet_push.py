"""The gateway's connection table, reported to the CA: at every change (debounced) and as a
heartbeat, over EST's mTLS with the gateway's own certificate, or straight into the CA home's
inventory for a gateway that renews from it (docs/design.md, "Fleet view")."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Callable, Protocol

from pkictl.errors import PKIError


from pkictl.clock import Clock
from pkictl.store import Credential

from ..config import AgentConfig

if TYPE_CHECKING:
    from .server import GatewayListener
    from ..rotation.rotate import RenewalSource

__all__ = ["FleetReporter", "ReporterHost", "DEBOUNCE"]

log = logging.getLogger("pki_agent")

DEBOUNCE = 0.2  # seconds a change waits for the ones that follow it before the report goes out


class ReporterHost(Protocol):
    """What the reporter reads of the gateway's agent (:class:`pki_agent.daemon.Agent`)."""

    config: AgentConfig
    clock: Clock
    credential: Credential | None
    source: RenewalSource | None


class FleetReporter:
    """Sends ``listener``'s table whenever it changed (within :data:`DEBOUNCE` s) and every
    ``listener.report_interval`` seconds, one report at a time.

    Args:
        agent: the gateway's agent (its name, clock, credential and renewal source).
        listener: the started listener whose table is reported.
    """

    def __init__(self, agent: ReporterHost, listener: "GatewayListener") -> None:
        self.agent, self.listener = agent, listener
        assert listener.config is not None
        self.interval = listener.config.report_interval.total_seconds()
        self._send: Callable[[bytes], None] | None = self._sender()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self._closed = False

    def _sender(self) -> Callable[[bytes], None] | None:
        source = self.agent.source
        return source.gateway_report if source is not None else None

    def start(self) -> None:
        """Start reporting (on the agent's loop); nothing when the agent has no renewal source."""
        if self._send is None:
            log.warning("no renewal source (renewal.ca_url or renewal.ca_home): the connection table is not reported to the CA")
            return
        self.listener.on_change = self.changed
        self._task = asyncio.get_running_loop().create_task(self._run())

    def changed(self) -> None:
        """The table changed: report it within :data:`DEBOUNCE` seconds."""
        self._wake.set()

    def body(self) -> bytes:
        """The report of the table now (:class:`pkictl.fleet_report.GatewayReport`, JSON)."""
        return json.dumps({"version": 1, "interval": self.interval, "generated_at": self.agent.clock.now().isoformat(),
                           "nodes": self.listener.connection_table()}, separators=(",", ":")).encode()

    async def _run(self) -> None:
        assert self._send is not None
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
                await asyncio.sleep(DEBOUNCE)  # the changes of a burst go out together
            except asyncio.TimeoutError:
                pass  # the heartbeat
            if self._closed:  # wait_for can lose a cancellation that meets its wake-up (Python 3.11)
                return
            self._wake.clear()
            try:
                await asyncio.to_thread(self._send, self.body())
            except (PKIError, OSError) as exc:
                if not self._failing:
                    log.warning("cannot report the connection table to the CA (%s); trying again every %g s", exc, self.interval)
                self._failing = True
                continue
            if self._failing:
                log.info("reporting the connection table to the CA works again")
                self._failing = False

    async def close(self) -> None:
        """Stop reporting."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
