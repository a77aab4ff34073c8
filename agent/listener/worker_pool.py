"""The gateway's listener as ``listener.workers`` processes, one per core: started, told to
reload, counted, replaced when one dies, and stopped together by the agent (docs/design.md,
"Listener workers"). What each worker does is in :mod:`pki_agent.listener.worker_process`.

The agent binds one ``SO_REUSEPORT`` socket per worker (per address) and each worker inherits
its own; the kernel spreads new connections over them. The agent keeps every socket open, so a
worker that dies leaves its accept queue to its replacement, which inherits the same socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pkictl.clock import Clock, SystemClock
from pkictl.sockets import bind_listening_sockets

from .authz import Authorizer
from ..config import ListenerConfig
from .connection import ListenerStats
from .nodetable import NodeTable, entry_from_wire, merge_tables
from .tls import ServerTLS
from .worker_process import held_to_wire, listener_to_wire

__all__ = ["WorkerPool", "START_BOUND", "RELOAD_BOUND"]

log = logging.getLogger("pki_agent")

START_BOUND = 30.0  # seconds a new worker may take to say it is serving
RELOAD_BOUND = 5.0  # seconds a worker may take to confirm a reload; one that does not is replaced
_QUICK = 2.0  # a worker that dies sooner than this after its start is replaced after a growing pause
_PAUSE_MAX = 30.0
_SIGNALLED_PAUSE = 2.0  # seconds before replacing a worker that stopped on SIGTERM or SIGINT of its own


class _Worker:
    """The agent's side of one worker: its sockets (kept across replacements) and its last report."""

    def __init__(self, index: int, sockets: list[socket.socket]) -> None:
        self.index = index
        self.sockets = sockets
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.buffer = bytearray()
        self.ready: asyncio.Future | None = None
        self.pid = 0
        self.started = 0.0
        self.quick_deaths = 0
        self.acked = 0  # the last reload it confirmed
        self.reload_error: str | None = None
        self.stopping: str | None = None  # the signal it said it stops on
        self.table = NodeTable()
        self.stats = ListenerStats()
        self.open = 0
        self.live: dict[str, tuple[int, int]] = {}


