"""Worker processes that issue for ``pkictl serve``, so that issuance runs beside the event loop.

Each worker loads the CA from its home once and then answers ``simple_enroll`` and
``simple_reenroll`` calls, one at a time. Before each call it follows ``pkictl rotate-issuing``
(:meth:`CertificateAuthority.refresh_issuing`, two stat calls when nothing changed), so that a
new issuing CA signs from its activation on without a restart, and no call fails or is answered
twice on the way. The event loop keeps doing TLS handshakes and HTTP while
workers run the issuance policy, the SQLite transactions and the audit log's fsyncs: in one
process all of that shared one core and the loop stood still during every fsync. Workers
coordinate through what already makes concurrent ``pkictl`` processes safe: SQLite ``BEGIN
IMMEDIATE`` for the inventory and tokens, and the audit log's ``flock``.

Each worker talks to the loop over its own pipe (:func:`multiprocessing.Pipe`), watched with
``loop.add_reader``: one small message each way per call and no helper threads. A
``concurrent.futures.ProcessPoolExecutor`` cost ~1.4 ms of CPU per call in its queue and
manager threads, more than the issuance itself (~1.9 ms), so it is not used here. Calls are
sent as they come, to the worker with the fewest outstanding, and queue in its pipe: a worker
never waits for the loop to hand it the next call (with one call at a time, a worker sat idle
whenever the loop was busy: one worker served 164 re-enrollments/s, against 280-370/s queued).
Answers come back in the order the calls went out.

With group commit (the default) a worker takes every call queued in its pipe and runs them in
one SQLite transaction and one audit-log write (:mod:`pkictl.est.group_commit`), answering them
only once both are durable.

Workers start with ``spawn`` (a fresh interpreter): forking a process that runs an event loop and
scheduler threads copies locks in unknown states. Errors raised in a worker (PolicyError,
PendingApproval, ...) are pickled back and re-raised by the caller unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import multiprocessing
import signal
from typing import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import PKIError
from .group_commit import MAX_GROUP, note_peer, run_group, run_one

__all__ = ["SignerPool", "SignerUnavailable"]

log = logging.getLogger("pkictl.serve")

QUEUE_DEPTH = 16
RESPAWN_PAUSE_MAX = 30.0  # seconds between attempts to start a worker that keeps failing to load
"""Calls a worker may have outstanding: ~1.2 KiB each, well inside a pipe's 64 KiB buffer, so a
send never blocks the event loop; further calls wait for a slot."""


class SignerUnavailable(PKIError):
    """No worker could answer the request (it died or took too long); the client should retry."""


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _simple_reenroll(ca, csr_der: bytes, current_der: bytes, peer: str | None = None) -> bytes:
    certificate = ca.simple_reenroll(x509.load_der_x509_csr(csr_der), x509.load_der_x509_certificate(current_der))
    note_peer(ca, certificate.serial_number, peer)
    return _der(certificate)


def _simple_enroll(ca, csr_der: bytes, name: str | None, token: str | None, peer: str, note: bool = False) -> bytes:
    certificate = ca.simple_enroll(x509.load_der_x509_csr(csr_der), name=name, token=token, peer=peer)
    note_peer(ca, certificate.serial_number, peer if note else None)
    return _der(certificate)


_OPERATIONS: dict[str, Callable[..., bytes]] = {"simple_reenroll": _simple_reenroll, "simple_enroll": _simple_enroll}


def _run(ca, operation: str, args: tuple) -> bytes:
    ca.refresh_issuing()  # follow rotate-issuing: the issuing CA of the moment signs this call
    return _OPERATIONS[operation](ca, *args)


def _calls(conn: Connection, group_commit: bool) -> list[tuple[str, tuple]] | None:
    """The next call, and with ``group_commit`` every call queued behind it (up to MAX_GROUP);
    None once the pipe is closed and nothing is left."""
    try:
        calls = [conn.recv()]
    except (EOFError, OSError):
        return None
    while group_commit and len(calls) < MAX_GROUP and conn.poll():
        try:
            calls.append(conn.recv())
        except (EOFError, OSError):  # closed behind the calls taken: answer them, then end
            break
    return calls


def _worker(conn: Connection, home: str, passphrase: bytes | None, group_commit: bool = False) -> None:
    """A worker's life: load the CA, say ready, answer calls until the pipe closes."""
    # The service stops its workers by closing their pipes once the last answer is out; a signal
    # meant for the service (Ctrl-C in a terminal hits the whole process group) must not cut a
    # worker off in the middle of an issuance.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..authority import CertificateAuthority
    from ..lint import _validator

    try:
        ca = CertificateAuthority.load(Path(home), passphrase=passphrase)
        _validator()  # build pkilint's validator now, not in the first request
    except Exception as exc:  # noqa: BLE001 - reported to the service, which refuses to start
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while (calls := _calls(conn, group_commit)) is not None:
        bound = [functools.partial(_run, ca, operation, args) for operation, args in calls]
        # Answered only once durable: the group's commit and audit write are done (group_commit).
        answers = run_group(ca, bound) if group_commit else [run_one(call) for call in bound]
        for answer in answers:
            try:
                conn.send(answer)
            except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
                conn.send(("error", PKIError(f"{type(answer[1]).__name__}: {str(answer[1])}")))  # an exception: bytes pickle


