"""Benchmark: a renewal herd. N distinct nodes (10,000 by default) all call simplereenroll at once,
as after a CA outage, against one `pkictl serve` on SQLite or against N `pkictl serve` replicas of
one CA on PostgreSQL; how long the service takes to absorb them, whether any renewal fails,
latency, and how it sheds load (503 + Retry-After, RFC 7030 4.2.3) instead of letting requests
time out.

Goal (issue 15): 10,000 renewals absorbed within 60 s on this machine (2 cores, shared with the
client) with no failed renewal.

Before the clock starts, the nodes' certificates are issued directly through the CA library in one
inventory transaction (pkictl.inventory.Inventory.group) and each node gets a new key and the CSR
its agent would send (pki_agent.rotation.rotate.build_reenroll_csr). Then `pkictl serve` starts as a
subprocess with its defaults (group commit, load shedding) except the connection caps, which are
raised because every simulated node dials from 127.0.0.1 (a real fleet comes from N addresses),
and client processes (aiohttp on uvloop, --connections connections each at most) start every
node's renewal at the same moment. A node answered 503 waits the Retry-After it was given (real
time: a bench, not a test) and asks again; any other answer but 200, or a timeout, is a failure.

On PostgreSQL (--engine postgresql) the CA is made with `pkictl init-ca --db` in a throwaway
PostgreSQL 15 server (tests/pg.py's PostgresCluster: initdb in a temporary directory, fsync and
synchronous_commit on), or in the empty database of --db URL (an operator's own server; the
password in a passfile), each of --replicas N gets a home of its own (`pkictl db replica`) and a
`pkictl serve --replica rI`, and the nodes are spread over the replicas round-robin, as a load
balancer would. --compare runs the herd on SQLite, on PostgreSQL with one replica and with two
(--replicas if more), one after the other in one run, and prints their ratios to SQLite.

After the herd the inventory must hold exactly one successor per node (read through
Inventory.open, which follows the home's database.yaml), `pkictl audit verify` must pass, and on
PostgreSQL the replicas' own log lines say how many renewals each answered.

Usage: python bench/renewal_herd.py [--nodes 10000] [--clients 2] [--connections 1000] [--workers 1]
                                    [--timeout 120] [--serve-arg=--max-queue-delay=5 ...]
                                    [--engine sqlite|postgresql] [--replicas N] [--db URL] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import multiprocessing
import os
import queue
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pkictl.authority import CertificateAuthority
from pkictl.est.wire import EST_PREFIX
from pkictl.inventory import Inventory

import est_reenroll  # bench/ is the script's folder, first on sys.path
from throwaway_pg import PKICTL, Databases, init_ca, pkictl

GOAL_SECONDS = 60.0
GOAL_NODES = 10_000
STOP_TIMEOUT = 30.0  # seconds a `pkictl serve` gets after SIGTERM before SIGKILL


# -- the fleet ---------------------------------------------------------------------------------


def make_fleet(home: Path, out: Path, count: int) -> list[tuple[str, str, bytes]]:
    """Issue ``count`` node certificates of the CA in ``home`` (:func:`est_reenroll.make_fleet`)
    and return ``(name, credential PEM path, CSR body)`` per node."""
    return [(node.name, str(node.pem), node.csr_body) for node in est_reenroll.make_fleet(home, out, "herd-", count)]


def spread(nodes: list, clients: int, replicas: int) -> list[list[tuple]]:
    """The client processes' shares of ``nodes``, each node with the replica it asks
    (``(name, pem, body, replica)``): round-robin over the replicas within every share, so that
    each client process, like a load balancer, sends every replica its turn."""
    shares = [nodes[i::clients] for i in range(clients)]
    return [[(*node, k % replicas) for k, node in enumerate(share)] for share in shares]


# -- the client: one process's share of the herd -------------------------------------------------


def _client(nodes: list[tuple[str, str, bytes, int]], urls: list[str], anchors: str, connections: int, timeout: float,
            barrier, results) -> None:
    """A client process: build each node's TLS context, wait for the start, renew every node at once."""
    if sys.platform == "linux":  # ended by the kernel if the bench dies (even by SIGKILL): nothing left waiting
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    contexts = []
    for _, pem, _, _ in nodes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=anchors)
        ctx.load_cert_chain(pem)
        contexts.append(ctx)
    barrier.wait()
    results.put(runner(_herd(nodes, contexts, urls, connections, timeout)))


