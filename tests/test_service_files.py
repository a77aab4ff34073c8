"""The shipped service files and example configs: they load, say what they must, and hold no secrets."""

from __future__ import annotations

import configparser
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import click
import pytest

from pki_agent.config import load_config
from pkictl.diagnosis.secretscan import find_secrets

from support import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
UNIT = ROOT / "systemd" / "pki-agent.service"
PLIST = ROOT / "launchd" / "net.pkictl.agent.plist"
SERVE_UNIT = ROOT / "systemd" / "pkictl-serve.service"
SERVE_PLIST = ROOT / "launchd" / "net.pkictl.serve.plist"
SERVE_EXEC = "/usr/local/bin/pkictl --home /var/lib/pkictl serve --listen 0.0.0.0:8443 --dns ca.example.lan"
SCANNED_DIRS = ("systemd", "launchd", "config")


def read_unit(path: Path) -> configparser.ConfigParser:
    """Parse a systemd unit file as INI, keeping the case of its keys."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(path.read_text(), source=str(path))
    return parser


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED_DIRS for p in (ROOT / d).rglob("*") if p.is_file())


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    """Every config/*.yaml passes the agent's schema (unknown keys refused) via load_config."""
    config = load_config(path)
    assert config.credential_dir.is_absolute()


def test_example_configs_describe_gateway_and_node_tw() -> None:
    """The gateway example listens on 0.0.0.0:8443 and forwards to 127.0.0.1:18789; the node example is TW with no
    listener and a tunnel from 127.0.0.1:18789 to the gateway."""
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} >= {"gateway.yaml", "node.yaml"}
    gateway = load_config(CONFIG_DIR / "gateway.yaml")
    assert gateway.kind == "gateway"
    assert gateway.listener is not None
    assert gateway.listener.listen == ("0.0.0.0", 8443)
    assert gateway.listener.upstream == ("127.0.0.1", 18789)
    node = load_config(CONFIG_DIR / "node.yaml")
    assert (node.name, node.kind, node.listener) == ("TW", "node", None)
    assert (node.tunnel.listen, node.tunnel.gateway) == (("127.0.0.1", 18789), ("gw.example.lan", 8443))


def test_unit_has_daemon_essentials() -> None:
    """The systemd unit runs `pki-agent run --config`, reloads with SIGHUP, restarts on failure and runs as a dedicated user."""
    service = read_unit(UNIT)["Service"]
    assert service["Type"] == "exec"
    assert "pki-agent run --config /etc/pki-agent/agent.yaml" in service["ExecStart"]
    assert PurePosixPath(service["ExecStart"].split()[0]).is_absolute()
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", service["ExecReload"])
    assert service["Restart"] == "on-failure"
    assert service["User"] == "pki-agent" and service["Group"] == "pki-agent"
    assert service["StateDirectory"] == "pki-agent"
    assert service["ConfigurationDirectory"] == "pki-agent"


@pytest.mark.parametrize(("unit", "writable"), [(UNIT, "/var/lib/pki-agent"), (SERVE_UNIT, "/var/lib/pkictl")],
                         ids=lambda v: getattr(v, "name", v))
def test_unit_is_hardened(unit: Path, writable: str) -> None:
    """Each systemd unit keeps its daemon unprivileged and lets it write only its state directory."""
    service = read_unit(unit)["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == writable
    assert service["CapabilityBoundingSet"] == ""
    assert "AmbientCapabilities" not in service
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["UMask"] == "0077"
    for key in ("PrivateTmp", "ProtectHome", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "LockPersonality",
                "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID"):
        assert service[key] == "yes", key
    assert service["SystemCallArchitectures"] == "native"


def test_serve_unit_has_daemon_essentials() -> None:
    """The pkictl-serve unit runs `pkictl --home /var/lib/pkictl serve` on 0.0.0.0:8443, reloads with SIGHUP, restarts on failure and runs as a dedicated user."""
    service = read_unit(SERVE_UNIT)["Service"]
    assert service["Type"] == "exec"
    assert service["ExecStart"] == SERVE_EXEC
    assert PurePosixPath(service["ExecStart"].split()[0]).is_absolute()
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", service["ExecReload"])
    assert service["Restart"] == "on-failure"
    assert service["User"] == "pkictl" and service["Group"] == "pkictl"
    assert service["StateDirectory"] == "pkictl"
    assert PurePosixPath("/var/lib") / service["StateDirectory"] == PurePosixPath(service["ReadWritePaths"])


def test_serve_unit_takes_nothing_from_the_environment() -> None:
    """The pkictl-serve unit sets no environment (no Environment=, EnvironmentFile=, PassEnvironment=); an encrypted CA's passphrase is read by --passphrase-file from /etc/pkictl/passphrase, shown as the commented alternative ExecStart."""
    text = SERVE_UNIT.read_text()
    service = read_unit(SERVE_UNIT)["Service"]
    assert not {"Environment", "EnvironmentFile", "PassEnvironment"} & set(service)
    assert not re.search(r"^\s*(Environment|EnvironmentFile|PassEnvironment)\s*=", text, re.MULTILINE)
    alternatives = re.findall(r"^#ExecStart=(.*)$", text, re.MULTILINE)
    assert alternatives == [SERVE_EXEC.replace(" serve ", " --passphrase-file /etc/pkictl/passphrase serve ", 1)]
    assert re.search(r"0600 and owned by pkictl", text)


def _parse_pkictl(command_line: str) -> tuple[dict, dict]:
    """Parse ``pkictl [group options] serve [options]`` with pkictl's own click CLI (nothing runs);
    return the group's and serve's parameters. Raises click.UsageError on an unknown option."""
    from pkictl.cli import cli

    argv = shlex.split(command_line)
    assert PurePosixPath(argv[0]).name == "pkictl" and "serve" in argv
    split = argv.index("serve")
    with cli.make_context("pkictl", [*argv[1:split], "serve"]) as group:
        serve = cli.get_command(group, "serve").make_context("serve", argv[split + 1:], parent=group)
        return dict(group.params), dict(serve.params)


def test_serve_command_lines_parse_with_the_real_cli() -> None:
    """The unit's ExecStart, its commented passphrase alternative and the plist's ProgramArguments parse with pkictl's own CLI into the intended home, listen address and DNS name; an unknown option does not (negative control)."""
    text = SERVE_UNIT.read_text()
    with SERVE_PLIST.open("rb") as f:
        plist_args = plistlib.load(f)["ProgramArguments"]
    lines = [read_unit(SERVE_UNIT)["Service"]["ExecStart"], *re.findall(r"^#ExecStart=(.*)$", text, re.MULTILINE), shlex.join(plist_args)]
    parsed = [_parse_pkictl(line) for line in lines]
    homes = [str(group["home"]) for group, _ in parsed]
    assert homes == ["/var/lib/pkictl", "/var/lib/pkictl", "/usr/local/var/pkictl"]
    assert [str(group["passphrase_file"]) for group, _ in parsed] == ["None", "/etc/pkictl/passphrase", "None"]
    for _, serve in parsed:
        assert serve["listen"] == "0.0.0.0:8443" and serve["dns_names"] == ("ca.example.lan",)
    with pytest.raises(click.UsageError):
        _parse_pkictl(SERVE_EXEC + " --dnss typo.example.lan")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_paths_are_writable_under_the_unit(path: Path) -> None:
    """The paths an example config makes the agent write (credential_dir, ca_home) lie inside the unit's ReadWritePaths."""
    writable = Path(read_unit(UNIT)["Service"]["ReadWritePaths"])
    config = load_config(path)
    for written in (config.credential_dir, config.renewal.ca_home):
        if written is not None:
            assert written.is_relative_to(writable), written


def test_plist_parses_and_runs_the_agent() -> None:
    """The launchd plist parses with plistlib and starts `pki-agent run --config` at load, restarting it after a failure."""
    with PLIST.open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "net.pkictl.agent"
    arguments = plist["ProgramArguments"]
    assert arguments[0].endswith("/pki-agent")
    assert arguments[1:] == ["run", "--config", "/usr/local/etc/pki-agent/agent.yaml"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["Umask"] == 0o077


def test_serve_plist_parses_and_runs_pkictl_serve_as_a_dedicated_user() -> None:
    """The pkictl serve plist parses with plistlib, starts `pkictl --home ... serve` at load as user _pkictl, restarts it after a failure and sets no environment."""
    with SERVE_PLIST.open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "net.pkictl.serve"
    arguments = plist["ProgramArguments"]
    assert arguments[0].endswith("/pkictl") and PurePosixPath(arguments[0]).is_absolute()
    assert arguments[1:] == ["--home", "/usr/local/var/pkictl", "serve", "--listen", "0.0.0.0:8443", "--dns", "ca.example.lan"]
    assert plist["UserName"] == "_pkictl" and plist["GroupName"] == "_pkictl"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["Umask"] == 0o077
    assert "EnvironmentVariables" not in plist


def test_new_service_files_are_scanned() -> None:
    """The secret scan below covers the pkictl serve unit and plist."""
    assert {SERVE_UNIT, SERVE_PLIST, UNIT, PLIST} <= set(scanned_files())


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secrets_in_shipped_files(path: Path) -> None:
    """No file under systemd/, launchd/ or config/ holds anything that looks like a secret."""
    assert find_secrets(path.read_text()) == []


def test_secret_detector_flags_a_token_and_spares_a_plain_line() -> None:
    """The detector flags a unit line carrying a token (negative control) and passes an ordinary ExecStart line."""
    hits = find_secrets("Environment=GATEWAY_TOKEN=abcdef0123456789abcdef0123456789")
    assert {name for _, name, _ in hits} >= {"token", "hex string"}
    assert {name for _, name, _ in find_secrets("-----BEGIN EC PRIVATE KEY-----")} == {"PEM private key"}
    assert {name for _, name, _ in find_secrets("key: q3Zx9Lm0PpR7sT2uVwXyZa4bC5dE6fGh")} == {"base64 string"}
    assert find_secrets("ExecStart=/usr/local/bin/pki-agent run --config /etc/pki-agent/agent.yaml") == []
    assert find_secrets("CapabilityBoundingSet=ProtectKernelTunablesRestrictAddressFamilies") == []
    # a pointer to the passphrase file passes; the passphrase itself, or the variable that carries it, does not
    assert find_secrets("ExecStart=/usr/local/bin/pkictl --home /var/lib/pkictl --passphrase-file /etc/pkictl/passphrase serve") == []
    assert {name for _, name, _ in find_secrets("ExecStart=pkictl --passphrase-file /etc/pkictl/passphrase --passphrase hunter2 serve")} == {"passphrase"}
    assert {name for _, name, _ in find_secrets("Environment=PKICTL_CA_PASSPHRASE=correct-horse")} == {"passphrase"}
    assert {name for _, name, _ in find_secrets("# passphrase: hunter2")} == {"passphrase"}


@pytest.mark.parametrize(("unit", "program"), [(UNIT, "pki-agent"), (SERVE_UNIT, "pkictl")], ids=lambda v: getattr(v, "name", v))
def test_unit_verifies_with_systemd_analyze(tmp_path: Path, unit: Path, program: str) -> None:
    """A copy of each unit whose ExecStart names the installed program passes `systemd-analyze verify`
    (skipped with the reason without that tool, failing under PKICTL_REQUIRE_NETNS=1).

    Mutation: ``ProtectSystem=strictly`` in systemd/pki-agent.service makes systemd-analyze warn
    about the file, and this test fails; so does a PATH without systemd-analyze under
    PKICTL_REQUIRE_NETNS=1."""
    agent = Path(sys.executable).parent / program
    if not agent.exists():
        agent = Path(shutil.which(program) or "")
    assert agent.is_file(), f"{program} is not installed next to this Python or on PATH"
    text = unit.read_text()
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"ExecStart=/usr/local/bin/{program} ", f"ExecStart={agent} ", 1))
    assert re.search(rf"^ExecStart={re.escape(str(agent))} ", copy.read_text(), re.MULTILINE)
    analyze = require_tool("systemd-analyze", "systemd")  # skipped without it, failing in CI
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify exits 0 even for an unknown key or a bad value ("..., ignoring"): those are
    # warnings naming the file, so none may mention it.
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if unit.name in line] == [], output
