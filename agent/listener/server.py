"""The gateway's mTLS listener: binds ``listener.listen``, admits nodes over mTLS and forwards
each to ``listener.upstream``; counts, sweeps deadlines, closes revoked and all connections.

How one connection works, and why it is built that way, is in :mod:`pki_agent.listener.connection`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Callable, Literal

from cryptography.hazmat.primitives.serialization import Encoding

from pkictl.admission import Admission, AdmissionLimits
from pkictl.clock import Clock, SystemClock
from pkictl.logfmt import peer_name
from pkictl.sockets import accept_ready, bind_listening_sockets

from .authz import Authorizer, PeerIdentity
from ..config import ListenerConfig
from .connection import CHUNK, CONNECTING, SWEEP, Connection, ListenerStats
from .connlog import EventBatch, log_probe, log_refused
from .nodetable import ConnectionEvent, NodeTable
from .tls import ServerTLS

__all__ = ["GatewayListener", "ListenerStats"]

# Certificates whose node the listener remembers (a few MB at most): enough for every node of a
# large fleet through several renewals; the oldest are forgotten first.
_REMEMBERED_SERIALS = 65536

log = logging.getLogger("pki_agent.listener")


class GatewayListener:
    """Accept nodes over mTLS on ``config.listen`` and forward each to ``config.upstream``.

    Args:
        config: addresses, allow list and limits.
        current: returns the :class:`ServerTLS` (context + revoked set) for a new connection
            (the agent's hot-reload holder); called once per connection, before the handshake.
        trust_domain: the SPIFFE trust domain of node identities.
        clock: the time of connection events in :attr:`table`.
    """

    def __init__(self, config: ListenerConfig, current: Callable[[], ServerTLS], trust_domain: str, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.table = NodeTable()
        # Called after each event that changed the table (the gateway's report to the CA).
        self.on_change: Callable[[], None] | None = None
        # Called with every event (a worker process sends them to the agent: pki_agent.listener.worker_process).
        self.on_event: Callable[[ConnectionEvent], None] | None = None
        self._current = current
        self.trust_domain = trust_domain
        self.authorizer = Authorizer(trust_domain, config.allowed_names)
        self.stats = ListenerStats()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[socket.socket] = []
        self._connections: set[Connection] = set()
        # A quarter of the slots is kept for nodes that passed the checks (docs/design.md,
        # "Connection admission"): a flood of handshakes cannot take those.
        self.admission = Admission(AdmissionLimits(total=config.max_connections, per_peer=config.per_peer_limit,
                                                   reserved=config.max_connections // 4))
        self._nodes_by_serial: dict[tuple[bytes, int], str] = {}  # insertion order = age (remember)
        # The revocations (superseded ones left out) that close_revoked has acted on; those of
        # the CRL in service when the listener is made count as acted on.
        tls = current()
        self._revocations_seen: frozenset[tuple[bytes, int]] = tls.revoked - tls.superseded
        self._drained: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._upstream_addresses = _numeric_addresses(*config.upstream)  # None: a name, resolved per connection
        # Every read lands in one of these and is consumed before the loop runs anything else.
        self._received = memoryview(bytearray(CHUNK))  # TLS records from nodes
        self._view = memoryview(bytearray(CHUNK))  # plaintext: decrypted, or read from upstreams
        self.events: EventBatch | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        return [s.getsockname()[:2] for s in self._sockets]

    @property
    def active_connections(self) -> int:
        """Connections open now, handshaking ones included."""
        return len(self._connections)

    @property
    def workers_serving(self) -> int:
        """1 while this listener accepts (it is the agent's only one: ``workers: 1``), else 0."""
        return 1 if self._sockets else 0

    @property
    def worker_restarts(self) -> int:
        """Always 0: an in-process listener has no worker to restart."""
        return 0

    def note(self, kind: Literal["opened", "closed", "refused"], conn: Connection | None, node: str | None, peer: str, *, reason: str | None = None) -> None:
        """Turn what happened to a connection into a :class:`ConnectionEvent` and apply it to the table."""
        event = ConnectionEvent(kind, id(conn), node, peer, self.clock.now(), bytes_in=conn.bytes_in if conn and kind == "closed" else 0,
                                bytes_out=conn.bytes_out if conn and kind == "closed" else 0, reason=reason)
        self.table.apply(event)
        if self.on_event is not None:
            self.on_event(event)
        if self.on_change is not None and node is not None:
            self.on_change()

    def live_bytes(self) -> dict[str, tuple[int, int]]:
        """Bytes ``(in, out)`` forwarded so far by each node's open connections."""
        out: dict[str, tuple[int, int]] = {}
        for c in self._connections:
            if c.identity is not None and not c.logged:
                got = out.get(c.identity.name, (0, 0))
                out[c.identity.name] = (got[0] + c.bytes_in, got[1] + c.bytes_out)
        return out

    def connection_table(self) -> list[dict]:
        """The per-node table now (:meth:`pki_agent.listener.nodetable.NodeTable.rows`), open bytes included."""
        return self.table.rows(self.clock.now(), self.live_bytes())

    def bytes_forwarded(self) -> tuple[int, int]:
        """``(node to upstream, upstream to node)`` bytes so far, open connections included."""
        live = [c for c in self._connections if c.identity is not None and not c.logged]
        return (self.stats.closed_bytes_in + sum(c.bytes_in for c in live),
                self.stats.closed_bytes_out + sum(c.bytes_out for c in live))

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind ``config.listen`` (or take ``sockets``, bound and listening already) and start accepting.

        Args:
            sockets: non-blocking listening sockets to accept on instead (a worker's, inherited
                from the agent: :mod:`pki_agent.listener.worker_pool`).

        Raises:
            OSError: the address cannot be bound.
        """
        loop = self.loop = asyncio.get_running_loop()
        self.events = EventBatch(loop)
        host, port = self.config.listen
        self._sockets = sockets if sockets is not None else await bind_listening_sockets(loop, host, port)
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock, loop)

    def _accept(self, listening: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        # Accepting here, not in create_server, gives every connection its peer address from
        # accept() itself: a node that resets at once has none left for getpeername() to tell.
        for sock, address in accept_ready(listening, log):
            peer = peer_name(address)
            conn = Connection(self, peer)
            decision = self.admission.admit(conn, peer)
            if not decision.admitted:
                sock.close()
                setting = "listener.max_connections_per_peer" if decision.reason == "peer connection limit" else "listener.max_connections"
                self._refused(peer, decision.reason, f"{decision.detail} ({setting})")
                continue
            if isinstance(decision.evict, Connection):
                self.evict(decision.evict, peer)
            sock.setblocking(False)
            self._connections.add(conn)
            conn.adopting = loop.create_task(conn.adopt(sock))

    def evict(self, conn: Connection, newcomer: str) -> None:
        """Close ``conn``, a connection that has not passed the checks yet, to make room for
        ``newcomer``: every slot without a node in it was taken."""
        limits = self.admission.limits
        self._refused(conn.peer, "evicted", f"{limits.total - limits.reserved} connections without a checked certificate "
                      f"were open; the oldest of the busiest address made room for {newcomer}")
        conn.evicted()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if self.loop is not None and sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    def remember(self, identity: PeerIdentity) -> None:
        """Note which node a certificate belongs to (every accepted connection calls this), so
        that a later revocation of it can close that node's other connections."""
        key = (identity.issuer, identity.serial)
        self._nodes_by_serial.pop(key, None)
        self._nodes_by_serial[key] = identity.name
        if len(self._nodes_by_serial) > _REMEMBERED_SERIALS:
            del self._nodes_by_serial[next(iter(self._nodes_by_serial))]

    def reloaded(self, tls: ServerTLS) -> None:
        """The agent took ``tls`` into service (``current`` returns it now): revocations in its
        CRL reach established connections too (:meth:`close_revoked`)."""
        if tls.revoked:
            self.close_revoked(tls.revoked, tls.superseded)

    def close_revoked(self, revoked: frozenset[tuple[bytes, int]], superseded: frozenset[tuple[bytes, int]] = frozenset()) -> int:
        """After a CRL reload: close every established connection of a node one of whose
        certificates is revoked, whichever certificate that connection authenticated with.

        A revocation says "this node is out" (an operator's ``pkictl revoke NODE``, a
        compromised key); a connection opened before the node's last renewals, with a
        certificate that has since expired and left the CRL, belongs to the same node. Only a
        ``superseded`` revocation (the node has a successor) leaves open connections alone: new
        ones are refused by the CRL check, while a long-lived connection survives the rotation.

        A node-wide close happens once, for revocations this listener has not acted on before:
        a node that re-paired with a new key after its revocation stays connected at every later
        reload while its old certificate is still on the CRL. A connection whose own
        certificate is on the CRL is closed at any reload.

        Args:
            revoked: ``(issuer name DER, serial)`` pairs of the new CRL.
            superseded: the pairs among them revoked with reason ``superseded``.

        Returns:
            How many connections were closed.
        """
        out = revoked - superseded
        fresh, self._revocations_seen = out - self._revocations_seen, out
        nodes = {self._nodes_by_serial[key] for key in fresh if key in self._nodes_by_serial}
        hits = [(c, who) for c in self._connections if (who := c.identity) is not None
                and ((who.issuer, who.serial) in out or who.name in nodes)]
        for conn, who in hits:
            own = (who.issuer, who.serial) in out
            detail = "its serial is on the new CRL" if own else f"another certificate of node {who.name} is on the new CRL"
            log.warning("closing peer=%s node=%s serial=%x reason='revoked' detail=%r", conn.peer, who.name, who.serial, detail)
            conn.end("revoked")
        return len(hits)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting and end every connection (SIGTERM), waiting at most ``timeout`` s."""
        self._close_sockets()
        self._drained = asyncio.Event()
        for conn in list(self._connections):
            if conn.identity is None:
                conn._abort()  # still handshaking or connecting the upstream
            else:
                conn.end("listener stopped")
        if self._connections:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except asyncio.TimeoutError:
                for conn in list(self._connections):
                    conn._abort()
        if self.events is not None:
            self.events.flush()

    async def _resolve_upstream(self, conn: Connection) -> None:
        """The slow path for an upstream given by name: resolve it for this connection, then connect."""
        host, port = self.config.upstream
        try:
            infos = await conn.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            if conn.state == CONNECTING:
                conn._upstream_failed(exc)
            return
        if conn.state == CONNECTING:
            conn.task = None
            conn._connect_upstream([(family, address) for family, _, _, _, address in infos])

    def _sweep_soon(self) -> None:
        if self._sweeper is None:
            assert self.loop is not None, "connections come from a started listener"
            self._sweeper = self.loop.call_later(SWEEP, self._sweep, self.loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Act on every connection whose deadline has passed; runs while there are connections.

        One timer for all instead of three per connection (handshake, idle, close grace): under a
        handshake flood a connection ends before its first sweep, and its timers were pure cost.
        The idle timeout is thus measured to within ``SWEEP`` seconds.
        """
        self._sweeper = None
        now = loop.time()
        due = []
        for conn in self._connections:
            if conn.active:  # bytes moved since the last sweep: cheaper per chunk than reading the clock
                conn.active = False
                conn.last_activity = now
            if conn.deadline <= now:
                due.append(conn)
        for conn in due:
            conn.expire(now)
        if self._connections:
            self._sweep_soon()

    def is_own_certificate(self, der: bytes | None) -> bool:
        """Whether ``der`` (a client's certificate, verified by the handshake) is the very
        certificate this listener serves: a client can present it only with this gateway's private
        key (its CertificateVerify, RFC 8446 4.4.3), so only this gateway's own doctor does
        (docs/design.md, "Doctor probes")."""
        return der is not None and der == self._current().credential.certificate.public_bytes(Encoding.DER)

    def _probed(self, peer: str, serial: int | None) -> None:
        log_probe(peer, serial)

    def _refused(self, peer: str, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None:
        self.stats.refuse(reason)
        log_refused(peer, reason, detail, node=node, serial=serial)
        self.note("refused", None, node, peer, reason=reason)


def _numeric_addresses(host: str, port: int) -> list[tuple[int, tuple]] | None:
    """``[(family, sockaddr)]`` for an IP address literal; None for a name (resolved per connection)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return [(socket.AF_INET6, (str(ip), port, 0, 0))]
    return [(socket.AF_INET, (str(ip), port))]