async def _herd(nodes, contexts, urls: list[str], connections: int, timeout: float) -> dict:
    import aiohttp

    slots = asyncio.Semaphore(connections)
    latencies: list[float] = []  # of each 200, its own request
    renewed_after: list[float] = []  # from the start of the herd to the node's 200
    retry_afters: list[int] = []
    shed_at: list[float] = []  # from the start of the herd to each 503
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    renewed_by: collections.Counter = collections.Counter()  # replica index -> 200s it gave this client
    start, cpu = time.monotonic(), sum(os.times()[:2])
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # one connection per request, as agents do
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))

    async def renew(node, ctx) -> None:
        name, _, body, replica = node
        url = urls[replica]
        while True:
            async with slots:
                began = time.monotonic()
                try:
                    async with session.post(url, data=body, ssl=ctx, headers={"Content-Type": "application/pkcs10"}) as response:
                        status, text = response.status, await response.read()
                        retry_after = response.headers.get("Retry-After")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    status, text, retry_after = 0, f"{type(exc).__name__}: {exc}".encode(), None
            statuses[status] += 1
            if status == 503 and retry_after and retry_after.isdigit():
                retry_afters.append(int(retry_after))
                shed_at.append(time.monotonic() - start)
                await asyncio.sleep(int(retry_after))
                continue
            if status == 200:
                latencies.append(time.monotonic() - began)
                renewed_after.append(time.monotonic() - start)
                renewed_by[replica] += 1
            elif len(failures) < 5:
                failures.append(f"{name}: {f'HTTP {status}' if status else 'no response'}: {text[:200].decode(errors='replace').strip()}")
            return

    try:
        await asyncio.gather(*(renew(node, ctx) for node, ctx in zip(nodes, contexts, strict=True)))
    finally:
        await session.close()
    return {"latencies": latencies, "renewed_after": renewed_after, "retry_afters": retry_afters, "shed_at": shed_at, "statuses": statuses,
            "failures": failures, "renewed_by": renewed_by, "cpu": sum(os.times()[:2]) - cpu}


# -- the server ----------------------------------------------------------------------------------


def _end_with_parent() -> list[str]:
    """A prefix that has the kernel SIGTERM a `pkictl serve` when the bench dies, however it dies
    (util-linux setpriv --pdeathsig, Linux); without setpriv, the bench's finally blocks only."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv and sys.platform == "linux" else []


class ServerFailed(RuntimeError):
    """A `pkictl serve` did not come up."""


class Server:
    """`pkictl serve` as a subprocess; its log is drained by a thread (the last lines kept)."""

    # The request log line of each renewal answered with a certificate (pkictl.est.log).
    _ANSWERED = re.compile(r"\banswered peer=\S+ method=POST path='[^']*/simplereenroll' status=200\b")

    def __init__(self, home: Path, args: list[str], log: Path | None = None, label: str = "pkictl serve") -> None:
        argv = [*_end_with_parent(), PKICTL, "--home", str(home), "serve", "--listen", "127.0.0.1:0", *args]
        self.label = label
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: collections.deque[str] = collections.deque(maxlen=20)
        self.tail: collections.deque[str] = collections.deque(maxlen=20)  # any line: why it did not start
        self.errors = 0
        self.answered = 0  # renewals this process answered 200, by its own log
        self.refusals: collections.Counter = collections.Counter()  # the server's refusal lines, by reason
        self._ready = threading.Event()
        self.port = 0
        self._copy = log.open("w") if log is not None else None  # the whole log, for a look afterwards
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        try:
            ready = self._ready.wait(60) and self.port
        except BaseException:  # interrupted (SIGTERM, Ctrl-C) before the caller could take it in hand
            self.stop()
            raise
        if not ready:
            self.stop()
            raise ServerFailed(f"{label} did not start:\n" + "\n".join(self.tail))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if self._copy is not None:
                self._copy.write(line)
            self.tail.append(line.rstrip())
            if " ERROR " in line:
                self.errors += 1
                self.log.append(line.rstrip())
            elif (" refused " in line or " rejected by client " in line) and (reason := re.search(r"reason='([^']*)'", line)):
                self.refusals[reason.group(1)] += 1
            elif self._ANSWERED.search(line):
                self.answered += 1
            if match := re.search(r"ready: EST on https://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    def cpu(self) -> float:
        """CPU seconds of the server and its signing workers."""
        try:
            return est_reenroll.tree_cpu(self.process.pid)
        except OSError:  # it ended
            return 0.0

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not ended within STOP_TIMEOUT s; safe twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"  {self.label} did not stop within {STOP_TIMEOUT:g} s of SIGTERM: killed", flush=True)
            self.process.kill()
            self.process.wait(10)
        self._drainer.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        if self._copy is not None and not self._copy.closed:
            self._copy.close()


# -- the CA and its database ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Engine:
    """Where one herd's CA keeps its records: ``sqlite``, or ``postgresql`` with ``replicas`` serve processes."""

    name: str
    replicas: int = 1

    @property
    def label(self) -> str:
        if self.name == "sqlite":
            return "sqlite"
        return f"postgresql, {self.replicas} replica{'s' if self.replicas > 1 else ''}"


