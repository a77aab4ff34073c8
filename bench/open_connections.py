"""Benchmark: memory per open connection, our gateway listener against nginx.

A node's connection to the gateway may stay open for hours; what each one costs in memory decides
how many nodes one gateway holds. Each forwarder is started alone (same certificates, CRL and
upstream as bench/gateway_peers.py), then ``--connections`` mTLS connections are opened from this
process, each with a full handshake and one exchanged byte, and left idle. Printed: the
forwarder's RSS before and with them open (all its processes, /proc), the cost per connection,
and the ratios to nginx.

Usage: python bench/open_connections.py [--connections 2000] [--only ours,nginx] [--pki-agent PATH]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # bench/ is not a package
from harness import Running, Setup, parse


def measure(setup: Setup, run: Running, count: int) -> tuple[float, float]:
    """RSS in MB of the forwarder idle and with ``count`` connections open."""
    ctx = ssl.create_default_context(cafile=str(setup.material.ca))
    ctx.load_cert_chain(*(str(p) for p in setup.node))
    time.sleep(0.3)  # its start-up allocations settle
    idle = P.rss_bytes(run.pids()) / 1e6
    conns = []
    try:
        for _ in range(count):
            tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", run.port), timeout=30), server_hostname="127.0.0.1")
            tls.sendall(b"ex")  # the bench upstream answers the second byte: the connection is forwarded
            if tls.recv(1) != b"x":
                raise RuntimeError(f"{run.log_path}: connection {len(conns) + 1} got no answer")
            conns.append(tls)
        time.sleep(0.3)
        return idle, P.rss_bytes(run.pids()) / 1e6
    finally:
        for tls in conns:
            tls.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--only", default="ours,nginx")
    parser.add_argument("--pki-agent", default=str(Path(sys.executable).with_name("pki-agent")))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 256
    if soft < need:  # this process holds every client socket (peers get theirs from their configs)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    work = Path(tempfile.mkdtemp(prefix="pkictl-bench-"))
    upstream = None
    try:
        setup = Setup(work)
        upstream = subprocess.Popen([str(setup.client), "upstream"], stdout=subprocess.PIPE, text=True)
        upstream_port = int(parse(upstream.stdout.readline())["port"])
        fields = P.agent_listener_fields(args.pki_agent)

        def configure_ours(workdir, material, port, upstream_port):
            return P.agent_config(workdir, material, port, upstream_port, trust_domain=setup.ca.settings.trust_domain,
                                  ca_home=setup.ca.home, allow=["bench"], fields=fields,
                                  extra={"listener.max_connections": args.connections + 16})

        candidates = {"ours": (P.ours(args.pki_agent, configure_ours, "WARNING"), args.pki_agent), "nginx": (P.PEERS["nginx"], P.PEERS["nginx"].find())}
        results = {}
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            peer, program = candidates[name]
            if program is None:
                print(f"{name}: not installed, not measured ({peer.install})")
                continue
            run = Running(setup, peer, program, upstream_port, "open")
            try:
                results[name] = measure(setup, run, args.connections)
            finally:
                run.stop()
        base = results.get("nginx")
        print(f"RSS with {args.connections} idle mTLS connections open (one handshake and one byte each):")
        for name, (idle, full) in results.items():
            per = (full - idle) / args.connections * 1000
            ratio = f" [{per / ((base[1] - base[0]) / args.connections * 1000):.2f} of nginx's]" if base and name != "nginx" else ""
            print(f"  {name:<6} idle {idle:6.1f} MB   open {full:6.1f} MB   {per:5.1f} kB per connection{ratio}")
        return 0 if results else 1
    finally:
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
