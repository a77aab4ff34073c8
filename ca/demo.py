"""``pkictl demo``: the real setup on one machine, in a fresh local directory, on loopback only.

Every step runs the installed commands as subprocesses, as an operator types them: ``pkictl
init-ca``, ``pkictl serve`` (the CA as an EST service), ``pkictl enroll-gateway`` and the
gateway's ``pki-agent run`` (renewing over EST, fetching the CRL from the service, its mTLS
listener in front of a demo upstream), node TW by a one-time token and node N2 by the operator's
approval (``pki-agent enroll``, then their agents with a tunnel each), a plain TCP client through
TW's tunnel, a refused client, the rotation of every certificate (gateway, node, the service's
own), ``pkictl revoke N2`` reaching the running gateway, ``pkictl status``, SIGTERM to all.
Certificates live seconds, so that everything happens in about half a minute. Every wait is
bounded and waits on a log line; a failed step stops every process and says which step and why.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path
from typing import Callable

from .demo_support import WAIT, DemoStepFailed, LineClient, LineUpstream, Session, find_command, loopback_hosts, pick_ports
from .errors import PKIError
from .settings import parse_duration

__all__ = ["run_demo", "MIN_LIFETIME", "MAX_LIFETIME"]

MIN_LIFETIME = 10  # seconds: below this the agents renew faster than the demo's steps run
MAX_LIFETIME = 60  # seconds: a renewal (at 2/3 of the lifetime) must come within one bounded wait

_SERIAL = r"([0-9a-f]+)"
_REFRESH_NOISE = re.compile(r"method=GET path='(/crl\.pem|/\.well-known/est/cacerts)' status=(200|304)")


def _tune(path: Path, values: dict[str, str], say: Callable[[str], None]) -> None:
    """Set ``renewal.KEY: VALUE`` in an agent.yaml that pkictl or pki-agent wrote, keeping its comments."""
    lines = path.read_text().splitlines()
    start = lines.index("renewal:") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    for key, value in values.items():
        setting = f"  {key}: {value}  # the demo's certificates live seconds"
        found = [i for i in range(start, end) if lines[i].startswith(f"  {key}:")]
        if found:
            lines[found[0]] = setting
        else:
            lines.insert(end, setting)
            end += 1
    path.write_text("\n".join(lines) + "\n")
    say(f"  (edit {path}: " + ", ".join(f"renewal.{k}: {v}" for k, v in values.items()) + ")")


def _gateway_serial(bundle: Path, host: str, port: int) -> tuple[str, str]:
    """Connect to the gateway with mTLS as the node of ``bundle``; (gateway's serial, TLS version)."""
    from cryptography import x509

    from .store import CredentialStore
    from .tls import client_context

    ctx, _ = client_context(CredentialStore(bundle))
    with socket.create_connection((host, port), timeout=WAIT) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None, "a verified server sent its certificate"
        return f"{x509.load_der_x509_certificate(der).serial_number:x}", str(tls.version())


def _refused_without_certificate(ca_pem: Path, host: str, port: int) -> str:
    """Connect to the gateway with TLS but no client certificate; how the client saw the refusal."""
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    try:
        with socket.create_connection((host, port), timeout=WAIT) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"let me in\n")
            data = tls.recv(100)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
    if data:
        raise DemoStepFailed(f"the gateway answered a client without a certificate ({data!r}); expected a refusal")
    return "EOF"


