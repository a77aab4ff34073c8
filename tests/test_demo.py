"""``pkictl demo`` end to end: the installed command as a subprocess, what its output claims checked
line by line against the processes' own log lines, and against the files it left (inventory, bundles).

The demo prints the log of every process it starts prefixed ``  [label] `` (serve, gw, TW, N2,
N2 enroll, upstream), each command it runs as ``  $ ...`` followed by its output, and its own
conclusions as ``  -> ...``; the checks below read the processes' lines first and the conclusions
only where they carry something no log line does (what a plain client got back).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import command, holds_within

def _loopback_hosts() -> tuple[str, str]:
    """Where the demo puts the CA service and the gateway: 127.0.0.2 and .3, or 127.0.0.1 where those cannot be bound."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:  # macOS without aliases
            return "127.0.0.1", "127.0.0.1"
    return "127.0.0.2", "127.0.0.3"


CA_HOST, GW_HOST = _loopback_hosts()
CA_RE, GW_RE = re.escape(CA_HOST), re.escape(GW_HOST)
DEMO_BOUND = 120  # seconds: the whole demo, far above its ~16 s, well below pytest's patience
DEMO_BUDGET = 40  # seconds: the README says about 16 s; room for a loaded, shared machine


class _Result(subprocess.CompletedProcess):
    """A CompletedProcess that remembers the PID (and so the session ID) of the demo."""

    def __init__(self, *args, pid: int) -> None:
        super().__init__(*args)
        self.pid = pid


def run_demo(directory: Path, *args: str) -> tuple["_Result", float]:
    """Run the installed ``pkictl demo --dir DIRECTORY ARGS`` to its end (bounded), in a session of
    its own (its session ID is its PID, see :func:`leftovers`); its result and duration."""
    argv = [command("pkictl"), "demo", "--dir", str(directory), *args]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=DEMO_BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the demo and everything it started
        stdout, stderr = proc.communicate()
        raise AssertionError(f"pkictl demo did not end within {DEMO_BOUND} s:\n{stdout}\n{stderr}") from None
    return _Result(argv, proc.returncode, stdout, stderr, pid=proc.pid), time.monotonic() - started


def logged(out: str, label: str) -> list[str]:
    """The log lines of the demo's process ``label``, prefix removed."""
    prefix = f"  [{label}] "
    return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]


def section(out: str, number: int) -> str:
    """The output of the demo's step ``number``, up to the next step."""
    match = re.search(rf"^{number}\. .*?(?=^\d+\. |\Z)", out, re.M | re.S)
    assert match, f"no step {number} in the demo's output:\n{out}"
    return match.group(0)


def renewals(out: str, label: str, name: str) -> list[tuple[str, str]]:
    """Every ``renewed NAME: serial A -> B`` that process ``label`` logged, as (A, B)."""
    return re.findall(rf"renewed {name}: serial ([0-9a-f]+) -> ([0-9a-f]+)", "\n".join(logged(out, label)))


def pids(out: str) -> list[int]:
    """The PIDs of the processes the demo says it started."""
    return [int(p) for p in re.findall(r"^    \(pid (\d+), log ", out, re.M)]


def _alive(result: "_Result") -> list[str]:
    alive = []
    for pid in pids(result.stdout):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(f"pid {pid}")
    if sys.platform.startswith("linux"):
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]  # after "pid (comm) "
            # A zombie has ended: this sandbox's PID 1 does not reap the orphans it inherits.
            if entry.name.isdigit() and int(session) == result.pid and state != "Z":
                alive.append(f"pid {entry.name} (session {session}): {cmdline}")
    return alive


