"""The multi-host lifecycle: a CA host running ``pkictl serve``, a gateway host running
``pki-agent run`` (the mTLS listener on its LAN address in front of a real WebSocket server on
127.0.0.1:18789), node TW enrolled by token and node N2 by approval, each with an unmodified
WebSocket client dialing its loopback tunnel; every credential lives LIFETIME seconds.

While a long-lived WebSocket connection on each node exchanges a message every 100 ms and each
node opens a new connection every second or faster, the run goes through at least five
lifetimes of every credential and:

1. stops ``pkictl serve`` across a due renewal and starts it again (same CA home, same port);
2. rotates the issuing CA with ``pkictl rotate-issuing --activate-in 2s``, the root key present,
   without restarting ``pkictl serve``; every host's live certificate ends up issued by the new one;
3. revokes N2 on the CA host: the gateway closes N2's open connections and refuses new ones
   within a few seconds (its ``renewal.crl_refresh_interval`` is 1s); N2's agent
   (``renewal.reenroll: approval``) files a pairing request by itself, the test approves it with
   the code ``pkictl requests`` lists, and N2 gets back in.

It then stops every process (SIGTERM: each must exit 0) and checks from the logs and the files: no message of TW lost, no new connection failed
(N2's between its revocation and its return excepted), every credential (gateway, TW, N2, the
EST service's own) rotated at least five times and each rotation seen by its peers, and no ERROR
line or traceback anywhere but the ones the outage and the revocation provoke (listed by host,
process and pattern in EXPECTED_ERRORS). Every check is evaluated and reported, not only the
first to fail; the figures (rotations, messages, connections, seconds from revoke to refusal and
from approve to N2's first good message) are printed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import yaml
from cryptography import x509

import netns

TESTS = Path(__file__).resolve().parent
LIFETIME = 10  # seconds: nodes, gateway and (it follows the gateway's) the EST service's certificate
ROTATIONS = 5  # of every credential, at least
LIFETIMES = 5  # the run lasts at least this many lifetimes
REFUSAL_BOUND = 5.0  # seconds from 'pkictl revoke' to the gateway refusing the node (CRL fetched every 1 s)
REPAIR_BOUND = 10.0  # seconds from 'pkictl approve' to the node's first good message
RUN_BOUND = 120.0  # seconds: the whole run, hard stop of every wait
HOSTS = {"ca": ["ca.example.lan"], "gw": ["gw.example.lan"], "tw": ["tw.example.lan"], "n2": ["n2.example.lan"]}
CODE = r"[A-Z2-7]{4}-[A-Z2-7]{4}"
AGENT_DIR = "/var/lib/pki-agent"
CA_HOME = "/var/lib/pkictl"

# The ERROR lines the test provokes, by host, process and pattern, each allowed only inside the
# window of the phase that provokes it (see Run.window); anything else is a failure.
EXPECTED_ERRORS = [
    # pkictl serve down: an agent whose renewal comes due logs the failure, an ERROR from 80% of
    # its lifetime on (README, "Running the agent").
    ("outage", r"^(gw|tw|n2)$", r"^agent$", r"ERROR pki_agent: renewal of (gw|TW|N2) failed \(cannot reach the EST server"),
    # N2 revoked: its tunnel is refused until it is approved again, its renewals are refused.
    ("revoked", r"^n2$", r"^agent$", r"ERROR pki_agent\.tunnel: tunnel authentication failure: the gateway refused this "
                                     r"node's certificate .* reason='(revoked|expired or not yet valid)'"),
    ("revoked", r"^n2$", r"^agent$", r"(ERROR|CRITICAL) pki_agent: renewal of N2 failed \(.*\b(revoked|refused)\b"),
    # ... and its agent says so once, before it files its pairing request.
    ("revoked", r"^n2$", r"^agent$", r"ERROR pki_agent: the certificate of N2 \(serial [0-9a-f]+\) can no longer renew: revoked "),
    ("revoked", r"^n2$", r"^(long|fresh|probe)$", r'"event": "(closed|error)"|"ok": false'),
]


def _agent_config(path: Path, **renewal) -> None:
    """Set the short test intervals in an agent.yaml written by pkictl / pki-agent enroll."""
    data = yaml.safe_load(path.read_text())
    data["renewal"].update({"check_interval": "1s", "min_interval": "1s", "retry_initial": "1s", "retry_max": "2s", **renewal})
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _records(process: netns.Process) -> list[tuple[float, dict]]:
    """The JSON lines of a WebSocket script, with their arrival times."""
    process.log.mark()
    out = []
    for stamp, line in zip(process.log.stamps, process.log.lines, strict=True):
        if line.startswith("{"):
            try:
                out.append((stamp, json.loads(line)))
            except ValueError:
                pass
    return out


def _lines(process: netns.Process, pattern: str) -> list[tuple[float, re.Match]]:
    """Every line of ``process`` matching ``pattern``, with its arrival time."""
    process.log.mark()
    regex = re.compile(pattern)
    return [(stamp, m) for stamp, line in zip(process.log.stamps, process.log.lines, strict=True) if (m := regex.search(line))]


def _windows(events: list[tuple[float, str]], end: float) -> list[tuple[str, float, float]]:
    """``(value, start, stop)`` for each value taken into service at ``start`` until the next one
    at ``stop``; the last one, still in service at ``end``, is left out (its span is cut short)."""
    out = []
    for i, (stamp, value) in enumerate(events):
        if out and out[-1][0] == value:
            continue
        nxt = next((s for s, v in events[i + 1:] if v != value), None)
        if nxt is not None:
            out.append((value, stamp, nxt))
    return out


def _live_issuer(directory: Path) -> x509.Name:
    return x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes()).issuer


class Checks:
    """Every check of the run, evaluated and reported together."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.figures: dict[str, object] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """A step whose first failed assertion ends it (and is recorded); later steps still run."""
        try:
            yield
        except AssertionError as exc:
            self.failures.append(f"[{name}] {exc}")

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


@dataclasses.dataclass
class Node:
    name: str  # TW, N2
    host: netns.Host
    directory: Path
    agent: netns.Process | None = None
    long: netns.Process | None = None
    probe: netns.Process | None = None


class Run:
    """The fleet, its processes and the moments of the run (monotonic seconds)."""

    def __init__(self, fleet: netns.Fleet) -> None:
        self.fleet = fleet
        self.ca, self.gw = fleet["ca"], fleet["gw"]
        self.home = self.ca.path(CA_HOME)
        self.gw_dir = self.gw.path(f"{AGENT_DIR}/gw")
        self.nodes = {"TW": Node("TW", fleet["tw"], fleet["tw"].path(f"{AGENT_DIR}/TW")),
                      "N2": Node("N2", fleet["n2"], fleet["n2"].path(f"{AGENT_DIR}/N2"))}
        self.serves: list[netns.Process] = []
        self.gateway: netns.Process | None = None
        self.upstream: netns.Process | None = None
        self.fresh: netns.Process | None = None  # N2's connection opened just before its revocation
        self.started = time.monotonic()
        self.moments: dict[str, float] = {}
        self.deadline = self.started + RUN_BOUND

    def left(self, cap: float) -> float:
        """A wait's bound: ``cap`` seconds, never past the run's hard stop."""
        return max(0.1, min(cap, self.deadline - time.monotonic()))

    def window(self, name: str) -> tuple[float, float]:
        """The span in which the errors of phase ``name`` are expected."""
        end = self.moments.get("end", time.monotonic())
        if name == "outage":
            return self.moments.get("serve stopped", math.inf), self.moments.get("outage over", end)
        if name == "revoked":
            return self.moments.get("revoking", math.inf), self.moments.get("N2 back", end) + 3.0
        raise KeyError(name)

    def pkictl(self, *args: str, check: bool = True):
        return self.ca.run(["pkictl", "--home", str(self.home), *args], check=check)

    def start_serve(self) -> netns.Process:
        serve = self.ca.start(f"serve{len(self.serves) + 1}", [
            "pkictl", "--home", str(self.home), "serve", "--listen", "0.0.0.0:8443", "--dns", "ca.example.lan",
            "--check-interval", "1", "--retry-after", "1"])
        self.serves.append(serve)
        serve.wait_for(r"ready: EST on https://ca\.example\.lan:8443/", timeout=self.left(30))
        return serve

    def client(self, node: Node, name: str, *mode: str) -> netns.Process:
        process = node.host.python(name, TESTS / "ws_client.py", "--url", "ws://127.0.0.1:18789", "--name", f"{node.name}-{name}",
                                   "--max-seconds", str(RUN_BOUND), *mode, chatty=True)
        return process

    def agents(self) -> dict[str, netns.Process]:
        return {"gw": self.gateway, **{n.name: n.agent for n in self.nodes.values()}}

    def renewed(self, name: str) -> list[tuple[float, str, str]]:
        """``(time, old serial, new serial)`` of each ``renewed NAME`` line of that agent."""
        process = self.agents()[name]
        return [(s, m.group(1), m.group(2)) for s, m in _lines(process, rf"renewed {name}: serial ([0-9a-f]+) -> ([0-9a-f]+)")]

    def in_service(self, name: str) -> list[tuple[float, str]]:
        """``(time, serial)`` each time the agent took a credential into service."""
        return [(s, m.group(1)) for s, m in _lines(self.agents()[name], rf"credential {name} serial ([0-9a-f]+),")]

    def service_serials(self) -> list[tuple[float, str]]:
        return [(s, m.group(1)) for serve in self.serves for s, m in _lines(serve, r"service certificate serial ([0-9a-f]+),")]


# -- building the fleet ----------------------------------------------------------------------------------


def build(run: Run) -> None:
    gw = run.gw
    run.pkictl("init-ca", "--trust-domain", "example.lan", "--node-lifetime", f"{LIFETIME}s", "--gateway-lifetime", f"{LIFETIME}s")
    run.start_serve()

    run.pkictl("enroll-gateway", "gw", "--dns", "gw.example.lan", "--ip", gw.address, "--listen", f"{gw.address}:8443",
               "--upstream", "127.0.0.1:18789", "--ca-url", "https://ca.example.lan:8443", "--out", str(run.gw_dir))
    _agent_config(run.gw_dir / "agent.yaml", crl_refresh_interval="1s")
    run.upstream = gw.python("gateway", TESTS / "ws_echo_server.py", "--listen", "127.0.0.1:18789", "--max-seconds",
                             str(RUN_BOUND), chatty=True)
    run.upstream.wait_for(r'"event": "ready"')
    run.gateway = gw.start("agent", ["pki-agent", "run", "--config", str(run.gw_dir / "agent.yaml")])
    run.gateway.wait_for(rf"ready: gateway gw, listening on {re.escape(gw.address)}:8443", timeout=run.left(30))

    printed = run.pkictl("enroll-node", "TW", "--token").stdout
    token = re.search(r"^\s+(\S+)\s*$", printed, re.M).group(1)
    fingerprint = re.search(r"sha256:[0-9a-f]{64}", printed).group(0)
    enroll = ["pki-agent", "enroll", "--ca-url", "https://ca.example.lan:8443", "--fingerprint", fingerprint]
    tunnel = ["--tunnel", "127.0.0.1:18789=gw.example.lan:8443"]
    tw, n2 = run.nodes["TW"], run.nodes["N2"]
    tw.host.run([*enroll, "--name", "TW", "--token", token, "--dir", str(tw.directory), *tunnel])
    _agent_config(tw.directory / "agent.yaml")

    waiting = n2.host.start("enroll", [*enroll, "--name", "N2", "--dir", str(n2.directory), "--wait", "60", *tunnel])
    code = waiting.wait_for(rf"waiting for approval: code ({CODE})").group(1)
    assert re.search(rf"^N2\s+{code}\s", run.pkictl("requests").stdout, re.M)
    run.pkictl("approve", "N2", "--code", code)
    assert waiting.popen.wait(run.left(30)) == 0, "N2's enrollment did not end after the approval"
    _agent_config(n2.directory / "agent.yaml", reenroll="approval")

    for node in (tw, n2):
        node.agent = node.host.start("agent", ["pki-agent", "run", "--config", str(node.directory / "agent.yaml")])
    for node in (tw, n2):
        node.agent.wait_for(rf"ready: node {node.name}, no listener, tunnel 127\.0\.0\.1:18789 -> gw\.example\.lan:8443",
                            timeout=run.left(30))
        node.long = run.client(node, "long", "long", "--interval", "0.1")
        node.probe = run.client(node, "probe", "probe", "--every", "1" if node.name == "TW" else "0.5")
    for node in (tw, n2):
        node.long.wait_for(r'"event": "echo"', timeout=run.left(30))
        node.probe.wait_for(r'"ok": true', timeout=run.left(30))


# -- the phases --------------------------------------------------------------------------------------------


def serve_outage(run: Run, checks: Checks) -> None:
    """Stop pkictl serve, keep it down until an agent's renewal comes due and fails, start it
    again: the renewals resume, and (checked at the end) nobody lost access."""
    agents = run.agents()
    run.moments["serve stopped"] = stopped = time.monotonic()
    rc = run.serves[-1].stop()
    checks.expect(rc == 0, f"[outage] pkictl serve exited {rc} on SIGTERM, not 0")
    failed = None
    deadline = time.monotonic() + run.left(LIFETIME)
    while failed is None and time.monotonic() < deadline:
        failed = next((name for name, process in agents.items()
                       if any(s >= stopped for s, _ in _lines(process, rf"renewal of {name} failed \(cannot reach the EST server"))), None)
        time.sleep(0.05)
    assert failed, f"no agent's renewal came due within {LIFETIME} s of stopping pkictl serve"
    run.moments["renewal failed"] = time.monotonic()
    run.start_serve()
    run.moments["serve restarted"] = time.monotonic()
    checks.figures["serve down (s)"] = round(run.moments["serve restarted"] - run.moments["serve stopped"], 1)
    checks.figures["renewal that failed"] = failed
    # renewals resume: every agent renews again after the restart
    for name, process in agents.items():
        start = next((i for i, s in enumerate(process.log.stamps) if s >= run.moments["serve restarted"]), len(process.log.lines))
        process.wait_for(rf"renewed {name}: serial", timeout=run.left(LIFETIME + 4), start=start)
    run.moments["outage over"] = time.monotonic()


def rotate_issuing(run: Run, checks: Checks) -> None:
    """Rotate the issuing CA with the root key present, pkictl serve running; every host's live
    certificate (and the service's) ends up issued by the new issuing CA."""
    old = x509.load_pem_x509_certificate((run.home / "issuing" / "cert.pem").read_bytes()).subject
    assert (run.home / "root" / "key.pem").exists(), "the root key is not in the CA home"
    run.moments["rotate"] = time.monotonic()
    result = run.pkictl("rotate-issuing", "--activate-in", "2s", check=False)
    assert result.returncode == 0, f"pkictl rotate-issuing --activate-in 2s -> exit {result.returncode}: {result.stdout}{result.stderr}"
    credentials = {"gw": run.gw_dir, "TW": run.nodes["TW"].directory, "N2": run.nodes["N2"].directory,
                   "est (the EST service)": run.home / "service"}
    deadline = time.monotonic() + run.left(2 + LIFETIME + 4)
    moved: dict[str, float] = {}
    while len(moved) < len(credentials) and time.monotonic() < deadline:
        for name, directory in credentials.items():
            if name not in moved and _live_issuer(directory) != old:
                moved[name] = time.monotonic() - run.moments["rotate"]
        time.sleep(0.2)
    new = x509.load_pem_x509_certificate((run.home / "issuing" / "cert.pem").read_bytes()).subject
    checks.expect(new != old, f"[rotate-issuing] {run.home}/issuing/cert.pem is still {old.rfc4514_string()}")
    for name, directory in credentials.items():
        issuer = _live_issuer(directory)
        checks.expect(issuer == new and issuer != old,
                      f"[rotate-issuing] {name}'s live certificate is issued by {issuer.rfc4514_string()}, not by the new issuing CA "
                      f"{new.rfc4514_string()}, {time.monotonic() - run.moments['rotate']:.1f} s after rotate-issuing")
    checks.figures["moved to the new issuing CA after (s)"] = {k: round(v, 1) for k, v in moved.items()}


def revoke_and_repair(run: Run, checks: Checks) -> None:
    """Revoke N2: its open connections are closed and new ones refused within REFUSAL_BOUND;
    its agent files a pairing request, the operator approves it, N2 gets back in."""
    n2, gateway = run.nodes["N2"], run.gateway
    # late enough for N2 to rotate after its return as often as the others
    deadline = min(run.deadline, run.moments["clients up"] + 4 * LIFETIME)
    while time.monotonic() < deadline and (time.monotonic() < run.moments["clients up"] + 2.5 * LIFETIME
                                           or len(run.renewed("N2")) < ROTATIONS - 2):
        time.sleep(0.2)
    # an open connection with N2's current certificate, opened right after a renewal
    mark = n2.agent.log.mark()
    n2.agent.wait_for(r"renewed N2: serial", timeout=run.left(LIFETIME), start=mark)
    run.fresh = run.client(n2, "fresh", "long", "--interval", "0.1")
    run.fresh.wait_for(r'"event": "echo"', timeout=run.left(10))
    n2_address = re.escape(n2.host.address)
    revoked_key = x509.load_pem_x509_certificate((n2.directory / "cert.pem").read_bytes()).public_key()
    gw_mark = gateway.log.mark()
    # The revocation is in force once the CRL is on disk, which can be before the command exits:
    # the errors it causes are expected from the moment it starts.
    run.moments["revoking"] = time.monotonic()
    run.pkictl("revoke", "N2", "--reason", "key-compromise")
    run.moments["revoked"] = revoked = time.monotonic()

    with checks.phase("revoke: new connections refused"):
        try:
            gateway.wait_for(rf"refused peer={n2_address}:\d+ reason='revoked'", timeout=run.left(REFUSAL_BOUND + 10), start=gw_mark)
        finally:  # whatever the gateway refused N2 for first, and when
            first = next(((s, m.group(1)) for s, m in _lines(gateway, rf"refused peer={n2_address}:\d+ reason='([^']*)'")
                          if s > revoked), None)
            checks.figures["revoke -> the gateway's first refusal of N2 (s, reason)"] = first and (round(first[0] - revoked, 2), first[1])
        refused_at = gateway.log.stamps[gateway.log.last_index]
        checks.figures["revoke -> gateway refuses N2 (s)"] = round(refused_at - revoked, 2)
        checks.expect(refused_at - revoked <= REFUSAL_BOUND,
                      f"[revoke] the gateway refused N2 {refused_at - revoked:.1f} s after 'pkictl revoke', more than {REFUSAL_BOUND} s")
    for label, process in (("opened with its current certificate just before", run.fresh),
                           ("opened at the start, with its first certificate", n2.long)):
        with checks.phase(f"revoke: N2's open connection {label} is closed"):
            process.wait_for(r'"event": "closed"', timeout=run.left(REFUSAL_BOUND))
            closed = process.log.stamps[process.log.last_index]
            checks.figures[f"revoke -> N2's connection {label.split(',')[0]} closed (s)"] = round(closed - revoked, 2)

    with checks.phase("re-pair: N2 files a pairing request by itself"):
        listed = None
        deadline = time.monotonic() + run.left(2 * LIFETIME + 5)
        while listed is None and time.monotonic() < deadline:
            listed = re.search(rf"^N2\s+({CODE})\s+{n2_address}\b", run.pkictl("requests").stdout, re.M | re.I)
            if listed is None:
                time.sleep(1.0)
        said = [line for s, line in zip(n2.agent.log.stamps, n2.agent.log.lines, strict=True) if s > revoked and "tunnel " not in line]
        assert listed, (f"'pkictl requests' listed no request of N2 from {n2.host.address} within {2 * LIFETIME + 5} s of its revocation "
                        f"(renewal.reenroll: approval); N2's agent said since (tunnel lines left out):\n  " + "\n  ".join(said[:12]))
        code = listed.group(1)
        run.moments["request listed"] = time.monotonic()
        checks.figures["revoke -> N2's pairing request listed (s)"] = round(run.moments["request listed"] - revoked, 1)
        checks.expect(code in n2.agent.log.text(), f"[re-pair] N2's agent log does not show the code {code} the operator is to compare")
        run.pkictl("approve", "N2", "--code", code)
        run.moments["approved"] = approved = time.monotonic()
        deadline = time.monotonic() + run.left(REPAIR_BOUND + 10)
        back = None
        while back is None and time.monotonic() < deadline:
            back = next((s for s, r in _records(n2.probe) if s > approved and r.get("event") == "probe" and r["ok"]), None)
            time.sleep(0.1)
        assert back, f"N2 did not get a message through within {REPAIR_BOUND + 10} s of 'pkictl approve'"
        run.moments["N2 back"] = back
        checks.figures["approve -> N2's first good message (s)"] = round(back - approved, 2)
        checks.expect(back - approved <= REPAIR_BOUND, f"[re-pair] N2 got back {back - approved:.1f} s after the approval, "
                                                         f"more than {REPAIR_BOUND} s")
        key = x509.load_pem_x509_certificate((n2.directory / "cert.pem").read_bytes()).public_key()
        checks.expect(key != revoked_key, "[re-pair] N2's new certificate certifies the key of the revoked one, not a new key")


def wait_for_the_rest(run: Run, checks: Checks) -> None:
    """Go on until the run has lasted LIFETIMES lifetimes and every credential rotated ROTATIONS
    times, or two lifetimes more than that (check_rotations then says which one fell short)."""
    deadline = min(run.deadline - 5, run.moments["clients up"] + (LIFETIMES + 2) * LIFETIME)
    while time.monotonic() < deadline:
        counts = rotations(run)
        if time.monotonic() - run.moments["clients up"] >= LIFETIMES * LIFETIME and min(counts.values()) >= ROTATIONS:
            return
        time.sleep(0.25)


def rotations(run: Run) -> dict[str, int]:
    counts = {name: len(run.renewed(name)) for name in ("gw", "TW", "N2")}
    counts["est"] = max(0, len({serial for _, serial in run.service_serials()}) - 1)
    return counts


# -- the checks at the end ---------------------------------------------------------------------------------


def check_messages(run: Run, checks: Checks) -> None:
    revoked = run.moments.get("revoked", math.inf)
    for node in run.nodes.values():
        records = _records(node.long)
        summary = next((r for _, r in records if r.get("event") == "summary"), None)
        sent = [(s, r["seq"]) for s, r in records if r.get("event") == "sent"]
        echoed = {r["seq"] for _, r in records if r.get("event") == "echo"}
        if node.name == "TW":
            ran = run.moments["end"] - run.moments["clients up"]
            checks.figures["TW long connection: sent / echoed / lost"] = (len(sent), len(echoed), len(sent) - len(echoed))
            checks.expect(summary is not None and not summary["lost"] and summary["sent"] == summary["echoed"] == len(sent),
                          f"[messages] TW's long-lived connection lost messages: {summary}")
            checks.expect(not any(r.get("event") == "closed" for _, r in records),
                          "[messages] TW's long-lived connection was closed: " + str([r for _, r in records if r.get("event") == "closed"]))
            checks.expect(len(sent) >= 0.8 * ran / 0.1, f"[messages] TW sent {len(sent)} messages in {ran:.0f} s, not one every 100 ms")
            checks.expect(summary is not None and summary["max_gap_ms"] < 1000,
                          f"[messages] TW's echoes stalled: longest gap {summary and summary['max_gap_ms']} ms")
        else:  # until its revocation; a message in flight at that moment may be lost
            before = [seq for s, seq in sent if s < revoked - 0.5]
            lost = [seq for seq in before if seq not in echoed]
            checks.figures["N2 long connection before the revocation: sent / lost"] = (len(before), len(lost))
            checks.expect(not lost, f"[messages] N2's long-lived connection lost {len(lost)} messages before its revocation: {lost[:10]}")


def check_new_connections(run: Run, checks: Checks) -> None:
    start, end = run.window("revoked")
    for node in run.nodes.values():
        probes = [(s, r) for s, r in _records(node.probe) if r.get("event") == "probe"]
        failed = [(s, r) for s, r in probes if not r["ok"]]
        if node.name == "N2":
            unexpected = [(s, r) for s, r in failed if not start <= s <= end]
            first = next((s for s, _ in failed if s > start), None)
            checks.figures["revoke -> N2's first failed new connection (s)"] = first and round(first - start, 2)
        else:
            unexpected = failed
        checks.figures[f"{node.name} new connections: tried / failed (unexpected)"] = (len(probes), len(failed), len(unexpected))
        checks.expect(not unexpected, f"[new connections] {node.name}: {len(unexpected)} failed: "
                      + "; ".join(f"{s - run.started:.1f}s {r.get('error')}" for s, r in unexpected[:5]))
        gaps = [b - a for (a, _), (b, _) in zip(probes, probes[1:], strict=False)]
        checks.expect(not gaps or max(gaps) < 4.0, f"[new connections] {node.name}: no attempt for {max(gaps or [0]):.1f} s")


def check_rotations(run: Run, checks: Checks) -> None:
    counts = rotations(run)
    checks.figures["rotations"] = counts
    for name, count in counts.items():
        checks.expect(count >= ROTATIONS, f"[rotations] {name} rotated {count} times, fewer than {ROTATIONS}")
    for name in ("gw", "TW"):
        chain = run.renewed(name)
        broken = [(a, b) for (_, _, a), (_, b, _) in zip(chain, chain[1:], strict=False) if a != b]
        checks.expect(not broken, f"[rotations] {name}'s renewals do not follow each other: {broken}")
    # what each agent says it serves is what is on its disk
    for name, directory in (("gw", run.gw_dir), ("TW", run.nodes["TW"].directory), ("N2", run.nodes["N2"].directory)):
        live = f"{x509.load_pem_x509_certificate((directory / 'cert.pem').read_bytes()).serial_number:x}"
        last = run.in_service(name)[-1][1] if run.in_service(name) else None
        checks.expect(live == last, f"[rotations] {name}'s live certificate has serial {live}, its agent last took {last} into service")


def check_peers(run: Run, checks: Checks) -> None:
    """Each rotation seen by its peers, from the logs' arrival times."""
    end = run.moments["end"]
    outage = run.window("revoked")
    # the gateway's serials, seen by each node's tunnel on a new connection while in service,
    # from the moment the clients run (N2's tunnel starts after its approval: the gateway's first
    # certificate may be gone by then)
    for node in run.nodes.values():
        opened = [s for s, _ in _lines(node.agent, r"tunnel open local=")]
        unseen = []
        for serial, start, stop in _windows(run.in_service("gw"), end):
            start = max(start, run.moments["clients up"])
            if stop - start < 2.5 or (node.name == "N2" and start < outage[1] and stop > outage[0]):
                continue
            if not any(start + 0.1 < s < stop for s in opened):
                unseen.append(serial[:12])
        checks.expect(not unseen, f"[peers] {node.name}'s tunnel opened no connection while the gateway served {unseen}")
    # each node's serials, accepted by the gateway from that node's address
    accepted = _lines(run.gateway, r"accepted peer=(\S+):\d+ node=(\w+) serial=([0-9a-f]+)")
    for node in run.nodes.values():
        seen = {m.group(3) for _, m in accepted if m.group(1) == node.host.address and m.group(2) == node.name.lower()}
        missing = [serial[:12] for serial, start, stop in _windows(run.in_service(node.name), end)
                   if stop - start >= 2.5 and serial not in seen and not (node.name == "N2" and start <= outage[0] <= stop)]
        checks.expect(not missing, f"[peers] the gateway never accepted {node.name} (from {node.host.address}) with serials {missing}")
    # the service's serials, seen by the agents: a request of one of them (each on a new TLS
    # connection) answered while each serial was in service, from the moment every agent runs.
    # The service swaps its context right after it logs the new serial, on the thread that
    # serves; 50 ms later a request is one whose handshake came after the swap.
    agents = {run.gw.address, *(n.host.address for n in run.nodes.values())}
    answered = [s for serve in run.serves for s, m in _lines(serve, r"pkictl\.serve: (?:answered|refused) peer=(\S+):\d+ method=(?:GET|POST) path=\S+ status=(?:200|202|304|403)\b")
                if m.group(1) in agents]
    unseen = [serial[:12] for serial, start, stop in _windows(run.service_serials(), end)
              if stop - start >= 2.5 and start >= run.moments["clients up"] and not any(start + 0.05 < s < stop for s in answered)]
    checks.expect(not unseen, f"[peers] no agent's request was answered while the EST service presented {unseen}")


def check_errors(run: Run, checks: Checks) -> None:
    unexpected = []
    for process in run.fleet.processes:
        process.log.mark()
        for stamp, line in zip(process.log.stamps, process.log.lines, strict=True):
            bad = re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line) or re.search(r'"event": "(error|closed)"|"ok": false', line)
            if not bad:
                continue
            allowed = False
            for phase, host, name, pattern in EXPECTED_ERRORS:
                start, stop = run.window(phase)
                if re.search(host, process.host.name) and re.search(name, process.name) and re.search(pattern, line) \
                        and start <= stamp <= stop:
                    allowed = True
                    break
            if not allowed:
                unexpected.append(f"{process.label} at {stamp - run.started:.1f}s: {line}")
    checks.figures["unexpected error lines"] = len(unexpected)
    checks.expect(not unexpected, f"[errors] {len(unexpected)} unexpected ERROR/traceback/failure lines:\n  " + "\n  ".join(unexpected[:30]))


