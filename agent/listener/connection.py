"""One node connection of the gateway's listener: TLS in from the node, plain TCP out to the upstream.

Each node connection is a plain TCP transport of the event loop (uvloop when installed) whose
protocol runs TLS itself in a MemoryBIO pair, and a non-blocking socket to the upstream driven
by ``add_reader``/``add_writer``. What that design saves, measured under a handshake flood
(bench/gateway_peers.py, one core), against the two other ways to do TLS in asyncio:

- asyncio's TLS transport (``connect_accepted_socket(ssl=...)``, ``create_server(ssl=...)``):
  its SSLProtocol allocates a 256 KiB buffer and decodes the peer certificate into a dict for
  every connection. A minimal forwarder on it used 6% more CPU per handshake than a minimal one
  on this design; pki-agent's listener on it (with a log call per line and three timers per
  connection) 9% more (1.25 against 1.14 ms), and 44 kB per open connection against 33 kB;
- an ``ssl.SSLSocket`` driven by readiness callbacks: OpenSSL then reads each TLS record with
  two ``read`` calls (Python's ``ssl`` has no read-ahead), and the wrapper sets the socket's
  timeout (a system call) at every handshake step: 57 system calls per connection against 34
  here, and 3% more CPU in the same minimal comparison.

Nothing reaches OpenSSL but what the node sent, in order (so no ClientHello can be lost,
cpython gh-142352); a reload swaps the context for new connections while established ones keep
theirs; every failed handshake is logged with its peer and reason, and OpenSSL's alert is sent,
so the node learns the reason too.

Timeouts (handshake, upstream connect, idle, maximum age, close grace) are deadlines checked by
one sweep every ``SWEEP`` seconds, not a timer per connection. Flow control: while the upstream
has not taken a chunk, the node is not read; while the node's transport buffers more than its
high-water mark, the upstream is not read. An open idle connection costs 33 kB of RSS (nginx:
55 kB), measured with 2,000 connections open.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import ssl
from typing import Callable, Literal, Protocol

from pkictl.admission import Admission

from .authz import Authorizer, PeerIdentity, handshake_refusal_reason
from ..config import ListenerConfig
from .connlog import EventBatch, log_accepted, log_closed
from ..errors import PeerRejected
from .tls import ServerTLS

__all__ = ["Connection", "ListenerHost", "ListenerStats", "CHUNK", "SWEEP", "CONNECTING"]

log = logging.getLogger("pki_agent.listener")
CHUNK = 256 * 1024  # bytes read at most per wake-up (the size of the listener's shared buffers)
_RECORD = 16 * 1024  # TLS's maximum plaintext per record (RFC 8446 5.1)
_CLOSE_GRACE = 5.0  # seconds a graceful close (flush, close_notify) may take before an abort
SWEEP = 0.25  # seconds between two looks at the connections' deadlines (their precision)

_ADOPTING, _HANDSHAKE, CONNECTING, _FORWARDING, _CLOSING, _GONE = range(6)


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


class ListenerHost(Protocol):
    """What a connection needs of the listener that accepted it (:class:`pki_agent.listener.server.GatewayListener`).

    Declared here so that a connection is read without its listener: the listener creates
    connections, a connection calls back only through these members.
    """

    loop: asyncio.AbstractEventLoop | None  # set when the listener starts
    config: ListenerConfig
    authorizer: Authorizer
    admission: Admission
    stats: ListenerStats
    events: EventBatch | None
    _current: Callable[[], ServerTLS]
    _received: memoryview  # the shared buffer TLS records from nodes are read into (CHUNK bytes)
    _view: memoryview  # the shared buffer of plaintext (CHUNK bytes)
    _upstream_addresses: list | None
    _connections: set
    _drained: asyncio.Event | None

    def note(self, kind: Literal["opened", "closed", "refused"], conn: Connection | None, node: str | None, peer: str, *,
             reason: str | None = None) -> None: ...

    def remember(self, identity: PeerIdentity) -> None: ...

    def is_own_certificate(self, der: bytes | None) -> bool: ...

    def _probed(self, peer: str, serial: int | None) -> None: ...

    def _refused(self, peer: str, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None: ...

    def _sweep_soon(self) -> None: ...

    async def _resolve_upstream(self, conn: Connection) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One node connection: TLS handshake, authorization, upstream connect, then forwarding.

    The node's side is the loop's plain TCP transport, and TLS runs in a MemoryBIO pair owned by
    this protocol: every byte the transport reads goes to OpenSSL first. The upstream's side is
    a plain non-blocking socket driven by ``add_reader``/``add_writer``. States, in order:
    adopting (the loop is making the transport), handshake, connecting (authorized; the upstream
    connect is in progress), forwarding, closing (close_notify sent; the transport flushes and
    closes), gone (the node's transport is closed; the connection is forgotten once the upstream
    has taken what the node sent).

    ``transport`` and ``tls`` exist from the handshake state on (``connection_made``), and
    ``upstream`` while ``ufd >= 0``: they are set in their state rather than None before it, so
    that the forwarding path reads them without a check per chunk.
    """

    __slots__ = ("listener", "loop", "peer", "transport", "incoming", "outgoing", "tls", "state", "revoked", "authorized",
                 "candidates", "upstream", "ufd", "identity", "early", "early_size", "bytes_in", "bytes_out", "started",
                 "last_activity", "active", "end_reason", "deadline", "age_due", "to_upstream",
                 "client_paused", "upstream_paused", "logged", "task", "adopting")

    transport: asyncio.Transport  # from connection_made on
    tls: ssl.SSLObject  # from connection_made on
    upstream: socket.socket  # while ufd >= 0

    def __init__(self, listener: ListenerHost, peer: str) -> None:
        loop = listener.loop
        assert loop is not None, "connections come from a started listener"
        self.listener = listener
        self.loop = loop
        self.peer = peer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.state = _ADOPTING
        self.revoked: frozenset[tuple[bytes, int]] = frozenset()
        self.authorized: PeerIdentity | None = None  # passed the checks; the upstream is being connected
        self.candidates: list[tuple[int, tuple]] = []  # upstream addresses still to try, the current one first
        self.ufd = -1  # the upstream socket's descriptor, -1 while there is none
        self.identity: PeerIdentity | None = None  # set once forwarding: the connection is then "accepted"
        self.early: list[bytes] = []  # what the node sent before the upstream was connected
        self.early_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.last_activity = 0.0
        self.active = False  # bytes moved since the sweep last looked
        self.end_reason: str | None = None
        # Loop time of the next check (handshake or upstream connect timeout, idle timeout, maximum
        # age, end of the close grace), made by the listener's periodic sweep: no timer per connection.
        self.deadline = math.inf
        self.age_due = math.inf
        self.to_upstream = b""  # bytes the upstream has not taken yet; the node is not read meanwhile
        self.client_paused = False
        self.upstream_paused = False
        self.logged = False
        self.task: asyncio.Task | None = None  # resolving an upstream given by name
        self.adopting: asyncio.Task | None = None  # held until done: the loop keeps only weak references to tasks

    # -- the node's transport ----------------------------------------------------------------------

    async def adopt(self, sock: socket.socket) -> None:
        """Make the accepted ``sock`` the loop's transport with this protocol (then connection_made)."""
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock)
        except OSError as exc:  # the node went between accept() and here
            sock.close()
            if self.state != _GONE:
                self.listener._refused(self.peer, "closed during handshake", type(exc).__name__)
                self._finish()
        self.adopting = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a socket's: a Transport (uvloop's too, not by inheritance)
        if self.state == _GONE:  # aborted while the transport was being made (the listener closing)
            self.transport.abort()
            return
        self.state = _HANDSHAKE
        listener = self.listener
        tls = listener._current()
        self.revoked = tls.revoked
        self.tls = tls.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.deadline = self.loop.time() + listener.config.handshake_timeout.total_seconds()
        listener._sweep_soon()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.listener._received  # handed to OpenSSL before the next read: one buffer serves all

    def buffer_updated(self, nbytes: int) -> None:
        state = self.state
        if state >= _CLOSING:
            return  # after our close_notify, what the node says is not read
        self.incoming.write(self.listener._received[:nbytes])
        if state == _HANDSHAKE:
            self._handshake()
        elif not self.client_paused:  # paused: it waits in the BIO, behind what the upstream has not taken
            self._read_tls()

    def eof_received(self) -> bool:
        self.incoming.write_eof()  # OpenSSL tells a close_notify from a truncation
        if self.state == _HANDSHAKE:
            self._handshake()
        elif self.state < _CLOSING:
            self._read_tls()
        return True  # this protocol closes the transport itself

    def pause_writing(self) -> None:  # the node reads slower than the upstream sends
        if self.ufd >= 0 and not self.upstream_paused:
            self.upstream_paused = True
            self.loop.remove_reader(self.ufd)

    def resume_writing(self) -> None:
        if self.upstream_paused:
            self.upstream_paused = False
            if self.ufd >= 0 and self.state == _FORWARDING:
                self.loop.add_reader(self.ufd, self._from_upstream)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == _GONE:
            return
        if self.state == _HANDSHAKE:  # a reset: no EOF reached OpenSSL
            self.listener._refused(self.peer, "closed during handshake", type(exc).__name__ if exc else "EOF")
        if self.end_reason is None:
            self.end_reason = "client closed" if exc is None else f"client error: {exc}"
        self._finish()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())

    # -- handshake and authorization ---------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except Exception as exc:  # noqa: BLE001 - every failed handshake is a logged refusal
            self._flush()  # OpenSSL's alert: the node learns why
            reason, detail = handshake_refusal_reason(exc)
            self._refuse(reason, detail)
            return
        self._flush()
        listener = self.listener
        self.deadline = self.loop.time() + listener.config.handshake_timeout.total_seconds()  # for the upstream connect
        try:
            self.authorized = listener.authorizer.check(self.tls, self.revoked)
        except PeerRejected as exc:
            if listener.is_own_certificate(self.tls.getpeercert(binary_form=True)):
                listener._probed(self.peer, exc.serial)  # pki-agent doctor on this gateway: not a refusal
                self.end("doctor probe")
                return
            listener._refused(self.peer, exc.reason, exc.detail, node=exc.node, serial=exc.serial)
            self.end(exc.reason)
            return
        listener.admission.proved(self)
        self.state = CONNECTING
        if listener._upstream_addresses is None:
            self.task = self.loop.create_task(listener._resolve_upstream(self))
        else:
            self._connect_upstream(listener._upstream_addresses)
        if self.state == CONNECTING and self.incoming.pending:  # data sent with the handshake's last flight
            self._read_tls()

    def _refuse(self, reason: str, detail: str) -> None:
        self.listener._refused(self.peer, reason, detail)
        self._close_client()

    def expire(self, now: float) -> None:
        """The sweep found ``deadline`` passed: act on what it stood for in this state."""
        config = self.listener.config
        state = self.state
        if state == _HANDSHAKE:
            seconds = config.handshake_timeout.total_seconds()
            self._refuse("handshake timeout", f"the client did not finish its TLS handshake in {seconds:g} s")
        elif state == CONNECTING:
            self._close_upstream()
            self._upstream_failed(TimeoutError(f"no answer in {config.handshake_timeout.total_seconds():g} s"))
        elif state == _FORWARDING:
            idle_due = self.last_activity + config.idle_timeout.total_seconds()
            if now >= self.age_due:
                self.end("max connection age")
            elif now >= idle_due:
                self.end("idle timeout")
            else:  # there was traffic since: look again when it would be idle long enough
                self.deadline = min(idle_due, self.age_due)
        else:  # the close grace is over
            self._abort()

    # -- the upstream ------------------------------------------------------------------------------

    def _connect_upstream(self, addresses: list[tuple[int, tuple]]) -> None:
        """Connect to the first of ``addresses`` that takes the connection, in order."""
        self.candidates = addresses
        family, address = addresses[0]
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._upstream_failed(exc)
            return
        self.upstream, self.ufd = upstream, upstream.fileno()
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = upstream.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            self._upstream_attempt_failed(OSError(code, os.strerror(code)))
            return
        # Registered for both at once: the registration then lives as long as the socket.
        self.loop.add_writer(self.ufd, self._upstream_connected)
        self.loop.add_reader(self.ufd, self._from_upstream)

    def _upstream_connected(self) -> None:
        loop = self.loop
        loop.remove_writer(self.ufd)
        code = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._upstream_attempt_failed(OSError(code, os.strerror(code)))
            return
        listener = self.listener
        identity = self.identity = self.authorized
        assert identity is not None and listener.events is not None, "connecting: authorized, by a started listener"
        self.state = _FORWARDING
        self.started = self.last_activity = loop.time()
        listener.stats.accepted += 1
        listener.remember(identity)
        listener.note("opened", self, identity.name, self.peer)
        log_accepted(self.peer, identity, self.tls.version(), batch=listener.events)
        config = listener.config
        if config.max_connection_age is not None:
            self.age_due = self.started + config.max_connection_age.total_seconds()
        self.deadline = min(self.started + config.idle_timeout.total_seconds(), self.age_due)
        if self.early:
            data, self.early, self.early_size = b"".join(self.early), [], 0
            self._send_upstream(data)
        if self.client_paused and not self.to_upstream:
            self._resume_client()

    def _upstream_attempt_failed(self, exc: OSError) -> None:
        self._close_upstream()
        if len(self.candidates) > 1:
            self._connect_upstream(self.candidates[1:])
        else:
            self._upstream_failed(exc)

    def _upstream_failed(self, exc: OSError) -> None:
        host, port = self.listener.config.upstream
        assert self.authorized is not None, "only an authorized connection connects the upstream"
        log.error("upstream unreachable peer=%s node=%s upstream=%s:%d error=%r",
                  self.peer, self.authorized.name, host, port, exc.strerror or str(exc))
        self.end("upstream unreachable")

    # -- forwarding --------------------------------------------------------------------------------

    def _read_tls(self) -> None:
        """Decrypt what the node sent and pass it on (held while the upstream is connecting)."""
        view, tls, incoming = self.listener._view, self.tls, self.incoming
        size, eof, error = 0, False, None
        # Only reads that can return something: an exception per message costs more than the check.
        # (Each read has room for a whole record, so OpenSSL never holds decrypted bytes back.)
        while incoming.pending or incoming.eof:
            try:
                n: int = tls.read(CHUNK - size, view[size:])  # type: ignore[assignment]  # into a buffer: a count (typeshed says bytes)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True
                break
            except (ssl.SSLError, ValueError) as exc:
                error = exc
                break
            if not n:
                eof = True
                break
            size += n
            if CHUNK - size < _RECORD:  # full: pass it on, then go on reading what OpenSSL holds
                if not self._pass_on(view[:size]):
                    return
                size = 0
        if self.outgoing.pending:  # what reading made OpenSSL say (a KeyUpdate reply, an alert)
            self._flush()
        if size and not self._pass_on(view[:size]):
            return
        if error is not None:
            self.end(f"client error: {error}")
        elif eof:
            self.end("client closed")

    def _pass_on(self, data: memoryview) -> bool:
        """Send decrypted bytes upstream; False when the node must not be read for now."""
        self.bytes_in += len(data)
        if self.state == _FORWARDING:
            self.active = True
            self._send_upstream(data)
            return not self.to_upstream and self.state == _FORWARDING
        self.early.append(bytes(data))
        self.early_size += len(data)
        if self.early_size >= CHUNK:  # enough held: wait for the upstream
            self._pause_client()
            return False
        return True

    def _send_upstream(self, data: memoryview | bytes) -> None:
        try:
            sent = self.upstream.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.end(f"upstream error: {exc}")
            return
        if sent < len(data):
            self.to_upstream = bytes(data[sent:])  # a copy: the shared buffer is reused
            self._pause_client()
            self.loop.add_writer(self.ufd, self._upstream_writable)

    def _pause_client(self) -> None:
        if not self.client_paused:
            self.client_paused = True
            self.transport.pause_reading()

    def _resume_client(self) -> None:
        self.client_paused = False
        self.transport.resume_reading()
        if self.incoming.pending or self.incoming.eof:  # what arrived before the pause
            self._read_tls()

    def _upstream_writable(self) -> None:
        try:
            sent = self.upstream.send(self.to_upstream)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.to_upstream = b""
            self.end(f"upstream error: {exc}")
            self._close_upstream()
            self._forget_if_done()
            return
        self.to_upstream = self.to_upstream[sent:]
        if self.to_upstream:
            return
        self.loop.remove_writer(self.ufd)
        if self.state >= _CLOSING:
            self._close_upstream()  # what the node sent before it went is delivered
            self._forget_if_done()
        else:
            self._resume_client()

    def _from_upstream(self) -> None:
        if self.state == CONNECTING:  # readable before writable: the connect's outcome is in
            self._upstream_connected()
            return
        view = self.listener._view
        try:
            n = self.upstream.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(f"upstream error: {exc}")
            return
        if not n:
            self.end("upstream closed")
            return
        self.bytes_out += n
        self.active = True
        try:
            self.tls.write(view[:n])
        except (ssl.SSLError, ValueError) as exc:
            self.end(f"client error: {exc}")
            return
        self.transport.write(self.outgoing.read())

    # -- ending ------------------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        """Close both sides gracefully, first reason wins: what each side sent is delivered, the
        node gets a close_notify (RFC 8446 6.1), and what is left after ``_CLOSE_GRACE`` seconds
        is aborted."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.state >= _CLOSING:
            return
        self._log_closed()  # now, not after the close: a node that does not read can take the grace time
        if self.ufd >= 0:
            if self.to_upstream:
                self.loop.remove_reader(self.ufd)  # its writer delivers the rest, then closes it
            else:
                self._close_upstream()
        try:
            self.tls.unwrap()  # queues our close_notify; the node's is not waited for
        except (ssl.SSLError, ValueError):
            pass
        self._close_client()

    def _close_client(self) -> None:
        """Flush what OpenSSL has to say, then close the node's transport (aborted after the grace)."""
        self.state = _CLOSING
        self._flush()
        self.deadline = self.loop.time() + _CLOSE_GRACE
        self.transport.close()

    def evicted(self) -> None:
        """Abort at once (the listener made room for a newer connection; it logged why)."""
        if self.end_reason is None:
            self.end_reason = "evicted"
        self._abort()

    def _abort(self) -> None:
        if self.state not in (_ADOPTING, _GONE):
            self.transport.abort()
        self.to_upstream = b""
        self._close_upstream()
        self._finish()

    def _finish(self) -> None:
        """The node's transport is closed: forget the connection once the upstream is done too."""
        self.state = _GONE
        if self.task is not None:
            self.task.cancel()
        self._log_closed()
        if self.to_upstream:  # the upstream still takes what the node sent, within the grace
            self.deadline = min(self.deadline, self.loop.time() + _CLOSE_GRACE)
        else:
            self._close_upstream()
        self._forget_if_done()

    def _forget_if_done(self) -> None:
        if self.state != _GONE or self.ufd >= 0:
            return
        listener = self.listener
        listener._connections.discard(self)
        listener.admission.release(self)
        if not listener._connections and listener._drained is not None:
            listener._drained.set()

    def _close_upstream(self) -> None:
        if self.ufd >= 0:
            self.loop.remove_reader(self.ufd)
            self.loop.remove_writer(self.ufd)
            self.upstream.close()
            del self.upstream
            self.ufd = -1

    def _log_closed(self) -> None:
        if self.identity is None or self.logged:
            return
        self.logged = True
        stats, events = self.listener.stats, self.listener.events
        assert events is not None, "made by the listener's start()"
        stats.closed_bytes_in += self.bytes_in
        stats.closed_bytes_out += self.bytes_out
        self.listener.note("closed", self, self.identity.name, self.peer)
        log_closed(self.peer, self.identity, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                   duration=self.loop.time() - self.started, reason=self.end_reason or "closed", batch=events)