def leftovers(result: "_Result", grace: float = 5.0) -> list[str]:
    """Processes still alive ``grace`` seconds after the demo ended, among those it said it started
    and (on Linux) any process of its session: ``pkictl serve``'s signing worker and
    multiprocessing's resource tracker, say, which end after serve and which the demo never names."""
    holds_within(lambda: not _alive(result), grace)
    return _alive(result)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One full run of the demo: (its stdout, its directory, the result, seconds taken)."""
    directory = tmp_path_factory.mktemp("demo") / "d"
    result, seconds = run_demo(directory)
    assert result.returncode == 0, f"pkictl demo exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout, directory, result, seconds


def test_demo_succeeds_within_its_budget_and_cleanly(demo):
    """The demo exits 0 within its time budget, every process exited 0 on SIGTERM, none is left, and no traceback was logged."""
    out, directory, result, seconds = demo
    assert seconds < DEMO_BUDGET, f"the demo took {seconds:.1f} s; the README says about 16 s"
    statuses = re.search(r"^  -> exit statuses: (.*)$", section(out, 12), re.M)
    assert statuses, section(out, 12)
    assert dict(item.split(" ") for item in statuses.group(1).split(", ")) == {"N2": "0", "TW": "0", "gw": "0", "serve": "0"}
    assert len(pids(out)) == 5, "serve, gw, TW, N2 enroll and N2 should have been started as processes"
    assert leftovers(result) == []
    assert "Traceback" not in out + result.stderr
    assert re.search(rf"^Done in \d+ s\. Everything is in {re.escape(str(directory))} .*pkictl --home {re.escape(str(directory / 'ca'))} status",
                     out, re.M)


def test_the_real_commands_ran_on_loopback_addresses(demo):
    """Every step ran the real pkictl and pki-agent commands: serve on 127.0.0.2, the gateway's listener on 127.0.0.3, tunnels on 127.0.0.1."""
    out = demo[0]
    ran = re.findall(r"^  \$ (pkictl|pki-agent) (.*)$", out, re.M)
    commands = [f"{program} {args}" for program, args in ran]
    for expected in (r"pkictl --home \S+ init-ca ", rf"pkictl --home \S+ serve --listen {CA_RE}:\d+ ",
                     rf"pkictl --home \S+ enroll-gateway gw --ip {GW_RE} --listen {GW_RE}:\d+ --upstream 127\.0\.0\.1:\d+ .*--ca-url https://{CA_RE}:\d+",
                     r"pki-agent run --config \S+/gw/agent\.yaml", r"pkictl --home \S+ enroll-node TW --token",
                     rf"pki-agent enroll .*--name TW --token \S+ .*--tunnel 127\.0\.0\.1:\d+={GW_RE}:\d+",
                     rf"pki-agent enroll .*--name N2 .*--tunnel 127\.0\.0\.1:\d+={GW_RE}:\d+", r"pkictl --home \S+ requests",
                     r"pkictl --home \S+ approve N2 --code ", r"pkictl --home \S+ revoke N2", r"pkictl --home \S+ status"):
        assert any(re.match(expected, c) for c in commands), f"no command matching {expected!r} among:\n" + "\n".join(commands)
    assert re.search(rf"ready: EST on https://{CA_RE}:\d+/", "\n".join(logged(out, "serve")))
    assert "N2 --token" not in out, "N2 enrolls by approval, without a token"


def test_tw_line_came_back_through_its_tunnel_and_the_gateway(demo):
    """A plain client's line went through TW's tunnel (mTLS with TW's certificate) and the gateway's listener to the upstream and back."""
    out = demo[0]
    step = section(out, 5)
    assert re.search(r"^  \[upstream\] connection #1 from 127\.0\.0\.1:\d+ \(plain TCP\): 'hello from TW'$", step, re.M)
    assert "-> TW's line came back through the tunnel and the gateway: 'upstream #1: hello from TW'" in step
    opened = re.search(rf"tunnel open local=\S+ gateway={GW_RE}:\d+ serial=([0-9a-f]+) tls=TLSv1\.3", "\n".join(logged(step, "TW")))
    assert opened, step
    assert re.search(rf"accepted peer=\S+ node=tw serial={opened.group(1)} tls=TLSv1\.3", "\n".join(logged(step, "gw"))), step


