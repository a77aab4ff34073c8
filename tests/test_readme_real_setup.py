"""README.md "A real setup: a CA host, a gateway and node TW", followed literally on four fresh
hosts (network namespaces): the CA host, the gateway, node TW enrolled by token and node N2
enrolled by approval. The commands are read from README.md itself, so a change there changes
what runs here, and a command the README no longer gives breaks this test.

What differs from a real setup, and nothing else:

=============================================  =========================================================
README                                         here
=============================================  =========================================================
``/var/lib/pkictl``, ``/etc/pkictl`` (CA host)  ``HOSTS/ca/var/lib/pkictl``, ``HOSTS/ca/etc/pkictl``
``/var/lib/pki-agent`` (gateway, TW, N2)        ``HOSTS/<host>/var/lib/pki-agent``
the operator's working directory (CA host)     ``HOSTS/ca/root``
``192.168.1.10`` (the gateway's LAN address)   the gateway host's address on the test bridge (10.x.y.2)
``pip install .``                              not run: this virtualenv has the project installed
                                               (its commands come first on PATH)
``... | ssh gw-host 'CMD'``                     ``... | ip netns exec <gateway host> bash -c CMD`` (a local pipe)
``TOKEN``, ``sha256:...``                       the token and fingerprint ``pkictl enroll-node TW --token`` printed
``--code ZMT6-DQMB``                            ``--code <the code N2 printed>``
the real gateway on ``127.0.0.1:18789``        tests/ws_echo_server.py (a WebSocket server) there
the client on TW                               tests/ws_client.py dialing ``ws://127.0.0.1:18789``
``pki-agent install-service``                  not run (the agents run in the foreground)
=============================================  =========================================================

Every line of the README's blocks runs as a shell runs it; a line that fails fails the test
with the line and what it printed.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path


import netns
from readme_support import readme_section, shell_blocks
from support import BIN

TESTS = Path(__file__).resolve().parent
SECTION = "A real setup"
CODE = r"[A-Z2-7]{4}-[A-Z2-7]{4}"  # an approval code, e.g. ZMT6-DQMB

HOSTS = {
    "ca": ["ca.example.lan"],
    "gw": ["gw.example.lan"],
    "tw": ["tw.example.lan"],
    "n2": ["n2.example.lan"],
}


# -- reading the README -------------------------------------------------------------------------------


def inline_commands(section: str) -> list[str]:
    """The inline code spans of the prose (fenced blocks left out), whitespace normalised."""
    prose = re.sub(r"^ *```.*?^ *```", "", section, flags=re.M | re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def find(commands: list[str], pattern: str, what: str) -> str:
    found = [c for c in commands if re.search(pattern, c)]
    assert found, f"README.md '{SECTION}' no longer gives {what} (no command matching {pattern!r}); this test follows the README"
    return found[0]


class Setup:
    """The hosts and the path mapping."""

    def __init__(self, fleet: netns.Fleet) -> None:
        self.fleet = fleet
        self.ca, self.gw = fleet["ca"], fleet["gw"]
        self.ca_env = fleet.env()
        self.operator_dir = self.ca.path("/root")
        self.operator_dir.mkdir(parents=True)

    def line(self, host: netns.Host, command: str) -> str:
        """``command`` for ``host``: absolute paths mapped under its root, the README's example
        gateway address replaced by the gateway host's."""
        for absolute in ("/var/lib/pkictl", "/etc/pkictl", "/var/lib/pki-agent"):
            command = re.sub(rf"(?<![\w/]){re.escape(absolute)}(?=[/\s'\"]|$)", str(host.path(absolute)), command)
        return command.replace("192.168.1.10", self.gw.address)

    def words(self, host: netns.Host, command: str) -> list[str]:
        return shlex.split(self.line(host, command), comments=True)

    def shell(self, host: netns.Host, command: str, env: dict[str, str] | None = None) -> str:
        """Run one README line on ``host`` as a shell runs it; fail naming the line if it fails."""
        result = host.run(["bash", "-c", self.line(host, command)], env=env, cwd=self.operator_dir if host is self.ca else None,
                          check=False)
        assert result.returncode == 0, f"README line `{command}` on {host.name} -> exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout


def wait_client_once(host: netns.Host, name: str) -> dict:
    """Run the unmodified WebSocket client on ``host`` once against its loopback tunnel."""
    result = host.run([sys.executable, str(TESTS / "ws_client.py"), "--url", "ws://127.0.0.1:18789", "--name", name, "once"],
                      check=False, timeout=30)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    probes = [r for r in records if r.get("event") == "probe"]
    assert probes, f"{host.name}: the WebSocket client printed no outcome: {result.stdout}{result.stderr}"
    return probes[-1]