def run_demo(directory: Path, *, lifetime: str = "15s", port: int | None = None, echo: Callable[[str], None] = print) -> None:
    """Run the demo in ``directory`` (created here; it must not exist).

    Args:
        lifetime: of the gateway, node and service certificates (10s to 60s); they renew at 2/3 of it.
        port: the first of five consecutive ports (CA service, gateway listener, upstream, TW's
            and N2's tunnels); None picks free ones.
        echo: prints one line.

    Raises:
        PKIError: ``directory`` exists, ``lifetime`` is out of range, or a step failed (the message
            says which, why, and quotes the logs; every process started is stopped first).
    """
    directory = Path(directory)
    seconds = int(parse_duration(lifetime, field="--lifetime").total_seconds())
    if not MIN_LIFETIME <= seconds <= MAX_LIFETIME:
        raise PKIError(f"--lifetime {lifetime}: want {MIN_LIFETIME}s to {MAX_LIFETIME}s, so that every certificate "
                       f"rotates within the demo's {WAIT:.0f} s waits and not faster than its steps run")
    if directory.exists() or directory.is_symlink():
        raise PKIError(f"{directory} exists; the demo makes a fresh directory: remove it, or pass --dir NEW_DIR")
    pkictl, agent = find_command("pkictl"), find_command("pki-agent")
    ca_host, gw_host, note = loopback_hosts()
    ports = pick_ports([ca_host, gw_host, "127.0.0.1", "127.0.0.1", "127.0.0.1"], port)
    directory.mkdir(parents=True)
    (directory / "logs").mkdir()
    session = Session(directory / "logs", echo)
    started = time.monotonic()
    try:
        _steps(session, directory, pkictl, agent, f"{seconds}s", (ca_host, gw_host, note), ports)
    except (PKIError, OSError) as exc:  # OSError: a connection the demo itself made (ssl.SSLError included)
        session.stop_all()
        why = str(exc) if isinstance(exc, PKIError) else f"{type(exc).__name__}: {exc}"
        raise DemoStepFailed(f"step {session.step} failed: {why}\nevery process the demo started is stopped; "
                             f"their logs are in {directory / 'logs'}; remove {directory} before running the demo again") from None
    finally:
        session.stop_all()  # also on Ctrl-C; a no-op for processes already stopped
    session.say(f"\nDone in {time.monotonic() - started:.0f} s. Everything is in {directory} (logs in {directory / 'logs'}); "
                f"see the status again with: pkictl --home {directory / 'ca'} status "
                "(its certificates expire seconds after the demo, so it reports them expired, exit status 4)")