def test_refused_client_and_its_logged_reason(demo):
    """A TLS client without a certificate is refused by the gateway, which logs the reason 'no client certificate'."""
    step = section(demo[0], 6)
    assert re.search(r"refused peer=127\.0\.0\.1:\d+ reason='no client certificate'", "\n".join(logged(step, "gw"))), step
    assert "the gateway logged reason='no client certificate'" in step


def test_n2_approved_with_the_code_its_enroll_printed(demo):
    """N2's enroll (no token) printed a code; 'pkictl requests' listed N2 with it, the operator approved that code, and the enroll finished."""
    step = section(demo[0], 7)
    code = re.search(r"waiting for approval: code ([A-Z2-7]{4}-[A-Z2-7]{4})", "\n".join(logged(step, "N2 enroll")))
    assert code, step
    code = code.group(1)
    listed = re.search(r"^  \$ pkictl --home \S+ requests\n(.*?)^  \$ pkictl --home \S+ approve N2", step, re.M | re.S)
    assert listed, step
    listed = listed.group(1)
    assert re.search(rf"^    N2\s+{code}\s", listed, re.M), listed
    assert re.search(rf"^  \$ pkictl --home \S+ approve N2 --code {code}$", step, re.M)
    assert f"approved N2 ({code})" in step
    enrolled = re.search(r"enrolled N2: serial ([0-9a-f]+)", "\n".join(logged(step, "N2 enroll")))
    assert enrolled, step
    assert re.search(rf"ready: node N2, .*tunnel 127\.0\.0\.1:\d+ -> {GW_RE}:\d+", "\n".join(logged(step, "N2")))
    assert "through its tunnel" in step and "'upstream #2: hello from N2'" in step


def test_gateway_nodes_and_service_each_rotated_to_a_new_serial(demo):
    """gw, TW and N2 each logged 'renewed NAME: serial A -> B' with A != B, and the service logged a second certificate serial."""
    out = demo[0]
    for label, name in (("gw", "gw"), ("TW", "TW"), ("N2", "N2")):
        pairs = renewals(out, label, name)
        assert pairs, f"{name} never renewed:\n" + "\n".join(logged(out, label))
        assert all(a != b for a, b in pairs), pairs
    service = re.findall(r"service certificate serial ([0-9a-f]+)", "\n".join(logged(out, "serve")))
    assert len(set(service)) >= 2, service
    reenrolled = [i for i, line in enumerate(logged(out, "serve")) if "method=POST path='/.well-known/est/simplereenroll' status=200" in line]
    rotated = next(i for i, line in enumerate(logged(out, "serve")) if f"service certificate serial {service[1]}" in line)  # found above
    assert any(i > rotated for i in reenrolled), "no renewal was served with the service's new certificate"


def test_connection_opened_before_the_rotations_still_works(demo):
    """TW's first connection carried a line after gw and TW had both rotated, and the gateway logged it closed with both lines' bytes."""
    out = demo[0]
    lines = out.splitlines()
    first = re.search(r"credential TW serial ([0-9a-f]+)", "\n".join(logged(out, "TW"))).group(1)
    later = next((i for i, line in enumerate(lines) if "[upstream] connection #1 " in line and "'still here after the rotations'" in line), None)
    assert later is not None, "the upstream never got 'still here after the rotations' on connection #1, TW's first:\n" + section(out, 9)
    for label, name in (("gw", "gw"), ("TW", "TW")):
        renewed = next((i for i, line in enumerate(lines) if line.startswith(f"  [{label}] ") and f"renewed {name}: serial" in line), None)
        assert renewed is not None and renewed < later, f"{name} renewed only after the old connection's second line"
    assert "-> the connection opened before the rotations still works: 'upstream #1: still here after the rotations'" in out
    sent = len("hello from TW\n") + len("still here after the rotations\n")
    closed = re.search(rf"closed peer=\S+ node=tw serial={first} bytes_in=(\d+) .*duration=([\d.]+)s", "\n".join(logged(out, "gw")))
    assert closed and int(closed.group(1)) == sent, f"want a 'closed' line for TW's first serial {first} with bytes_in={sent}"


