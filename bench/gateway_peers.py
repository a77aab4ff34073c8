"""Benchmark: our gateway listener against nginx, haproxy and stunnel as mTLS forwarders.

Goals (issue 5): at least nginx's handshake rate and throughput on this machine, round trip p99 no
worse than nginx, and zero failed handshakes across hot reloads under load.

Set-up: a CA, the gateway's certificate (IP SAN 127.0.0.1), a node certificate, a revoked node
and a node of a foreign CA, all made with pkictl's own library in a temporary directory. Every
forwarder serves the same fullchain and key, trusts only our root, demands a client certificate
and checks the CRL; each forwards to the same fast upstream (bench/tls_load.c, in C), and the same
load client (bench/tls_load.c, compiled at run time) drives each in turn: TLS 1.3 only, one suite
(TLS_AES_128_GCM_SHA256) and one group (X25519), a full handshake per connection (no session is
ever offered for resumption; the peers have tickets and session caches off). The forwarder runs
alone on CPU 1, the client and the upstream on CPU 0 (taskset). Before measuring, each forwarder
must let the node through and refuse a client without a certificate, a revoked one and a foreign
one, or it is not measured.

Per forwarder and round: handshakes/s with the server's CPU per handshake (/proc/PID/stat of the
forwarder's processes), upload and download over one connection (MB/s, server CPU s/GB), round
trip p50/p99 of 64-byte messages over one connection, RSS idle and the peak under load. Printed:
medians of the rounds, their spread, and ratios to nginx. Last, the hot-reload test: a handshake
flood against our listener while the credential is rotated many times (a new certificate
installed with CredentialStore.install, or `pkictl enroll-gateway --replace`, then SIGHUP).

Usage: python bench/gateway_peers.py [--only ours,nginx,haproxy,stunnel] [--pki-agent PATH]
           [--rounds 3] [--seconds 4] [--procs 8] [--mb 500] [--rtt-count 5000] [--rtt-repeat 3]
           [--reloads 40] [--reload-seconds 8] [--reload-via library|cli] [--set listener.KEY=VALUE]
           [--agent-log-level INFO] [--nice -10] [--keep] [--multicore]

With --multicore (bench/multicore.py): each forwarder with 1 and 2 workers (our listener.workers,
nginx worker_processes, haproxy nbthread; stunnel's threads), nothing pinned, the handshake flood
only: handshakes/s, CPU per handshake, connection latency p50/p99; then the reload test with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # bench/ is not a package
import harness
from harness import CLIENT_CPU, Running, Setup, measure, parse, pinned, reload_test, sanity
from multicore import run_multicore

METRICS = [  # key, heading, unit, better
    ("hs", "handshakes/s", "", "higher"),
    ("hs_cpu_ms", "server CPU/handshake", "ms", "lower"),
    ("up_mbs", "upload", "MB/s", "higher"),
    ("up_cpu", "server CPU/GB up", "s", "lower"),
    ("down_mbs", "download", "MB/s", "higher"),
    ("down_cpu", "server CPU/GB down", "s", "lower"),
    ("rtt_p50", "round trip p50", "us", "lower"),
    ("rtt_p99", "round trip p99", "us", "lower"),
    ("rss_idle", "RSS idle", "MB", "lower"),
    ("rss_load", "RSS under load", "MB", "lower"),
]


# -- report ----------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def report(results: dict[str, list[dict]], reload: dict | None, args) -> int:
    names = list(results)
    med = {n: {k: statistics.median(r[k] for r in results[n]) for k, *_ in METRICS} for n in names}
    base = "nginx" if "nginx" in med else names[0]
    print(f"\nMedians of {args.rounds} round(s); ratios to {base} in brackets "
          f"({'forwarder on CPU 1, client and upstream on CPU 0' if harness.pinning() else 'NOT pinned: fewer than 2 CPUs or no taskset'})")
    width = max(len(h) + len(u) + 3 for _, h, u, _ in METRICS)
    print(" " * width + "".join(f"{n:>18}" for n in names))
    for key, heading, unit, _ in METRICS:
        label = f"{heading} ({unit})" if unit else heading
        cells = []
        for n in names:
            value, ref = med[n][key], med[base][key]
            cells.append(f"{fmt(value)} [{value / ref:.2f}]" if ref else fmt(value))
        print(f"{label:<{width}}" + "".join(f"{c:>18}" for c in cells))
    if args.rounds > 1:
        print("\nBest of the rounds (noise on a shared machine only ever slows a peer down):")
        best = {n: {"hs": max(r["hs"] for r in results[n]), "up_mbs": max(r["up_mbs"] for r in results[n]),
                    "down_mbs": max(r["down_mbs"] for r in results[n]), "rtt_p99": min(r["rtt_p99"] for r in results[n])}
                for n in names}
        for key, label in (("hs", "handshakes/s"), ("up_mbs", "upload (MB/s)"), ("down_mbs", "download (MB/s)"),
                           ("rtt_p99", "round trip p99 (us)")):
            print(f"{label:<{width}}" + "".join(f"{fmt(best[n][key]) + ' [' + format(best[n][key] / best[base][key], '.2f') + ']':>18}"
                                               for n in names))
    print("\nSpread across rounds ((max - min) / median):")
    for n in names:
        spread = {k: (max(r[k] for r in results[n]) - min(r[k] for r in results[n])) / med[n][k] if med[n][k] else 0
                  for k in ("hs", "up_mbs", "down_mbs", "rtt_p99")}
        others = (statistics.median(r["others_server_cpu"] for r in results[n]), statistics.median(r["others_client_cpu"] for r in results[n]))
        print(f"  {n:<8} " + "  ".join(f"{k} {v:.0%}" for k, v in spread.items())
              + f"   other processes took {others[0]:.0%} of the forwarder's CPU, {others[1]:.0%} of the client's during the floods")
    print("\nLoad client (C, OpenSSL; same for every peer):")
    for n in names:
        rounds = results[n]
        client_ms = statistics.median(r["client_ms"] for r in rounds)
        print(f"  {n:<8} client {client_ms:.2f} ms CPU/handshake (capacity ~{1e3 / client_ms:.0f}/s on one core); "
              f"client core busy {statistics.median(r['client_busy'] for r in rounds):.0%}, server core busy "
              f"{statistics.median(r['server_busy'] for r in rounds):.0%}; tickets/handshake "
              f"{statistics.median(r['tickets'] for r in rounds):.2f}; failed {sum(r['hs_failed'] for r in rounds)}; "
              f"cipher {rounds[0]['cipher']}")
    fastest = max(names, key=lambda n: med[n]["hs"])
    capacity = 1e3 / statistics.median(r["client_ms"] for r in results[fastest])
    headroom = capacity / med[fastest]["hs"]
    print(f"  against the fastest ({fastest}, {med[fastest]['hs']:.0f}/s) the client could do ~{capacity:.0f}/s on a full core "
          f"({headroom:.1f}x): " + ("the client may be the limit there; compare the server CPU per handshake instead"
                                   if headroom < 1.3 else "the client is not the limit"))
    goals = []
    if "ours" in med and "nginx" in med:
        o, g = med["ours"], med["nginx"]
        goals += [
            (f"handshake rate >= nginx ({o['hs']:.0f} vs {g['hs']:.0f}/s)", o["hs"] >= g["hs"]),
            (f"upload throughput >= nginx ({o['up_mbs']:.0f} vs {g['up_mbs']:.0f} MB/s)", o["up_mbs"] >= g["up_mbs"]),
            (f"download throughput >= nginx ({o['down_mbs']:.0f} vs {g['down_mbs']:.0f} MB/s)", o["down_mbs"] >= g["down_mbs"]),
            (f"round trip p99 <= nginx ({o['rtt_p99']:.0f} vs {g['rtt_p99']:.0f} us)", o["rtt_p99"] <= g["rtt_p99"]),
        ]
    if reload is not None:
        print(f"\nHot reload under load ({args.reload_via}): {reload['reloads']} rotations + SIGHUP during a "
              f"{args.reload_seconds:g} s flood: {reload['ok']} handshakes ({reload['rate']:.0f}/s), {reload['failed']} failed"
              f"{' (' + '; '.join(sorted(reload['why'])) + ')' if reload['why'] else ''}; {reload['served']} of "
              f"{reload['installed']} certificates seen served; newest served afterwards: {reload['last_ok']}; "
              f"'reload failed' in the log: {reload['reload_failed_logged']}")
        if reload["late"]:
            print(f"  {reload['late']} rotation(s) came after the flood ended (rotations are slower than "
                  f"--reload-seconds / --reloads): raise --reload-seconds")
        goals.append((f"zero failed handshakes across {reload['reloads']} reloads ({reload['failed']} failed)", reload["failed"] == 0))
        goals.append(("the served certificate changes with each reload (newest served afterwards, more than one seen)",
                      reload["last_ok"] and reload["served"] > 1))
    if goals:
        print("\nGoals of issue 5:")
        for text, met in goals:
            print(f"  {'met    ' if met else 'NOT met'}  {text}")
    if "ours" in med and "nginx" in med:
        o, g = med["ours"], med["nginx"]
        print(f"  (steadier than the rates on a shared machine, server CPU ours/nginx: {o['hs_cpu_ms'] / g['hs_cpu_ms']:.2f} "
              f"per handshake, {o['up_cpu'] / g['up_cpu']:.2f} / {o['down_cpu'] / g['down_cpu']:.2f} per GB up / down)")
    return 0


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="ours,nginx,haproxy,stunnel", help="comma-separated peers to run (default: all)")
    parser.add_argument("--pki-agent", default=str(Path(sys.executable).with_name("pki-agent")),
                        help="the pki-agent to measure (default: the one next to this Python), e.g. another worktree's .venv/bin/pki-agent")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer; medians are printed (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="handshake flood per round, seconds (default 4)")
    parser.add_argument("--procs", type=int, default=8, help="concurrent client connections in the flood (default 8)")
    parser.add_argument("--mb", type=int, default=500, help="MB up and MB down per round (default 500)")
    parser.add_argument("--rtt-count", type=int, default=5000, help="round trips per measurement (default 5000)")
    parser.add_argument("--rtt-repeat", type=int, default=3, help="round-trip measurements per round; their median is the round's (default 3)")
    parser.add_argument("--reloads", type=int, default=40, help="rotations in the hot-reload test; 0 skips it (default 40)")
    parser.add_argument("--reload-seconds", type=float, default=8.0, help="length of the flood during reloads (default 8)")
    parser.add_argument("--reload-via", choices=["library", "cli"], default="library",
                        help="install new versions with CredentialStore.install (default) or 'pkictl enroll-gateway --replace'")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra agent.yaml setting for ours, e.g. listener.max_connections=4096 (YAML value; repeatable)")
    parser.add_argument("--agent-log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="ours: pki-agent's --log-level (default INFO, its production default: a line per accepted and closed connection)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the bench and everything it starts, e.g. -10 (as root) against a busy shared machine")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs) and print where")
    parser.add_argument("--multicore", action="store_true",
                        help="the multi-core mode (bench/multicore.py): each forwarder with 1 and 2 workers, nothing pinned; "
                             "handshakes/s, CPU per handshake, connection p99, then the reload test with 2 workers")
    args = parser.parse_args()
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(wanted) - {"ours", *P.PEERS}
    if unknown:
        parser.error(f"--only: unknown peer(s) {', '.join(sorted(unknown))}; want ours, nginx, haproxy, stunnel")
    extra = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: want KEY=VALUE")
        extra[key] = yaml.safe_load(value)

    if args.multicore:
        harness.unpin()
    if harness.pinning():
        os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this process (RSS sampler, rotations) stays off the forwarder's CPU
    if args.nice:
        os.nice(args.nice)  # inherited by the forwarders, the client and the upstream
    work = Path(tempfile.mkdtemp(prefix="pkictl-bench-"))
    upstream = None
    try:
        setup = Setup(work)
        fields = P.agent_listener_fields(args.pki_agent) if "ours" in wanted and Path(args.pki_agent).exists() else set()

        def configure_ours(workdir, material, port, upstream_port, workers=1):
            # listener.workers only where the code under test has it: unset, it is the CPUs the
            # agent may run on, one here where it is pinned to one CPU.
            more = {"listener.workers": workers} if "workers" in fields and (args.multicore or workers != 1) else {}
            return P.agent_config(workdir, material, port, upstream_port, trust_domain=setup.ca.settings.trust_domain,
                                  ca_home=setup.ca.home, allow=["bench"], fields=fields, extra={**extra, **more})

        candidates = {"ours": P.ours(args.pki_agent, configure_ours, args.agent_log_level), **P.PEERS}
        chosen: list[tuple[P.Peer, str]] = []
        for name in wanted:
            program = candidates[name].find()
            if program is None:
                print(f"{name}: not installed, not measured ({candidates[name].install})")
            else:
                chosen.append((candidates[name], program))
        if not chosen:
            print("nothing to measure")
            return 1
        upstream = subprocess.Popen([*pinned(CLIENT_CPU), str(setup.client), "upstream"], stdout=subprocess.PIPE, text=True)
        upstream_port = int(parse(upstream.stdout.readline())["port"])
        if args.multicore:
            print(f"bench --multicore: {', '.join(n.name for n, _ in chosen)}; {args.rounds} round(s) of {args.seconds:g} s "
                  f"floods x {args.procs} connections, 1 and 2 workers each; ours = {args.pki_agent}")
            return run_multicore(setup, chosen, upstream_port, args)
        print(f"bench: {', '.join(n.name for n, _ in chosen)}; {args.rounds} round(s) of {args.seconds:g} s floods x "
              f"{args.procs} connections, {args.mb} MB each way, {args.rtt_count} round trips; ours = {args.pki_agent}")
        results: dict[str, list[dict]] = {}
        excluded = set()
        for round_no in range(1, args.rounds + 1):
            for peer, program in chosen:  # interleaved: a noisy spell of the machine hits every peer
                if peer.name in excluded:
                    continue
                run = Running(setup, peer, program, upstream_port, f"r{round_no}")
                try:
                    problem = sanity(setup, run.port)
                    if problem:
                        print(f"{peer.name}: {problem}; log in {run.log_path}")
                        excluded.add(peer.name)
                        continue
                    result = measure(setup, run, args, upstream.pid)
                finally:
                    run.stop()
                results.setdefault(peer.name, []).append(result)
                print(f"  round {round_no} {peer.name:<8} {result['hs']:7.0f} hs/s  up {result['up_mbs']:6.0f} MB/s  "
                      f"down {result['down_mbs']:6.0f} MB/s  p99 {result['rtt_p99']:6.0f} us  rss {result['rss_load']:.0f} MB",
                      flush=True)
        reload = None
        ours_peer = next((p for p in chosen if p[0].name == "ours"), None)
        if args.reloads > 0 and ours_peer is not None and "ours" not in excluded:
            reload = reload_test(setup, ours_peer[0], ours_peer[1], upstream_port, args)
        if not results:
            return 1
        return report(results, reload, args)
    finally:
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
