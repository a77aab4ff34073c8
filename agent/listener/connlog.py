"""How the listener tells the operator about each connection: refused, accepted, closed; text or JSON lines.

Every event is one log record whose message reads ``refused peer=... reason='...' ...`` and
which carries the same fields as a dict (``record.pki_event``), so that the JSON formatter
writes them as keys instead of parsing text back. The time is the record's: ``asctime`` in the
text format, ``time`` (ISO 8601, UTC) in JSON.

Refusals are logged at once. Accepted and closed lines go through an :class:`EventBatch`, which
hands them to logging together within 0.1 s, each with the time of its event (as nginx's
``access_log ... buffer=`` does).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from typing import Callable, Literal

from pkictl.handshake import CLIENT_REJECTED
from pkictl.logfmt import bare

from .authz import PeerIdentity

__all__ = ["log_refused", "log_probe", "log_accepted", "log_closed", "EventBatch", "TextFormatter", "JSONFormatter", "BatchingStreamHandler", "configure_logging", "TEXT_FORMAT"]

log = logging.getLogger("pki_agent.listener")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_refused(peer: str, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None:
    """Log a refused connection (WARNING).

    A client that refused *our* certificate (reason :data:`pkictl.handshake.CLIENT_REJECTED`) is
    logged as ``rejected by client ...`` instead: the fix is on this side or in the client's
    trust anchor, not in the client's certificate (docs/design.md, "Handshake failures").

    Args:
        peer: the client's ``host:port``.
        reason: the stable reason (``unknown CA``, ``revoked``, ``not allowed``, ``not TLS``...).
        detail: what exactly OpenSSL or the authorization rule said.
        node: the identity the certificate claims, when the handshake got that far.
        serial: its serial number, likewise.
    """
    what = "rejected by client" if reason == CLIENT_REJECTED else "refused"
    event = {"event": what, "peer": peer, "reason": reason, "node": node, "serial": _hex(serial), "detail": detail}
    # The name comes from a certificate: escaped as everything from a peer is, though our CA's names are plain.
    who = (f" node={bare(node)}" if node else "") + (f" serial={serial:x}" if serial is not None else "")
    log.warning("%s peer=%s reason=%r%s detail=%r", what, peer, reason, who, detail, extra={"pki_event": event})


def log_probe(peer: str, serial: int | None) -> None:
    """Log a test connection of ``pki-agent doctor`` on this gateway (INFO, reason ``doctor probe``):
    it presented this listener's own certificate, proving it holds its key, and was closed."""
    event = {"event": "probe", "peer": peer, "reason": "doctor probe", "serial": _hex(serial),
             "detail": "this gateway's own certificate: pki-agent doctor checking the listener"}
    who = f" serial={serial:x}" if serial is not None else ""
    log.info("probe peer=%s reason=%r%s detail=%r", peer, "doctor probe", who, event["detail"], extra={"pki_event": event})


def log_accepted(peer: str, identity: PeerIdentity, tls_version: str | None, *, batch: "EventBatch") -> None:
    """Log an authorized connection whose upstream is connected (INFO), through ``batch``."""
    if not log.isEnabledFor(logging.INFO):
        return
    event = {"event": "accepted", "peer": peer, "node": identity.name, "serial": _hex(identity.serial), "tls": tls_version}
    batch.add("accepted peer=%s node=%s serial=%x tls=%s", (peer, identity.name, identity.serial, tls_version), event)


def log_closed(peer: str, identity: PeerIdentity, *, bytes_in: int, bytes_out: int, duration: float, reason: str,
               batch: "EventBatch") -> None:
    """Log the end of an accepted connection (INFO), through ``batch``.

    Args:
        bytes_in: bytes forwarded from the node to the upstream.
        bytes_out: bytes forwarded from the upstream to the node.
        duration: seconds since the handshake completed.
        reason: who or what ended it (``client closed``, ``upstream closed``, ``idle timeout``,
            ``max connection age``, ``revoked``, ``listener stopped``...).
    """
    if not log.isEnabledFor(logging.INFO):
        return
    event = {"event": "closed", "peer": peer, "node": identity.name, "serial": _hex(identity.serial), "bytes_in": bytes_in,
             "bytes_out": bytes_out, "duration": round(duration, 3), "reason": reason}
    args = (peer, identity.name, identity.serial, bytes_in, bytes_out, duration, reason)
    batch.add("closed peer=%s node=%s serial=%x bytes_in=%d bytes_out=%d duration=%.3fs reason=%r", args, event)


