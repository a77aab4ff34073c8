"""The multi-core mode of bench/gateway_peers.py (``--multicore``): every forwarder with 1 and
with 2 workers (ours: ``listener.workers``; nginx: ``worker_processes``; haproxy: ``nbthread``;
stunnel has no such setting, a thread per connection: measured once). Nothing is pinned: the
forwarder, the load client and the upstream share the machine's CPUs as the scheduler places
them, the same way for each forwarder.

Per forwarder and worker count, medians of the rounds: handshakes/s, the forwarder's CPU per
handshake (all its processes and threads), the latency of a connection in the flood (connect,
handshake, 1-byte echo, close) p50 and p99, failed connections, and for ours how the accepted
connections spread over the worker processes (from their ``accepted ... worker=PID`` lines).
Then the hot-reload test against ours with 2 workers.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # bench/ is not a package
from harness import Running, Setup, hs_flood, latency_quantile, reload_test, sanity

__all__ = ["run_multicore"]


def _one(setup: Setup, peer: P.Peer, program: str, upstream: int, workers: int, tag: str, args) -> dict | None:
    run = Running(setup, peer, program, upstream, tag, workers)
    try:
        problem = sanity(setup, run.port)
        if problem:
            print(f"{peer.name}: {problem}; log in {run.log_path}")
            return None
        hs_flood(setup, run.port, 0.5, args.procs)  # warm-up: lazy imports, first allocations
        cpu0 = run.cpu()
        total, wall, client_cpu = hs_flood(setup, run.port, args.seconds, args.procs)
        server_cpu = run.cpu() - cpu0
    finally:
        run.stop()
    ok = max(1, total["ok"])
    result = {"hs": total["ok"] / wall, "hs_cpu_ms": server_cpu / ok * 1e3, "client_ms": client_cpu / ok * 1e3,
              "p50_ms": latency_quantile(total["lat"], 0.50), "p99_ms": latency_quantile(total["lat"], 0.99),
              "failed": total["failed"], "spread": ""}
    if peer.name == "ours" and workers > 1:
        counts: dict[str, int] = {}
        for pid in re.findall(r" accepted peer=\S+ .* worker=(\d+)$", run.log_path.read_text(), re.M):
            counts[pid] = counts.get(pid, 0) + 1
        accepted = sum(counts.values())
        result["spread"] = " / ".join(f"{c / accepted:.0%}" for c in sorted(counts.values(), reverse=True)) if accepted else "-"
    return result


def run_multicore(setup: Setup, chosen: list[tuple[P.Peer, str]], upstream: int, args) -> int:
    """Measure every chosen forwarder with 1 and 2 workers, ``args.rounds`` rounds interleaved,
    print the table and the reload test; returns the exit status."""
    counts = [1, 2]
    results: dict[tuple[str, int], list[dict]] = {}
    excluded: set[str] = set()
    for round_no in range(1, args.rounds + 1):
        for peer, program in chosen:
            for workers in counts if peer.name != "stunnel" else [0]:
                if peer.name in excluded:
                    continue
                result = _one(setup, peer, program, upstream, max(1, workers), f"mc{workers}-r{round_no}", args)
                if result is None:
                    excluded.add(peer.name)
                    continue
                results.setdefault((peer.name, workers), []).append(result)
                print(f"  round {round_no} {peer.name:<8} {workers or 'threads'!s:>7}  {result['hs']:7.0f} hs/s  "
                      f"{result['hs_cpu_ms']:.2f} ms CPU/hs  p99 {result['p99_ms']:.1f} ms  failed {result['failed']}"
                      f"{'  spread ' + result['spread'] if result['spread'] else ''}", flush=True)
    if not results:
        return 1
    med = {key: {k: statistics.median(r[k] for r in rs) for k in ("hs", "hs_cpu_ms", "client_ms", "p50_ms", "p99_ms")}
           for key, rs in results.items()}
    print(f"\nMulti-core mode, medians of {args.rounds} round(s) of {args.seconds:g} s floods x {args.procs} connections; "
          "nothing pinned (forwarder, client and upstream share every CPU); ratios to nginx with as many workers")
    print(f"{'forwarder':<10}{'workers':>8}{'handshakes/s':>18}{'CPU/handshake (ms)':>22}{'p50 (ms)':>10}{'p99 (ms)':>16}"
          f"{'x 1 worker':>12}{'failed':>8}  spread over workers")
    for (name, workers), m in med.items():
        ref = med.get(("nginx", workers))
        one = med.get((name, 1))

        def cell(key: str, m=m, ref=ref) -> str:
            text = f"{m[key]:.0f}" if m[key] >= 100 else f"{m[key]:.2f}"
            return f"{text} [{m[key] / ref[key]:.2f}]" if ref and ref[key] else text

        scaling = f"{m['hs'] / one['hs']:.2f}" if one and workers > 1 else ""
        spread = results[(name, workers)][-1]["spread"]
        failed = sum(r["failed"] for r in results[(name, workers)])
        print(f"{name:<10}{workers or 'threads'!s:>8}{cell('hs'):>18}{cell('hs_cpu_ms'):>22}{m['p50_ms']:>10.2f}{cell('p99_ms'):>16}"
              f"{scaling:>12}{failed:>8}  {spread}")
    client = statistics.median(r["client_ms"] for rs in results.values() for r in rs)
    print(f"  the load client took {client:.2f} ms CPU per handshake (median over all runs), on the same CPUs")
    ours = next(((p, prog) for p, prog in chosen if p.name == "ours"), None)
    if args.reloads > 0 and ours is not None and "ours" not in excluded:
        reload = reload_test(setup, ours[0], ours[1], upstream, args, workers=2)
        print(f"\nHot reload under load, 2 workers ({args.reload_via}): {reload['reloads']} rotations + SIGHUP during a "
              f"{args.reload_seconds:g} s flood: {reload['ok']} handshakes ({reload['rate']:.0f}/s), {reload['failed']} failed"
              f"{' (' + '; '.join(sorted(reload['why'])) + ')' if reload['why'] else ''}; {reload['served']} of "
              f"{reload['installed']} certificates seen served; newest served afterwards: {reload['last_ok']}")
    return 0
