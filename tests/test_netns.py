"""The multi-host test infrastructure itself (tests/netns.py): hosts reach each other by name and
nothing outside the fleet, a failing test leaves nothing behind, a crashed run's leftovers are
swept and a live run's are not."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import netns

TESTS = Path(__file__).resolve().parent
PROBE = "import socket, sys\ns = socket.socket(); s.settimeout(3)\nprint(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"


def _state(fleet: netns.Fleet) -> set[str]:
    """What of ``fleet`` exists on this machine: namespaces, /etc/netns and owner entries."""
    names = {fleet.bridge_ns, *(h.ns for h in fleet.hosts.values())}
    found = {n for n in netns._namespaces() if n in names}
    found |= {f"/etc/netns/{n}" for n in names if (netns.NETNS_DIR / n).exists()}
    found |= {f"owner {n}" for n in names if (netns.OWNERS_DIR / n).exists()}
    return found


def test_hosts_reach_each_other_by_name_and_nothing_outside_the_fleet(tmp_path):
    """A client on one host reaches a server on another by its DNS name over the bridge, from
    its own address; an address outside the fleet has no route (ENETUNREACH, no packet sent),
    nor has the test machine's loopback; after the block nothing of the fleet is left."""
    netns.require()
    with netns.Fleet(tmp_path, {"a": ["a.example.lan"], "b": ["b.example.lan"]}) as fleet:
        server = fleet["b"].python("ws", TESTS / "ws_echo_server.py", "--listen", "0.0.0.0:18789", "--max-seconds", "30", chatty=True)
        server.wait_for(r'"event": "ready"')
        once = fleet["a"].run([sys.executable, str(TESTS / "ws_client.py"), "--url", "ws://b.example.lan:18789", "--name", "a", "once"])
        assert '"ok": true' in once.stdout
        server.wait_for(rf'"event": "open", "conn": 1, "peer": "{fleet["a"].address}:\d+"')
        assert fleet["a"].run([sys.executable, "-c", PROBE, "192.0.2.1", "80"]).stdout.strip() == str(101)  # ENETUNREACH
        # what listens on the machine's own loopback is not the host's loopback
        with socket.socket() as outside:
            outside.bind(("127.0.0.1", 0))
            outside.listen()
            port = outside.getsockname()[1]
            assert fleet["a"].run([sys.executable, "-c", PROBE, "127.0.0.1", str(port)]).stdout.strip() == str(111)  # ECONNREFUSED
        routes = fleet["a"].run(["ip", "route"]).stdout
        assert "default" not in routes and str(fleet.network) in routes
        assert "\tb.example.lan" in fleet["a"].run(["cat", "/etc/hosts"]).stdout
    assert _state(fleet) == set()


def test_a_failing_test_leaves_nothing_behind_and_prints_every_log(tmp_path, capsys):
    """An assertion failing inside the fleet stops its processes (a process group included),
    deletes its namespaces and prints each process's log under its host and name."""
    netns.require()
    with pytest.raises(AssertionError, match="deliberately"):
        with netns.Fleet(tmp_path, {"a": ["a.example.lan"]}) as fleet:
            sleeper = fleet["a"].start("sleeper", ["bash", "-c", "echo started; sleep 300 & sleep 300; wait"])
            sleeper.wait_for("started")
            assert netns._ip("netns", "pids", fleet["a"].ns).stdout.split()
            raise AssertionError("deliberately")
    assert not sleeper.running()
    assert _state(fleet) == set()
    printed = capsys.readouterr().out
    assert "===== a/sleeper: bash -c" in printed and "started" in printed
    assert (tmp_path / "logs" / "00-a-sleeper.log").read_text() == "started\n"


def test_a_crashed_runs_leftovers_are_swept_and_a_live_runs_are_not(tmp_path):
    """A fleet whose test process was killed with SIGKILL (no teardown) leaves namespaces and a
    process behind; the next fleet sweeps them; a fleet whose owner lives is left alone."""
    netns.require()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        import netns
        fleet = netns.Fleet(__import__("pathlib").Path({str(tmp_path / 'crashed')!r}), {{"a": ["a.example.lan"]}}).__enter__()
        fleet["a"].start("sleeper", ["sleep", "300"])
        print(fleet.prefix, flush=True)
        time.sleep(300)
    """)
    crashed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        prefix = crashed.stdout.readline().strip()
        assert prefix.startswith("pkt"), prefix
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(10)
        crashed.stdout.close()
    left = {n for n in netns._namespaces() if n.startswith(prefix)}
    assert left == {f"{prefix}-br", f"{prefix}-a"}
    orphans = netns._ip("netns", "pids", f"{prefix}-a").stdout.split()
    assert orphans, "the crashed run's sleeper should still run in its namespace"

    with netns.Fleet(tmp_path / "live", {"b": ["b.example.lan"]}) as live:
        assert {f"{prefix}-br", f"{prefix}-a"} <= set(live.swept)
        assert not any(n.startswith(prefix) for n in netns._namespaces())
        assert not (netns.NETNS_DIR / f"{prefix}-a").exists() and not (netns.OWNERS_DIR / f"{prefix}-a").exists()
        for pid in orphans:
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        # a second run going on beside this one does not sweep it: its owner (this process) lives
        assert live.bridge_ns not in netns.sweep_leftovers()
        assert live["b"].ns in netns._namespaces()
    assert _state(live) == set()


def _outcome(call) -> BaseException | None:
    """What ``call()`` raised (pytest's skip and fail included), or None."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - skip and fail are BaseExceptions
        return exc
    return None


def test_without_namespaces_the_tests_skip_with_the_reason_but_fail_in_ci(monkeypatch):
    """Not root (or no ip): require() skips, naming why; with PKICTL_REQUIRE_NETNS=1, as .ci/run
    sets it, it fails instead, so that CI can never pass with these tests skipped."""
    netns.unavailable.cache_clear()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    try:
        assert "need root" in netns.unavailable()
        monkeypatch.delenv(netns.REQUIRE_ENV, raising=False)
        skipped = _outcome(netns.require)
        assert isinstance(skipped, pytest.skip.Exception) and "need root" in str(skipped), repr(skipped)
        monkeypatch.setenv(netns.REQUIRE_ENV, "1")
        failed = _outcome(netns.require)  # a skip escaping here would only skip this test: caught, it fails it
        assert isinstance(failed, pytest.fail.Exception), repr(failed)
        assert "PKICTL_REQUIRE_NETNS=1 but the multi-host tests cannot run: network namespaces need root" in str(failed)
    finally:
        netns.unavailable.cache_clear()
    assert "PKICTL_REQUIRE_NETNS=1" in (TESTS.parent / ".ci" / "run").read_text()
