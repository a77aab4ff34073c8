"""Benchmark: a renewal herd. N distinct nodes (10,000 by default) all call simplereenroll at once
against one `pkictl serve` on SQLite, as after a CA outage; how long the service takes to absorb
them, whether any renewal fails, latency, and how it sheds load (503 + Retry-After, RFC 7030
4.2.3) instead of letting requests time out.

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

After the herd the inventory must hold exactly one successor per node, and `pkictl audit verify`
must pass.

Usage: python bench/renewal_herd.py [--nodes 10000] [--clients 2] [--connections 1000] [--workers 1]
                                    [--timeout 120] [--serve-arg=--max-queue-delay=5 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import re
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

GOAL_SECONDS = 60.0
GOAL_NODES = 10_000


# -- the fleet ---------------------------------------------------------------------------------


def make_fleet(home: Path, out: Path, count: int) -> list[tuple[str, str, bytes]]:
    """Issue ``count`` node certificates of the CA in ``home`` (:func:`est_reenroll.make_fleet`)
    and return ``(name, credential PEM path, CSR body)`` per node, as the client processes take them."""
    return [(node.name, str(node.pem), node.csr_body) for node in est_reenroll.make_fleet(home, out, "herd-", count)]


# -- the client: one process's share of the herd -------------------------------------------------


def _client(nodes: list[tuple[str, str, bytes]], url: str, anchors: str, connections: int, timeout: float,
            barrier, results) -> None:
    """A client process: build each node's TLS context, wait for the start, renew every node at once."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    contexts = []
    for _, pem, _ in nodes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=anchors)
        ctx.load_cert_chain(pem)
        contexts.append(ctx)
    barrier.wait()
    results.put(runner(_herd(nodes, contexts, url, connections, timeout)))


async def _herd(nodes, contexts, url: str, connections: int, timeout: float) -> dict:
    import aiohttp

    slots = asyncio.Semaphore(connections)
    latencies: list[float] = []  # of each 200, its own request
    renewed_after: list[float] = []  # from the start of the herd to the node's 200
    retry_afters: list[int] = []
    shed_at: list[float] = []  # from the start of the herd to each 503
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    start, cpu = time.monotonic(), sum(os.times()[:2])
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # one connection per request, as agents do
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))

    async def renew(node, ctx) -> None:
        name, _, body = node
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
            elif len(failures) < 5:
                failures.append(f"{name}: {f'HTTP {status}' if status else 'no response'}: {text[:200].decode(errors='replace').strip()}")
            return

    try:
        await asyncio.gather(*(renew(node, ctx) for node, ctx in zip(nodes, contexts, strict=True)))
    finally:
        await session.close()
    return {"latencies": latencies, "renewed_after": renewed_after, "retry_afters": retry_afters, "shed_at": shed_at, "statuses": statuses,
            "failures": failures, "cpu": sum(os.times()[:2]) - cpu}


# -- the server ---------------------------------------------------------------------------------


