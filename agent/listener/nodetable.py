"""The gateway listener's per-node connection table, kept from one stream of connection events.

The listener does not update the table in place: each connection that opens, closes (with its
bytes) or is refused becomes a :class:`ConnectionEvent`, and :meth:`NodeTable.apply` is the one
function that changes the table. So the table can be fed from several listener processes alike
(docs/design.md, "Fleet view").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal

__all__ = ["ConnectionEvent", "NodeEntry", "NodeTable", "OTHER", "MAX_NODES"]

OTHER = "other"  # the metrics label of every identity that is not one series of its own
MAX_NODES = 10_000  # entries the table keeps at most; idle ones are forgotten first


@dataclasses.dataclass(frozen=True)
class ConnectionEvent:
    """One thing that happened to one connection of the listener.

    Attributes:
        kind: ``opened`` (authorized and forwarding), ``closed`` (an opened one ended) or
            ``refused``.
        connection: an id unique among the open connections of the stream (pairs a close with
            its open).
        node: the node identity (lower case), None for a refusal before one was known.
        peer: the client's ``host:port``.
        at: when it happened, aware UTC.
        bytes_in, bytes_out: of a close: bytes forwarded node to upstream and back.
        reason: of a refusal: the listener's reason (``revoked``, ``not allowed``...).
    """

    kind: Literal["opened", "closed", "refused"]
    connection: int
    node: str | None
    peer: str
    at: dt.datetime
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str | None = None


@dataclasses.dataclass
class NodeEntry:
    """What the table knows of one node; bytes count closed connections only (open ones are
    added by whoever reads the table, from the connections themselves)."""

    open: dict[int, tuple[dt.datetime, str]] = dataclasses.field(default_factory=dict)  # id -> (opened at, peer)
    latest_peer: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    last_seen: dt.datetime | None = None
    opened_total: int = 0
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)
    last_refusal_reason: str | None = None
    last_refusal_at: dt.datetime | None = None

    @property
    def connected_since(self) -> dt.datetime | None:
        """When the oldest open connection opened, or None."""
        return min((since for since, _ in self.open.values()), default=None)


class NodeTable:
    """Per node identity: open connections, since when, the latest peer, bytes, last seen, the
    last refusal; plus counters for the metrics. Refusals without an identity are counted by
    reason only."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeEntry] = {}
        self.anonymous_refusals: dict[str, int] = {}

    def apply(self, event: ConnectionEvent) -> None:
        """Change the table by one event (the only function that does)."""
        if event.node is None:
            if event.kind == "refused" and event.reason is not None:
                self.anonymous_refusals[event.reason] = self.anonymous_refusals.get(event.reason, 0) + 1
            return
        entry = self.nodes.get(event.node)
        if entry is None:
            self._make_room()
            entry = self.nodes[event.node] = NodeEntry()
        entry.last_seen = event.at if entry.last_seen is None else max(entry.last_seen, event.at)
        if event.kind == "opened":
            entry.open[event.connection] = (event.at, event.peer)
            entry.latest_peer = event.peer
            entry.opened_total += 1
        elif event.kind == "closed":
            entry.open.pop(event.connection, None)
            entry.bytes_in += event.bytes_in
            entry.bytes_out += event.bytes_out
        else:
            reason = event.reason or "refused"
            entry.refusals[reason] = entry.refusals.get(reason, 0) + 1
            entry.last_refusal_reason, entry.last_refusal_at = reason, event.at

    def _make_room(self) -> None:
        """Forget the idle entry seen longest ago once the table is full (identities come from
        certificates of our CA only, but a bound is a bound)."""
        if len(self.nodes) < MAX_NODES:
            return
        idle = [(e.last_seen or dt.datetime.min.replace(tzinfo=dt.timezone.utc), name) for name, e in self.nodes.items() if not e.open]
        if idle:
            del self.nodes[min(idle)[1]]

    def rows(self, now: dt.datetime, live: dict[str, tuple[int, int]] | None = None) -> list[dict]:
        """The table as JSON-ready rows, sorted by node.

        Args:
            now: the time of the snapshot (a connected node was last seen now).
            live: bytes ``(in, out)`` of each node's open connections so far.

        Returns:
            Dicts with ``node``, ``open_connections``, ``connected_since``, ``peer``,
            ``bytes_in``, ``bytes_out``, ``last_seen``, ``last_refusal_reason``,
            ``last_refusal_at`` (times ISO 8601 UTC or None).
        """
        live = live or {}
        out = []
        for name in sorted(self.nodes):
            entry = self.nodes[name]
            extra_in, extra_out = live.get(name, (0, 0))
            seen = now if entry.open else entry.last_seen
            out.append({
                "node": name, "open_connections": len(entry.open), "connected_since": _iso(entry.connected_since),
                "peer": max(entry.open.values())[1] if entry.open else entry.latest_peer,
                "bytes_in": entry.bytes_in + extra_in, "bytes_out": entry.bytes_out + extra_out,
                "last_seen": _iso(seen), "last_refusal_reason": entry.last_refusal_reason,
                "last_refusal_at": _iso(entry.last_refusal_at),
            })
        return out


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
