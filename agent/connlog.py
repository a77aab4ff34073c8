"""How the listener tells the operator about each connection: refused, accepted, closed; text or JSON lines.

Every event is one log record whose message reads ``refused peer=... reason='...' ...`` and
which carries the same fields as a dict (``record.pki_event``), so that the JSON formatter
writes them as keys instead of parsing text back. The time is the record's: ``asctime`` in the
text format, ``time`` (ISO 8601, UTC) in JSON.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Literal

from .authz import PeerIdentity

__all__ = ["log_refused", "log_accepted", "log_closed", "JSONFormatter", "BatchingStreamHandler", "configure_logging", "TEXT_FORMAT"]

log = logging.getLogger("pki_agent.listener")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_refused(peer: str, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None:
    """Log a refused connection (WARNING).

    Args:
        peer: the client's ``host:port``.
        reason: the stable reason (``unknown CA``, ``revoked``, ``not allowed``, ``not TLS``...).
        detail: what exactly OpenSSL or the authorization rule said.
        node: the identity the certificate claims, when the handshake got that far.
        serial: its serial number, likewise.
    """
    event = {"event": "refused", "peer": peer, "reason": reason, "node": node, "serial": _hex(serial), "detail": detail}
    who = (f" node={node}" if node else "") + (f" serial={serial:x}" if serial is not None else "")
    log.warning("refused peer=%s reason=%r%s detail=%r", peer, reason, who, detail, extra={"pki_event": event})


def log_accepted(peer: str, identity: PeerIdentity, tls_version: str | None) -> None:
    """Log an authorized connection whose upstream is connected (INFO)."""
    event = {"event": "accepted", "peer": peer, "node": identity.name, "serial": _hex(identity.serial), "tls": tls_version}
    log.info("accepted peer=%s node=%s serial=%x tls=%s", peer, identity.name, identity.serial, tls_version,
             extra={"pki_event": event})


def log_closed(peer: str, identity: PeerIdentity, *, bytes_in: int, bytes_out: int, duration: float, reason: str) -> None:
    """Log the end of an accepted connection (INFO).

    Args:
        bytes_in: bytes forwarded from the node to the upstream.
        bytes_out: bytes forwarded from the upstream to the node.
        duration: seconds since the handshake completed.
        reason: who or what ended it (``client closed``, ``upstream closed``, ``idle timeout``,
            ``max connection age``, ``revoked``, ``listener stopped``...).
    """
    event = {"event": "closed", "peer": peer, "node": identity.name, "serial": _hex(identity.serial), "bytes_in": bytes_in,
             "bytes_out": bytes_out, "duration": round(duration, 3), "reason": reason}
    log.info("closed peer=%s node=%s serial=%x bytes_in=%d bytes_out=%d duration=%.3fs reason=%r",
             peer, identity.name, identity.serial, bytes_in, bytes_out, duration, reason, extra={"pki_event": event})


def _hex(serial: int | None) -> str | None:
    return None if serial is None else f"{serial:x}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 UTC, ms), ``level``, ``logger``, ``message``,
    the event's fields when the record is a connection event, and ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "pki_event", None)
        if event:
            entry.update((k, v) for k, v in event.items() if v is not None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class BatchingStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes the lines of one event-loop iteration with one ``write``.

    Under a handshake flood the listener logs two lines per connection; a write (and a wake-up
    of the reader of the pipe, journald or a terminal) per line cost more CPU than the rest of
    the connection's Python code. Lines are flushed at the end of the loop iteration that logged
    them, so nothing waits; outside the loop (other threads, shutdown) a line is written at once.
    """

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._lines:
                data, self._lines = "".join(self._lines), []
                self.stream.write(data)
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


def configure_logging(fmt: Literal["text", "json"], level: str = "INFO") -> None:
    """Send the agent's log to stderr in ``fmt`` (``text`` or ``json``) at ``level``."""
    # The logging HOWTO's "Optimization": no caller lookup, thread or process fields, which no
    # format here shows and which cost a stack walk and calls per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected": the reload line says it
