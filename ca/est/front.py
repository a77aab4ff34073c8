"""The EST service's TLS front: it binds, accepts every connection itself, does its TLS handshake,
and logs each client refused there (peer address, exact reason) before HTTP sees the connection.

``loop.create_server(ssl=ctx)`` drops failed handshakes silently (asyncio's sslproto logs them
only in debug mode), and once a client has reset, its transport no longer knows the peer's
address (docs/design.md, "The EST service").
Accepting here keeps the address from ``accept()`` itself, and awaiting
``loop.connect_accepted_socket(ssl=...)`` per connection (on asyncio's loop and on uvloop alike)
raises the handshake's failure where it can be logged. The reasons are the gateway listener's
(:mod:`pkictl.handshake`), in the listener's line format::

    refused peer=192.168.1.21:40022 reason='expired' detail='certificate has expired'
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..admission import Admission, AdmissionLimits
from ..errors import PKIError
from ..handshake import CLIENT_REJECTED, handshake_refusal_reason, likely_cause
from ..logfmt import peer_name, quoted
from ..sockets import accept_ready, bind_listening_sockets, bind_problem

__all__ = ["FrontLimits", "TLSFront", "log_tls_refusal"]

# How often the front looks for requests that are late (seconds): a deadline is kept to within this.
_SWEEP = 0.5

log = logging.getLogger("pkictl.serve")


def log_tls_refusal(peer: str, reason: str, detail: str) -> None:
    """Log a client refused during its TLS handshake (WARNING), as the gateway listener does.

    Args:
        peer: ``host:port`` from ``accept()``.
        reason: a reason of :func:`pkictl.handshake.handshake_refusal_reason`.
        detail: what OpenSSL said, and the likely cause; escaped here (it may quote the peer).

    A client that refused this server's certificate (:data:`pkictl.handshake.CLIENT_REJECTED`) is
    logged as ``rejected by client ...``: not a refusal of the client.
    """
    what = "rejected by client" if reason == CLIENT_REJECTED else "refused"
    log.warning("%s peer=%s reason=%s detail=%s", what, peer, quoted(reason), quoted(detail),
                extra={"pki_event": {"event": what, "peer": peer, "reason": reason, "detail": detail}})


@dataclasses.dataclass(frozen=True)
class FrontLimits:
    """What the EST service's front allows one client (docs/design.md, "Connection admission").

    Attributes:
        header_timeout: seconds a connection has to send a request's complete header, from its
            handshake or from the previous answer (slowloris); an idle keep-alive connection is
            closed then too.
        body_timeout: seconds a request has to send its body once the header is in (HTTP 408).
        admission: connections in total, per peer address, and kept for clients that present
            a certificate of this CA.

    Raises:
        ValueError: a timeout that is not positive.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    admission: AdmissionLimits = AdmissionLimits()

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, want more than 0 seconds")


class _Slot:
    """One connection of the front: its handshake task, then its HTTP protocol and transport."""

    __slots__ = ("peer", "fd", "task", "transport", "deadline", "received", "answered", "evicted")

    def __init__(self, peer: str, fd: int) -> None:
        self.peer = peer
        self.fd = fd  # the accepted socket's, owned by the loop until the handshake ends
        self.evicted = False
        self.task: asyncio.Task | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.deadline: float | None = None  # loop time the next request's header is due; None while one is handled
        self.received = 0  # bytes since the last answer
        self.answered = 0  # requests answered on this connection


