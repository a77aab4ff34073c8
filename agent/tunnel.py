"""The node-side tunnel: plain TCP in on loopback, mTLS out to the gateway with the node's current credential.

An unmodified client on the node dials ``tunnel.listen`` (e.g. 127.0.0.1:18789) and gets mutual
TLS without knowing it. Each new connection takes the client context that is current at that
moment (the agent rebuilds it after every renewal), so new connections present the new
certificate while established ones keep theirs. The gateway is verified against our trust anchor
and the name or IP address dialed (or ``tunnel.server_name``).

With TLS 1.3 a gateway that refuses the node's certificate does so after the client's handshake
has "succeeded": the refusal arrives as an alert or an EOF on the first read (docs/design.md,
"mTLS server checks"). The tunnel logs that as an authentication failure with the reason, apart
from an unreachable gateway and from a gateway whose own certificate is not trusted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable

from pkictl.tls import alert_reason

from .config import TunnelConfig

__all__ = ["NodeTunnel"]

log = logging.getLogger("pki_agent.tunnel")


def _peer(writer: asyncio.StreamWriter) -> str:
    """``host:port`` (``[v6]:port``) of the stream's peer."""
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

_CHUNK = 256 * 1024
_LINGER = 5.0  # seconds: after the local client's EOF, how long the gateway may stay quiet before the tunnel closes

