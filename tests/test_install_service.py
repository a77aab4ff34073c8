"""pki-agent install-service: a systemd unit and a launchd plist written from the config, verified
by systemd-analyze and plistlib, never holding a secret; and the secret scanner itself."""

from __future__ import annotations

import configparser
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pki_agent.cli import cli
from pki_agent.errors import AgentError
from pkictl.diagnosis.secretscan import find_secrets, redact
from pki_agent.service import LaunchdBackend, SystemdBackend, backend_for, install_service

from doctor_support import write_config
from support import require_tool

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = Path(sys.executable).parent / "pki-agent"


def read_unit(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    return parser


def gateway_config(tmp_path: Path, **listener) -> Path:
    return write_config(tmp_path / "agent.yaml", {
        "name": "gw", "kind": "gateway", "credential_dir": str(tmp_path / "gw"), "renewal": {"ca_home": str(tmp_path / "ca")},
        "listener": {"listen": "0.0.0.0:8443", "upstream": "127.0.0.1:18789", "crl": str(tmp_path / "ca" / "crl.pem"), "allow": ["tw"],
                     **listener}})


def run(*args: str):
    return CliRunner().invoke(cli, ["install-service", *args], catch_exceptions=False)


def test_systemd_unit_from_the_config_verifies(tmp_path) -> None:
    """The unit for a gateway config runs this pki-agent with that config, may write its credential dir and CA home only,
    and passes systemd-analyze verify without a warning about it (skipped with the reason without that tool, failing
    under PKICTL_REQUIRE_NETNS=1). Mutation: ``ProtectSystem=strictly`` in SystemdBackend's unit (agent/service.py)
    makes systemd-analyze warn about the unit, and this test fails; so does a PATH without systemd-analyze under
    PKICTL_REQUIRE_NETNS=1."""
    config = gateway_config(tmp_path)
    unit = tmp_path / "pki-agent.service"
    result = run("--config", str(config), "--platform", "systemd", "--output", str(unit))
    assert result.exit_code == 0 and f"wrote {unit}" in result.output and "systemctl enable --now pki-agent" in result.output
    service = read_unit(unit.read_text())["Service"]
    assert service["ExecStart"] == f"{PROGRAM.absolute()} run --config {config}"
    assert service["ReadWritePaths"] == f"{tmp_path / 'gw'} {tmp_path / 'ca'}"
    assert (service["User"], service["Group"]) == ("pki-agent", "pki-agent")
    assert service["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in service
    assert service["PrivateTmp"] == "no"  # the test's paths are under /tmp, which a private /tmp would hide
    analyze = require_tool("systemd-analyze", "systemd")  # skipped without it, failing in CI
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert [line for line in output.splitlines() if unit.name in line] == [], output


def test_unit_keeps_the_shipped_hardening(tmp_path) -> None:
    """Every [Service] setting of the shipped systemd/pki-agent.service is in the generated unit, with the same value
    except the ones taken from the config."""
    shipped = read_unit((ROOT / "systemd" / "pki-agent.service").read_text())["Service"]
    text = SystemdBackend().render(_spec(tmp_path))
    generated = read_unit(text)["Service"]
    from_config = {"ExecStart", "ReadWritePaths", "PrivateTmp"}
    assert set(shipped) <= set(generated)
    assert {k: shipped[k] for k in shipped if k not in from_config} == {k: generated[k] for k in shipped if k not in from_config}


def _spec(tmp_path: Path, **changes):
    from pki_agent.config import load_config
    from pki_agent.service import spec_from_config

    config = gateway_config(tmp_path, **changes)
    return spec_from_config(config, load_config(config), user="pki-agent", program=PROGRAM)


def test_low_port_gets_only_net_bind_service(tmp_path) -> None:
    """A listener on port 443 gets CAP_NET_BIND_SERVICE in the bounding and ambient sets, and nothing else."""
    service = read_unit(SystemdBackend().render(_spec(tmp_path, listen="0.0.0.0:443")))["Service"]
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_paths_below_home_keep_home_readable(tmp_path) -> None:
    """A credential directory below /home makes ProtectHome read-only instead of hiding /home (the path stays writable)."""
    config = write_config(tmp_path / "agent.yaml", {"name": "TW", "kind": "node", "credential_dir": "/home/op/pki/TW"})
    from pki_agent.config import load_config
    from pki_agent.service import spec_from_config

    service = read_unit(SystemdBackend().render(spec_from_config(config, load_config(config), user="op", program=PROGRAM)))["Service"]
    assert service["ProtectHome"] == "read-only" and service["ReadWritePaths"] == "/home/op/pki/TW"


def test_launchd_plist_from_the_config(tmp_path) -> None:
    """On Linux too (--platform launchd), the plist parses with plistlib and holds Label, ProgramArguments, RunAtLoad,
    KeepAlive, StandardOutPath and StandardErrorPath; --user adds UserName and GroupName."""
    config = gateway_config(tmp_path)
    out = tmp_path / "net.pkictl.agent.plist"
    result = run("--config", str(config), "--platform", "launchd", "--output", str(out), "--user", "_pkiagent")
    assert result.exit_code == 0 and "launchctl bootstrap system" in result.output
    plist = plistlib.loads(out.read_bytes())
    assert plist["Label"] == "net.pkictl.agent"
    assert plist["ProgramArguments"] == [str(PROGRAM.absolute()), "run", "--config", str(config)]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/usr/local/var/log/pki-agent.log"
    assert (plist["UserName"], plist["GroupName"]) == ("_pkiagent", "_pkiagent")
    shipped = plistlib.loads((ROOT / "launchd" / "net.pkictl.agent.plist").read_bytes())
    assert set(shipped) <= set(plist)


def test_dry_run_prints_and_writes_nothing(tmp_path) -> None:
    """--dry-run prints the unit and the path it would write, and creates no file."""
    out = tmp_path / "pki-agent.service"
    result = run("--config", str(gateway_config(tmp_path)), "--platform", "systemd", "--output", str(out), "--dry-run")
    assert result.exit_code == 0 and "ExecStart=" in result.output and f"would write {out}" in result.output
    assert not out.exists()


def test_refuses_anything_that_looks_like_a_secret(tmp_path) -> None:
    """A config whose path holds 'token' is refused with the line named, and nothing is written."""
    directory = tmp_path / "token"
    directory.mkdir()
    config = gateway_config(directory)
    out = tmp_path / "pki-agent.service"
    with pytest.raises(AgentError, match=r"looks like it holds a secret: line \d+ \(token\)"):
        install_service(config, backend=SystemdBackend(), user=None, output=out, program=PROGRAM, say=lambda _: None)
    assert not out.exists()


def test_existing_file_is_replaced_only_with_force(tmp_path) -> None:
    """A different existing unit is kept unless --force; the same content is rewritten silently."""
    out = tmp_path / "pki-agent.service"
    out.write_text("[Service]\nExecStart=/bin/true\n")
    config = str(gateway_config(tmp_path))
    result = CliRunner().invoke(cli, ["install-service", "--config", config, "--platform", "systemd", "--output", str(out)])
    assert result.exit_code == 1 and "--force" in result.output and out.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert run("--config", config, "--platform", "systemd", "--output", str(out), "--force").exit_code == 0
    assert run("--config", config, "--platform", "systemd", "--output", str(out)).exit_code == 0


def test_backend_is_chosen_in_one_place() -> None:
    """macOS gets launchd, Linux systemd, an explicit name wins, an unknown one is an error."""
    assert isinstance(backend_for(system="darwin"), LaunchdBackend)
    assert isinstance(backend_for(system="linux"), SystemdBackend)
    assert isinstance(backend_for("launchd", system="linux"), LaunchdBackend)
    with pytest.raises(AgentError, match="want one of systemd, launchd"):
        backend_for("upstart")


def test_fingerprints_are_not_secrets_and_redaction_hides_values() -> None:
    """A root fingerprint (sha256:<hex>, trust_anchor_sha256:) and the setting naming the passphrase
    file pass the scanner, a passphrase does not; a redacted line keeps its key, not its value."""
    digest = "ab" * 32
    assert find_secrets(f"trust_anchor_sha256: sha256:{digest}  # the root") == []
    assert find_secrets(f"trust_anchor_sha256: {digest}") == []
    assert [h.pattern for h in find_secrets(f"api_key: {digest}")] == ["API key", "hex string"]
    # the setting that names the CA passphrase's file is a pointer, the passphrase itself is not
    assert find_secrets("  ca_passphrase_file: /etc/pkictl/passphrase  # the CA keys are encrypted") == []
    assert [h.pattern for h in find_secrets("  ca_passphrase: correct-horse-battery-staple")] == ["passphrase"]
    assert redact("Environment=GATEWAY_TOKEN=abcdef0123456789") == "Environment=GATEWAY_TOKEN=<redacted>"
    assert redact("ExecStart=/bin/x --token hunter2 --verbose") == "ExecStart=/bin/x --token <redacted> --verbose"


def test_crl_refreshed_over_est_outside_the_bundle_is_writable(tmp_path) -> None:
    """A gateway renewing over EST keeps its CRL fresh by rewriting it, so the CRL's directory joins ReadWritePaths."""
    config = write_config(tmp_path / "agent.yaml", {
        "name": "gw", "kind": "gateway", "credential_dir": "/var/lib/pki-agent/gw", "renewal": {"ca_url": "https://ca.example.lan:8443"},
        "listener": {"listen": "0.0.0.0:8443", "upstream": "127.0.0.1:18789", "crl": "/var/lib/pki-agent/crl/crl.pem",
                     "allow": ["tw"]}})
    from pki_agent.config import load_config
    from pki_agent.service import spec_from_config

    spec = spec_from_config(config, load_config(config), user="pki-agent", program=PROGRAM)
    assert read_unit(SystemdBackend().render(spec))["Service"]["ReadWritePaths"] == "/var/lib/pki-agent/gw /var/lib/pki-agent/crl"
    assert "chown -R pki-agent: /var/lib/pki-agent/gw /var/lib/pki-agent/crl" in SystemdBackend().next_steps(Path("/x/pki-agent.service"), spec)


def test_api_keys_and_bearer_credentials_are_found_and_every_value_redacted() -> None:
    """An API key by its name (API_KEY=, ACCESS_KEY:) or by its form (sk-..., Bearer ...) is a hit, and
    redaction hides the value of a secret-named option wherever it sits, not the word after it."""
    assert [h.pattern for h in find_secrets("Environment=API_KEY=abc123")] == ["API key"]
    assert [h.pattern for h in find_secrets("aws_access_key: short")] == ["API key"]
    assert [h.pattern for h in find_secrets("ExecStart=/bin/client sk-proj-4f9Qx2Lm8Rt7")] == ["API key value"]
    assert [h.pattern for h in find_secrets("Environment=AUTH=Bearer eyJhbGciOi.x")] == ["bearer credential"]
    assert find_secrets("ExecStart=/usr/bin/ssh-keygen -t ed25519 --skip-checks") == []
    assert redact("ExecStart=/bin/x --gateway-token=VALUE --verbose") == "ExecStart=/bin/x --gateway-token=<redacted> --verbose"
    assert redact('Environment="API_KEY=sk-proj-4f9Qx2Lm8Rt7"') == 'Environment="API_KEY=<redacted>"'
    assert redact("ExecStart=/bin/client sk-proj-4f9Qx2Lm8Rt7 --verbose") == "ExecStart=/bin/client <redacted> --verbose"
