"""The gateway's mTLS listener: TLS in from nodes, plain TCP out to the real gateway.

The listener accepts sockets itself and hands each to ``loop.connect_accepted_socket`` with the
context current at that moment. The TLS protocol owns the socket from its first byte: nothing
else may read before it, or the ClientHello is lost (cpython gh-142352; uvloop starts reading
right after ``connection_made``, so pausing there is not enough). A reload thus swaps the
context for new connections while established ones keep theirs, and every failed handshake
comes back to the listener to be logged with its peer and reason, which
``create_server(ssl=...)`` would drop silently.

Forwarding uses plain ``asyncio.Protocol`` objects, not streams: on uvloop they cost less CPU
per GB than streams and matched the C forwarders (../shared/DESIGN.md, "Peers and figures").
Flow control is the transports' own: when one side's write buffer passes its high-water mark
the other side stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from .authz import Authorizer, PeerIdentity, handshake_refusal_reason
from .config import ListenerConfig
from .connlog import log_accepted, log_closed, log_refused
from .errors import PeerRejected
from .tls import ServerTLS

__all__ = ["GatewayListener", "ListenerStats"]

log = logging.getLogger("pki_agent.listener")
_HIGH_WATER = 512 * 1024  # bytes buffered towards one side before the other side stops reading
_CLOSE_GRACE = 5.0  # seconds a graceful close (flush, close_notify) may take before an abort


class ListenerStats:
    """Counters of one listener, read by the metrics endpoint (plain ints: no lock per chunk).

    Attributes:
        accepted: connections authorized and forwarded.
        refused: refused connections by reason.
        closed_bytes_in, closed_bytes_out: bytes forwarded by connections that have ended.
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: dict[str, int] = {}
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class _Upstream(asyncio.Protocol):
    """The plain TCP side towards the real gateway; every event goes to its connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: "_Connection") -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.bytes_out += len(data)
        conn.last_activity = conn.loop.time()
        if not conn.client.is_closing():  # writes after close() would only be dropped with a warning
            conn.client.write(data)

    def eof_received(self) -> bool:
        self.conn.end("upstream closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.end("upstream closed" if exc is None else f"upstream error: {exc}")

    def pause_writing(self) -> None:
        self.conn.client.pause_reading()

    def resume_writing(self) -> None:
        self.conn.client.resume_reading()


class _Connection(asyncio.Protocol):
    """One node connection: TLS handshake on the accepted socket, authorization, then forwarding."""

    __slots__ = ("listener", "loop", "peer", "client", "upstream", "identity", "pending", "bytes_in", "bytes_out", "started",
                 "last_activity", "end_reason", "task", "timers", "idle_timer", "lost", "logged")

    def __init__(self, listener: "GatewayListener", peer: str) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.peer = peer
        self.client: asyncio.Transport | None = None  # the TLS transport, once the handshake is done
        self.upstream: asyncio.Transport | None = None
        self.identity: PeerIdentity | None = None
        self.pending: list[bytes] = []  # bytes from the node before the upstream is connected
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.last_activity = 0.0
        self.end_reason: str | None = None
        self.task: asyncio.Task | None = None
        self.timers: list[asyncio.TimerHandle] = []  # maximum age, close grace
        self.idle_timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.logged = False

    async def open(self, sock: socket.socket, tls: ServerTLS) -> None:
        """Handshake, authorize, connect the upstream; any failure is logged and closes the client."""
        try:
            identity = await self._authenticate(sock, tls)
            if identity is None or self.lost:
                return
            await self._connect_upstream(identity)
        except asyncio.CancelledError:
            if self.client is not None:
                self.client.abort()
            else:
                sock.close()
            self._forget()
            raise

    async def _authenticate(self, sock: socket.socket, tls: ServerTLS) -> PeerIdentity | None:
        listener = self.listener
        try:
            # The TLS protocol owns the socket from the first byte, so no ClientHello can be read
            # by anything else first (cpython gh-142352), and a failure comes back here.
            await self.loop.connect_accepted_socket(lambda: self, sock, ssl=tls.context,
                                                    ssl_handshake_timeout=listener.config.handshake_timeout.total_seconds())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failed handshake is a logged refusal
            reason, detail = handshake_refusal_reason(exc)
            self._forget()
            listener._refused(self.peer, reason, detail)
            sock.close()
            return None
        try:
            return listener.authorizer.check(self.client.get_extra_info("ssl_object"), tls.revoked)
        except PeerRejected as exc:
            self._forget()
            listener._refused(self.peer, exc.reason, exc.detail, node=exc.node, serial=exc.serial)
            self._close_client()
            return None

    async def _connect_upstream(self, identity: PeerIdentity) -> None:
        listener = self.listener
        host, port = listener.config.upstream
        try:
            upstream, _ = await self.loop.create_connection(lambda: _Upstream(self), host, port)
        except OSError as exc:
            log.error("upstream unreachable peer=%s node=%s upstream=%s:%d error=%r", self.peer, identity.name, host, port, str(exc))
            self._forget()
            self._close_client()
            return
        if self.lost:  # the node left while the upstream was being connected
            upstream.close()
            return
        self.identity = identity
        self.upstream = upstream
        self.started = self.last_activity = self.loop.time()
        upstream.set_write_buffer_limits(high=_HIGH_WATER)
        self.client.set_write_buffer_limits(high=_HIGH_WATER)
        listener.stats.accepted += 1
        log_accepted(self.peer, identity, self.client.get_extra_info("ssl_object").version())
        if self.pending:
            upstream.write(b"".join(self.pending))
            self.pending = []
        self.client.resume_reading()
        config = listener.config
        self.idle_timer = self.loop.call_at(self.started + config.idle_timeout.total_seconds(), self._check_idle)
        if config.max_connection_age is not None:
            self.timers.append(self.loop.call_later(config.max_connection_age.total_seconds(), self.end, "max connection age"))

    # -- TLS side: this protocol receives the decrypted bytes ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport
        transport.pause_reading()  # until authorized and the upstream is connected

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.upstream is None:
            self.pending.append(data)
            return
        self.last_activity = self.loop.time()
        self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()  # the node finished sending; asyncio's TLS then closes its side
        return False

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self.end_reason is None:
            self.end_reason = "client closed" if exc is None else f"client error: {exc}"
        if self.upstream is not None:
            self.upstream.close()
        self._log_closed()
        self._forget()

    # -- ending -------------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        """Close both sides gracefully (flush, close_notify), first reason wins; abort after a grace time."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.lost:
            return
        if self.upstream is not None:
            self.upstream.close()
        self._close_client()
        self._log_closed()  # now, not after the close handshake: a silent client can take the grace time

    def _close_client(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.close()
            self.timers.append(self.loop.call_later(_CLOSE_GRACE, self.client.abort))

    def _check_idle(self) -> None:
        idle = self.listener.config.idle_timeout.total_seconds()
        due = self.last_activity + idle
        if self.loop.time() >= due:
            self.end("idle timeout")
        else:  # there was traffic since: look again when it would be idle long enough
            self.idle_timer = self.loop.call_at(due, self._check_idle)

    def _log_closed(self) -> None:
        if self.identity is None or self.logged:
            return
        self.logged = True
        stats = self.listener.stats
        stats.closed_bytes_in += self.bytes_in
        stats.closed_bytes_out += self.bytes_out
        log_closed(self.peer, self.identity, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                   duration=self.loop.time() - self.started, reason=self.end_reason or "closed")

    def _forget(self) -> None:
        self.lost = True
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        listener = self.listener
        listener._connections.discard(self)
        if not listener._connections and listener._drained is not None:
            listener._drained.set()


class GatewayListener:
    """Accept nodes over mTLS on ``config.listen`` and forward each to ``config.upstream``.

    Args:
        config: addresses, allow list and limits.
        current: returns the :class:`ServerTLS` (context + revoked set) for a new connection
            (the agent's hot-reload holder); called once per connection, before the handshake.
        trust_domain: the SPIFFE trust domain of node identities.
    """

    def __init__(self, config: ListenerConfig, current: Callable[[], ServerTLS], trust_domain: str) -> None:
        self.config = config
        self._current = current
        self.trust_domain = trust_domain
        self.authorizer = Authorizer(trust_domain, config.allowed_names)
        self.stats = ListenerStats()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._drained: asyncio.Event | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        return [s.getsockname()[:2] for s in self._sockets]

    @property
    def active_connections(self) -> int:
        """Connections open now, handshaking ones included."""
        return len(self._connections)

    def bytes_forwarded(self) -> tuple[int, int]:
        """``(node to upstream, upstream to node)`` bytes so far, open connections included."""
        live = [c for c in self._connections if c.identity is not None and not c.logged]
        return (self.stats.closed_bytes_in + sum(c.bytes_in for c in live),
                self.stats.closed_bytes_out + sum(c.bytes_out for c in live))

    async def start(self) -> None:
        """Bind ``config.listen`` and start accepting.

        Raises:
            OSError: the address cannot be bound.
        """
        self.loop = asyncio.get_running_loop()
        host, port = self.config.listen
        infos = await self.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, type_, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        for sock in self._sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listening: socket.socket) -> None:
        # Drain the backlog on each wake-up (asyncio's own accept loop does the same).
        for _ in range(128):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ...: keep serving the connections there are
                log.error("accept on %s failed: %s", listening.getsockname(), exc)
                return
            host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
            peer = f"{host}:{address[1]}"
            if len(self._connections) >= self.config.max_connections:
                sock.close()
                self._refused(peer, "connection limit", f"{self.config.max_connections} connections open (listener.max_connections)")
                continue
            sock.setblocking(False)  # (both loops set TCP_NODELAY on the transport themselves)
            conn = _Connection(self, peer)
            self._connections.add(conn)
            conn.task = self.loop.create_task(conn.open(sock, self._current()))

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if self.loop is not None and sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    def close_revoked(self, revoked: frozenset[tuple[bytes, int]]) -> int:
        """Close established connections whose certificate is in ``revoked`` (after a CRL reload).

        Args:
            revoked: ``(issuer name DER, serial)`` pairs of the new CRL.

        Returns:
            How many connections were closed.
        """
        hits = [c for c in self._connections if c.identity is not None and (c.identity.issuer, c.identity.serial) in revoked]
        for conn in hits:
            log.warning("closing peer=%s node=%s serial=%x reason='revoked' detail='its serial is on the new CRL'",
                        conn.peer, conn.identity.name, conn.identity.serial)
            conn.end("revoked")
        return len(hits)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting and end every connection (SIGTERM), waiting at most ``timeout`` s."""
        self._close_sockets()
        self._drained = asyncio.Event()
        for conn in list(self._connections):
            if conn.identity is None and conn.task is not None:
                conn.task.cancel()  # still handshaking or connecting: _open aborts and forgets it
            else:
                conn.end("listener stopped")
        if self._connections:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except asyncio.TimeoutError:
                for conn in list(self._connections):
                    if conn.client is not None:
                        conn.client.abort()

    def _refused(self, peer: str, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None:
        self.stats.refuse(reason)
        log_refused(peer, reason, detail, node=node, serial=serial)
