"""The forwarders bench/gateway_peers.py measures: their configurations, processes and CPU/memory.

Every peer gets the same files (``Material``): the gateway's fullchain and key, our root as the
only trust anchor, the CRLs, and must demand a client certificate (mTLS). Each runs with TLS 1.2
as the minimum, session tickets and session caches off (every handshake is a full one), and its
own default logging. The config generators are also used by tests/test_bench_peers.py, which
checks that the installed peers accept them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["Material", "make_material", "Peer", "PEERS", "peer_processes", "cpu_seconds", "rss_bytes", "free_port", "wait_listening",
           "agent_python", "agent_listener_fields"]

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Material:
    """The files every peer serves and checks with.

    Attributes:
        fullchain: gateway certificate + issuing CA (PEM).
        key: the gateway's private key (PEM, 0600).
        combined: fullchain + key in one file (haproxy's ``crt``).
        ca: our root, the only trust anchor.
        crl: the CA's crl.pem (what our listener loads, ``listener.crl``).
        crl_all: the same file, which holds the issuing CA's and the root's CRLs: nginx, haproxy
            and stunnel check the CRL of every certificate in the chain (X509_V_FLAG_CRL_CHECK_ALL)
            and refuse every client without the root's.
        gateway_dir: the gateway's credential directory (our listener reads it).
    """

    fullchain: Path
    key: Path
    combined: Path
    ca: Path
    crl: Path
    crl_all: Path
    gateway_dir: Path


def make_material(ca, gateway_dir: Path, out: Path) -> Material:
    """Copies of the gateway's current credential for the peers (the reload test's rotations
    prune old versions from ``archive/``), and the CRL file they need (the CA's crl.pem).

    Args:
        ca: the :class:`pkictl.authority.CertificateAuthority`.
        gateway_dir: the gateway's credential directory.
        out: a new directory for the copies.
    """
    from pkictl.store import CredentialStore

    out.mkdir(mode=0o700)
    version = CredentialStore(gateway_dir).current_version_dir()
    chain_pem, key_pem = (version / "fullchain.pem").read_bytes(), (version / "privkey.pem").read_bytes()
    fullchain, key, combined = out / "fullchain.pem", out / "privkey.pem", out / "combined.pem"
    fullchain.write_bytes(chain_pem)
    for path, data in ((key, key_pem), (combined, chain_pem + key_pem)):
        path.touch(0o600)
        path.write_bytes(data)
    return Material(fullchain, key, combined, ca.home / "ca.pem", ca.crl_path, ca.crl_path, gateway_dir)


@dataclasses.dataclass(frozen=True)
class Peer:
    """One forwarder: how to find it, configure it, check its config and start it.

    Attributes:
        name: the name the bench prints (``ours``, ``nginx``, ``haproxy``, ``stunnel``).
        install: what to run when the program is missing.
        find: returns the program's path, or None when it is not installed.
        configure: ``(workdir, material, port, upstream_port, workers) -> config file``; workers:
            nginx's worker_processes, haproxy's nbthread, our listener.workers (stunnel has none:
            a thread per connection).
        check: ``(program, config) -> argv`` that validates the config without serving, or None.
        argv: ``(program, config) -> argv`` that serves in the foreground.
    """

    name: str
    install: str
    find: Callable[[], str | None]
    configure: Callable[[Path, Material, int, int, int], Path]
    check: Callable[[str, Path], list[str]] | None
    argv: Callable[[str, Path], list[str]]


# -- nginx (stream module) -----------------------------------------------------------------------

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def nginx_config(workdir: Path, m: Material, port: int, upstream: int, workers: int = 1) -> Path:
    load = f"load_module {NGINX_STREAM_MODULE};\n" if NGINX_STREAM_MODULE.exists() else ""
    text = f"""{load}daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 8192; }}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {m.fullchain};
        ssl_certificate_key {m.key};
        ssl_client_certificate {m.ca};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {m.crl_all};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        proxy_pass 127.0.0.1:{upstream};
    }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


NGINX = Peer(
    "nginx", "apt-get install -y nginx libnginx-mod-stream",
    lambda: shutil.which("nginx") or (str(p) if (p := Path("/usr/sbin/nginx")).exists() else None),
    nginx_config,
    lambda prog, conf: [prog, "-t", "-q", "-p", str(conf.parent), "-e", str(conf.parent / "nginx-error.log"), "-c", str(conf)],
    lambda prog, conf: [prog, "-p", str(conf.parent), "-e", str(conf.parent / "nginx-error.log"), "-c", str(conf)],
)


# -- haproxy (mode tcp) --------------------------------------------------------------------------


