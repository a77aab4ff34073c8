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
``... | ssh gw-host 'CMD'``                     ``... | ip netns exec <gateway host> CMD`` (a local pipe)
``TOKEN``, ``sha256:...``                       the token and fingerprint ``pkictl enroll-node TW --token`` printed
``pkictl approve TW --code ZMT6-DQMB``          ``pkictl approve N2 --code <the code N2 printed>``
the real gateway on ``127.0.0.1:18789``        tests/ws_echo_server.py (a WebSocket server) there
the client on TW                               tests/ws_client.py dialing ``ws://127.0.0.1:18789``
``pki-agent install-service``                  not run (the agents run in the foreground)
=============================================  =========================================================

Where the README leaves out something the commands need, the test says so by name (a "README
gap"), does the least an operator would have to guess, goes on, and fails at the end with every
gap found, so that one run names them all.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys
from pathlib import Path

import pytest

import netns
from support import BIN

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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


def readme_section(title: str) -> str:
    """The text of the README section whose '## ' heading starts with ``title``."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"README.md has no section '## {title}...' any more"
    return match.group(1)


def shell_blocks(section: str) -> list[list[str]]:
    """The commands of each ```sh block, continuation lines joined."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S):
        lines = [line.split(" # ", 1)[0].strip() for line in body.replace("\\\n", " ").splitlines()]
        blocks.append([" ".join(line.split()) for line in lines if line and not line.startswith("#")])
    return blocks


def inline_commands(section: str) -> list[str]:
    """The inline code spans of the prose (fenced blocks left out), whitespace normalised."""
    prose = re.sub(r"^```.*?^```", "", section, flags=re.M | re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def find(commands: list[str], pattern: str, what: str) -> str:
    found = [c for c in commands if re.search(pattern, c)]
    assert found, f"README.md '{SECTION}' no longer gives {what} (no command matching {pattern!r}); this test follows the README"
    return found[0]


class Setup:
    """The hosts, the path mapping and the README gaps found on the way."""

    def __init__(self, fleet: netns.Fleet) -> None:
        self.fleet = fleet
        self.ca, self.gw = fleet["ca"], fleet["gw"]
        self.gaps: list[str] = []
        self.ca_env = fleet.env()
        self.operator_dir = self.ca.path("/root")
        self.operator_dir.mkdir(parents=True)

    def words(self, host: netns.Host, command: str) -> list[str]:
        """``command`` as an argument list for ``host``: absolute paths mapped under its root,
        the README's example gateway address replaced by the gateway host's, comments dropped."""
        for absolute in ("/var/lib/pkictl", "/etc/pkictl", "/var/lib/pki-agent"):
            command = re.sub(rf"(?<![\w/]){re.escape(absolute)}(?=[/\s'\"]|$)", str(host.path(absolute)), command)
        command = command.replace("192.168.1.10", self.gw.address)
        return shlex.split(command, comments=True)

    def gap(self, text: str) -> None:
        self.gaps.append(text)
        print(f"README gap: {text}")

    def gaps_report(self) -> str:
        return "README gaps:\n" + "\n".join(f"  - {g}" for g in self.gaps)


def _passphrase_missing(result) -> bool:
    return re.search(r"passphrase", result.stdout + result.stderr, re.I) is not None


def _with_passphrase(words: list[str], passphrase_file: str) -> list[str]:
    return [words[0], "--passphrase-file", passphrase_file, *words[1:]]


def run_ca_command(setup: Setup, command: str, passphrase_file: str) -> str:
    """Run a pkictl command of the README on the CA host as written; if it fails for want of the
    CA passphrase, which the README's command does not give, record that gap and run it again
    with ``--passphrase-file``. Returns its stdout."""
    words = setup.words(setup.ca, command)
    result = setup.ca.run(words, env=setup.ca_env, cwd=setup.operator_dir, check=False)
    if result.returncode != 0 and _passphrase_missing(result) and "--passphrase-file" not in words:
        setup.gap(f"`{command}` fails on the CA that `init-ca` just made with a passphrase ({(result.stderr or result.stdout).strip()}); "
                  "the command as the README gives it has no --passphrase-file (or PKICTL_CA_PASSPHRASE)")
        result = setup.ca.run(_with_passphrase(words, passphrase_file), env=setup.ca_env, cwd=setup.operator_dir, check=False)
    assert result.returncode == 0, f"`{command}` on the CA host -> exit {result.returncode}\n{result.stdout}{result.stderr}"
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
        try:
            # -- the CA host -----------------------------------------------------------------------
            install = find(everything, r"^pip install \.", "the install command")
            assert install.startswith("pip install ."), install  # replaced: the project is installed in this venv
            for program in ("pkictl", "pki-agent"):
                assert ca.run(["bash", "-c", f"command -v {program}"]).stdout.strip() == str(BIN / program)
            export = find(everything, r"^export PKICTL_HOME=", "where the CA home is (export PKICTL_HOME=...)")
            name, _, value = setup.words(ca, export)[1].partition("=")
            setup.ca_env[name] = value
            init = find(everything, r"^pkictl .*\binit-ca\b", "pkictl init-ca")
            serve_command = find(everything, r"^pkictl .*\bserve\b", "pkictl serve")
            passphrase_file = next((w for w in setup.words(ca, init) if "passphrase" in w and not w.startswith("--")), None)

            words = setup.words(ca, init)
            result = ca.run(words, env=setup.ca_env, cwd=setup.operator_dir, check=False)
            if result.returncode != 0 and passphrase_file and not Path(passphrase_file).exists():
                setup.gap(f"`{init}` needs {passphrase_file.replace(str(ca.root), '')}, and the README never says how to "
                          f"make it (contents, mode 0600, its directory); init-ca said: {(result.stderr or result.stdout).strip()}")
                # The least an operator would guess: a random passphrase in a 0600 file in a 0700 directory.
                Path(passphrase_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(passphrase_file, "x", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
                result = ca.run(words, env=setup.ca_env, cwd=setup.operator_dir, check=False)
            assert result.returncode == 0, f"`{init}` -> exit {result.returncode}\n{result.stdout}{result.stderr}"
            assert "encrypted" in result.stdout, result.stdout
            home = Path(setup.ca_env["PKICTL_HOME"])
            assert (home / "ca.yaml").exists(), f"init-ca did not create the CA in PKICTL_HOME={home}"

            serve = ca.start("serve", setup.words(ca, serve_command), env=setup.ca_env, cwd=setup.operator_dir)
            serve.wait_for(r"ready: EST on https://ca\.example\.lan:8443/\.well-known/est")

            # -- the gateway -----------------------------------------------------------------------------
            enroll_gateway = find(everything, r"^pkictl enroll-gateway ", "pkictl enroll-gateway")
            run_ca_command(setup, enroll_gateway, passphrase_file)
            bundle = setup.operator_dir / "gw"
            assert (bundle / "agent.yaml").exists() and (bundle / "live").is_symlink(), "enroll-gateway --out gw wrote no bundle"

            copy = find(spans, r"^tar .*\| ssh ", "how to copy gw/ to the gateway host (tar ... | ssh ...)")
            left, _, remote = copy.partition("|")
            remote_words = shlex.split(remote)
            assert remote_words[0] == "ssh" and len(remote_words) == 3, f"unexpected copy command {copy!r}"
            sender = setup.words(ca, left)
            receiver = setup.words(gw, remote_words[2])
            copied = ca.pipe(sender, gw, receiver, cwd=setup.operator_dir, check=False)
            if copied.returncode != 0:
                target = receiver[receiver.index("-C") + 1]
                setup.gap(f"`{copy}` needs /var/lib/pki-agent on the gateway host, and the README never says to create it "
                          f"(tar said: {copied.stderr.strip()})")
                Path(target).mkdir(mode=0o700, parents=True)
                copied = ca.pipe(sender, gw, receiver, cwd=setup.operator_dir)
            assert (gw.path("/var/lib/pki-agent/gw/live")).is_symlink(), "the copy did not keep the live symlink"

            # 1. the real gateway on loopback only; 2. the agent
            upstream = gw.python("gateway", TESTS / "ws_echo_server.py", "--listen", "127.0.0.1:18789", chatty=True)
            upstream.wait_for(r'"event": "ready"')
            gateway_run = find(spans, r"^pki-agent run --config /var/lib/pki-agent/gw/", "how to run the gateway's agent")
            gateway = gw.start("agent", setup.words(gw, gateway_run))
            gateway.wait_for(r"ready: gateway gw, listening on 0\.0\.0\.0:8443")

            # -- node TW, with a token ---------------------------------------------------------------------
            token_command = find(everything, r"^pkictl enroll-node TW --token", "pkictl enroll-node TW --token")
            printed = run_ca_command(setup, token_command, passphrase_file)
            token = re.search(r"^\s+(\S+)\s*$", printed, re.M)
            fingerprint = re.search(r"sha256:[0-9a-f]{64}", printed)
            assert token and fingerprint, f"enroll-node --token printed no token or fingerprint:\n{printed}"
            enroll = find(everything, r"^pki-agent enroll ", "pki-agent enroll on TW")
            node_run = find(everything, r"^pki-agent run ", "pki-agent run on TW")
            tunnel = find(spans, r"^pki-agent enroll \.\.\. --tunnel ", "the enroll option for a tunnel")
            tunnel_words = shlex.split(tunnel)[3:]
            assert tunnel_words[0] == "--tunnel", tunnel

            def enroll_words(host: netns.Host, name: str, with_token: bool) -> list[str]:
                words = [{"sha256:...": fingerprint.group(0), "TOKEN": token.group(1)}.get(w, w)
                         for w in setup.words(host, enroll)]
                if not with_token:  # "Without a token, the request waits for approval."
                    at = words.index("--token")
                    del words[at:at + 2]
                words = [w.replace("/var/lib/pki-agent/TW", f"/var/lib/pki-agent/{name}") if "/pki-agent/TW" in w else w for w in words]
                return [name if w == "TW" else w for w in words] + tunnel_words

            enrolled = tw.run(enroll_words(tw, "TW", True))
            tw_serial = re.search(r"enrolled TW: serial ([0-9a-f]+)", enrolled.stdout)
            assert tw_serial, enrolled.stdout
            tw_agent = tw.start("agent", setup.words(tw, node_run))
            listen, _, dialed = tunnel_words[1].partition("=")
            ready = tw_agent.wait_for(r"ready: node TW, no listener, tunnel (\S+) -> (\S+)")
            assert ready.groups() == (listen, dialed), f"TW's agent is not running the README's tunnel {tunnel_words[1]}: {ready.group(0)}"

            # the unmodified client through the tunnel reaches the real gateway, from TW's address
            outcome = wait_client_once(tw, "TW")
            assert outcome["ok"], f"TW's WebSocket client did not get through its tunnel: {outcome}"
            upstream.wait_for(r'"event": "recv", "conn": \d+, "from": "TW", "seq": 1')
            gateway.wait_for(rf"accepted peer={re.escape(tw.address)}:\d+ node=tw serial={tw_serial.group(1)}\b")

            # -- node N2, by approval ------------------------------------------------------------------------
            waiting = n2.start("enroll", enroll_words(n2, "N2", False))
            code = waiting.wait_for(rf"\bcode ({CODE})").group(1)
            requests = find(spans, r"^pkictl requests$", "pkictl requests")
            listed = run_ca_command(setup, requests, passphrase_file)
            assert re.search(rf"^N2\s+{code}\s+{re.escape(n2.address)}\b", listed, re.M | re.I), \
                f"pkictl requests does not list N2 with code {code} from {n2.address}:\n{listed}"
            # not before the approval: the request waits, no certificate on N2
            assert waiting.running() and not n2.path("/var/lib/pki-agent/N2/live").exists(), \
                "N2 got a certificate before anyone approved it"
            approve = find(spans, r"^pkictl approve TW --code ", "pkictl approve")
            example = re.search(CODE, approve).group(0)
            run_ca_command(setup, approve.replace(" TW ", " N2 ").replace(example, code), passphrase_file)
            assert waiting.popen.wait(60) == 0, "N2's enroll did not end with its certificate after the approval"
            n2_serial = waiting.wait_for(r"enrolled N2: serial ([0-9a-f]+)").group(1)
            assert n2.path("/var/lib/pki-agent/N2/live").is_symlink()
            n2_agent = n2.start("agent", [w.replace("/TW/", "/N2/") for w in setup.words(n2, node_run)])
            n2_agent.wait_for(rf"ready: node N2, no listener, tunnel {re.escape(listen)} -> {re.escape(dialed)}$")
            outcome = wait_client_once(n2, "N2")
            assert outcome["ok"], f"N2's WebSocket client did not get through its tunnel: {outcome}"
            upstream.wait_for(r'"event": "recv", "conn": \d+, "from": "N2", "seq": 1')
            gateway.wait_for(rf"accepted peer={re.escape(n2.address)}:\d+ node=n2 serial={n2_serial}\b")

            # -- pkictl status lists them ------------------------------------------------------------------
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
        except BaseException:
            if setup.gaps:
                print(setup.gaps_report())
            raise
        if setup.gaps:
            pytest.fail(setup.gaps_report() + "\n(everything else the README promises worked, with the workarounds above)",
                        pytrace=False)
