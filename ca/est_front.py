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
import logging
import socket
import ssl
from typing import Callable

from .errors import PKIError
from .handshake import handshake_refusal_reason, likely_cause
from .logfmt import peer_name, quoted
from .sockets import accept_ready, bind_listening_sockets, bind_problem

__all__ = ["TLSFront", "log_tls_refusal"]

log = logging.getLogger("pkictl.serve")


def log_tls_refusal(peer: str, reason: str, detail: str) -> None:
    """Log a client refused during its TLS handshake (WARNING), as the gateway listener does.

    Args:
        peer: ``host:port`` from ``accept()``.
        reason: a reason of :func:`pkictl.handshake.handshake_refusal_reason`.
        detail: what OpenSSL said, and the likely cause; escaped here (it may quote the peer).
    """
    log.warning("refused peer=%s reason=%s detail=%s", peer, quoted(reason), quoted(detail),
                extra={"pki_event": {"event": "refused", "peer": peer, "reason": reason, "detail": detail}})


class TLSFront:
    """Accept TLS clients on ``(host, port)`` and hand each handshaken connection to ``protocol_factory``.

    Args:
        protocol_factory: makes the HTTP protocol of one connection (aiohttp's ``web.Server``).
        context: returns the server context for a new connection (called once per connection,
            so that a reloaded context reaches new connections only: docs/design.md).
        handshake_timeout: seconds a client has to finish its handshake (slowloris).
    """

    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol], context: Callable[[], ssl.SSLContext], *,
                 handshake_timeout: float) -> None:
        self._factory = protocol_factory
        self._context = context
        self.handshake_timeout = handshake_timeout
        self._sockets: list[socket.socket] = []
        self._handshakes: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

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
        for sock, address in accept_ready(listening, log):
            sock.setblocking(False)
            task = loop.create_task(self._handshake(loop, sock, peer_name(address)))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, peer: str) -> None:
        try:
            await loop.connect_accepted_socket(self._factory, sock, ssl=self._context(),
                                               ssl_handshake_timeout=self.handshake_timeout)
        except Exception as exc:  # noqa: BLE001 - every failed handshake is a logged refusal
            # The loop closed the transport, and with it the socket (uvloop detaches it first).
            reason, detail = handshake_refusal_reason(exc)
            cause = likely_cause(exc)
            log_tls_refusal(peer, reason, f"{detail}: {cause}" if cause else detail)

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def close(self) -> None:
        """Stop accepting and abandon the handshakes under way (HTTP connections are aiohttp's to close)."""
        self._close_sockets()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
