"""The gateway's mTLS listener: TLS in from nodes, plain TCP out to the real gateway.

Each connection is accepted as plain TCP and upgraded with ``start_tls`` using the context that is
current at that moment, as the handler's very first await (awaiting anything earlier can lose
the ClientHello: cpython gh-142352). This lets a reload swap the context for new connections while
established ones keep theirs, and lets every failed handshake be logged with its peer and reason,
which ``asyncio.start_server(ssl=...)`` would drop silently.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable

from .authz import PeerIdentity, authorize_client, handshake_refusal_reason
from .config import ListenerConfig
from .errors import PeerRejected
from .tls import ServerTLS

__all__ = ["GatewayListener"]

log = logging.getLogger("pki_agent.listener")
_CHUNK = 256 * 1024


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
        return f"{host}:{peer[1]}"
    return str(peer)


async def _close(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Close gracefully (flush what is buffered, TLS close_notify); abort if that stalls."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (asyncio.TimeoutError, ConnectionError, OSError, ssl.SSLError):
        writer.transport.abort()


class GatewayListener:
    """Accept nodes over mTLS on ``config.listen`` and forward each to ``config.upstream``.

    Args:
        config: addresses and limits.
        current: returns the :class:`ServerTLS` (context + revoked set) for a new connection
            (the agent's hot-reload holder); called once per connection, before the handshake.
        trust_domain: the SPIFFE trust domain of node identities.
    """

    def __init__(self, config: ListenerConfig, current: Callable[[], ServerTLS], trust_domain: str) -> None:
        self.config = config
        self._current = current
        self.trust_domain = trust_domain
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        host, port = self.config.listen
        self._server = await asyncio.start_server(self._handle, host or None, port, limit=_CHUNK)

    async def close(self) -> None:
        """Stop accepting and end every connection (SIGTERM)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer(writer)
        if len(self._connections) >= self.config.max_connections:
            log.warning("refused peer=%s reason=%r detail=%r", peer, "connection limit", f"{self.config.max_connections} connections open")
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer, peer)
        finally:
            try:
                await _close(writer)
            finally:
                self._connections.discard(task)  # only now: close() waits for what is in the set

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        tls = self._current()
        try:
            await writer.start_tls(tls.context, ssl_handshake_timeout=self.config.handshake_timeout.total_seconds())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failed handshake is a logged refusal
            reason, detail = handshake_refusal_reason(exc)
            log.warning("refused peer=%s reason=%r detail=%r", peer, reason, detail)
            return
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            identity = authorize_client(ssl_object.getpeercert(binary_form=True), self.trust_domain, tls.revoked)
        except PeerRejected as exc:
            log.warning("refused peer=%s reason=%r detail=%r", peer, exc.reason, exc.detail)
            return
        await self._forward(reader, writer, peer, identity, ssl_object.version())

    async def _forward(self, reader, writer, peer: str, identity: PeerIdentity, version: str) -> None:
        started = time.monotonic()
        host, port = self.config.upstream
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port, limit=_CHUNK)
        except OSError as exc:
            log.error("upstream unreachable peer=%s node=%s upstream=%s:%d error=%r", peer, identity.name, host, port, str(exc))
            return
        log.info("accepted peer=%s node=%s serial=%x tls=%s", peer, identity.name, identity.serial, version)
        counts = {"in": 0, "out": 0}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, key: str, half_close: bool) -> None:
            while data := await src.read(_CHUNK):
                dst.write(data)
                counts[key] += len(data)
                await dst.drain()
            if half_close and dst.can_write_eof():
                dst.write_eof()  # the node finished sending; let the gateway answer and close

        upward = asyncio.create_task(pipe(reader, up_writer, "in", True))
        downward = asyncio.create_task(pipe(up_reader, writer, "out", False))
        try:
            done, _ = await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
            if upward in done and upward.exception() is None:
                await downward  # the node half-closed: wait for the gateway's last bytes
        except (ConnectionError, OSError):
            pass
        finally:
            for t in (upward, downward):
                t.cancel()
            await asyncio.gather(upward, downward, return_exceptions=True)
            await _close(up_writer)
            log.info(
                "closed peer=%s node=%s serial=%x bytes_in=%d bytes_out=%d duration=%.3fs",
                peer, identity.name, identity.serial, counts["in"], counts["out"], time.monotonic() - started,
            )