class NodeTunnel:
    """Accept plain TCP on ``config.listen`` and forward each connection over mTLS to ``config.gateway``.

    Args:
        config: the tunnel's addresses and limits.
        current: returns ``(context, serial)`` for a new connection: the client SSLContext built
            from the node's current credential and that certificate's serial number (for logs).
        on_refusal: called with the reason each time the gateway refuses this node's certificate
            (the agent then checks whether its certificate was revoked).
    """

    def __init__(self, config: TunnelConfig, current: Callable[[], tuple[ssl.SSLContext, int]],
                 on_refusal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._current = current
        self._on_refusal = on_refusal
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        return [s.getsockname()[:2] for s in self._server.sockets] if self._server else []

    @property
    def gateway(self) -> str:
        host, port = self.config.gateway
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        """Bind ``config.listen``.

        Raises:
            OSError: the address is in use or not available.
        """
        host, port = self.config.listen
        self._server = await asyncio.start_server(self._handle, host, port, limit=_CHUNK)

    async def close(self) -> None:
        """Stop accepting and end every tunnelled connection."""
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
        local = _peer(writer)
        if len(self._connections) >= self.config.max_connections:
            log.warning("tunnel refused local=%s reason='connection limit' detail=%r", local, f"{self.config.max_connections} connections open")
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._tunnel(reader, writer, local)
        except asyncio.CancelledError:
            # close() cancels open connections; ending normally keeps asyncio's stream callback
            # from logging the cancellation as an error with a traceback at every stop.
            pass
        finally:
            try:
                await _close(writer)
            finally:
                self._connections.discard(task)

    async def _dial(self, local: str, context: ssl.SSLContext, serial: int):
        host, port = self.config.gateway
        timeout = self.config.connect_timeout.total_seconds()
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=self.config.server_name or host,
                                        ssl_handshake_timeout=timeout, limit=_CHUNK),
                timeout)
        except ssl.SSLCertVerificationError as exc:
            log.error("tunnel gateway certificate rejected local=%s gateway=%s detail=%r: %s", local, self.gateway,
                      exc.verify_message or str(exc), self._why_rejected(exc))
        except ssl.SSLError as exc:
            reason = alert_reason(exc)
            if reason is not None:
                self._log_refusal(local, serial, reason, exc.reason)
            else:
                log.error("tunnel TLS handshake with the gateway failed local=%s gateway=%s detail=%r", local, self.gateway, exc.reason or str(exc))
        except (OSError, asyncio.TimeoutError) as exc:
            log.error("tunnel gateway unreachable local=%s gateway=%s error=%r", local, self.gateway,
                      str(exc) or f"no connection within {timeout:g} s")
        return None

    def _why_rejected(self, exc: ssl.SSLCertVerificationError) -> str:
        """What a failed verification of the gateway's certificate means for the operator."""
        name = self.config.server_name or self.config.gateway[0]
        if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return ("the gateway's certificate has expired: its agent has not renewed it (see 'pki-agent status' and its log on "
                    "the gateway host: can it reach the EST server?)")
        if exc.verify_code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
            return "the gateway's certificate is not valid yet: the clock of this host or of the CA is wrong"
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (f"the gateway's certificate does not name {name}: dial a name or IP it carries, or set "
                    "tunnel.server_name to one")
        return "it is not from the CA this node trusts (ca.pem): another server answers there, or the CA was replaced"

    def _log_refusal(self, local: str, serial: int, reason: str, detail: str) -> None:
        if self._on_refusal is not None:
            self._on_refusal(reason)
        log.error("tunnel authentication failure: the gateway refused this node's certificate local=%s gateway=%s "
                  "serial=%x reason=%r detail=%r", local, self.gateway, serial, reason, detail)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: str) -> None:
        context, serial = self._current()
        dialed = await self._dial(local, context, serial)
        if dialed is None:
            return
        up_reader, up_writer = dialed
        log.info("tunnel open local=%s gateway=%s serial=%x tls=%s", local, self.gateway, serial,
                 up_writer.get_extra_info("ssl_object").version())
        started = time.monotonic()
        counts = {"up": 0, "down": 0}
        # How each direction ended: ("eof", None), ("read", error) or ("write", error).
        ended: dict[str, tuple[str, BaseException | None]] = {}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, key: str) -> None:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except (ConnectionError, OSError, ssl.SSLError) as exc:
                    ended[key] = ("read", exc)
                    return
                if not data:
                    ended[key] = ("eof", None)
                    return
                try:
                    dst.write(data)
                    counts[key] += len(data)
                    await dst.drain()
                except (ConnectionError, OSError, ssl.SSLError) as exc:
                    ended[key] = ("write", exc)
                    return

        upward = asyncio.create_task(pipe(reader, up_writer, "up"))
        downward = asyncio.create_task(pipe(up_reader, writer, "down"))
        try:
            done, _ = await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
            how = ended.get("up", ("", None))[0]
            if upward in done and how == "eof":
                # The client half-closed. asyncio's TLS transport cannot pass that on (no
                # write_eof), so take what the gateway still sends until it is quiet for _LINGER.
                while True:
                    seen = counts["down"]
                    finished, _ = await asyncio.wait({downward}, timeout=_LINGER)
                    if finished or counts["down"] == seen:
                        break
            elif upward in done and how == "write":
                await asyncio.wait({downward}, timeout=1.0)  # the gateway hung up: let its alert or EOF arrive
        finally:
            for t in (upward, downward):
                t.cancel()
            await asyncio.gather(upward, downward, return_exceptions=True)
            await _close(up_writer)
        self._report_end(local, serial, ended, counts, time.monotonic() - started)

    def _report_end(self, local: str, serial: int, ended: dict, counts: dict, duration: float) -> None:
        up, down = ended.get("up", ("", None)), ended.get("down", ("", None))
        reason = alert_reason(down[1]) if down[0] == "read" else None
        gateway_first = down[0] in ("eof", "read") or up[0] == "write"
        if reason is not None:
            self._log_refusal(local, serial, reason, down[1].reason)
        elif gateway_first and counts["down"] == 0 and up[0] != "eof":
            # The gateway hung up without a byte while the client was still sending: how a TLS 1.3
            # gateway that checks the client after the handshake refuses when it sends no alert
            # (our listener's own checks: allow list, purpose, a CA certificate as client).
            self._log_refusal(local, serial, "closed by the gateway before any data",
                              "the gateway ended the connection right after the handshake; its log says why")
        log.info("tunnel closed local=%s gateway=%s serial=%x bytes_up=%d bytes_down=%d duration=%.3fs",
                 local, self.gateway, serial, counts["up"], counts["down"], duration)