def make_ca(tmp: Path, engine: Engine, databases: Databases) -> tuple[Path, list[Path]]:
    """The CA's home and the home each `pkictl serve` runs in: the CA's own on SQLite; on
    PostgreSQL one replica home per replica (`pkictl db replica`: no root key)."""
    home = tmp / "ca"
    if engine.name == "sqlite":
        CertificateAuthority.init(home).close()
        return home, [home]
    init_ca(home, databases.new("herd"))
    homes = []
    for i in range(1, engine.replicas + 1):
        pkictl(home, "db", "replica", str(tmp / f"r{i}"))
        homes.append(tmp / f"r{i}")
    return home, homes


# -- one herd -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def check_inventory(home: Path, count: int) -> str | None:
    """None if every node has exactly one successor and the audit log verifies, else what is wrong
    (the inventory and the audit chain the home's database.yaml names, else its SQLite file)."""
    inventory = Inventory.open(home)
    try:
        by_name = collections.Counter(r.name for r in inventory.records(latest_only=False) if r.name.startswith("herd-"))
    finally:
        inventory.close()
    wrong = {name: n for name, n in by_name.items() if n != 2}
    if len(by_name) != count or wrong:
        return f"{len(by_name)} nodes in the inventory (want {count}); with other than 2 certificates: {list(wrong.items())[:5]}"
    verify = subprocess.run([PKICTL, "--home", str(home), "audit", "verify"], capture_output=True, text=True, check=False, timeout=600)
    return None if verify.returncode == 0 else f"pkictl audit verify: {verify.stdout}{verify.stderr}"


def collect(results, procs: list, deadline: float) -> list[dict]:
    """Each client process's report; raises if one ended without one, or at ``deadline``."""
    reports: list[dict] = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            ended = [p for p in procs if not p.is_alive()]
            if len(ended) > len(reports) and results.empty():
                raise RuntimeError(f"a client process ended without its report (exit codes {[p.exitcode for p in ended]})") from None
            if time.monotonic() > deadline:
                raise RuntimeError("the herd did not end in time") from None
    return reports


def run_herd(args, engine: Engine, databases: Databases) -> dict:
    """Make the CA and the fleet, start the servers, renew every node at once, check the records:
    what happened, for :func:`report`. Every server and client process is gone when it returns or raises."""
    # Every node dials from 127.0.0.1 and all handshake at once: the caps must hold them all as
    # unproved connections (a quarter of --max-connections is kept for proved ones).
    caps = str(2 * args.clients * args.connections + 256)
    with tempfile.TemporaryDirectory() as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        print(f"\n== {engine.label}: {args.nodes} nodes", flush=True)
        home, homes = make_ca(tmp, engine, databases)
        began = time.monotonic()
        nodes = make_fleet(home, tmp / "fleet", args.nodes)
        print(f"{args.nodes} nodes issued and their renewals prepared in {time.monotonic() - began:.1f} s; "
              f"{os.cpu_count()} cores; {args.clients} client process(es), {args.connections} connections each at most", flush=True)
        servers: list[Server] = []
        for i, where in enumerate(homes, 1):
            replica = ["--replica", f"r{i}"] if engine.name == "postgresql" else []
            log = args.server_log.with_name(f"{args.server_log.name}.{engine.name}-{engine.replicas}-r{i}") if args.server_log else None
            server = Server(where, ["--workers", str(args.workers), "--max-connections", caps, "--max-connections-per-peer", caps,
                                    *replica, *args.serve_arg], log=log, label=f"pkictl serve {' '.join(replica) or '(sqlite)'}")
            stack.callback(server.stop)
            servers.append(server)
        urls = [f"https://127.0.0.1:{server.port}{EST_PREFIX}/simplereenroll" for server in servers]
        mp = multiprocessing.get_context("spawn")
        barrier, results = mp.Barrier(args.clients + 1), mp.Queue()
        procs = [mp.Process(target=_client, args=(share, urls, str(home / "ca.pem"), args.connections, args.timeout, barrier, results))
                 for share in spread(nodes, args.clients, len(servers))]

        def end_clients() -> None:
            for proc in procs:
                if proc.pid is None:  # never started
                    continue
                if proc.is_alive():
                    proc.terminate()
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)

        stack.callback(end_clients)
        for proc in procs:
            proc.start()
        barrier.wait(timeout=600)
        cpu0, db0, machine0, start = sum(s.cpu() for s in servers), est_reenroll.database_cpu(databases), est_reenroll.machine_cpu(), time.monotonic()
        reports = collect(results, procs, deadline=start + args.timeout * 4 + 600)
        wall = time.monotonic() - start
        server_cpu, db1, machine1 = sum(s.cpu() for s in servers) - cpu0, est_reenroll.database_cpu(databases), est_reenroll.machine_cpu()
        for proc in procs:
            proc.join(60)
        stack.close()  # the servers stop before the check: their log lines are all in
        problem = check_inventory(home, args.nodes)
    renewed = sorted(x for r in reports for x in r["renewed_after"])
    return {
        "engine": engine, "nodes": args.nodes, "wall": wall, "server_cpu": server_cpu,
        "db_cpu": db1 - db0 if db0 is not None and db1 is not None else None,
        "statuses": sum((r["statuses"] for r in reports), collections.Counter()),
        "latencies": [x for r in reports for x in r["latencies"]], "renewed": renewed,
        "retry_afters": sorted(x for r in reports for x in r["retry_afters"]),
        "shed_at": [x for r in reports for x in r["shed_at"]],
        "renewed_by": sum((r["renewed_by"] for r in reports), collections.Counter()),
        "client_cpu": sum(r["cpu"] for r in reports), "machine_busy": machine1[0] - machine0[0], "failures": [f for r in reports for f in r["failures"]][:5],
        "servers": [{"label": s.label, "answered": s.answered, "errors": s.errors, "refusals": s.refusals, "log": list(s.log)}
                    for s in servers],
        "problem": problem,
        "failed": args.nodes - len(renewed),
        "absorbed": renewed[-1] if renewed else float("nan"),
        "rate": len(renewed) / renewed[-1] if renewed else 0.0,
    }


