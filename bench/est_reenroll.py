"""Benchmark: EST re-enrollments per second against a real `pkictl serve`.

Goal (issue): at least 300 re-enrollments/s on this machine, so that a 10,000-node fleet renewing
at once after an outage is served within a minute.

Before the clock starts: a CA in a temporary directory and N node certificates (signed through the
library, their inventory rows written by pkictl's own Inventory), each node with a new key and the
CSR its agent would send (pki_agent.rotation.rotate.build_reenroll_csr: subject and SAN identical to the
current certificate, RFC 7030 4.2.2). Then `pkictl serve` runs as a subprocess and client processes
renew every node once, each on a fresh mTLS connection with that node's certificate (as a fleet
does: one request per node). The machine has 2 cores shared by client and server, so the server's
CPU (/proc/PID/stat) and the client's own CPU are both reported, per re-enrollment.

Last, a second round of fresh nodes runs while py-spy samples the server (`pip install py-spy`;
without it, under a cProfile'd `pkictl serve`), and the server's time is broken down by cost.

Usage: python bench/est_reenroll.py [--nodes 2000] [--concurrency 32] [--seconds 60] [--workers N] [--loop auto|uvloop|asyncio]
                                    [--group-commit both|on|off] [--profile-nodes 1000] [--profiler auto|py-spy|cprofile|none]
                                    [--engine both|sqlite|postgresql] [--db URL]

By default it runs two rounds of fresh nodes, each against its own `pkictl serve`: with
--no-group-commit (every issuance commits its inventory transaction and fsyncs its audit record
alone, and the serving process records the renewal address in a transaction of its own), then with
group commit (pkictl.est.group_commit), and prints the ratio of the two; and it does so on both
engines, SQLite in the CA home, then PostgreSQL (`pkictl init-ca --db` in a throwaway PostgreSQL 15
server from tests/pg.py, fsync and synchronous_commit on, or the empty database of --db URL; its
`pkictl serve --replica bench`), and prints PostgreSQL's ratio to SQLite in each mode.

`pkictl serve` issues in a signing worker process beside its event loop (--workers, default 1) on
uvloop when it is installed (--loop); the server CPU reported is that of the whole process tree.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pki_agent.rotation.rotate import build_reenroll_csr
from pkictl.authority import CertificateAuthority
from pkictl.est.wire import EST_PREFIX, encode_csr
from pkictl.files import read_private_file
from pkictl.inventory import Inventory
from pkictl.keys import load_private_key
from pkictl.profile import build_end_entity, generate_key, validity_window
from throwaway_pg import Databases, init_ca  # bench/ is the script's folder, first on sys.path

GOAL = 300.0  # re-enrollments per second
WARMUP = 20  # re-enrollments before timing: the first one imports pkilint and builds its validator
TIMEOUT = 120.0  # seconds per request
TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of the fleet: its credential file (key, certificate, issuing CA) and the body of
    its simplereenroll request (a base64 CSR for a new key)."""

    name: str
    pem: Path
    csr_body: bytes

    def request(self, port: int) -> bytes:
        head = (f"POST {EST_PREFIX}/simplereenroll HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/pkcs10\r\nContent-Transfer-Encoding: base64\r\n"
                f"Content-Length: {len(self.csr_body)}\r\nConnection: close\r\n\r\n")
        return head.encode() + self.csr_body


# -- the fleet ---------------------------------------------------------------------------------


