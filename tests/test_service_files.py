"""The shipped service files and example configs: they load, say what they must, and hold no secrets."""

from __future__ import annotations

import configparser
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from pki_agent.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
UNIT = ROOT / "systemd" / "pki-agent.service"
PLIST = ROOT / "launchd" / "net.pkictl.agent.plist"
SCANNED_DIRS = ("systemd", "launchd", "config")

# What a secret tends to look like in a text file. The base64 pattern wants upper case, lower case
# and a digit so that long words and paths (CapabilityBoundingSet) do not count.
SECRET_PATTERNS = {
    "password": re.compile(r"password", re.IGNORECASE),
    "passphrase": re.compile(r"passphrase", re.IGNORECASE),
    "token": re.compile(r"token", re.IGNORECASE),
    "secret": re.compile(r"secret", re.IGNORECASE),
    "PEM private key": re.compile(r"BEGIN .*PRIVATE KEY"),
    "hex string": re.compile(r"\b[0-9A-Fa-f]{32,}\b"),
    "base64 string": re.compile(r"(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])[A-Za-z0-9+/]{32,}={0,2}"),
}


def find_secrets(text: str) -> list[tuple[int, str, str]]:
    """Return ``(line number, pattern name, line)`` for every line of ``text`` that looks secret."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for name, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                hits.append((number, name, line))
    return hits


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
    """The gateway example listens on 0.0.0.0:8443 and forwards to 127.0.0.1:18789; the node example is TW with no listener."""
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} >= {"gateway.yaml", "node.yaml"}
    gateway = load_config(CONFIG_DIR / "gateway.yaml")
    assert gateway.kind == "gateway"
    assert gateway.listener is not None
    assert gateway.listener.listen == ("0.0.0.0", 8443)
    assert gateway.listener.upstream == ("127.0.0.1", 18789)
    node = load_config(CONFIG_DIR / "node.yaml")
    assert (node.name, node.kind, node.listener) == ("TW", "node", None)


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


def test_unit_is_hardened() -> None:
    """The systemd unit keeps the daemon unprivileged and lets it write only /var/lib/pki-agent."""
    service = read_unit(UNIT)["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/pki-agent"
    assert service["CapabilityBoundingSet"] == ""
    assert "AmbientCapabilities" not in service
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["UMask"] == "0077"
    for key in ("PrivateTmp", "ProtectHome", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "LockPersonality",
                "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID"):
        assert service[key] == "yes", key
    assert service["SystemCallArchitectures"] == "native"


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


def test_unit_verifies_with_systemd_analyze(tmp_path: Path) -> None:
    """A copy of the unit whose ExecStart names an existing pki-agent passes `systemd-analyze verify` when that tool is installed."""
    agent = Path(sys.executable).parent / "pki-agent"
    if not agent.exists():
        agent = Path(shutil.which("pki-agent") or "")
    assert agent.is_file(), "pki-agent is not installed next to this Python or on PATH"
    text = UNIT.read_text()
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/local/bin/pki-agent ", f"ExecStart={agent} ", 1))
    assert f"ExecStart={agent} run --config" in copy.read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        # verify exits 0 even for an unknown key or a bad value ("..., ignoring"): those are
        # warnings naming the file, so none may mention it.
        output = result.stdout + result.stderr
        assert [line for line in output.splitlines() if UNIT.name in line] == [], output
