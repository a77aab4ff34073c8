"""The machinery of bench/gateway_peers.py: the CA and credentials, the compiled load client, one
forwarder's round of measurements, and the hot-reload flood against ours."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # bench/ is not a package

from pkictl.authority import CertificateAuthority
from pkictl.profile import generate_key
from pkictl.settings import CASettings
from pkictl.store import Credential, CredentialStore

__all__ = ["PIN", "SERVER_CPU", "CLIENT_CPU", "pinned", "Setup", "Running", "parse", "sanity", "measure", "reload_test",
           "hs_flood", "latency_quantile", "unpin", "pinning"]

HERE = Path(__file__).resolve().parent
SERVER_CPU, CLIENT_CPU = "1", "0"
PIN = len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None


_MODE = {"pin": PIN}


def pinned(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if _MODE["pin"] else []


def pinning() -> bool:
    """Whether forwarders run on CPU 1 and the client and upstream on CPU 0."""
    return _MODE["pin"]


def unpin() -> None:
    """Pin nothing from now on: the forwarders, the client and the upstream share every CPU
    (the multi-core mode)."""
    _MODE["pin"] = False


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
    build = subprocess.run([cc, "-O2", "-o", str(out), str(HERE / "tls_load.c"), "-lssl", "-lcrypto", "-lpthread", "-lm"],
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

    def __init__(self, setup: Setup, peer: P.Peer, program: str, upstream: int, tag: str, workers: int = 1) -> None:
        self.port = P.free_port()
        workdir = setup.work / f"{peer.name}-{tag}"
        workdir.mkdir()
        config = peer.configure(workdir, setup.material, self.port, upstream, workers)
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
    total: dict = {"ok": 0, "failed": 0, "tickets": 0, "serials": set(), "why": set(), "lat": {}}
    for line in lines:
        total["ok"] += int(line["ok"])
        for item in filter(None, line.get("lat", "").split(",")):
            bucket, count = item.split(":")
            total["lat"][int(bucket)] = total["lat"].get(int(bucket), 0) + int(count)
        total["failed"] += int(line["fail_connect"]) + int(line["fail_handshake"]) + int(line["fail_read"])
        total["tickets"] += int(line["tickets"])
        total["serials"] |= {int(s, 16) for s in line.get("serials", "").split(",") if s and s != "?"}
        if line.get("why", "-") != "-":
            total["why"].add(line["why"])
    return total, wall, cpu1 - cpu0


def latency_quantile(histogram: dict[int, int], q: float) -> float:
    """The ``q`` quantile (0..1) of a flood's connection latencies, in ms, from the load client's
    5% buckets (the bucket's geometric middle: within 2.5%)."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= q * total:
            return 1.05 ** (bucket + 0.5) / 1e3
    return 1.05 ** (max(histogram) + 0.5) / 1e3


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


def reload_test(setup: Setup, peer: P.Peer, program: str, upstream: int, args, workers: int = 1) -> dict:
    """A handshake flood against our listener (``workers`` of them) while its credential is
    rotated ``args.reloads`` times (install + SIGHUP, evenly spaced); counts failed handshakes and
    the serials served."""
    run = Running(setup, peer, program, upstream, f"reload-{workers}", workers)
    pkictl = str(Path(program).with_name("pkictl"))
    try:
        # A served connection, not only a bound port: the agent binds before its workers serve.
        if problem := sanity(setup, run.port):
            raise RuntimeError(f"ours before the reload test: {problem}; log in {run.log_path}")
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