class WorkerPool:
    """``config.worker_count`` listener processes on ``config.listen``, seen as one listener
    (:class:`pki_agent.listener.view.ListenerView`): counters, table and bytes are the sums of
    the workers' reports, those of workers that died included.

    Args:
        config: the listener's settings (``workers`` of them).
        current: the agent's :class:`ServerTLS` in service; a worker starts with no older CRL
            than its CRL numbers (a replayed CRL the agent refused stays refused).
        trust_domain: the SPIFFE trust domain of node identities.
        credential_dir: the gateway's credential directory, which each worker loads.
        key_group: the group that may read the key (``credential_group``), or None.
        log_format: the workers' log format (``text`` or ``json``).
        clock: the time of the table's rows.
    """

    def __init__(self, config: ListenerConfig, current: Callable[[], ServerTLS], trust_domain: str, credential_dir: Path, *,
                 key_group: int | None = None, log_format: str = "text", clock: Clock | None = None) -> None:
        self.config = config
        self._current = current
        self.clock = clock or SystemClock()
        self.authorizer = Authorizer(trust_domain, config.allowed_names)
        self.on_change: Callable[[], None] | None = None
        self.restarts = 0
        self._setup = {"listener": listener_to_wire(config), "credential_dir": str(credential_dir), "trust_domain": trust_domain,
                       "key_group": key_group, "log_format": log_format}
        self._workers: list[_Worker] = []
        self._addresses: list[tuple[str, int]] = []
        self._retired_table = NodeTable()  # what workers that died had counted
        self._retired_stats = ListenerStats()
        self._merged: NodeTable | None = None
        self._seq = 0
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the listener as the agent sees it ----------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (useful with port 0)."""
        return list(self._addresses)

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers serving now."""
        return [w.pid for w in self._workers if w.control is not None and w.pid]

    @property
    def workers_serving(self) -> int:
        """Workers that said they serve and have not stopped since."""
        return sum(1 for w in self._workers if w.control is not None and w.ready is not None and w.ready.done()
                   and w.ready.exception() is None)

    @property
    def worker_restarts(self) -> int:
        """Workers started again after one stopped, since the agent started."""
        return self.restarts

    @property
    def active_connections(self) -> int:
        """Connections open now in every worker (as last reported), handshaking ones included."""
        return sum(w.open for w in self._workers)

    @property
    def stats(self) -> ListenerStats:
        """The workers' counters summed, those of workers that died included."""
        total = ListenerStats()
        for stats in (self._retired_stats, *(w.stats for w in self._workers)):
            total.add(stats)
        return total

    @property
    def table(self) -> NodeTable:
        """The workers' connection tables as one (:func:`pki_agent.listener.nodetable.merge_tables`)."""
        if self._merged is None:
            self._merged = merge_tables([self._retired_table, *(w.table for w in self._workers)])
        return self._merged

    def live_bytes(self) -> dict[str, tuple[int, int]]:
        """Bytes ``(in, out)`` forwarded so far by each node's open connections, in every worker."""
        out: dict[str, tuple[int, int]] = {}
        for w in self._workers:
            for name, (bytes_in, bytes_out) in w.live.items():
                got = out.get(name, (0, 0))
                out[name] = (got[0] + bytes_in, got[1] + bytes_out)
        return out

    def bytes_forwarded(self) -> tuple[int, int]:
        """``(node to upstream, upstream to node)`` bytes so far, open connections included."""
        stats = self.stats
        live = self.live_bytes().values()
        return stats.closed_bytes_in + sum(b for b, _ in live), stats.closed_bytes_out + sum(b for _, b in live)

    def connection_table(self) -> list[dict]:
        """The per-node table now, of every worker (:meth:`pki_agent.listener.nodetable.NodeTable.rows`)."""
        return self.table.rows(self.clock.now(), self.live_bytes())

    # -- processes ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``config.listen`` once per worker (``SO_REUSEPORT``), start the workers and wait
        until every one serves.

        Raises:
            OSError: the address cannot be bound, or a worker did not start (nothing stays running).
        """
        loop = self._loop = asyncio.get_running_loop()
        host, port = self.config.listen
        if port != 0:
            # SO_REUSEPORT would let these sockets join those of another process of this user
            # on the port (another agent, a test server) and share its connections in silence:
            # a plain bind first fails on any listener there, with the usual message.
            for sock in await bind_listening_sockets(loop, host, port):
                sock.close()
        sets = [await bind_listening_sockets(loop, host, port, reuse_port=True)]
        try:
            bound = sets[0][0].getsockname()[1]
            for _ in range(self.config.worker_count - 1):
                sets.append(await bind_listening_sockets(loop, host, bound, reuse_port=True))
        except OSError:
            for sock in (s for group in sets for s in group):
                sock.close()
            raise
        self._workers = [_Worker(i, sockets) for i, sockets in enumerate(sets)]
        self._addresses = [s.getsockname()[:2] for s in sets[0]]
        for worker in self._workers:
            self._spawn(worker)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in self._workers if w.ready is not None)), START_BOUND)
        except (OSError, asyncio.TimeoutError) as exc:
            await self.close(timeout=1)
            raise OSError(f"a listener worker did not start within {START_BOUND:g} s: {exc or 'no answer'} (its log lines say why)") from None
        log.info("listener: %d workers serving (pids %s)", len(self._workers), " ".join(map(str, self.pids)))

    def _spawn(self, worker: _Worker) -> None:
        assert self._loop is not None
        parent, child = socket.socketpair()
        fds = [s.fileno() for s in worker.sockets]
        loop_name = "uvloop" if type(self._loop).__module__.startswith("uvloop") else "asyncio"
        setup = {**self._setup, "sockets": fds, "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                 "held": held_to_wire(self._current().crl_numbers)}
        try:
            worker.proc = subprocess.Popen([sys.executable, "-m", "pki_agent.listener.worker_process", str(child.fileno()), loop_name],
                                           pass_fds=[child.fileno(), *fds], stdin=subprocess.DEVNULL)
            parent.sendall(json.dumps({"setup": setup}).encode() + b"\n")
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        worker.control, worker.buffer, worker.pid, worker.started = parent, bytearray(), worker.proc.pid, time.monotonic()
        worker.ready = self._loop.create_future()
        self._loop.add_reader(parent.fileno(), self._readable, worker)

    def _readable(self, worker: _Worker) -> None:
        if worker.control is None:
            return
        try:
            data = worker.control.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(worker)
            return
        worker.buffer += data
        while (end := worker.buffer.find(b"\n")) >= 0:
            line = bytes(worker.buffer[:end])
            del worker.buffer[: end + 1]
            try:
                self._message(worker, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:  # a bug, not a peer: our own child wrote it
                log.error("listener worker pid %d sent what the agent cannot read (%s): replacing it", worker.pid, exc)
                self._kill(worker)
                return

    def _message(self, worker: _Worker, message: dict) -> None:
        if "report" in message:
            report = message["report"]
            stats = worker.stats
            stats.accepted, stats.refused = int(report["accepted"]), {str(k): int(v) for k, v in report["refused"].items()}
            stats.closed_bytes_in, stats.closed_bytes_out = int(report["closed_bytes_in"]), int(report["closed_bytes_out"])
            worker.open = int(report["open"])
            worker.live = {str(k): (int(v[0]), int(v[1])) for k, v in report["live"].items()}
            base = worker.pid << 48  # connection ids are unique within one worker only
            for name, wire in report["nodes"].items():
                worker.table.nodes[name] = entry_from_wire(wire, base)
            worker.table.anonymous_refusals = {str(k): int(v) for k, v in report["anonymous"].items()}
            self._merged = None
            if report["nodes"] and self.on_change is not None:
                self.on_change()
        elif "reloaded" in message:
            worker.acked, worker.reload_error = int(message["reloaded"]), message["error"]
        elif "stopping" in message:
            worker.stopping = str(message["stopping"])
        elif "ready" in message:
            log.info("listener worker %d (pid %d) serving serial %s", worker.index, worker.pid, message["ready"]["serial"])
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)

    def _send(self, worker: _Worker, message: dict) -> bool:
        if worker.control is None:
            return False
        try:
            worker.control.send(json.dumps(message).encode() + b"\n")  # a few bytes: the socket buffer takes them whole
        except OSError as exc:  # BlockingIOError included: a worker that reads nothing is stuck
            log.error("listener worker pid %d cannot be told to %s (%s): replacing it", worker.pid, next(iter(message)), exc)
            self._kill(worker)
            return False
        return True

    def _kill(self, worker: _Worker) -> None:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()

    def _lost(self, worker: _Worker) -> None:
        """The worker's end of the link closed: it exited (or is exiting). Keep what it counted,
        drop its open connections from the table, and start a replacement on its sockets."""
        assert self._loop is not None
        if worker.control is not None:
            self._loop.remove_reader(worker.control.fileno())
            worker.control.close()
            worker.control = None
        now = self.clock.now()
        for entry in worker.table.nodes.values():
            if entry.open:
                entry.open.clear()
                entry.last_seen = now  # it was connected until now
        self._retired_table = merge_tables([self._retired_table, worker.table])
        self._retired_stats.add(worker.stats)
        worker.table, worker.stats, worker.open, worker.live = NodeTable(), ListenerStats(), 0, {}
        self._merged = None
        if self.on_change is not None:
            self.on_change()
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(OSError(f"worker pid {worker.pid} exited before it was ready"))
        task = self._loop.create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, worker: _Worker) -> None:
        proc = worker.proc
        assert proc is not None
        try:
            code = await asyncio.to_thread(proc.wait, RELOAD_BOUND)
        except subprocess.TimeoutExpired:  # closed its link, yet still runs: it is of no use any more
            proc.kill()
            code = await asyncio.to_thread(proc.wait)
        if self._closing:
            return
        if worker.stopping is not None and code == 0:
            # Stopped on a signal of its own: most likely sent to every process of the service
            # (systemctl stop, Ctrl-C), which stops the agent too and cancels this replacement.
            log.info("listener worker %d (pid %d) stopped on %s; starting a replacement in %g s unless the agent stops too",
                     worker.index, worker.pid, worker.stopping, _SIGNALLED_PAUSE)
            worker.stopping = None
            await asyncio.sleep(_SIGNALLED_PAUSE)
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            quick = time.monotonic() - worker.started < _QUICK
            worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
            pause = min(0.5 * 2 ** (worker.quick_deaths - 1), _PAUSE_MAX) if quick else 0.0
            log.error("listener worker %d (pid %d) %s; starting a replacement%s; the other workers' connections are not affected",
                      worker.index, worker.pid, how, f" in {pause:g} s (it died {worker.quick_deaths} time(s) just after starting)" if pause else "")
            if pause:
                await asyncio.sleep(pause)
        if not self._closing:
            self.restarts += 1
            try:
                self._spawn(worker)
            except OSError as exc:  # no process or descriptor left: try again, with the pauses of a quick death
                log.error("cannot start listener worker %d again: %s", worker.index, exc)
                worker.started = time.monotonic()
                self._lost(worker)

    def reloaded(self, tls: ServerTLS) -> None:
        """The agent took a new credential, trust bundle or CRL into service: every worker loads
        it from the files, and this returns once each serving worker confirmed (or was replaced
        for not confirming within :data:`RELOAD_BOUND` s: a replacement loads the files as they
        are). Each worker closes its own connections of newly revoked nodes.

        Blocks the agent's loop for as long as the workers take (a few ms): the agent's loop
        serves no connection, and a reload that returns before every worker serves it would let
        a revoked node in at a worker that has not reloaded yet.
        """
        self._seq += 1
        seq = self._seq
        told = [w for w in self._workers if self._send(w, {"reload": seq})]
        waiting = [w for w in told if w.ready is not None and w.ready.done() and w.ready.exception() is None]
        deadline = time.monotonic() + RELOAD_BOUND
        while waiting and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([w.control for w in waiting if w.control is not None], [], [], left)
            for worker in [w for w in waiting if w.control in readable]:
                self._readable(worker)
            waiting = [w for w in waiting if w.control is not None and w.acked < seq]
        for worker in waiting:
            log.error("listener worker %d (pid %d) did not confirm the reload within %g s: replacing it", worker.index, worker.pid, RELOAD_BOUND)
            self._kill(worker)
        for worker in told:
            if worker.acked == seq and worker.reload_error is not None:
                log.warning("listener worker %d (pid %d) kept its context: %s", worker.index, worker.pid, worker.reload_error)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (each ends its connections within ``timeout`` s, as a listener's
        close does), kill those that take longer, and release the sockets."""
        self._closing = True
        for worker in self._workers:
            self._send(worker, {"stop": timeout})
        deadline = time.monotonic() + timeout + RELOAD_BOUND
        for worker in self._workers:
            if worker.proc is None:
                continue
            try:
                await asyncio.to_thread(worker.proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("listener worker %d (pid %d) did not stop within %g s: killing it", worker.index, worker.pid, timeout + RELOAD_BOUND)
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
        for worker in self._workers:
            for _ in range(64):  # what is left of its last report, then the end of the link (it has exited)
                if worker.control is None:
                    break
                self._readable(worker)
        for task in self._tasks:
            task.cancel()  # a replacement waiting out its pause: none is started any more
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self._workers:
            if worker.control is not None and self._loop is not None:
                self._loop.remove_reader(worker.control.fileno())
                worker.control.close()
                worker.control = None
            for sock in worker.sockets:
                sock.close()
        self._addresses = []