class _Timed(asyncio.Protocol):
    """aiohttp's protocol of one connection with the front in the middle: it counts what arrives
    and tells the front when the connection ends. Nothing else changes on the way."""

    def __init__(self, front: "TLSFront", slot: _Slot, inner: Any) -> None:
        self._front, self._slot, self._inner = front, slot, inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._front._connected(self._slot, transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._slot.received += len(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._front._lost(self._slot)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class TLSFront:
    """Accept TLS clients on ``(host, port)`` and hand each handshaken connection to ``protocol_factory``.

    Args:
        protocol_factory: makes the HTTP protocol of one connection (aiohttp's ``web.Server``).
        context: returns the server context for a new connection (called once per connection,
            so that a reloaded context reaches new connections only: docs/design.md).
        handshake_timeout: seconds a client has to finish its handshake (slowloris).
        limits: header and body timeouts and connection caps; the app must run
            :meth:`middleware` for the timeouts to apply.
        on_refusal: called with the reason of each client refused here (for the metrics).
        pace: given the connections still handshaking, ``(seconds to pause after this round,
            connections to accept in it)``, asked at each accept round: while the service sheds
            load, the connections it would only shed wait in the kernel's backlog instead of
            taking the event loop's time in TLS handshakes from the requests it has in hand
            (docs/design.md, "Group commit and load shedding"). None accepts all that wait.
    """

    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol], context: Callable[[], ssl.SSLContext], *,
                 handshake_timeout: float, limits: FrontLimits | None = None,
                 on_refusal: Callable[[str], None] | None = None, pace: Callable[[int], tuple[float, int]] | None = None) -> None:
        self._factory = protocol_factory
        self._on_refusal = on_refusal
        self._context = context
        self.handshake_timeout = handshake_timeout
        self.limits = limits or FrontLimits()
        self.admission = Admission(self.limits.admission)
        self._sockets: list[socket.socket] = []
        self._handshakes: set[asyncio.Task] = set()
        self._slots: dict[asyncio.BaseTransport, _Slot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._pace = pace
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        self.paced = 0  # times accepting paused (the pace asked for a wait)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        return [s.getsockname()[:2] for s in self._sockets]

    async def start(self, host: str, port: int) -> None:
        """Bind every address of ``host`` (all interfaces for ``""``) on ``port`` and start accepting.

        Raises:
            PKIError: an address cannot be bound (in use, not this host's, privileged); nothing
                stays bound.
        """
        loop = self._loop = asyncio.get_running_loop()
        try:
            self._sockets = await bind_listening_sockets(loop, host, port)
        except OSError as exc:
            raise PKIError(bind_problem(host, port, exc)) from exc
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock, loop)

    def _accept(self, listening: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        interval, budget = self._pace(len(self._handshakes)) if self._pace is not None else (0.0, 128)
        if interval > 0:  # these now, the next after the interval
            loop.remove_reader(listening.fileno())
            self._paused[listening] = loop.call_later(interval, self._resume, listening, loop)
            self.paced += 1
        for sock, address in accept_ready(listening, log, limit=budget):
            peer = peer_name(address)
            slot = _Slot(peer, sock.fileno())
            decision = self.admission.admit(slot, peer)
            if not decision.admitted:
                sock.close()
                self._refuse(peer, decision.reason, decision.detail)
                continue
            if isinstance(decision.evict, _Slot):
                self._evict(decision.evict, peer)
            sock.setblocking(False)
            task = slot.task = loop.create_task(self._handshake(loop, sock, slot))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self, listening: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._paused.pop(listening, None)
        if listening.fileno() >= 0:
            loop.add_reader(listening.fileno(), self._accept, listening, loop)

    def _evict(self, slot: _Slot, newcomer: str) -> None:
        limits = self.limits.admission
        self._refuse(slot.peer, "evicted", f"{limits.total - limits.reserved} connections without a client certificate "
                        f"were open; the oldest of the busiest address made room for {newcomer}")
        slot.evicted = True
        if slot.transport is not None:
            slot.transport.abort()  # type: ignore[attr-defined]  # a socket's transport: a Transport
            return
        # Still handshaking: the loop owns the socket, and cancelling its handshake does not close
        # it on every loop. A shutdown does: the handshake reads EOF and the loop closes the socket.
        handle = socket.socket(fileno=slot.fd)
        try:
            handle.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone already
        finally:
            handle.detach()

    async def _handshake(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, slot: _Slot) -> None:
        try:
            await loop.connect_accepted_socket(lambda: _Timed(self, slot, self._factory()), sock, ssl=self._context(),
                                               ssl_handshake_timeout=self.handshake_timeout)
        except asyncio.CancelledError:
            self.admission.release(slot)
            raise
        except Exception as exc:  # noqa: BLE001 - every failed handshake is a logged refusal
            # The loop closed the transport, and with it the socket (uvloop detaches it first).
            self.admission.release(slot)
            if slot.evicted:
                return  # logged as such
            reason, detail = handshake_refusal_reason(exc)
            cause = likely_cause(exc)
            self._refuse(slot.peer, reason, f"{detail}: {cause}" if cause else detail)

    # -- connections past their handshake ------------------------------------------------------

    def _connected(self, slot: _Slot, transport: asyncio.BaseTransport) -> None:
        assert self._loop is not None, "started"
        slot.transport = transport
        slot.deadline = self._loop.time() + self.limits.header_timeout
        self._slots[transport] = slot
        if transport.get_extra_info("peercert"):  # verified against our CA by the handshake
            self.admission.proved(slot)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def _lost(self, slot: _Slot) -> None:
        if slot.transport is not None:
            self._slots.pop(slot.transport, None)
        self.admission.release(slot)

    def _sweep(self) -> None:
        """Close the connections whose next request header is late (one timer for all)."""
        assert self._loop is not None, "started"
        self._sweeper = None
        now = self._loop.time()
        for slot in [s for s in self._slots.values() if s.deadline is not None and s.deadline <= now]:
            assert slot.transport is not None, "in _slots: connected"
            self._slots.pop(slot.transport, None)
            if slot.received or not slot.answered:
                timeout = self.limits.header_timeout
                detail = (f"{slot.received} bytes and no complete request header within {timeout:g} s" if slot.received
                          else f"no request within {timeout:g} s of the handshake")
                self._refuse(slot.peer, "header timeout", detail)
            slot.transport.abort()  # type: ignore[attr-defined]  # a socket's transport: a Transport
        if self._slots:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """The request's header is in: stop its clock, give its body ``body_timeout`` seconds
        (HTTP 408, RFC 9110 15.5.9), and start the clock of the next request once answered."""
        slot = self._slots.get(request.transport) if request.transport is not None else None
        if slot is not None:
            slot.deadline = None
        try:
            if request.body_exists:
                try:
                    await asyncio.wait_for(request.read(), self.limits.body_timeout)  # kept: the handler reads it again
                except asyncio.TimeoutError:
                    raise web.HTTPRequestTimeout(reason=f"the request body did not arrive within {self.limits.body_timeout:g} s; "
                                                        "send it with the request, at once") from None
            return await handler(request)
        finally:
            if slot is not None and self._loop is not None:
                slot.received, slot.answered = 0, slot.answered + 1
                slot.deadline = self._loop.time() + self.limits.header_timeout

    def _refuse(self, peer: str, reason: str, detail: str) -> None:
        log_tls_refusal(peer, reason, detail)
        if self._on_refusal is not None:
            self._on_refusal(reason)

    def _close_sockets(self) -> None:
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def close(self) -> None:
        """Stop accepting and abandon the handshakes under way (HTTP connections are aiohttp's to close)."""
        self._close_sockets()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