def test_new_connections_get_the_new_certificates(demo):
    """After the rotations a new tunnel connection presents TW's new certificate and a new mTLS connection gets the gateway's new one."""
    out = demo[0]
    step = section(out, 9)
    tw_new = {b for _, b in renewals(out, "TW", "TW")}
    accepted = re.search(r"accepted peer=\S+ node=tw serial=([0-9a-f]+) ", "\n".join(logged(step, "gw")))
    assert accepted and accepted.group(1) in tw_new, step
    seen = re.search(r"sees the gateway's new certificate: serial ([0-9a-f]+) \(was ([0-9a-f]+)\)", step)
    assert seen, step
    gw_first = re.search(r"credential gw serial ([0-9a-f]+)", "\n".join(logged(out, "gw"))).group(1)
    assert seen.group(2) == gw_first
    assert seen.group(1) in {b for _, b in renewals(out, "gw", "gw")}


def test_revoked_n2_is_refused_by_the_running_gateway_through_its_tunnel(demo):
    """After 'pkictl revoke N2' the running gateway loads the CRL it fetched over EST, closes N2's open connection and refuses N2's new one."""
    step = section(demo[0], 10)
    revoked = set(re.findall(r"^    revoked node N2 serial ([0-9a-f]+)", step, re.M))
    assert revoked, step
    gw = "\n".join(logged(step, "gw"))
    assert re.search(rf"CRL refreshed from https://{CA_RE}:\d+", gw), gw
    assert re.search(r"CRL loaded: [1-9]\d* revoked", gw), gw
    assert re.search(r"closing peer=\S+ node=n2 serial=[0-9a-f]+ reason='revoked'", gw), gw
    assert re.search(r"refused peer=127\.0\.0\.1:\d+ reason='revoked'", gw), gw
    failure = re.search(r"tunnel authentication failure.* serial=([0-9a-f]+) reason='revoked'", "\n".join(logged(step, "N2")))
    assert failure and failure.group(1) in revoked, step
    assert "N2's client got no answer" in step


def test_revoked_n2_re_pairs_by_itself_and_gets_back_in(demo):
    """After its revocation N2's agent files a pairing request with a new key; the code it logs is
    the one 'pkictl requests' lists and the demo approves; N2 installs the new certificate (one
    the CA holds as valid) and its tunnel carries a line again."""
    out, directory = demo[0], demo[1]
    step = section(out, 10)
    n2 = "\n".join(logged(step, "N2"))
    code = re.search(r"pairing request of N2: a new key was made here; its code is ([A-Z2-7]{4}-[A-Z2-7]{4})", n2)
    assert code, n2
    assert re.search(rf"^  \$ pkictl --home \S+ approve N2 --code {code.group(1)}$", step, re.M), step
    back = re.search(r"re-enrolled N2: serial ([0-9a-f]+) -> ([0-9a-f]+) \(approved at the CA\)", n2)
    revoked = set(re.findall(r"^    revoked node N2 serial ([0-9a-f]+)", step, re.M))
    assert back and back.group(1) in revoked and back.group(2) not in revoked, n2
    assert re.search(rf"N2 re-paired with serial {back.group(2)}, nothing done on N2; through its tunnel again: 'upstream #", step), step
    listed = subprocess.run([command("pkictl"), "--home", str(directory / "ca"), "status", "--all", "--json"], capture_output=True,
                            text=True, timeout=60)
    states = {r["serial"]: r["state"] for r in json.loads(listed.stdout)}
    assert states.get(back.group(2)) not in (None, "revoked"), states