def haproxy_config(workdir: Path, m: Material, port: int, upstream: int, workers: int = 1) -> Path:
    text = f"""global
    nbthread {workers}
    maxconn 8192
    tune.ssl.cachesize 0
    pidfile {workdir}/haproxy.pid

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend gw
    bind 127.0.0.1:{port} ssl crt {m.combined} ca-file {m.ca} crl-file {m.crl_all} verify required ssl-min-ver TLSv1.2 no-tls-tickets
    default_backend upstream

backend upstream
    server gateway 127.0.0.1:{upstream}
"""
    path = workdir / "haproxy.cfg"
    path.write_text(text)
    return path


HAPROXY = Peer(
    "haproxy", "apt-get install -y haproxy",
    lambda: shutil.which("haproxy") or (str(p) if (p := Path("/usr/sbin/haproxy")).exists() else None),
    haproxy_config,
    lambda prog, conf: [prog, "-c", "-q", "-f", str(conf)],
    lambda prog, conf: [prog, "-db", "-f", str(conf)],
)


# -- stunnel ---------------------------------------------------------------------------------------


def stunnel_config(workdir: Path, m: Material, port: int, upstream: int, workers: int = 1) -> Path:
    text = f"""foreground = yes
pid = {workdir}/stunnel.pid
output = {workdir}/stunnel.log
debug = warning

[gateway]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{upstream}
cert = {m.fullchain}
key = {m.key}
CAfile = {m.ca}
CRLfile = {m.crl_all}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
options = NO_TICKET
sessionCacheSize = 1
sessionCacheTimeout = 1
"""
    path = workdir / "stunnel.conf"
    path.write_text(text)
    return path


STUNNEL = Peer(
    "stunnel", "apt-get install -y stunnel4",
    lambda: shutil.which("stunnel4") or shutil.which("stunnel"),
    stunnel_config,
    None,  # stunnel has no config-check mode: the test starts it and connects
    lambda prog, conf: [prog, str(conf)],
)


# -- ours: the real pki-agent --------------------------------------------------------------------


def agent_python(pki_agent: str) -> str:
    """The interpreter of an installed ``pki-agent`` script (its shebang), so that the config is
    generated for the code that will run, which may be another worktree's."""
    first = Path(pki_agent).read_text().splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def agent_listener_fields(pki_agent: str) -> set[str]:
    """The keys that ``listener:`` accepts in the code behind ``pki_agent``."""
    out = subprocess.run([agent_python(pki_agent), "-c", "from pki_agent.config import ListenerConfig; "
                          "print(' '.join(ListenerConfig.model_fields))"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{pki_agent}: cannot read its listener schema: {out.stderr.strip()}")
    return set(out.stdout.split())


def agent_config(workdir: Path, m: Material, port: int, upstream: int, *, trust_domain: str, ca_home: Path,
                 allow: list[str], fields: set[str], extra: dict | None = None) -> Path:
    """The gateway's ``agent.yaml``: the production layout (credential directory, CRL, renewal
    from the CA home) with the listener in front of the bench's upstream.

    Args:
        allow: node names for ``listener.allow`` (written only if the code under test has it).
        fields: the keys the listener schema of the code under test accepts.
        extra: more keys, ``{"listener.max_connections": 4096, "renewal.jitter": 0}`` style.
    """
    import yaml

    listener = {"listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream}", "crl": str(m.crl),
                "max_connections": 8192}
    if "allow" in fields:
        listener["allow"] = allow
    data = {"name": "gw", "kind": "gateway", "trust_domain": trust_domain, "credential_dir": str(m.gateway_dir),
            "renewal": {"ca_home": str(ca_home), "check_interval": "1h", "jitter": 0}, "listener": listener}
    for dotted, value in (extra or {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ours(pki_agent: str, configure: Callable[[Path, Material, int, int, int], Path], log_level: str = "INFO") -> Peer:
    """Our listener: ``pki-agent run --config agent.yaml --log-level LEVEL`` of the given installation
    (INFO, the default, logs two lines per connection: accepted and closed)."""
    return Peer("ours", "pip install -e . (or pass --pki-agent PATH)", lambda: pki_agent if Path(pki_agent).exists() else None,
                configure, None, lambda prog, conf: [prog, "run", "--config", str(conf), "--log-level", log_level])


PEERS = {"nginx": NGINX, "haproxy": HAPROXY, "stunnel": STUNNEL}


# -- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (peers other than ours need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:port accepts TCP connections, or raise (the process died / timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout} s")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses


def peer_processes(root: int) -> list[int]:
    """``root`` and all its descendants (nginx's workers, haproxy's and stunnel's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (all their threads), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        if fields := _stat(pid):
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of ``pids`` summed (shared pages of nginx's master and worker count twice)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds (nginx, haproxy, stunnel and ours all stop on TERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