def make_fleet(home: Path, out: Path, prefix: str, count: int) -> list[Node]:
    """Issue ``count`` node certificates of the CA in ``home`` and prepare their re-enrollments.

    The certificates are built and signed as CertificateAuthority.issue does, minus its pre-issuance
    lint and audit record (they are set-up, not the thing measured); their rows go through
    Inventory.record_intent / record_issued, so the server finds them exactly as it would.
    """
    ca = CertificateAuthority.load(home)
    key_path = home / "issuing" / "key.pem"
    issuing_key = load_private_key(read_private_file(key_path), None, source=str(key_path))
    inventory = Inventory.open(home)
    if inventory.engine == "sqlite":
        inventory._db.execute("PRAGMA synchronous = OFF")  # set-up only; the server's connection keeps the default
    now = ca.clock.now()
    not_before, not_after = validity_window(now, ca.settings.lifetime("node"))
    issuing_pem = ca.issuing.public_bytes(serialization.Encoding.PEM)
    out.mkdir(mode=0o700, exist_ok=True)
    nodes = []
    with inventory.group():  # one commit for the whole fleet
        for i in range(count):
            name = f"{prefix}{i:06d}"
            key = generate_key()
            serial = x509.random_serial_number()
            builder = build_end_entity("node", name=name, trust_domain=ca.settings.trust_domain, public_key=key.public_key(),
                                       issuer=ca.issuing, not_before=not_before, not_after=not_after, serial=serial)
            inventory.record_intent(serial=serial, name=name, kind="node", sans=[], now=now, exclusive=False,
                                    issuer=ca.issuing.serial_number)
            certificate = builder.sign(issuing_key, hashes.SHA256())
            inventory.record_issued(certificate, renewal_fraction=ca.settings.renewal_fraction)
            pem = out / f"{name}.pem"
            pem.touch(0o600, exist_ok=False)  # it holds the key
            pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                            + certificate.public_bytes(serialization.Encoding.PEM) + issuing_pem)
            nodes.append(Node(name, pem, encode_csr(build_reenroll_csr(certificate, generate_key()))))
    inventory.close()
    ca.close()
    return nodes


# -- the client: one fresh mTLS connection per node -------------------------------------------


def client_context(pem: Path, anchors: Path) -> ssl.SSLContext:
    """The TLS client context of one node, as its agent builds it (agent/est_client.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=anchors)
    ctx.load_cert_chain(pem)
    return ctx


def reenroll(ctx: ssl.SSLContext, port: int, request: bytes) -> tuple[int, bytes]:
    """Send one simplereenroll on a new connection; return (HTTP status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client, the agent's client, does
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            data = _response(tls)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"no HTTP response ({len(data)} bytes)")
    return int(head.split(b" ", 2)[1]), body


def _response(tls: ssl.SSLSocket) -> bytes:
    """Read one HTTP response: to its Content-Length, else to the end of the connection."""
    data, length = b"", None
    while True:
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and length is None:
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else None
        if sep and length is not None and len(body) >= length:
            return data