def _steps(s: Session, d: Path, pkictl: str, agent: str, lifetime: str, hosts: tuple, ports: list[int]) -> None:
    ca_host, gw_host, note = hosts
    ca_port, gw_port, up_port, tw_port, n2_port = ports
    home = d / "ca"
    url = f"https://{ca_host}:{ca_port}"
    if note:
        s.say(f"note: {note}")

    s.section(1, f"a private CA in {home}: root and issuing CA; gateway, node and service certificates live {lifetime}")
    s.run([pkictl, "--home", str(home), "init-ca", "--node-lifetime", lifetime, "--gateway-lifetime", lifetime])

    s.section(2, f"the CA as an EST service on {url} (it renews its own certificate; --retry-after 1 for the approval step)")
    first_requests: set[str] = set()

    def show_serve(line: str) -> bool:  # the gateway fetches the CRL every second: show the first of each
        match = _REFRESH_NOISE.search(line)
        if match is None:
            return True
        new = match.group(1) not in first_requests
        first_requests.add(match.group(1))
        return new

    serve = s.start("serve", [pkictl, "--home", str(home), "serve", "--listen", f"{ca_host}:{ca_port}", "--ip", ca_host,
                              "--check-interval", "1", "--retry-after", "1"], show=show_serve)
    serve.wait_for(rf"ready: EST on {re.escape(url)}/", f"'ready: EST on {url}'")
    service_first = serve.wait_for(rf"service certificate serial {_SERIAL}", "its certificate's serial").group(1)
    s.say(f"  -> the service is ready; its own certificate has serial {service_first}. Repeated CRL and CA certificate "
          f"fetches are not shown (they are in {serve.log_path})")

    s.section(3, f"the demo upstream (the real gateway, plain TCP, one reply per line) on 127.0.0.1:{up_port}")
    s.upstream = LineUpstream("127.0.0.1", up_port, s.say)
    s.say(f"  -> listening on 127.0.0.1:{up_port}; from now on it is reached only through the gateway's mTLS listener")

    s.section(4, f"gateway gw: its certificate for {gw_host}, its listener on {gw_host}:{gw_port}, renewal and CRL over EST")
    s.run([pkictl, "--home", str(home), "enroll-gateway", "gw", "--ip", gw_host, "--listen", f"{gw_host}:{gw_port}",
           "--upstream", f"127.0.0.1:{up_port}", "--allow", "TW", "--allow", "N2", "--ca-url", url, "--out", str(d / "gw")])
    _tune(d / "gw" / "agent.yaml", {"check_interval": "1s", "crl_refresh_interval": "1s"}, s.say)
    gw = s.start("gw", [agent, "run", "--config", str(d / "gw" / "agent.yaml")])
    gw.wait_for(rf"ready: gateway gw, listening on {re.escape(gw_host)}:{gw_port}", f"'ready: gateway gw, listening on {gw_host}:{gw_port}'")
    gw_first = gw.wait_for(rf"credential gw serial {_SERIAL}", "its credential's serial").group(1)

    s.section(5, "node TW by a one-time token: the key is made on TW, the CA pinned by its root fingerprint")
    issued = s.run([pkictl, "--home", str(home), "enroll-node", "TW", "--token"]).stdout
    token = re.search(r"^\s+(\S+)\s*$", issued, re.M)
    fingerprint = re.search(r"root fingerprint: (sha256:[0-9a-f]{64})", issued)
    if token is None or fingerprint is None:
        raise DemoStepFailed(f"'pkictl enroll-node TW --token' printed no token or no 'root fingerprint: sha256:...' line:\n{issued}")
    tunnel = f"127.0.0.1:{tw_port}={gw_host}:{gw_port}"
    s.run([agent, "enroll", "--ca-url", url, "--fingerprint", fingerprint.group(1), "--name", "TW", "--token", token.group(1),
           "--dir", str(d / "TW"), "--tunnel", tunnel])
    _tune(d / "TW" / "agent.yaml", {"check_interval": "1s"}, s.say)
    tw = s.start("TW", [agent, "run", "--config", str(d / "TW" / "agent.yaml")])
    tw.wait_for(rf"ready: node TW, .*tunnel 127\.0\.0\.1:{tw_port} ", f"'ready: node TW, ... tunnel 127.0.0.1:{tw_port}'")
    tw_first = tw.wait_for(rf"credential TW serial {_SERIAL}", "its credential's serial").group(1)
    gw_mark, tw_mark = gw.mark(), tw.mark()  # the rotations awaited below come after the connection opened here
    s.say(f"  a plain TCP client on TW (it knows nothing of TLS) connects to TW's tunnel on 127.0.0.1:{tw_port} and keeps the connection open:")
    old = LineClient("127.0.0.1", tw_port)
    answer = old.exchange("hello from TW")
    if not answer.startswith("upstream #"):
        raise DemoStepFailed(f"TW's tunnel gave {answer!r} for 'hello from TW'; expected the upstream's answer\n{tw.tail()}\n{gw.tail()}")
    gw.wait_for(rf"accepted peer=\S+ node=tw serial={tw_first} ", f"'accepted ... node=tw serial={tw_first}'", start=gw_mark)
    s.say(f"  -> TW's line came back through the tunnel and the gateway: {answer!r} (TW serial {tw_first}, gateway serial {gw_first})")

    s.section(6, "a client without a certificate is refused, and the gateway logs why")
    s.say(f"  $ openssl s_client -connect {gw_host}:{gw_port} -CAfile {d / 'gw' / 'ca.pem'}   (done here with Python's ssl: no client certificate)")
    mark = gw.mark()
    seen = _refused_without_certificate(d / "gw" / "ca.pem", gw_host, gw_port)
    reason = gw.wait_for(r"refused peer=\S+ reason='([^']+)'", "a 'refused ... reason=' line", start=mark).group(1)
    s.say(f"  -> the client saw {seen}; the gateway logged reason={reason!r}")

    s.section(7, "node N2 by approval: no token, the operator compares the code N2 shows and approves it")
    enroll = s.start("N2 enroll", [agent, "enroll", "--ca-url", url, "--fingerprint", fingerprint.group(1), "--name", "N2",
                                   "--dir", str(d / "N2"), "--tunnel", f"127.0.0.1:{n2_port}={gw_host}:{gw_port}", "--wait", str(int(WAIT))])
    code = enroll.wait_for(r"waiting for approval: code ([A-Z2-7]{4}-[A-Z2-7]{4})", "'waiting for approval: code XXXX-XXXX'").group(1)
    pending = s.run([pkictl, "--home", str(home), "requests"]).stdout
    if not re.search(rf"^N2\s+{code}\s", pending, re.M):
        raise DemoStepFailed(f"'pkictl requests' does not list N2 with the code {code} that N2 shows:\n{pending}")
    s.say(f"  -> N2 shows {code} and 'pkictl requests' lists N2 with {code}: they match, so approve")
    s.run([pkictl, "--home", str(home), "approve", "N2", "--code", code])
    n2_first = enroll.wait_for(rf"enrolled N2: serial {_SERIAL}", "'enrolled N2: serial ...'").group(1)
    if (status := enroll.wait_exit("exit after enrolling")) != 0:
        raise DemoStepFailed(f"pki-agent enroll for N2 exited with status {status}\n{enroll.tail()}")
    _tune(d / "N2" / "agent.yaml", {"check_interval": "1s"}, s.say)
    n2 = s.start("N2", [agent, "run", "--config", str(d / "N2" / "agent.yaml")])
    n2.wait_for(rf"ready: node N2, .*tunnel 127\.0\.0\.1:{n2_port} ", f"'ready: node N2, ... tunnel 127.0.0.1:{n2_port}'")
    n2_mark = n2.mark()
    n2_client = LineClient("127.0.0.1", n2_port)
    answer = n2_client.exchange("hello from N2")
    if not answer.startswith("upstream #"):
        raise DemoStepFailed(f"N2's tunnel gave {answer!r} for 'hello from N2'; expected the upstream's answer\n{n2.tail()}\n{gw.tail()}")
    s.say(f"  -> N2 (serial {n2_first}, approved with code {code}) got {answer!r} through its tunnel; the connection stays open")

    s.section(8, "waiting for every certificate to rotate: gateway, TW, N2 and the service's own (at 2/3 of their lifetime)")
    gw_renewed = gw.wait_for(rf"renewed gw: serial {_SERIAL} -> {_SERIAL}", "'renewed gw: serial A -> B'", start=gw_mark)
    gw_new = gw_renewed.group(2)
    gw.wait_for(rf"credential gw serial {gw_new}", f"its listener taking serial {gw_new} into service", start=gw_mark)
    tw_new = tw.wait_for(rf"renewed TW: serial {_SERIAL} -> {_SERIAL}", "'renewed TW: serial A -> B'", start=tw_mark).group(2)
    n2.wait_for(rf"renewed N2: serial {_SERIAL} -> {_SERIAL}", "'renewed N2: serial A -> B'", start=n2_mark)
    rotated = serve.wait_for(rf"service certificate serial (?!{service_first}\b){_SERIAL}", "a new 'service certificate serial'")
    serve.wait_for(r"method=POST path='/\.well-known/est/simplereenroll' status=200", "a renewal served with its new certificate", start=serve.matched_at + 1)
    s.say(f"  -> gw {gw_renewed.group(1)} -> {gw_new}, TW {tw_first} -> {tw_new}, service {service_first} -> {rotated.group(1)} "
          "(and an agent renewed against the service's new certificate)")

    s.section(9, "after the rotations: the connection opened before still works, new connections get the new certificates")
    answer = old.exchange("still here after the rotations")
    closed = [old.sock.getsockname()[1]]
    if not answer.startswith("upstream #"):
        raise DemoStepFailed(f"the connection opened before the rotations gave {answer!r}; expected the upstream's answer\n{gw.tail()}")
    s.say(f"  -> the connection opened before the rotations still works: {answer!r}")
    old.close()
    mark = gw.mark()
    fresh = LineClient("127.0.0.1", tw_port)
    answer = fresh.exchange("hello again from TW")
    closed.append(fresh.sock.getsockname()[1])
    fresh.close()
    accepted = gw.wait_for(r"accepted peer=\S+ node=tw serial=([0-9a-f]+) ", "'accepted ... node=tw'", start=mark).group(1)
    if accepted == tw_first or not answer.startswith("upstream #"):
        raise DemoStepFailed(f"a new connection through TW's tunnel got {answer!r} with TW serial {accepted}; expected an answer "
                             f"with a serial other than {tw_first}\n{tw.tail()}\n{gw.tail()}")
    s.say(f"  -> a new connection through TW's tunnel: {answer!r}, with TW's new certificate (serial {accepted})")
    s.say(f"  $ openssl s_client -connect {gw_host}:{gw_port} -cert {d / 'TW' / 'cert.pem'} -cert_chain {d / 'TW' / 'chain.pem'} "
          f"-key {d / 'TW' / 'privkey.pem'} -CAfile {d / 'TW' / 'ca.pem'}   (done here with Python's ssl)")
    seen, version = _gateway_serial(d / "TW", gw_host, gw_port)
    if seen == gw_first:
        raise DemoStepFailed(f"a new connection still got the gateway's first certificate (serial {gw_first}) after it renewed to {gw_new}\n{gw.tail()}")
    s.say(f"  -> a new mTLS connection ({version}) sees the gateway's new certificate: serial {seen} (was {gw_first})")

    s.section(10, "revoking N2: the running gateway fetches the CRL from the service and refuses N2, with no restart")
    mark, n2_mark = gw.mark(), n2.mark()
    s.run([pkictl, "--home", str(home), "revoke", "N2", "--reason", "key-compromise"])
    revoked_at = time.monotonic()
    count = gw.wait_for(r"CRL loaded: ([1-9]\d*) revoked", "'CRL loaded: N revoked' (N > 0)", start=mark).group(1)
    gw.wait_for(r"closing peer=\S+ node=n2 .*reason='revoked'", "closing N2's open connection", start=mark)
    if n2_client.exchange("N2 again, on the open connection"):
        raise DemoStepFailed(f"N2's connection opened before the revocation still gets answers\n{gw.tail()}")
    n2_client.close()
    refused_client = LineClient("127.0.0.1", n2_port)
    answer = refused_client.exchange("N2 after its revocation")
    refused_client.close()
    if answer:
        raise DemoStepFailed(f"N2 got {answer!r} through its tunnel after its revocation; expected a refusal\n{gw.tail()}")
    gw.wait_for(r"refused peer=\S+ reason='revoked'", "'refused ... reason='revoked''", start=mark)
    n2.wait_for(r"tunnel authentication failure.* reason='revoked'", "the tunnel's authentication failure", start=n2_mark)
    s.say(f"  -> the gateway loaded a CRL with {count} revoked, closed N2's open connection and refused N2's new one "
          f"{time.monotonic() - revoked_at:.1f} s after 'pkictl revoke' (crl_refresh_interval 1s); N2's client got no answer")
    code = n2.wait_for(r"pairing request of N2: a new key was made here; its code is ([A-Z2-7]{4}-[A-Z2-7]{4})",
                       "N2's pairing request with a new key", start=n2_mark).group(1)
    s.say(f"  -> N2's agent learned from the refusal that its certificate is revoked, made a new key and asks for approval: code {code}")
    pending = s.run([pkictl, "--home", str(home), "requests"]).stdout
    if not re.search(rf"^N2\s+{code}\s", pending, re.M):
        raise DemoStepFailed(f"'pkictl requests' does not list N2's new request with the code {code} that N2 shows:\n{pending}")
    s.run([pkictl, "--home", str(home), "approve", "N2", "--code", code])
    n2_back = n2.wait_for(rf"re-enrolled N2: serial \S+ -> {_SERIAL}", "'re-enrolled N2: serial ... -> ...'", start=n2_mark).group(1)
    n2.wait_for(rf"credential N2 serial {n2_back}", f"N2's agent taking serial {n2_back} into service", start=n2_mark)
    back_client = LineClient("127.0.0.1", n2_port)
    answer = back_client.exchange("N2 is back")
    back_client.close()
    if not answer.startswith("upstream #"):
        raise DemoStepFailed(f"N2 re-paired (serial {n2_back}) but its tunnel got {answer!r}; expected the upstream's answer\n{n2.tail()}\n{gw.tail()}")
    s.say(f"  -> N2 re-paired with serial {n2_back}, nothing done on N2; through its tunnel again: {answer!r}")

    s.section(11, "the CA's status report")
    s.say("  (first TW's tunnel ends the two connections its client closed: it gives the gateway 5 s of quiet for any last bytes)")
    for local in closed:
        tw.wait_for(rf"tunnel closed local=127\.0\.0\.1:{local} ", f"'tunnel closed local=127.0.0.1:{local}'")
    s.check_running()
    result = s.run([pkictl, "--home", str(home), "status"], ok=(0, 3, 4))
    s.say(f"  -> exit status {result.returncode} (0: nothing needs attention; 3: something expiring; 4: something expired)")

    s.section(12, "SIGTERM to every process")
    statuses = s.stop_all()
    s.say("  -> exit statuses: " + ", ".join(f"{label} {code}" for label, code in statuses.items()))
    bad = {label: code for label, code in statuses.items() if code != 0}
    if bad:
        raise DemoStepFailed("not every process exited with status 0 on SIGTERM: " + ", ".join(f"{k} {v}" for k, v in bad.items())
                             + "\n" + "\n".join(s.processes[label].tail() for label in bad))

