"""One listener worker process (``python -m pki_agent.listener.worker_process FD``): serves the gateway's
listener on the sockets the agent gave it, reloads when told, and reports its counters and table.

The agent (:mod:`pki_agent.listener.worker_pool`) starts it with one end of a Unix socket pair as file
descriptor FD and its listening sockets as further inherited descriptors. Over that socket, one
JSON object per line (docs/design.md, "Listener workers"):

- agent to worker: ``{"setup": {...}}`` first (the listener settings, the credential directory,
  the log format, the sockets' descriptors), then ``{"reload": SEQ}`` and ``{"stop": SECONDS}``;
- worker to agent: ``{"ready": {...}}``, ``{"reloaded": SEQ, "serial": HEX, "error": TEXT}``
  and, at most every :data:`REPORT` seconds while something changed, ``{"report": {...}}``: the
  counters, the open connections, and the table entries of the nodes that changed.

SIGHUP reloads from disk, SIGTERM and SIGINT close the listener gracefully, and so does the end
of the socket (the agent is gone: no worker outlives it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Mapping

from pkictl.crl_numbers import CRLKey, HeldCRL
from pkictl.errors import PKIError
from pkictl.formats import VersionLayout
from pkictl.loops import event_loop_factory
from pkictl.store import CredentialStore

from ..config import ListenerConfig
from .connlog import configure_logging
from .server import GatewayListener
from .nodetable import ConnectionEvent, entry_to_wire
from .tls import ServerTLS, server_context

__all__ = ["Worker", "main", "REPORT", "listener_to_wire", "listener_from_wire", "held_to_wire", "held_from_wire"]

REPORT = 0.1  # seconds between two reports to the agent at most (the fleet view's lag from a worker)

log = logging.getLogger("pki_agent.listener")


def listener_to_wire(config: ListenerConfig) -> dict:
    """``config`` as JSON-ready values that :func:`listener_from_wire` turns back into it exactly
    (durations as ``{"seconds": S}``, paths as text)."""
    out: dict = {}
    for key, value in config.model_dump().items():
        if isinstance(value, dt.timedelta):
            value = {"seconds": value.total_seconds()}
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out


def listener_from_wire(wire: dict) -> ListenerConfig:
    """The :class:`ListenerConfig` :func:`listener_to_wire` made.

    Raises:
        pydantic.ValidationError: ``wire`` is not a valid listener configuration.
    """
    return ListenerConfig.model_validate({k: dt.timedelta(seconds=v["seconds"]) if isinstance(v, dict) else v for k, v in wire.items()})


def held_to_wire(held: Mapping[CRLKey, HeldCRL]) -> list:
    """The CRL numbers in service (:attr:`pki_agent.listener.tls.ServerTLS.crl_numbers`) as JSON-ready values."""
    return [[issuer.hex(), aki.hex() if aki is not None else None, h.issuer, h.number, h.sha256.hex()]
            for (issuer, aki), h in held.items()]


def held_from_wire(wire: list) -> dict[CRLKey, HeldCRL]:
    """The CRL numbers :func:`held_to_wire` made."""
    return {(bytes.fromhex(issuer), bytes.fromhex(aki) if aki is not None else None): HeldCRL(name, int(number), bytes.fromhex(digest))
            for issuer, aki, name, number, digest in wire}


class Worker:
    """The listener of one worker process and its link to the agent.

    Args:
        setup: what the agent sent first (see :meth:`pki_agent.listener.worker_pool.WorkerPool._spawn`).
        reader, writer: the socket pair's end, as asyncio streams.
    """

    def __init__(self, setup: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.config = listener_from_wire(setup["listener"])
        self.store = CredentialStore(Path(setup["credential_dir"]), layout=VersionLayout(group=setup["key_group"]))
        self.reader, self.writer = reader, writer
        # The agent's CRL numbers: a worker started after the agent refused an older CRL on disk
        # refuses it too, rather than serve it (CRLRollbackError: it exits, and is started again).
        self.tls: ServerTLS = server_context(self.store, self.config.crl, held=held_from_wire(setup["held"]))
        self.listener = GatewayListener(self.config, lambda: self.tls, setup["trust_domain"])
        self.listener.on_event = self._changed
        self._sockets = [socket.socket(fileno=fd) for fd in setup["sockets"]]
        self._dirty: set[str] = set()
        self._anonymous = False
        self._last: tuple | None = None
        self.stopped = asyncio.Event()

    def _changed(self, event: ConnectionEvent) -> None:
        if event.node is None:
            self._anonymous = True
        else:
            self._dirty.add(event.node)

    def send(self, message: dict) -> None:
        """Queue one line to the agent (the stream buffers it; the loop writes it)."""
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def reload(self) -> str | None:
        """Build a fresh context from the files (refusing an older CRL); on any error keep the
        current one. Established connections of newly revoked nodes are closed.

        Returns:
            None when the new context is in service, else what went wrong (logged).
        """
        try:
            fresh = server_context(self.store, self.config.crl, held=self.tls.crl_numbers)
        except (PKIError, ssl.SSLError, OSError) as exc:
            log.error("reload failed, still serving serial %x: %s", self.tls.credential.certificate.serial_number, exc)
            return str(exc)
        self.tls = fresh
        log.info("serving serial %x (%d revoked)", fresh.credential.certificate.serial_number, len(fresh.revoked))
        self.listener.reloaded(fresh)
        return None

    def _report(self) -> None:
        listener, stats = self.listener, self.listener.stats
        live = listener.live_bytes()
        state = (stats.accepted, sum(stats.refused.values()), stats.closed_bytes_in, stats.closed_bytes_out,
                 listener.active_connections, sorted(live.items()))
        if state == self._last and not self._dirty and not self._anonymous:
            return
        nodes = {name: entry_to_wire(listener.table.nodes[name]) for name in self._dirty if name in listener.table.nodes}
        self.send({"report": {"accepted": stats.accepted, "refused": stats.refused, "closed_bytes_in": stats.closed_bytes_in,
                              "closed_bytes_out": stats.closed_bytes_out, "open": listener.active_connections,
                              "live": live, "nodes": nodes, "anonymous": listener.table.anonymous_refusals}})
        self._last, self._dirty, self._anonymous = state, set(), False

    async def _reports(self) -> None:
        while not self.stopped.is_set():
            self._report()
            await asyncio.sleep(REPORT)

    async def _commands(self) -> None:
        try:
            while True:
                try:
                    line = await self.reader.readline()
                except OSError:  # ECONNRESET: the agent died with a report of ours unread
                    break
                if not line:
                    break  # the agent is gone
                message = json.loads(line)
                if "reload" in message:
                    error = self.reload()
                    self.send({"reloaded": message["reload"], "serial": f"{self.tls.credential.certificate.serial_number:x}", "error": error})
                elif "stop" in message:
                    break
        finally:
            self.stopped.set()  # whatever ended the link, no worker outlives the agent

    def _signalled(self, sig: signal.Signals) -> None:
        # Said first, so that the agent does not take the exit for a crash: systemd's stop and a
        # terminal's Ctrl-C signal every process, the agent included, which stops them all anyway.
        self.send({"stopping": sig.name})
        self.stopped.set()

    async def run(self) -> None:
        """Serve until told to stop, SIGTERM or SIGINT, or the end of the link; then close the
        listener (open connections end) and send the last report."""
        loop = asyncio.get_running_loop()
        await self.listener.start(self._sockets)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the agent's renew-now, sent to every process of the unit: not ours
        self.send({"ready": {"pid": os.getpid(), "serial": f"{self.tls.credential.certificate.serial_number:x}"}})
        gc.freeze()  # as the agent's own process does once serving (agent/cli.py)
        commands = loop.create_task(self._commands())
        reports = loop.create_task(self._reports())
        await self.stopped.wait()
        await self.listener.close()
        commands.cancel()
        reports.cancel()
        await asyncio.gather(commands, reports, return_exceptions=True)
        self._report()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass  # the agent closed its end first


async def _serve(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    first = await reader.readline()
    if not first:
        return
    setup = json.loads(first)["setup"]
    configure_logging(setup["log_format"], setup["log_level"], worker=os.getpid())
    try:
        worker = Worker(setup, reader, writer)
    except (PKIError, ssl.SSLError, OSError) as exc:
        log.error("cannot start: %s", exc)
        writer.close()
        raise SystemExit(1) from None
    await worker.run()


def main(argv: list[str] | None = None) -> int:
    """The worker's entry point: ``python -m pki_agent.listener.worker_process FD [LOOP]``."""
    args = sys.argv[1:] if argv is None else argv
    factory, _ = event_loop_factory(args[1] if len(args) > 1 else "auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(int(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
