"""What the agent, its metrics and its report to the CA read of the listener: one in-process
listener or the worker processes' sum alike (docs/design.md, "Listener workers")."""

from __future__ import annotations

from typing import Callable, Protocol

from .authz import Authorizer
from ..config import ListenerConfig
from .connection import ListenerStats
from .nodetable import NodeTable
from .tls import ServerTLS

__all__ = ["ListenerView"]


class ListenerView(Protocol):
    """A started listener as the rest of the agent sees it (:class:`pki_agent.listener.server.GatewayListener`,
    :class:`pki_agent.listener.worker_pool.WorkerPool`).

    Attributes:
        config: its settings.
        authorizer: the allow list (the metrics' ``node`` labels).
        table: the per-node connection table, of every worker.
        stats: accepted and refused connections and forwarded bytes, of every worker.
        on_change: called after each event that changed :attr:`table` (the fleet report).
    """

    config: ListenerConfig
    authorizer: Authorizer
    on_change: Callable[[], None] | None

    @property
    def table(self) -> NodeTable: ...

    @property
    def stats(self) -> ListenerStats: ...

    @property
    def addresses(self) -> list[tuple[str, int]]: ...

    @property
    def active_connections(self) -> int: ...

    @property
    def workers_serving(self) -> int:
        """Processes accepting connections now (the agent's own, for ``workers: 1``)."""
        ...

    @property
    def worker_restarts(self) -> int:
        """Worker processes started again after one stopped (0 for ``workers: 1``)."""
        ...

    def bytes_forwarded(self) -> tuple[int, int]: ...

    def connection_table(self) -> list[dict]: ...

    def reloaded(self, tls: ServerTLS) -> None: ...

    async def start(self) -> None: ...

    async def close(self, timeout: float = 10.0) -> None: ...