class EventBatch:
    """Accepted and closed lines of one listener, handed to logging together (INFO).

    Under a handshake flood, a logging call per event cost about 0.045 ms of CPU per line (8%
    of a handshake's CPU for the two lines): the logging code is cold in the caches after every
    OpenSSL handshake. Emitted a hundred at a time, and written straight to the agent's own
    handler, the two lines cost no CPU that bench/gateway_peers.py can tell from its noise (1%).
    Each line keeps the time of its event; a line waits at most ``delay`` seconds.

    Args:
        loop: the listener's event loop (``add`` must be called from it).
        delay: seconds between the first waiting line and the flush.
        clock: the time of an event, seconds since the epoch (``time.time``; tests inject one).
    """

    def __init__(self, loop, delay: float = 0.1, clock: Callable[[], float] = time.time) -> None:
        self._loop = loop
        self._delay = delay
        self._clock = clock
        self._items: list[tuple[float, str, tuple, dict]] = []
        self._timer = None

    def add(self, msg: str, args: tuple, event: dict) -> None:
        """Queue one INFO line (``msg % args``) with its event fields; it leaves within ``delay`` s."""
        self._items.append((self._clock(), msg, args, event))
        if self._timer is None:
            self._timer = self._loop.call_later(self._delay, self.flush)

    def flush(self) -> None:
        """Hand every waiting line to logging now (the timer, and the listener when it closes).

        When the agent's own handler is the only one on the way, with its own formatter and no
        filter (``configure_logging``), the lines are formatted here and handed to it in one call:
        the same text as through records (tests/test_connlog.py), without a record each.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, []
        sole = _sole_handler()
        if sole is not None:
            handler, line = sole[0], sole[1].event_line
            handler.emit_lines([line(created, log.name, msg % args, event) for created, msg, args, event in items])
            return
        for created, msg, args, event in items:
            record = log.makeRecord(log.name, logging.INFO, __file__, 0, msg, args, None, extra={"pki_event": event})
            record.relativeCreated -= (record.created - created) * 1000
            record.created = created
            record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
            log.handle(record)


def _sole_handler() -> "tuple[BatchingStreamHandler, TextFormatter | JSONFormatter] | None":
    """The handler of the listener's INFO lines and its formatter if it is the agent's own, alone,
    unfiltered and with the agent's own formatter; None otherwise (pytest's caplog, an embedding
    application)."""
    if not log.isEnabledFor(logging.INFO):
        return None
    found = []
    logger: logging.Logger | None = log
    while logger is not None:
        if logger.filters:
            return None
        found += logger.handlers
        logger = logger.parent if logger.propagate else None
    if len(found) != 1:
        return None
    handler = found[0]
    if type(handler) is not BatchingStreamHandler or handler.filters or handler.level > logging.INFO:
        return None
    formatter = handler.formatter
    if type(formatter) is TextFormatter or type(formatter) is JSONFormatter:  # not a subclass: its format() could differ
        return handler, formatter
    return None


def _hex(serial: int | None) -> str | None:
    return None if serial is None else f"{serial:x}"


class _Stamp:
    """What ``Formatter.formatTime`` reads of a record."""

    __slots__ = ("created", "msecs")

    def __init__(self, created: float) -> None:
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``: local time with milliseconds, level, logger, message."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def event_line(self, created: float, name: str, message: str, event: dict) -> str:
        """The line :meth:`format` makes of an INFO record of logger ``name`` created at ``created``."""
        return f"{self.formatTime(_Stamp(created))} INFO {name}: {message}"  # type: ignore[arg-type]  # formatTime reads created and msecs only


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 UTC, ms), ``level``, ``logger``, ``message``,
    the event's fields when the record is a connection event, and ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self._line(record.created, record.levelname, record.name, record.getMessage(),
                          getattr(record, "pki_event", None), exception)

    def event_line(self, created: float, name: str, message: str, event: dict) -> str:
        """The line :meth:`format` makes of an INFO record of logger ``name`` created at ``created``."""
        return self._line(created, "INFO", name, message, event, None)

    @staticmethod
    def _line(created: float, level: str, name: str, message: str, event: dict | None, exception: str | None) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": level.lower(),
            "logger": name,
            "message": message,
        }
        if event:
            entry.update((k, v) for k, v in event.items() if v is not None)
        if exception:
            entry["exception"] = exception
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
        self._schedule()

    def emit_lines(self, lines: list[str]) -> None:
        """Write lines formatted already (by this handler's formatter), in the same batch as records."""
        terminator = self.terminator
        self.acquire()
        try:
            self._lines.extend(line + terminator for line in lines)
        finally:
            self.release()
        self._schedule()

    def _schedule(self) -> None:
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
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected": the reload line says it