class _Worker:
    """The service's end of one worker: its process, its pipe, the calls sent and not answered
    yet (oldest first: the worker answers in order)."""

    def __init__(self, context, home: Path, passphrase: bytes | None, group_commit: bool) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, str(home), passphrase, group_commit), daemon=True,
                                       name="pkictl-signer")
        self.process.start()
        child.close()
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.reading = False

    def stop(self) -> None:
        self.conn.close()  # the worker ends at EOF, after the call it may be answering


class SignerPool:
    """``workers`` processes, each with the CA of ``home`` loaded.

    Args:
        home: the CA home directory.
        passphrase: the CA key passphrase (None for unencrypted keys); handed to the workers
            through their start-up pipe, never through argv or the environment.
        workers: how many processes, >= 1.
        timeout: seconds a call may take before the client is told to retry (HTTP 503) and the
            worker is replaced.
        group_commit: each worker runs the calls queued in its pipe as one group, one commit
            and one audit write for all (:mod:`pkictl.est.group_commit`), and records the address
            each certificate went to in it; False runs and commits them one by one.
    """

    def __init__(self, home: Path, *, passphrase: bytes | None, workers: int, timeout: float = 30.0, group_commit: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers: got {workers}, want at least 1")
        self.home, self.passphrase, self.workers, self.timeout = Path(home), passphrase, workers, timeout
        self.group_commit = group_commit
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._respawning: set[asyncio.Task] = set()
        self._closed = False

    @property
    def alive(self) -> int:
        """Workers running and answering calls now (a replaced one is back once it loaded the CA)."""
        return len(self._workers)

    async def start(self) -> None:
        """Start the workers and wait until each has loaded the CA.

        Raises:
            PKIError: a worker could not load the CA (the message says why).
        """
        self._slots = asyncio.Semaphore(self.workers * QUEUE_DEPTH)
        started = await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self.workers)), return_exceptions=True)
        self._workers = [w for w in started if isinstance(w, _Worker)]
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            await self.close()
            raise failed[0]

    def _spawn(self) -> _Worker:
        """Start one worker and wait (blocking) for its first message."""
        worker = _Worker(self._context, self.home, self.passphrase, self.group_commit)
        if not worker.conn.poll(120):
            worker.process.kill()
            raise PKIError(f"a signing worker did not load the CA in {self.home} within 120 s")
        try:
            status, detail = worker.conn.recv()
        except EOFError:
            status, detail = "failed", f"it exited with status {worker.process.exitcode}"
        if status != "ready":
            worker.process.join(10)
            raise PKIError(f"a signing worker could not load the CA in {self.home}: {detail}")
        return worker

    async def close(self) -> None:
        """Stop every worker; each finishes the call it is answering first."""
        self._closed = True
        for task in list(self._respawning):
            task.cancel()
        workers, self._workers = self._workers, []
        for worker in workers:
            self._retire(worker, "the service is stopping")
        for worker in workers:
            await asyncio.to_thread(worker.process.join, self.timeout)

    def _retire(self, worker: _Worker, why: str) -> None:
        if worker.reading:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.reading = False
        worker.stop()
        while worker.pending:
            call = worker.pending.popleft()
            if not call.done():
                call.set_exception(SignerUnavailable(f"{why} while a signing worker handled this request; retry"))

    def _replace(self, worker: _Worker, why: str) -> None:
        """Retire ``worker`` (dead or stuck), fail its calls, start another in its place."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        self._retire(worker, why)
        worker.process.kill()
        log.error("signing worker %s: %s; starting another", worker.process.pid, why)

        async def respawn() -> None:
            # Again and again, with a growing pause: a CA database away for a while (replicas on
            # PostgreSQL) makes a worker fail to load until it is back.
            delay = 1.0
            while not self._closed:
                try:
                    self._workers.append(await asyncio.to_thread(self._spawn))
                    return
                except PKIError as exc:
                    log.error("%s; trying again in %g s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESPAWN_PAUSE_MAX)

        task = asyncio.ensure_future(respawn())
        self._respawning.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._respawning.discard)

    def _answer(self, worker: _Worker) -> None:
        """Reader callback: the answer to the worker's oldest call, or EOF because it died."""
        try:
            status, value = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker, f"it ended (exit status {worker.process.exitcode})")
            return
        call = worker.pending.popleft()
        if not worker.pending:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.reading = False
        if call.done():  # its caller gave up (timeout)
            return
        if status == "ok":
            call.set_result(value)
        else:
            call.set_exception(value)

    async def _call(self, operation: str, *args):
        assert self._slots is not None, "start() first"
        async with self._slots:
            return await self._send(operation, args)

    async def _send(self, operation: str, args: tuple):
        if not self._workers:
            raise SignerUnavailable("no signing worker is running (one is being started); retry")
        worker = min(self._workers, key=lambda w: len(w.pending))
        loop = asyncio.get_running_loop()
        call = loop.create_future()
        try:
            worker.conn.send((operation, args))  # small: fits the pipe buffer
        except OSError:
            self._replace(worker, "its pipe is closed")
            raise SignerUnavailable("a signing worker stopped; retry") from None
        worker.pending.append(call)
        if not worker.reading:
            loop.add_reader(worker.conn.fileno(), self._answer, worker)
            worker.reading = True
        try:
            return await asyncio.wait_for(asyncio.shield(call), self.timeout)
        except asyncio.TimeoutError:
            self._replace(worker, f"it did not answer within {self.timeout:g} s")
            raise SignerUnavailable(f"issuance took longer than {self.timeout:g} s; retry later") from None

    @property
    def records_peers(self) -> bool:
        """Whether the workers record where each certificate went (with group commit, in the
        group's transaction), so that the serving process need not."""
        return self.group_commit

    async def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: x509.Certificate, *, peer: str | None = None) -> x509.Certificate:
        """:meth:`pkictl.authority.CertificateAuthority.simple_reenroll` in a worker; ``peer``
        (the client's address) is recorded with the successor when :attr:`records_peers`."""
        der = await self._call("simple_reenroll", csr.public_bytes(serialization.Encoding.DER), _der(current),
                               peer if self.records_peers else None)
        return x509.load_der_x509_certificate(der)

    async def simple_enroll(self, csr: x509.CertificateSigningRequest, *, name: str | None, token: str | None, peer: str) -> x509.Certificate:
        """:meth:`pkictl.bootstrap.Bootstrap.simple_enroll` in a worker."""
        der = await self._call("simple_enroll", csr.public_bytes(serialization.Encoding.DER), name, token, peer, self.records_peers)
        return x509.load_der_x509_certificate(der)