def test_inventory_and_bundles_agree_with_the_output(demo):
    """The CA's inventory holds several serials of gw, TW and N2 (those the logs named, N2's revoked) and the gateway's archive several versions."""
    out, directory = demo[0], demo[1]
    listed = subprocess.run([command("pkictl"), "--home", str(directory / "ca"), "status", "--all", "--json"], capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode in (0, 3, 4), listed.stderr
    rows = json.loads(listed.stdout)
    serials = {name: {r["serial"] for r in rows if r["name"] == name} for name in ("gw", "TW", "N2")}
    for label, name in (("gw", "gw"), ("TW", "TW"), ("N2", "N2")):
        assert len(serials[name]) >= 2, f"{name}: {serials[name]}"
        assert {s for pair in renewals(out, label, name) for s in pair} <= serials[name]
    revoked = set(re.findall(r"^    revoked node N2 serial ([0-9a-f]+)", out, re.M))
    assert revoked and all(r["state"] == "revoked" for r in rows if r["serial"] in revoked)
    assert not any(r["state"] == "revoked" for r in rows if r["name"] in ("gw", "TW"))
    versions = [p for p in (directory / "gw" / "archive").iterdir() if p.is_dir()]
    assert len(versions) >= 2, versions
    from cryptography import x509

    live = x509.load_pem_x509_certificate((directory / "gw" / "cert.pem").read_bytes())
    last = re.findall(r"credential gw serial ([0-9a-f]+)", "\n".join(logged(out, "gw")))[-1]
    assert f"{live.serial_number:x}" == last


def test_existing_directory_is_refused_and_left_untouched(tmp_path):
    """'pkictl demo --dir EXISTING' refuses with a message naming the directory and what to do, and changes nothing in it."""
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in existing.iterdir())
    result, _ = run_demo(existing)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{existing} exists" in result.stderr and "--dir NEW_DIR" in result.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in existing.iterdir()) == before
    assert (existing / "keep.txt").read_text() == "precious"
    assert "$ pkictl" not in result.stdout


def test_lifetime_out_of_range_is_refused_before_anything_starts(tmp_path):
    """A --lifetime the demo cannot show a rotation with is refused with the range, and no directory is made."""
    result, _ = run_demo(tmp_path / "d", "--lifetime", "5m")
    assert result.returncode == 1
    assert "--lifetime 5m: want 10s to 60s" in result.stderr
    assert not (tmp_path / "d").exists()


def _free_base(hosts: list[str]) -> int:
    """A port P such that P..P+4 can be bound on the five hosts given."""
    for base in range(21000, 32000, 97):
        try:
            socks = []
            for offset, host in enumerate(hosts):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no five free consecutive ports found")


def test_a_failed_step_stops_every_process_and_says_why(tmp_path):
    """With N2's tunnel port taken, the demo fails at N2's agent, names the step and the agent's reason, exits 1 and leaves no process."""
    hosts = [CA_HOST, GW_HOST, "127.0.0.1", "127.0.0.1", "127.0.0.1"]
    base = _free_base(hosts)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 4))  # N2's tunnel: serve, gw and TW are running by then
    blocker.listen()
    try:
        result, _ = run_demo(tmp_path / "d", "--port", str(base))
    finally:
        blocker.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"Error: step 7 \(node N2 by approval.*\) failed: N2 \(pki-agent run --config \S+\) exited with status 1 "
                     r"before 'ready: node N2", result.stderr), result.stderr
    assert f"tunnel: cannot listen on 127.0.0.1:{base + 4}" in result.stderr and "address already in use" in result.stderr
    assert "every process the demo started is stopped" in result.stderr
    assert len(pids(result.stdout)) == 5, result.stdout
    assert leftovers(result) == []


def test_without_127_0_0_2_everything_falls_back_to_127_0_0_1_on_distinct_ports(monkeypatch):
    """Where 127.0.0.2 cannot be bound (macOS without aliases) the demo uses 127.0.0.1 for all, on five distinct ports, and says why."""
    from pkictl import demo_support

    real = demo_support._bindable
    monkeypatch.setattr(demo_support, "_bindable", lambda host, port=0: host == "127.0.0.1" and real(host, port))
    ca_host, gw_host, note = demo_support.loopback_hosts()
    assert (ca_host, gw_host) == ("127.0.0.1", "127.0.0.1")
    assert note and "127.0.0.2" in note and "ifconfig lo0 alias" in note
    assert len(set(demo_support.pick_ports([ca_host, gw_host, "127.0.0.1", "127.0.0.1", "127.0.0.1"]))) == 5