class Server:
    """`pkictl serve` as a subprocess; its log is drained by a thread (the last lines kept)."""

    def __init__(self, home: Path, args: list[str], log: Path | None = None) -> None:
        pkictl = str(Path(sys.executable).parent / "pkictl")
        argv = [pkictl, "--home", str(home), "serve", "--listen", "127.0.0.1:0", *args]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: collections.deque[str] = collections.deque(maxlen=20)
        self.errors = 0
        self.refusals: collections.Counter = collections.Counter()  # the server's refusal lines, by reason
        self._ready = threading.Event()
        self.port = 0
        self._copy = log.open("w") if log is not None else None  # the whole log, for a look afterwards
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if not self._ready.wait(60) or not self.port:
            self.stop()
            sys.exit("pkictl serve did not start:\n" + "\n".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if self._copy is not None:
                self._copy.write(line)
            if " ERROR " in line:
                self.errors += 1
                self.log.append(line.rstrip())
            elif (" refused " in line or " rejected by client " in line) and (reason := re.search(r"reason='([^']*)'", line)):
                self.refusals[reason.group(1)] += 1
            if match := re.search(r"ready: EST on https://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    def cpu(self) -> float:
        """CPU seconds of the server and its signing workers."""
        total = 0.0
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():  # workers are started from a thread
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
        return total

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self._drainer.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        if self._copy is not None:
            self._copy.close()


# -- main -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def check_inventory(home: Path, count: int) -> str | None:
    """None if every node has exactly one successor and the audit log verifies, else what is wrong."""
    inventory = Inventory.open(home)
    try:
        by_name = collections.Counter(r.name for r in inventory.records(latest_only=False) if r.name.startswith("herd-"))
    finally:
        inventory.close()
    wrong = {name: n for name, n in by_name.items() if n != 2}
    if len(by_name) != count or wrong:
        return f"{len(by_name)} nodes in the inventory (want {count}); with other than 2 certificates: {list(wrong.items())[:5]}"
    verify = subprocess.run([str(Path(sys.executable).parent / "pkictl"), "--home", str(home), "audit", "verify"],
                            capture_output=True, text=True, check=False)
    return None if verify.returncode == 0 else f"pkictl audit verify: {verify.stdout}{verify.stderr}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=GOAL_NODES)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=1000, help="connections at once per client process")
    parser.add_argument("--workers", type=int, default=1, help="pkictl serve --workers")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it counts as failed")
    parser.add_argument("--serve-arg", action="append", default=[], help="another pkictl serve argument (repeatable)")
    parser.add_argument("--server-log", type=Path, default=None, help="keep pkictl serve's whole log in this file")
    args = parser.parse_args()
    # Every node dials from 127.0.0.1 and all handshake at once: the caps must hold them all as
    # unproved connections (a quarter of --max-connections is kept for proved ones).
    caps = str(2 * args.clients * args.connections + 256)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        home = tmp / "ca"
        CertificateAuthority.init(home).close()
        began = time.monotonic()
        nodes = make_fleet(home, tmp / "fleet", args.nodes)
        print(f"{args.nodes} nodes issued and their renewals prepared in {time.monotonic() - began:.1f} s; "
              f"{os.cpu_count()} cores; {args.clients} client process(es), {args.connections} connections each at most")
        server = Server(home, ["--workers", str(args.workers), "--max-connections", caps, "--max-connections-per-peer", caps,
                               *args.serve_arg], log=args.server_log)
        url = f"https://127.0.0.1:{server.port}{EST_PREFIX}/simplereenroll"
        mp = multiprocessing.get_context("spawn")
        barrier, results = mp.Barrier(args.clients + 1), mp.Queue()
        shares = [nodes[i::args.clients] for i in range(args.clients)]
        procs = [mp.Process(target=_client, args=(share, url, str(home / "ca.pem"), args.connections, args.timeout, barrier, results))
                 for share in shares]
        try:
            for proc in procs:
                proc.start()
            barrier.wait(timeout=600)
            cpu0, start = server.cpu(), time.monotonic()
            reports = [results.get(timeout=3600) for _ in procs]
            wall = time.monotonic() - start
            server_cpu = server.cpu() - cpu0
            for proc in procs:
                proc.join(60)
        finally:
            server.stop()
        problem = check_inventory(home, args.nodes)
    statuses = sum((r["statuses"] for r in reports), collections.Counter())
    latencies = [x for r in reports for x in r["latencies"]]
    renewed = sorted(x for r in reports for x in r["renewed_after"])
    retry_afters = sorted(x for r in reports for x in r["retry_afters"])
    failed = args.nodes - len(renewed)
    absorbed = renewed[-1] if renewed else float("nan")
    rate = len(renewed) / absorbed if renewed else 0.0
    print(f"herd of {args.nodes}: {len(renewed)} renewed, {failed} failed; absorbed in {absorbed:.1f} s ({rate:.0f} renewals/s)")
    print(f"  answers: {dict(sorted(statuses.items()))} (0 = no response)")
    if latencies:
        print(f"  latency of the request answered 200: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print(f"  time from the herd's start to a node's renewal: p50 {percentile(renewed, 0.5):.1f} s, "
              f"p99 {percentile(renewed, 0.99):.1f} s")
    if retry_afters:
        spread = collections.Counter(retry_afters)
        shown = ", ".join(f"{s} s: {n}" for s, n in sorted(spread.items())[:12])
        print(f"  503 answers: {len(retry_afters)}; Retry-After min {retry_afters[0]} s, median {statistics.median(retry_afters):g} s, "
              f"max {retry_afters[-1]} s, {len(spread)} distinct values ({shown}{', ...' if len(spread) > 12 else ''})")
    else:
        print("  503 answers: none (the herd fit under the shedding bound)")
    print(f"  server CPU {server_cpu:.1f} s ({server_cpu * 1000 / max(len(renewed), 1):.2f} ms per renewal, shed answers included); "
          f"client CPU {sum(r['cpu'] for r in reports):.1f} s; wall {wall:.1f} s; server ERROR lines: {server.errors}")
    shed_at = [x for r in reports for x in r["shed_at"]]
    if renewed:
        step = max(1, int(absorbed // 12) + 1)  # about a dozen buckets
        buckets = range(0, int(absorbed) + step, step)
        print(f"  timeline ({step} s buckets: renewed / 503): " + ", ".join(
            f"{b}s {sum(b <= x < b + step for x in renewed)}/{sum(b <= x < b + step for x in shed_at)}" for b in buckets))
    if server.refusals:
        print(f"  the server's refusal lines by reason: {dict(server.refusals.most_common())}")
    for line in server.log:
        print(f"    server: {line}")
    for line in [f for r in reports for f in r["failures"]][:5]:
        print(f"    failure: {line}")
    if problem:
        print(f"  INTEGRITY: {problem}")
    if rate:
        print(f"  predicts 100,000 nodes in {100_000 / rate:.0f} s at this rate, if nothing else gives out first")
    if args.nodes >= GOAL_NODES:
        met = absorbed <= GOAL_SECONDS and not failed and not problem
        print(f"goal: {GOAL_NODES:,} absorbed within {GOAL_SECONDS:.0f} s with no failure: {'met' if met else 'NOT met'} "
              f"({absorbed:.1f} s, {failed} failed)")
    return 1 if failed or problem else 0


if __name__ == "__main__":
    sys.exit(main())