def test_the_readme_real_setup_on_four_fresh_hosts(tmp_path):
    """The README's real setup, its commands read from README.md and run as written on a CA
    host, a gateway and nodes TW (token) and N2 (approval): TW's and N2's plain WebSocket clients
    reach the real gateway through their tunnels, N2 gets its certificate once approved, and
    'pkictl status' lists every certificate."""
    netns.require()
    section = readme_section(SECTION)
    blocks = shell_blocks(section)
    everything = [c for block in blocks for c in block]
    spans = inline_commands(section)

    with netns.Fleet(tmp_path, HOSTS) as fleet:
        setup = Setup(fleet)
        ca, gw, tw, n2 = fleet["ca"], fleet["gw"], fleet["tw"], fleet["n2"]

        # -- the CA host: its first block, line by line as a shell runs it ------------------------------
        serve = None
        ca_block = next(b for b in blocks if any(re.search(r"\binit-ca\b", c) for c in b))
        for command in ca_block:
            if command.startswith("pip install ."):  # this virtualenv has the project, its commands first on PATH
                for program in ("pkictl", "pki-agent"):
                    assert ca.run(["bash", "-c", f"command -v {program}"]).stdout.strip() == str(BIN / program)
            elif command.startswith("export "):
                name, _, value = setup.words(ca, command)[1].partition("=")
                setup.ca_env[name] = value
            elif command.endswith(" &"):  # a service the README starts in the background
                assert re.search(r"\bserve\b", command), command
                serve = ca.start("serve", setup.words(ca, command[:-2]), env=setup.ca_env, cwd=setup.operator_dir)
            else:
                setup.shell(ca, command, setup.ca_env)
        assert serve is not None, f"the CA host's block starts no pkictl serve: {ca_block}"
        home = Path(setup.ca_env["PKICTL_HOME"])
        assert (home / "ca.yaml").exists(), f"init-ca did not create the CA in PKICTL_HOME={home}"
        passphrase = ca.path("/etc/pkictl/passphrase")
        assert passphrase.stat().st_mode & 0o077 == 0 and len(passphrase.read_text().strip()) >= 32
        assert b"ENCRYPTED PRIVATE KEY" in (home / "issuing" / "key.pem").read_bytes(), "the README's CA keys are not encrypted"
        serve.wait_for(r"ready: EST on https://ca\.example\.lan:8443/\.well-known/est")

        # -- the gateway ------------------------------------------------------------------------------------
        setup.shell(ca, find(everything, r"^pkictl .*\benroll-gateway gw ", "pkictl enroll-gateway"), setup.ca_env)
        bundle = setup.operator_dir / "gw"
        assert (bundle / "agent.yaml").exists() and (bundle / "live").is_symlink(), "enroll-gateway --out gw wrote no bundle"
        copy = find(everything, r"^tar .*\| ssh ", "how to copy gw/ to the gateway host (tar ... | ssh ...)")
        left, _, remote = copy.partition("|")
        remote_words = shlex.split(remote)
        assert remote_words[0] == "ssh" and len(remote_words) == 3, f"unexpected copy command {copy!r}"
        ca.pipe(setup.words(ca, left), gw, ["bash", "-c", setup.line(gw, remote_words[2])], cwd=setup.operator_dir)
        assert gw.path("/var/lib/pki-agent/gw/live").is_symlink(), "the copy did not keep the live symlink"

        # 1. the real gateway on loopback only; 2. the agent
        upstream = gw.python("gateway", TESTS / "ws_echo_server.py", "--listen", "127.0.0.1:18789", chatty=True)
        upstream.wait_for(r'"event": "ready"')
        gateway = gw.start("agent", setup.words(gw, find(everything, r"^pki-agent run --config /var/lib/pki-agent/gw/",
                                                           "how to run the gateway's agent")))
        gateway.wait_for(r"ready: gateway gw, listening on 0\.0\.0\.0:8443")

        # -- node TW, with a token ------------------------------------------------------------------------------
        printed = setup.shell(ca, find(everything, r"^pkictl .*\benroll-node TW --token", "pkictl enroll-node TW --token"), setup.ca_env)
        token = re.search(r"^\s+(\S+)\s*$", printed, re.M)
        fingerprint = re.search(r"sha256:[0-9a-f]{64}", printed)
        assert token and fingerprint, f"enroll-node --token printed no token or fingerprint:\n{printed}"
        told = re.search(r"^on TW: (pki-agent enroll .*)$", printed, re.M)
        assert told and "--ca-url https://ca.example.lan:8443 " in told.group(1), f"the printed command lacks the CA's URL:\n{printed}"
        filled = {"sha256:...": fingerprint.group(0), "TOKEN": token.group(1)}
        enroll_tw = find(everything, r"^pki-agent enroll .*--name TW .*--token TOKEN", "pki-agent enroll on TW")
        enrolled = tw.run([filled.get(w, w) for w in setup.words(tw, enroll_tw)])
        tw_serial = re.search(r"enrolled TW: serial ([0-9a-f]+)", enrolled.stdout)
        assert tw_serial, enrolled.stdout
        node_run = find(everything, r"^pki-agent run --config /var/lib/pki-agent/TW/", "pki-agent run on TW")
        tw_agent = tw.start("agent", setup.words(tw, node_run))
        tunnel = re.search(r"--tunnel (\S+)=(\S+)", enroll_tw)
        assert tunnel, f"TW's enroll gives no --tunnel: {enroll_tw}"
        ready = tw_agent.wait_for(r"ready: node TW, no listener, tunnel (\S+) -> (\S+)")
        assert ready.groups() == tunnel.groups(), f"TW's agent is not running the README's tunnel: {ready.group(0)}"

        # the unmodified client through the tunnel reaches the real gateway, from TW's address
        outcome = wait_client_once(tw, "TW")
        assert outcome["ok"], f"TW's WebSocket client did not get through its tunnel: {outcome}"
        upstream.wait_for(r'"event": "recv", "conn": \d+, "from": "TW", "seq": 1')
        gateway.wait_for(rf"accepted peer={re.escape(tw.address)}:\d+ node=tw serial={tw_serial.group(1)}\b")

        # -- node N2, by approval ---------------------------------------------------------------------------------
        enroll_n2 = find(everything, r"^pki-agent enroll .*--name N2 ", "pki-agent enroll on N2 (without a token)")
        assert "--token" not in enroll_n2, enroll_n2
        waiting = n2.start("enroll", [filled.get(w, w) for w in setup.words(n2, enroll_n2)])
        code = waiting.wait_for(rf"\bcode ({CODE})").group(1)
        listed = setup.shell(ca, find(everything, r"^pkictl requests$", "pkictl requests"), setup.ca_env)
        assert re.search(rf"^N2\s+{code}\s+{re.escape(n2.address)}\b", listed, re.M | re.I), \
            f"pkictl requests does not list N2 with code {code} from {n2.address}:\n{listed}"
        # not before the approval: the request waits, no certificate on N2
        assert waiting.running() and not n2.path("/var/lib/pki-agent/N2/live").exists(), "N2 got a certificate before anyone approved it"
        approve = find(everything, r"^pkictl .*\bapprove N2 --code ", "pkictl approve N2")
        setup.shell(ca, approve.replace(re.search(CODE, approve).group(0), code), setup.ca_env)
        assert waiting.popen.wait(60) == 0, "N2's enroll did not end with its certificate after the approval"
        n2_serial = waiting.wait_for(r"enrolled N2: serial ([0-9a-f]+)").group(1)
        assert n2.path("/var/lib/pki-agent/N2/live").is_symlink()
        # "then run its agent as on TW"
        n2_agent = n2.start("agent", [w.replace("/TW/", "/N2/") for w in setup.words(n2, node_run)])
        n2_agent.wait_for(rf"ready: node N2, no listener, tunnel {re.escape(tunnel.group(1))} -> {re.escape(tunnel.group(2))}$")
        outcome = wait_client_once(n2, "N2")
        assert outcome["ok"], f"N2's WebSocket client did not get through its tunnel: {outcome}"
        upstream.wait_for(r'"event": "recv", "conn": \d+, "from": "N2", "seq": 1')
        gateway.wait_for(rf"accepted peer={re.escape(n2.address)}:\d+ node=n2 serial={n2_serial}\b")

        # -- pkictl status lists them ------------------------------------------------------------------------------
        status_command = find(spans, r"^pkictl status$", "pkictl status")
        status = ca.run(setup.words(ca, status_command), env=setup.ca_env, cwd=setup.operator_dir, check=False)
        assert status.returncode == 0, f"pkictl status -> {status.returncode}:\n{status.stdout}{status.stderr}"
        gw_serial = gateway.wait_for(r"credential gw serial ([0-9a-f]+)").group(1)
        for listed_name, kind, serial in (("gw", "gateway", gw_serial), ("TW", "node", tw_serial.group(1)), ("N2", "node", n2_serial)):
            # the table shows a serial's first 16 hex digits
            row = re.search(rf"^{listed_name}\s+{kind}\s+{serial[:16]}\S*\s.*\bok$", status.stdout, re.M)
            assert row, f"pkictl status does not list {kind} {listed_name} with serial {serial[:16]}... as ok:\n{status.stdout}"

        for process in (serve, gateway, tw_agent, n2_agent):
            errors = [line for line in process.log.text().splitlines() if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
            assert not errors, f"{process.label} logged errors:\n" + "\n".join(errors)
