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
           [--agent-log-level INFO] [--nice -10] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # noqa: E402  (bench/ is not a package)

from pkictl.authority import CertificateAuthority  # noqa: E402
from pkictl.profile import generate_key  # noqa: E402
from pkictl.settings import CASettings  # noqa: E402
from pkictl.store import Credential, CredentialStore  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVER_CPU, CLIENT_CPU = "1", "0"
PIN = len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
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


def pinned(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if PIN else []


# -- set-up --------------------------------------------------------------------------------------


class Setup:
    """The CA, the credentials and the compiled client in ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ca = CertificateAuthority.init(work / "ca", CASettings())
        gateway = self.ca.enroll("gateway", "gw", out=work / "gw", ip_addresses=["127.0.0.1"]).directory
        self.node = self._files(self.ca.enroll("node", "bench", out=work / "node").directory)
        self.revoked = self._files(self.ca.enroll("node", "revoked", out=work / "revoked").directory)
        self.ca.revoke("revoked", reason="keyCompromise")
        foreign = CertificateAuthority.init(work / "foreign-ca", CASettings())
        self.foreign = self._files(foreign.enroll("node", "bench", out=work / "foreign").directory)
        foreign.close()
        self.material = P.make_material(self.ca, gateway, work / "peers")
        self.client = compile_client(work)

    @staticmethod
    def _files(bundle: Path) -> tuple[Path, Path]:
        version = CredentialStore(bundle).current_version_dir()
        return version / "fullchain.pem", version / "privkey.pem"

    def rotate_gateway(self, via: str, pkictl: str) -> int:
        """Put a new gateway certificate in service on disk; return its serial."""
        store = CredentialStore(self.material.gateway_dir)
        if via == "cli":
            subprocess.run([pkictl, "--home", str(self.ca.home), "enroll-gateway", "gw", "--ip", "127.0.0.1", "--replace",
                            "--out", str(store.directory)], check=True, capture_output=True, timeout=60)
            return store.load().certificate.serial_number
        key = generate_key()
        certificate = self.ca.issue("gateway", "gw", key.public_key(), ip_addresses=["127.0.0.1"], first=False)
        store.install(Credential(key, certificate, self.ca.chain))
        return certificate.serial_number


def compile_client(work: Path) -> Path:
    """Build bench/tls_load.c against the system OpenSSL (the one every peer uses)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench: no C compiler: apt-get install -y gcc libssl-dev")
    out = work / "tls_load"
    build = subprocess.run([cc, "-O2", "-o", str(out), str(HERE / "tls_load.c"), "-lssl", "-lcrypto", "-lpthread"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        sys.exit(f"bench: cannot compile bench/tls_load.c (apt-get install -y gcc libssl-dev):\n{build.stderr}")
    return out


# -- the load client -------------------------------------------------------------------------------


def parse(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def run_client(setup: Setup, mode: str, port: int, cert: tuple[Path, Path] | None = None, **options) -> tuple[list[dict], float, float]:
    """Run the load client once; return its result lines, the wall time and its own CPU seconds."""
    argv = [*pinned(CLIENT_CPU), str(setup.client), mode, "--port", str(port), "--ca", str(setup.material.ca)]
    if cert is not None:
        argv += ["--cert", str(cert[0]), "--key", str(cert[1])]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: the caller takes differences
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"load client failed ({proc.returncode}): {err.strip()}")
    return [parse(line) for line in out.splitlines() if line.strip()], wall, usage.ru_utime + usage.ru_stime


class Sampler:
    """Samples the RSS of a forwarder's processes every 50 ms; ``peak`` is the largest seen."""

    def __init__(self, root: int) -> None:
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, P.rss_bytes(P.peer_processes(self.root)))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- one forwarder, one round ----------------------------------------------------------------------


class Running:
    """A forwarder started for one round, on its own CPU, with its log in the work directory."""

    def __init__(self, setup: Setup, peer: P.Peer, program: str, upstream: int, tag: str) -> None:
        self.port = P.free_port()
        workdir = setup.work / f"{peer.name}-{tag}"
        workdir.mkdir()
        config = peer.configure(workdir, setup.material, self.port, upstream)
        self.log_path = workdir / "output.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([*pinned(SERVER_CPU), *peer.argv(program, config)], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            P.wait_listening(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{peer.name}: {exc}; its output:\n{self.log_path.read_text()[-2000:]}") from None

    def pids(self) -> list[int]:
        return P.peer_processes(self.proc.pid)

    def cpu(self) -> float:
        return P.cpu_seconds(self.pids())

    def stop(self) -> None:
        P.stop(self.proc)
        self._log.close()


def sanity(setup: Setup, port: int) -> str | None:
    """None if the forwarder admits the node and refuses the controls; else what went wrong."""
    good, _, _ = run_client(setup, "once", port, setup.node)
    if good[0].get("result") != "ok":
        return f"refused the valid node: {good[0].get('why')}"
    for label, cert in (("no certificate", None), ("revoked", setup.revoked), ("foreign CA", setup.foreign)):
        lines, _, _ = run_client(setup, "once", port, cert)
        if lines[0].get("result") == "ok":
            return f"let a client with {label} through: not mTLS as configured, not measured"
    return None


def hs_flood(setup: Setup, port: int, seconds: float, procs: int) -> tuple[dict, float, float]:
    """Run the handshake flood; return the summed counts, wall time and client CPU seconds."""
    _, _, cpu0 = run_client(setup, "once", port, setup.node)  # RUSAGE_CHILDREN baseline
    lines, wall, cpu1 = run_client(setup, "hs", port, setup.node, procs=procs, seconds=seconds)
    total: dict = {"ok": 0, "failed": 0, "tickets": 0, "serials": set(), "why": set()}
    for line in lines:
        total["ok"] += int(line["ok"])
        total["failed"] += int(line["fail_connect"]) + int(line["fail_handshake"]) + int(line["fail_read"])
        total["tickets"] += int(line["tickets"])
        total["serials"] |= {int(s, 16) for s in line.get("serials", "").split(",") if s and s != "?"}
        if line.get("why", "-") != "-":
            total["why"].add(line["why"])
    return total, wall, cpu1 - cpu0


def measure(setup: Setup, run: Running, args, upstream_pid: int) -> dict:
    """One round of every measurement against one running forwarder."""
    r: dict = {}
    time.sleep(0.3)
    r["rss_idle"] = P.rss_bytes(run.pids()) / 1e6
    hs_flood(setup, run.port, 0.5, args.procs)  # warm-up: lazy imports, first allocations
    with Sampler(run.proc.pid) as sampler:
        cpu0, up0, busy0 = run.cpu(), P.cpu_seconds([upstream_pid]), cpu_busy()
        total, wall, client_cpu = hs_flood(setup, run.port, args.seconds, args.procs)
        server_cpu, upstream_cpu = run.cpu() - cpu0, P.cpu_seconds([upstream_pid]) - up0
        busy = {cpu: seconds - busy0.get(cpu, 0.0) for cpu, seconds in cpu_busy().items()}
        r["hs"] = total["ok"] / wall
        r["hs_cpu_ms"] = server_cpu / max(1, total["ok"]) * 1e3
        r["hs_failed"], r["tickets"] = total["failed"], total["tickets"] / max(1, total["ok"])
        r["client_ms"] = client_cpu / max(1, total["ok"]) * 1e3
        r["client_busy"] = (client_cpu + upstream_cpu) / wall
        r["server_busy"] = server_cpu / wall
        # What other processes (other agents on a shared machine) took from the two CPUs meanwhile.
        r["others_server_cpu"] = max(0.0, busy.get(SERVER_CPU, 0.0) - server_cpu) / wall
        r["others_client_cpu"] = max(0.0, busy.get(CLIENT_CPU, 0.0) - client_cpu - upstream_cpu) / wall
        for direction in ("up", "down"):
            cpu0 = run.cpu()
            lines, _, _ = run_client(setup, direction, run.port, setup.node, bytes=args.mb * 1_000_000)
            if lines[0].get("result") != "ok":
                raise RuntimeError(f"{direction}load failed: {lines[0].get('why')}")
            r[f"{direction}_mbs"] = float(lines[0]["mb_per_s"])
            r[f"{direction}_cpu"] = (run.cpu() - cpu0) / (args.mb / 1000)
            r["cipher"] = lines[0]["cipher"]
        r["rss_load"] = max(sampler.peak, P.rss_bytes(run.pids())) / 1e6
    p50s, p99s = [], []
    for _ in range(args.rtt_repeat):  # cheap, and the p99 is what a busy machine disturbs most
        lines, _, _ = run_client(setup, "rtt", run.port, setup.node, count=args.rtt_count, size=64)
        if lines[0].get("result") != "ok":
            raise RuntimeError(f"round trips failed: {lines[0].get('why')}")
        p50s.append(float(lines[0]["p50_us"]))
        p99s.append(float(lines[0]["p99_us"]))
    r["rtt_p50"], r["rtt_p99"] = statistics.median(p50s), statistics.median(p99s)
    return r


def cpu_busy() -> dict[str, float]:
    """Busy seconds of each CPU since boot (/proc/stat: all but idle and iowait)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields[:8]]
            busy[name[3:]] = (sum(ticks) - ticks[3] - ticks[4]) / P.TICKS
    return busy


# -- the hot-reload test ---------------------------------------------------------------------------


def reload_test(setup: Setup, peer: P.Peer, program: str, upstream: int, args) -> dict:
    """A handshake flood against our listener while its credential is rotated ``args.reloads``
    times (install + SIGHUP, evenly spaced); counts failed handshakes and the serials served."""
    run = Running(setup, peer, program, upstream, "reload")
    pkictl = str(Path(program).with_name("pkictl"))
    try:
        installed = [CredentialStore(setup.material.gateway_dir).load().certificate.serial_number]
        result: dict = {}

        def flood() -> None:
            result["total"], result["wall"], _ = hs_flood(setup, run.port, args.reload_seconds, args.procs)

        thread = threading.Thread(target=flood)
        thread.start()
        spacing = args.reload_seconds / (args.reloads + 1)
        started = time.monotonic()
        late = 0
        for i in range(args.reloads):
            time.sleep(max(0.0, started + spacing * (i + 0.5) - time.monotonic()))
            installed.append(setup.rotate_gateway(args.reload_via, pkictl))
            os.kill(run.proc.pid, signal.SIGHUP)
            late += not thread.is_alive()
        thread.join()
        # After the flood: does a new connection get the last installed certificate?
        lines, _, _ = run_client(setup, "hs", run.port, setup.node, procs=1, seconds=0.2)
        last_served = {int(s, 16) for s in lines[0].get("serials", "").split(",") if s}
        log = run.log_path.read_text()
    finally:
        run.stop()
    total = result["total"]
    return {"ok": total["ok"], "failed": total["failed"], "why": total["why"], "reloads": args.reloads,
            "served": len(total["serials"] & set(installed)), "installed": len(installed),
            "last_ok": last_served == {installed[-1]}, "reload_failed_logged": log.count("reload failed"),
            "rate": total["ok"] / result["wall"], "late": late}


# -- report ----------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def report(results: dict[str, list[dict]], reload: dict | None, args) -> int:
    names = list(results)
    med = {n: {k: statistics.median(r[k] for r in results[n]) for k, *_ in METRICS} for n in names}
    base = "nginx" if "nginx" in med else names[0]
    print(f"\nMedians of {args.rounds} round(s); ratios to {base} in brackets "
          f"({'forwarder on CPU 1, client and upstream on CPU 0' if PIN else 'NOT pinned: fewer than 2 CPUs or no taskset'})")
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

    if PIN:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this process (RSS sampler, rotations) stays off the forwarder's CPU
    if args.nice:
        os.nice(args.nice)  # inherited by the forwarders, the client and the upstream
    work = Path(tempfile.mkdtemp(prefix="pkictl-bench-"))
    upstream = None
    try:
        setup = Setup(work)
        fields = P.agent_listener_fields(args.pki_agent) if "ours" in wanted and Path(args.pki_agent).exists() else set()

        def configure_ours(workdir, material, port, upstream_port):
            return P.agent_config(workdir, material, port, upstream_port, trust_domain=setup.ca.settings.trust_domain,
                                  ca_home=setup.ca.home, allow=["bench"], fields=fields, extra=extra)

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