def summary(run: Run, checks: Checks) -> str:
    lines = [f"fleet lifecycle: {run.moments['end'] - run.started:.0f} s in all, lifetime {LIFETIME} s, "
             f"{run.moments['end'] - run.moments.get('clients up', run.started):.0f} s with clients"]
    lines += [f"  {name}: {value}" for name, value in checks.figures.items()]
    moments = ", ".join(f"{k} {v - run.started:.1f}" for k, v in sorted(run.moments.items(), key=lambda kv: kv[1]))
    lines.append(f"  moments (s since start): {moments}")
    return "\n".join(lines)


def test_fleet_lifecycle_rotation_outage_issuing_rotation_revocation_and_repair(tmp_path):
    """Through five lifetimes of every credential, a serve outage, an issuing-CA rotation and
    N2's revocation and re-pairing, TW's long connection loses no message, new connections
    succeed (N2's refused only while revoked, within the bound), every credential rotates at
    least five times and its peers see each rotation, and nothing logs an unexpected error."""
    netns.require()
    with netns.Fleet(tmp_path, HOSTS) as fleet:
        run = Run(fleet)
        checks = Checks()
        build(run)
        run.moments["clients up"] = time.monotonic()
        with checks.phase("serve outage"):
            serve_outage(run, checks)
        with checks.phase("rotate-issuing"):
            rotate_issuing(run, checks)
        with checks.phase("revocation"):
            revoke_and_repair(run, checks)
        wait_for_the_rest(run, checks)
        for node in run.nodes.values():  # SIGTERM: the clients print their summaries
            for process in (node.long, node.probe):
                process.stop()
        if run.fresh is not None:
            run.fresh.stop()
        run.moments["end"] = time.monotonic()
        with checks.phase("shutdown"):  # SIGTERM: every process stops cleanly (check_errors reads what they said)
            for process in (*(n.agent for n in run.nodes.values()), run.gateway, run.upstream, run.serves[-1]):
                rc = process.stop()
                checks.expect(rc == 0, f"[shutdown] {process.label} exited {rc} on SIGTERM, not 0")
        for check in (check_messages, check_new_connections, check_rotations, check_peers, check_errors):
            with checks.phase(check.__name__):
                check(run, checks)
        report = summary(run, checks)
        print(report)
        assert not checks.failures, f"{len(checks.failures)} checks failed:\n" + "\n".join(checks.failures) + "\n" + report
