"""Connection admission for the endpoints that accept connections themselves (the EST service's
TLS front, the gateway listener): a cap in total and per peer address, and a share of the total
that only clients who proved a certificate may hold.

A flood from one address fills at most ``per_peer`` slots. Connections that have not proved a
certificate yet (handshaking, idle, sending headers slowly, or enrolling with a token) share
``total - reserved`` slots; when those are full, a new connection takes the slot of the oldest
unproved connection of the address holding the most of them, so that a flood from many
addresses delays a real client by one handshake at worst instead of locking it out. The
``reserved`` slots stay for clients with a valid certificate (docs/design.md, "Connection
admission").
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Hashable

__all__ = ["AdmissionLimits", "Admission", "Decision", "peer_host"]


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """How many connections an endpoint holds.

    Attributes:
        total: connections open at once, every kind.
        per_peer: connections open at once from one peer address.
        reserved: of ``total``, the slots only clients that proved a certificate may hold.

    Raises:
        ValueError: ``total`` < 1, ``per_peer`` not in 1..total, or ``reserved`` not in 0..total-1.
    """

    total: int = 1024
    per_peer: int = 256
    reserved: int = 256

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"total connections: got {self.total}, want at least 1")
        if not 1 <= self.per_peer <= self.total:
            raise ValueError(f"connections per peer: got {self.per_peer}, want 1 to {self.total} (the total)")
        if not 0 <= self.reserved < self.total:
            raise ValueError(f"reserved connections: got {self.reserved}, want 0 to {self.total - 1} (fewer than the total)")


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer to one new connection.

    Attributes:
        admitted: whether it may go on.
        reason, detail: why not (a refusal line's reason and detail), or "" when admitted.
        evict: the ticket of an unproved connection to close now to make room, or None.
    """

    admitted: bool
    reason: str = ""
    detail: str = ""
    evict: Hashable | None = None


def peer_host(peer: str) -> str:
    """The address part of ``host:port`` or ``[v6]:port`` (what the per-peer cap counts)."""
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class Admission:
    """The connections of one endpoint, by peer address and by whether they proved a certificate.

    Each connection is a ``ticket`` (any hashable the endpoint picks, such as its connection
    object): :meth:`admit` when accepted, :meth:`proved` once its certificate is verified and
    authorized, :meth:`release` when it ends (whatever happened before).
    """

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._host: dict[Hashable, str] = {}
        self._per_peer: dict[str, int] = {}
        self._unproved: dict[str, OrderedDict[Hashable, None]] = {}  # by peer address, oldest first
        self._unproved_count = 0

    @property
    def open(self) -> int:
        """Connections admitted and not released."""
        return len(self._host)

    @property
    def unproved(self) -> int:
        """Of :attr:`open`, those that have not proved a certificate."""
        return self._unproved_count

    def admit(self, ticket: Hashable, peer: str) -> Decision:
        """Count a new connection from ``peer`` (``host:port``) unless a cap refuses it.

        Returns:
            The decision; when it names a ticket to ``evict``, that connection no longer counts
            and the caller closes it.
        """
        limits, host = self.limits, peer_host(peer)
        crowded = self._unproved_count >= limits.total - limits.reserved
        if self.open >= limits.total and not crowded:  # full of clients with a certificate
            return Decision(False, "connection limit", f"{limits.total} connections open")
        if self._per_peer.get(host, 0) >= limits.per_peer:
            return Decision(False, "peer connection limit", f"{limits.per_peer} connections open from {host}")
        evict = None
        if crowded:
            # Full of connections without a certificate: the oldest of the address with most gives way.
            busiest = max(self._unproved, key=lambda h: len(self._unproved[h]))
            evict = next(iter(self._unproved[busiest]))
            self.release(evict)
        self._host[ticket] = host
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        self._unproved.setdefault(host, OrderedDict())[ticket] = None
        self._unproved_count += 1
        return Decision(True, evict=evict)

    def proved(self, ticket: Hashable) -> None:
        """``ticket`` proved a certificate: it may hold a reserved slot and is never evicted."""
        host = self._host.get(ticket)
        if host is not None:
            self._drop_unproved(ticket, host)

    def release(self, ticket: Hashable) -> None:
        """``ticket`` ended (or was evicted); unknown and already released tickets are ignored."""
        host = self._host.pop(ticket, None)
        if host is None:
            return
        self._drop_unproved(ticket, host)
        left = self._per_peer[host] - 1
        if left:
            self._per_peer[host] = left
        else:
            del self._per_peer[host]

    def _drop_unproved(self, ticket: Hashable, host: str) -> None:
        waiting = self._unproved.get(host)
        if waiting is None or ticket not in waiting:
            return
        del waiting[ticket]
        if not waiting:
            del self._unproved[host]
        self._unproved_count -= 1