def _client(nodes: list[Node], port: int, anchors: Path, threads: int, seconds: float, barrier, results) -> None:
    """A client process: builds its nodes' contexts, waits for the start, renews each node once."""
    work = iter([(client_context(n.pem, anchors), n.request(port)) for n in nodes])
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    barrier.wait()
    cpu0, start = os.times(), time.monotonic()
    deadline = start + seconds

    def run() -> None:
        while time.monotonic() < deadline:
            with lock:
                item = next(work, None)
            if item is None:
                return
            ctx, request = item
            began = time.monotonic()
            try:
                status, body = reenroll(ctx, port, request)
            except (OSError, ValueError) as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}".encode()
            took = time.monotonic() - began
            with lock:
                latencies.append(took)
                statuses[status] += 1
                if status != 200 and len(failures) < 5:
                    failures.append(f"{f'HTTP {status}' if status else 'no response'}: {body[:300].decode(errors='replace').strip()}")

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    cpu1 = os.times()
    results.put({"latencies": latencies, "statuses": statuses, "failures": failures, "end": time.monotonic(),
                 "cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)})


# -- what the machine and the server spent ----------------------------------------------------


def process_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (pkictl serve's signing workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every live process below it."""
    total = 0.0
    for each in (pid, *descendants(pid)):
        try:
            total += process_cpu(each)
        except OSError:  # ended in between
            pass
    return total


def database_cpu(databases: Databases) -> float | None:
    """CPU seconds so far of the throwaway PostgreSQL server's processes (postmaster and
    backends); None for an operator's server."""
    pid = databases.server_pid()
    try:
        return tree_cpu(pid) if pid is not None else None
    except OSError:  # the postmaster ended in between
        return None


def run_queue_wait(pid: int) -> float:
    """Seconds the main thread of ``pid`` (the server's event loop) was runnable but had no core."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def machine_cpu() -> tuple[float, float, float, float]:
    """(busy, iowait, steal, total) seconds of all cores since boot, from /proc/stat; busy counts
    every process of the machine, other tenants' too."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) / TICKS for v in Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq, iowait, steal, user + nice + system + idle + iowait + irq + softirq + steal


@dataclasses.dataclass
class Round:
    """What one round of re-enrollments did and cost (seconds; CPU seconds)."""

    ok: int
    failed: int
    wall: float
    server_cpu: float  # the serving process and its signing workers
    loop_cpu: float  # the serving process alone (TLS, HTTP, the event loop)
    client_cpu: float
    server_wait: float  # runnable, waiting for a core
    machine_busy: float  # of all cores, 0..1
    iowait: float
    steal: float
    latencies: list[float]
    statuses: collections.Counter
    failures: list[str]
    db_cpu: float | None = None  # the PostgreSQL server's processes, when it is ours


def run_round(nodes: list[Node], port: int, anchors: Path, server_pid: int, concurrency: int, seconds: float, processes: int = 2,
              db_cpu: Callable[[], float | None] = lambda: None) -> Round:
    """Renew every node once (or until ``seconds`` pass) with ``concurrency`` connections at a time
    (``db_cpu``: the database server's CPU seconds so far, if known)."""
    mp = multiprocessing.get_context("spawn")
    barrier, results = mp.Barrier(processes + 1), mp.Queue()
    shares = [nodes[i::processes] for i in range(processes)]
    threads = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    workers = [mp.Process(target=_client, args=(shares[i], port, anchors, threads[i], seconds, barrier, results)) for i in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=600)  # a client that died building its contexts breaks the barrier
    db0 = db_cpu()
    start, loop0, server0, wait0, machine0, self0 = (time.monotonic(), process_cpu(server_pid), tree_cpu(server_pid),
                                                     run_queue_wait(server_pid), machine_cpu(), os.times())
    reports = [results.get(timeout=seconds + 2 * TIMEOUT) for _ in workers]
    loop1, server1, wait1, machine1, self1 = process_cpu(server_pid), tree_cpu(server_pid), run_queue_wait(server_pid), machine_cpu(), os.times()
    db1 = db_cpu()
    for worker in workers:
        worker.join()
    statuses = sum((r["statuses"] for r in reports), collections.Counter())
    return Round(
        ok=statuses[200], failed=sum(statuses.values()) - statuses[200], wall=max(r["end"] for r in reports) - start,
        server_cpu=server1 - server0, loop_cpu=loop1 - loop0, server_wait=wait1 - wait0,
        client_cpu=sum(r["cpu"] for r in reports) + (self1.user - self0.user) + (self1.system - self0.system),
        machine_busy=(machine1[0] - machine0[0]) / (machine1[3] - machine0[3]), iowait=(machine1[1] - machine0[1]) / (machine1[3] - machine0[3]),
        steal=(machine1[2] - machine0[2]) / (machine1[3] - machine0[3]),
        latencies=sorted(x for r in reports for x in r["latencies"]), statuses=statuses,
        failures=[f for r in reports for f in r["failures"]][:5],
        db_cpu=db1 - db0 if db0 is not None and db1 is not None else None,
    )


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted seconds, in ms (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(label: str, r: Round) -> None:
    """Print a round's figures: throughput, CPU per re-enrollment on each side, who waited, latency."""
    done = r.ok + r.failed
    cpu_ms = r.server_cpu * 1000 / max(done, 1)
    print(f"{label}: {r.ok} ok, {r.failed} failed in {r.wall:.2f} s")
    print(f"  re-enrollments/s (wall)          {r.ok / r.wall:8.1f}")
    print(f"  server CPU per re-enrollment     {cpu_ms:8.2f} ms   (event loop process {r.loop_cpu * 1000 / max(done, 1):.2f} ms, "
          f"signing workers the rest)")
    print(f"  server-only capacity ({os.cpu_count()} cores)   {os.cpu_count() * 1000 / cpu_ms if cpu_ms else 0:8.1f} /s")
    if r.db_cpu is not None:
        print(f"  PostgreSQL CPU per re-enrollment {r.db_cpu * 1000 / max(done, 1):8.2f} ms   (its server processes: backends, WAL writer...)")
    print(f"  client CPU per re-enrollment     {r.client_cpu * 1000 / max(done, 1):8.2f} ms   (client busy {r.client_cpu / r.wall:.0%} of one core)")
    print(f"  server event loop: {r.loop_cpu / r.wall:.0%} on a core, {r.server_wait / r.wall:.0%} runnable waiting for one, "
          f"{max(0.0, 1 - (r.loop_cpu + r.server_wait) / r.wall):.0%} asleep (disk waits or no request)")
    print(f"  machine: {r.machine_busy:.0%} of {os.cpu_count()} cores busy (all tenants), {r.iowait:.0%} iowait, {r.steal:.0%} stolen")
    if r.latencies:
        print(f"  latency p50 {percentile(r.latencies, 0.50):.1f} ms, p99 {percentile(r.latencies, 0.99):.1f} ms, "
              f"max {r.latencies[-1] * 1000:.1f} ms")
    if r.failed:
        print(f"  statuses: {dict(r.statuses)}; first failures:")
        for failure in r.failures:
            print(f"    {failure}")


# -- the server ---------------------------------------------------------------------------------


class Server:
    """`pkictl serve` as a subprocess (optionally under cProfile); its log is drained by a thread."""

    def __init__(self, home: Path, profile_to: Path | None = None, workers: int | None = None, loop: str = "auto",
                 extra: tuple[str, ...] = ()) -> None:
        pkictl = str(Path(sys.executable).parent / "pkictl")
        argv = [pkictl, "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--rate", "1000", "--burst", "1000", *extra]
        if workers is not None:
            argv += ["--workers", str(workers)]
        argv += ["--loop", loop]
        if profile_to is not None:
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile_to), *argv]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: collections.deque[str] = collections.deque(maxlen=20)
        self._ready = threading.Event()
        self.port = 0
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if not self._ready.wait(30) or not self.port:
            self.stop()
            sys.exit("pkictl serve did not start:\n" + "\n".join(self.log))

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if match := re.search(r"ready: EST on https://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        """SIGTERM (serve stops cleanly, and cProfile writes its stats); SIGKILL after 60 s. Safe twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._drainer.join(10)
        self.process.stderr.close()


def warm_up(server: Server, nodes: list[Node], anchors: Path) -> None:
    """Renew ``nodes`` one by one, untimed: the first request imports pkilint and builds its validator."""
    for node in nodes:
        status, body = reenroll(client_context(node.pem, anchors), server.port, node.request(server.port))
        if status != 200:
            server.stop()
            sys.exit(f"warm-up re-enrollment of {node.name} failed: HTTP {status}: {body.decode(errors='replace')}")


# -- where the server's time goes ---------------------------------------------------------------


def _frame(names: str, file: str) -> str:
    """A py-spy frame ``[Class.]name (file:line)`` of one of ``names`` in ``file`` (regexes)."""
    return rf"^(?:[\w<>.]+\.)?(?:{names}) \({file}"


# (label, frame pattern): a sample counts for the first label one of its frames matches, so a cost
# comes before the ones it runs inside (prelint runs inside issue, inside simple_reenroll, inside
# aiohttp's handler...).
CATEGORIES = [
    ("waiting for PostgreSQL (round trips, commits)", r"^Connection\.wait \(psycopg/"),
    ("pre-issuance lint (pkilint + throwaway signature)", _frame("prelint", r"ca/lint\.py")),
    ("audit log append (file fsync + head, or rows)", _frame("append|flush|_append_bodies", r"ca/audit\.py")),
    ("inventory writes (1 transaction, its commit)", _frame("record_signed", r"ca/inventory\.py")),
    ("signing with the issuing key", r"^CertificateBuilder\.sign \("),
    ("issue(): checks, build, serial", _frame("issue", r"ca/authority\.py")),
    ("simple_reenroll checks (issuer, CSR sig, inventory get)", _frame("simple_reenroll", r"ca/authority\.py")),
    ("CSR decode, PKCS#7 encode", _frame("decode_csr_body|encode_certs_only|_csr|_certificate", r"ca/(est|serve)\.py")),
    ("per-request log line", r"\(logging/__init__\.py"),
    ("handler: peer certificate, rate limit", _frame("simplereenroll|_limit", r"ca/serve\.py")),
    ("TLS handshake (incl. client chain verification)",
     _frame("_do_handshake|_on_handshake_complete", r"asyncio/sslproto\.py") + r"|^SSLObject\.do_handshake \(ssl\.py"),  # asyncio | uvloop
    ("TLS read/write/close", r"\(asyncio/sslproto\.py|^SSLObject\.(read|write|unwrap) \(ssl\.py"),
    ("aiohttp (HTTP parse, routing, middleware, response)", r"\(aiohttp/"),
    ("asyncio event loop (accept, callbacks)", r"\(asyncio/"),
]
_COMPILED = [(label, re.compile(pattern)) for label, pattern in CATEGORIES]
_IDLE = "idle (epoll, a worker waiting for calls, parked threads)"


# Samples of nothing to do: the event loop in epoll (asyncio's or uvloop's), a signing worker
# waiting for calls on its pipe, parked threads (psycopg's pool workers), the resource tracker.
_WAITING = re.compile(r"^(epoll_p?wait|futex|pthread_cond_(timed)?wait|sem_(timed)?wait) \(|^0x[0-9a-f]+ \(libc")


def idle(stack: list[str]) -> bool:
    leaf = stack[-1] if stack else ""
    if leaf.startswith(("epoll_wait (", "epoll_pwait (")):
        return True
    if any("resource_tracker" in frame for frame in stack):
        return True
    if leaf.startswith("read (") and any(frame.startswith("_calls (ca/est/signers.py") for frame in stack):
        return True
    return bool(_WAITING.search(leaf)) and any(frame.startswith("thread_run (") for frame in stack)


def classify(stack: list[str]) -> tuple[str, str]:
    """(category, the frame its innermost matching frame calls) of a stack, outermost frame first."""
    if idle(stack):
        return _IDLE, "(nothing to do)"
    for label, regex in _COMPILED:
        matches = [i for i, frame in enumerate(stack) if regex.search(frame)]
        if matches:
            i = matches[-1]  # the innermost: what it calls is the informative part
            return label, re.sub(r" \(.*", "", stack[i + 1])[:40] if i + 1 < len(stack) else "(itself)"
    return "other", re.sub(r" \(.*", "", stack[-1])[:40]


def breakdown(raw: Path, ms_per_request: float) -> None:
    """Print the server's non-idle time by category, from py-spy's collapsed stacks."""
    counts: collections.Counter = collections.Counter()
    fsync: collections.Counter = collections.Counter()
    gc: collections.Counter = collections.Counter()
    inner: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    processes: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        text, _, count = line.rpartition(" ")
        if not text:
            continue
        frames, n = text.split(";"), int(count)
        stack = [f for f in frames if not f.startswith("process ")]  # --subprocesses: the process path first
        label, called = classify(stack)
        if label != _IDLE:
            processes["signing workers" if sum(f.startswith("process ") for f in frames) > 1 else "event loop process"] += n
        counts[label] += n
        inner[label][called] += n
        if re.match(r"(fsync|fdatasync) \(", stack[-1]):
            fsync[label] += n
        if any(frame.startswith("gc_collect") for frame in stack):
            gc[label] += n
    busy = sum(counts.values()) - counts[_IDLE]
    print(f"server time by cost (py-spy, {busy} busy samples + {counts[_IDLE]} idle; share of the busy time, "
          f"ms = share x {ms_per_request:.2f} ms, the event loop's time per re-enrollment at the measured rate):")
    print(f"  {'share':>6} {'ms':>5} {'fsync':>6} {'GC':>5}  {'cost':54} calls inside it")
    for label, n in counts.most_common():
        if label == _IDLE:
            continue
        top = ", ".join(f"{name} {k / n:.0%}" for name, k in inner[label].most_common(3))
        print(f"  {n / busy:6.1%} {n / busy * ms_per_request:5.2f} {fsync[label] / busy:6.1%} {gc[label] / busy:5.1%}  {label:54} {top}")
    print(f"  by process: {', '.join(f'{name} {k / busy:.0%}' for name, k in processes.most_common())}")
    print(f"  {sum(fsync.values()) / busy:6.1%} of the busy time is blocked in fsync/fdatasync, {sum(gc.values()) / busy:.1%} in Python's garbage collector")


def profile_py_spy(py_spy: str, server: Server, nodes: list[Node], anchors: Path, concurrency: int, seconds: float,
                   tmp: Path, ms_per_request: float) -> None:
    """Sample the running server with py-spy (native frames too, idle included) during a round of ``nodes``."""
    raw = tmp / f"py-spy-{server.process.pid}.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.process.pid), "--rate", "100", "--idle", "--native", "--subprocesses",
                            "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached
    r = run_round(nodes, server.port, anchors, server.process.pid, concurrency, seconds)
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    report("profiled round (py-spy pauses the server 100 times/s: slower)", r)
    if not raw.exists():
        print(f"py-spy wrote no profile: {err.strip()[-500:]}")
        return
    breakdown(raw, ms_per_request)


def profile_cprofile(home: Path, nodes: list[Node], anchors: Path, concurrency: int, seconds: float, tmp: Path,
                     extra: tuple[str, ...] = ()) -> None:
    """Without py-spy: a second `pkictl serve` under cProfile, a round of ``nodes``, cumulative times
    of the functions that matter (cProfile inflates pure-Python code such as pkilint the most)."""
    import pstats

    out = tmp / f"serve-{len(list(tmp.glob('serve-*.prof')))}.prof"
    server = Server(home, profile_to=out, extra=extra)
    warm_up(server, nodes[:WARMUP], anchors)
    r = run_round(nodes[WARMUP:], server.port, anchors, server.process.pid, concurrency, seconds)
    server.stop()
    report("profiled round (cProfile: slower)", r)
    requests = max(r.ok + r.failed + min(WARMUP, len(nodes)), 1)
    wanted = [("_errors", "ca/est/serve.py", "the whole request handler"), ("simple_reenroll", "ca/authority.py", ""),
              ("issue", "ca/authority.py", ""), ("prelint", "ca/lint.py", "pre-issuance lint"), ("append", "ca/audit.py", "audit log"),
              ("record_signed", "ca/inventory.py", "SQLite"),
              ("fsync", "~", "every fsync"), ("_do_handshake", "asyncio/sslproto.py", "TLS handshake"), ("_log", "logging/", "log lines")]
    stats = pstats.Stats(str(out)).stats
    print("server functions, cumulative ms per re-enrollment (cProfile; nested rows overlap):")
    for func, where, what in wanted:
        total = sum(v[3] for (file, _, name), v in stats.items()
                    if where in file and re.fullmatch(rf"(<built-in method posix\.)?{func}>?", name))
        print(f"  {total * 1000 / requests:7.2f} ms  {func:16} {where:20} {what}")


# -- main -------------------------------------------------------------------------------------


def prepare(engine: str, tmp: Path, databases: Databases, modes: list[str], args, profiler: str) -> tuple[Path, tuple[str, ...], dict, dict, list]:
    """The CA of one engine's rounds and its fleets: (home, the serve arguments it needs, warm-up
    nodes by mode, timed nodes by mode, the profiled round's nodes)."""
    home = tmp / engine / "ca"
    if engine == "sqlite":
        CertificateAuthority.init(home).close()
        extra: tuple[str, ...] = ()
    else:
        init_ca(home, databases.new("reenroll"))
        extra = ("--replica", "bench")  # a serve on PostgreSQL names its own service certificate
    warmups = {m: make_fleet(home, tmp / engine / f"warmup-{m}", f"warm{m}-", WARMUP) for m in modes}
    fleets = {m: make_fleet(home, tmp / engine / f"fleet-{m}", f"node{m}-", args.nodes) for m in modes}
    profiled = make_fleet(home, tmp / engine / "profiled", "prof-", args.profile_nodes if profiler != "none" else 0)
    return home, extra, warmups, fleets, profiled


def run_engine(engine: str, tmp: Path, databases: Databases, args, profiler: str, py_spy: str | None) -> dict[str, float]:
    """Both rounds (or the one asked for) of one engine, the profile after its last: the
    re-enrollments/s of each mode."""
    modes = ["off", "on"] if args.group_commit == "both" else [args.group_commit]
    began = time.monotonic()
    home, replica, warmups, fleets, profiled = prepare(engine, tmp, databases, modes, args, profiler)
    anchors = home / "ca.pem"
    filesystem = subprocess.run(["df", "--output=fstype", str(tmp)], check=False, capture_output=True, text=True).stdout.split()
    where = f"CA home on {filesystem[-1] if filesystem else '?'}" if engine == "sqlite" else "records in PostgreSQL"
    print(f"\n== {engine}: {args.nodes} nodes (+{len(profiled)} for the profile) prepared in {time.monotonic() - began:.1f} s; "
          f"{where}, {os.cpu_count()} cores, concurrency {args.concurrency}", flush=True)
    rates: dict[str, float] = {}
    for mode in modes:
        # Shedding off (a bound above any round): this measures the write path, not the admission.
        server = Server(home, workers=args.workers, loop=args.loop,
                        extra=(*replica, "--group-commit" if mode == "on" else "--no-group-commit", "--max-pending", "1000000"))
        try:
            warm_up(server, warmups[mode], anchors)
            r = run_round(fleets[mode], server.port, anchors, server.process.pid, args.concurrency, args.seconds,
                          db_cpu=lambda: database_cpu(databases))
            report(f"{engine}: re-enrollment, group commit {mode}", r)
            rate = rates[mode] = r.ok / r.wall
            fleet_time = f"10,000 nodes in {10_000 / rate:.0f} s" if rate else "none renewed"
            print(f"goal: >= {GOAL:.0f} re-enrollments/s: {'met' if rate >= GOAL and not r.failed else 'NOT met'} "
                  f"({rate:.1f}/s = {rate / GOAL:.2f}x{f', {r.failed} failed' if r.failed else ''}; {fleet_time})")
            sys.stdout.flush()
            if profiler == "py-spy" and mode == modes[-1]:
                assert py_spy is not None
                profile_py_spy(py_spy, server, profiled, anchors, args.concurrency, args.seconds, tmp, 1000 / max(rate, 1e-9))
        finally:
            server.stop()
    if len(rates) == 2 and rates["off"]:
        print(f"{engine}: group commit: {rates['on']:.1f} re-enrollments/s against {rates['off']:.1f}/s without: "
              f"{rates['on'] / rates['off']:.2f}x")
    if profiler == "cprofile":
        profile_cprofile(home, profiled, anchors, args.concurrency, args.seconds, tmp, replica)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop starting re-enrollments after this long")
    parser.add_argument("--profile-nodes", type=int, default=1000)
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile", "none"], default="auto")
    parser.add_argument("--workers", type=int, default=None, help="pkictl serve --workers (default: serve's own default)")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="pkictl serve --loop")
    parser.add_argument("--group-commit", choices=["both", "on", "off"], default="both",
                        help="both: a round without group commit, then one with it, and their ratio (default)")
    parser.add_argument("--engine", choices=["both", "sqlite", "postgresql"], default="both",
                        help="where the CA keeps its records; both: SQLite, then PostgreSQL, and their ratio (default)")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="postgresql: an empty database of your own server (postgresql://USER@HOST/DB?passfile=PATH) "
                             "instead of a throwaway server")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    profiler = ("py-spy" if py_spy else "cprofile") if args.profiler == "auto" else args.profiler
    if profiler == "py-spy" and not py_spy:
        parser.error("py-spy is not installed: pip install py-spy, or pass --profiler cprofile")
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop the servers and PostgreSQL
    databases = Databases(args.db)
    rates: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as name:
            for engine in engines:
                rates[engine] = run_engine(engine, Path(name), databases, args, profiler, py_spy)
    finally:
        databases.close()
    if len(rates) == 2:
        print("\nre-enrollments/s by engine, measured in this run:")
        for mode in rates["sqlite"]:
            sqlite, pg = rates["sqlite"][mode], rates["postgresql"].get(mode, 0.0)
            print(f"  group commit {mode:3}: sqlite {sqlite:7.1f}/s, postgresql {pg:7.1f}/s: postgresql/sqlite {pg / sqlite if sqlite else 0:.2f}x")
        for engine, by_mode in rates.items():
            if len(by_mode) == 2 and by_mode["off"]:
                print(f"  {engine:10}: group commit on/off {by_mode['on'] / by_mode['off']:.2f}x")


if __name__ == "__main__":
    main()