def report(r: dict) -> None:
    """Print one herd's figures."""
    nodes, renewed, latencies, retry_afters, absorbed, rate = r["nodes"], r["renewed"], r["latencies"], r["retry_afters"], r["absorbed"], r["rate"]
    print(f"herd of {nodes}: {len(renewed)} renewed, {r['failed']} failed; absorbed in {absorbed:.1f} s ({rate:.0f} renewals/s)")
    print(f"  answers: {dict(sorted(r['statuses'].items()))} (0 = no response)")
    if latencies:
        print(f"  latency of the request answered 200: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print(f"  time from the herd's start to a node's renewal: p50 {percentile(renewed, 0.5):.1f} s, "
              f"p99 {percentile(renewed, 0.99):.1f} s")
    if retry_afters:
        spread_ = collections.Counter(retry_afters)
        shown = ", ".join(f"{s} s: {n}" for s, n in sorted(spread_.items())[:12])
        print(f"  503 answers: {len(retry_afters)}; Retry-After min {retry_afters[0]} s, median {statistics.median(retry_afters):g} s, "
              f"max {retry_afters[-1]} s, {len(spread_)} distinct values ({shown}{', ...' if len(spread_) > 12 else ''})")
    else:
        print("  503 answers: none (the herd fit under the shedding bound)")
    errors = sum(s["errors"] for s in r["servers"])
    db = f"; PostgreSQL server CPU {r['db_cpu']:.1f} s ({r['db_cpu'] * 1000 / max(len(renewed), 1):.2f} ms per renewal)" if r["db_cpu"] is not None else ""
    print(f"  server CPU {r['server_cpu']:.1f} s ({r['server_cpu'] * 1000 / max(len(renewed), 1):.2f} ms per renewal, shed answers included){db}; "
          f"client CPU {r['client_cpu']:.1f} s; wall {r['wall']:.1f} s; server ERROR lines: {errors}")
    ours = r["server_cpu"] + (r["db_cpu"] or 0.0) + r["client_cpu"]
    print(f"  machine: {r['machine_busy']:.1f} CPU s busy of {r['wall'] * (os.cpu_count() or 1):.1f} in the herd "
          f"({r['machine_busy'] / (r['wall'] * (os.cpu_count() or 1)):.0%}); not this bench's: {max(0.0, r['machine_busy'] - ours):.1f} s "
          f"(other tenants, the kernel, the bench's own process)")
    if r["engine"].name == "postgresql":
        asked = ", ".join(f"r{i + 1} {r['renewed_by'][i]}" for i in range(len(r["servers"])))
        answered = ", ".join(f"r{i + 1} {s['answered']}" for i, s in enumerate(r["servers"]))
        print(f"  replicas: renewed through each (client side): {asked}; answered 200 by each (its own log): {answered}")
    shed_at = r["shed_at"]
    if renewed:
        step = max(1, int(absorbed // 12) + 1)  # about a dozen buckets
        buckets = range(0, int(absorbed) + step, step)
        print(f"  timeline ({step} s buckets: renewed / 503): " + ", ".join(
            f"{b}s {sum(b <= x < b + step for x in renewed)}/{sum(b <= x < b + step for x in shed_at)}" for b in buckets))
    refusals = sum((s["refusals"] for s in r["servers"]), collections.Counter())
    if refusals:
        print(f"  the server's refusal lines by reason: {dict(refusals.most_common())}")
    for s in r["servers"]:
        for line in s["log"]:
            print(f"    server{'' if len(r['servers']) == 1 else ' ' + s['label'].split()[-1]}: {line}")
    for line in r["failures"]:
        print(f"    failure: {line}")
    if r["problem"]:
        print(f"  INTEGRITY: {r['problem']}")
    if rate:
        print(f"  predicts 100,000 nodes in {100_000 / rate:.0f} s at this rate, if nothing else gives out first")
    if nodes >= GOAL_NODES:
        met = absorbed <= GOAL_SECONDS and not r["failed"] and not r["problem"]
        print(f"goal: {GOAL_NODES:,} absorbed within {GOAL_SECONDS:.0f} s with no failure: {'met' if met else 'NOT met'} "
              f"({absorbed:.1f} s, {r['failed']} failed)")
    sys.stdout.flush()


def compare(results: list[dict]) -> None:
    """One line per engine, and its ratios to the first (SQLite), all measured in this run."""
    base = results[0]
    print(f"\ncompared, {base['nodes']} nodes each, in this run (ratios to {base['engine'].label}; renewals/s: higher is better):")
    print(f"  {'engine':26} {'absorbed':>9} {'renewals/s':>11} {'x':>6} {'failed':>7} {'p99 ms':>7} {'x':>6} {'503s':>6} "
          f"{'serve CPU ms':>13} {'pg CPU ms':>10}")
    for r in results:
        p99 = percentile(r["latencies"], 0.99) * 1000
        base_p99 = percentile(base["latencies"], 0.99) * 1000
        done = max(len(r["renewed"]), 1)
        db = f"{r['db_cpu'] * 1000 / done:10.2f}" if r["db_cpu"] is not None else f"{'-':>10}"
        print(f"  {r['engine'].label:26} {r['absorbed']:8.1f}s {r['rate']:11.0f} {r['rate'] / base['rate'] if base['rate'] else 0:5.2f}x "
              f"{r['failed']:7d} {p99:7.0f} {p99 / base_p99 if base_p99 else 0:5.2f}x {len(r['retry_afters']):6d} "
              f"{r['server_cpu'] * 1000 / done:13.2f} {db}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=GOAL_NODES)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=1000, help="connections at once per client process")
    parser.add_argument("--workers", type=int, default=1, help="pkictl serve --workers")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it counts as failed")
    parser.add_argument("--serve-arg", action="append", default=[], help="another pkictl serve argument (repeatable)")
    parser.add_argument("--server-log", type=Path, default=None, help="keep each pkictl serve's whole log in files named after this")
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="sqlite", help="where the CA keeps its records")
    parser.add_argument("--replicas", type=int, default=1, help="postgresql: pkictl serve replicas the nodes are spread over")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="postgresql: an empty database of your own server (postgresql://USER@HOST/DB?passfile=PATH) "
                             "instead of a throwaway server")
    parser.add_argument("--compare", action="store_true",
                        help="run sqlite, postgresql with 1 replica and with --replicas (2 if not more) in one run, with ratios")
    args = parser.parse_args()
    if args.replicas < 1 or (args.replicas > 1 and args.engine != "postgresql" and not args.compare):
        parser.error("--replicas N (N >= 1) is for --engine postgresql: SQLite has one pkictl serve")
    if args.db is not None and args.compare:
        parser.error("--db URL holds one CA: --compare needs the throwaway server (a database per herd)")
    if args.compare:
        engines = [Engine("sqlite"), Engine("postgresql", 1), Engine("postgresql", max(2, args.replicas))]
    else:
        engines = [Engine(args.engine, args.replicas)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop the servers and PostgreSQL
    databases = Databases(args.db)
    results = []
    try:
        for engine in engines:
            result = run_herd(args, engine, databases)
            report(result)
            results.append(result)
    except ServerFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        databases.close()
    if len(results) > 1:
        compare(results)
    return 1 if any(r["failed"] or r["problem"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
