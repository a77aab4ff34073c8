"""Protecting the CA as an operator meets it: encrypted keys, an offline root, key file modes,
and an audit log that detects editing -- all through the pkictl CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkictl.cli import cli

PASSPHRASE = "correct horse battery staple"


def pkictl(home: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["--home", str(home), *args], env=env or {"PKICTL_CA_PASSPHRASE": None})


@pytest.fixture
def passphrase_file(tmp_path) -> Path:
    path = tmp_path / "passphrase"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, PASSPHRASE.encode() + b"\n")
    os.close(fd)
    return path


def test_passphrase_encrypts_both_ca_keys_and_is_needed_to_sign(tmp_path, passphrase_file):
    """init-ca with --passphrase-file writes both CA keys as scrypt-encrypted PKCS#8; signing
    without the passphrase fails saying how to give it, with it (file or environment) works,
    and status needs no passphrase."""
    home = tmp_path / "ca"
    result = pkictl(home, "--passphrase-file", str(passphrase_file), "init-ca")
    assert result.exit_code == 0, result.output
    for part in ("root", "issuing"):
        pem = (home / part / "key.pem").read_bytes()
        assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert oct((home / part / "key.pem").stat().st_mode & 0o777) == "0o600"

    refused = pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW"))
    assert refused.exit_code == 1
    assert "--passphrase-file" in refused.output and "PKICTL_CA_PASSPHRASE" in refused.output
    assert not (tmp_path / "TW").exists()

    wrong = pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW"), env={"PKICTL_CA_PASSPHRASE": "not the passphrase at all"})
    assert wrong.exit_code == 1 and not (tmp_path / "TW").exists()

    assert pkictl(home, "--passphrase-file", str(passphrase_file), "enroll-node", "TW", "--out", str(tmp_path / "TW")).exit_code == 0
    by_env = pkictl(home, "enroll-node", "tw2", "--out", str(tmp_path / "tw2"), env={"PKICTL_CA_PASSPHRASE": PASSPHRASE})
    assert by_env.exit_code == 0, by_env.output
    assert pkictl(home, "status").exit_code == 0


def test_passphrase_file_readable_by_others_is_refused(tmp_path, passphrase_file):
    """A passphrase file with mode 0644 is refused before anything is created."""
    passphrase_file.chmod(0o644)
    result = pkictl(tmp_path / "ca", "--passphrase-file", str(passphrase_file), "init-ca")
    assert result.exit_code == 1 and "0600" in result.output
    assert not (tmp_path / "ca").exists()


def test_day_to_day_work_needs_no_root_key(tmp_path):
    """With the root key moved offline, enroll, revoke and status still work."""
    home = tmp_path / "ca"
    assert pkictl(home, "init-ca").exit_code == 0
    shutil.move(home / "root" / "key.pem", tmp_path / "offline-root-key.pem")
    assert pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW")).exit_code == 0
    assert pkictl(home, "enroll-gateway", "gw", "--ip", "127.0.0.1", "--out", str(tmp_path / "gw")).exit_code == 0
    assert pkictl(home, "revoke", "TW").exit_code == 0
    assert pkictl(home, "status").exit_code == 0


def test_group_readable_issuing_key_is_refused_with_the_fix(tmp_path):
    """An issuing key with mode 0640 is refused and the message says chmod 600."""
    home = tmp_path / "ca"
    assert pkictl(home, "init-ca").exit_code == 0
    (home / "issuing" / "key.pem").chmod(0o640)
    result = pkictl(home, "enroll-node", "TW")
    assert result.exit_code == 1 and "chmod 600" in result.output


def test_an_open_issuing_directory_or_a_key_of_another_account_is_refused(tmp_path):
    """An issuing/ directory of mode 0755, and an issuing key (0600) owned by another account,
    are refused with the fix (chmod 700, chown) before anything is issued, and pkictl doctor
    names each as a ca-keys error; the 0700 directory with this account's key is the control."""
    import json

    home = tmp_path / "ca"
    assert pkictl(home, "init-ca").exit_code == 0
    assert pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW")).exit_code == 0  # the control

    def doctor_problems() -> list[str]:
        result = pkictl(home, "doctor", "--json")
        return [f["problem"] for f in json.loads(result.output)["findings"] if f["check"] == "ca-keys" and f["severity"] == "error"]

    (home / "issuing").chmod(0o755)
    opened = pkictl(home, "enroll-node", "N2", "--out", str(tmp_path / "N2"))
    assert opened.exit_code == 1 and "has mode 0755, open to group or others" in opened.output and "chmod 700" in opened.output
    assert not (tmp_path / "N2").exists()
    assert any("mode 0755" in p for p in doctor_problems())
    (home / "issuing").chmod(0o700)

    os.chown(home / "issuing" / "key.pem", 65534, -1)  # nobody
    try:
        foreign = pkictl(home, "enroll-node", "N3", "--out", str(tmp_path / "N3"))
        assert foreign.exit_code == 1 and "belongs to uid 65534, not to this account" in foreign.output, foreign.output
        assert any("belongs to uid 65534" in p for p in doctor_problems())
    finally:
        os.chown(home / "issuing" / "key.pem", os.geteuid(), -1)
    assert pkictl(home, "enroll-node", "N4", "--out", str(tmp_path / "N4")).exit_code == 0


def test_audit_log_records_and_verifies_then_detects_an_edit(tmp_path):
    """init (and the root's first CRL), issuance, a refusal and a revocation are in the audit log; audit verify passes,
    then fails with the line number once a record is edited, and on truncation."""
    home = tmp_path / "ca"
    assert pkictl(home, "init-ca").exit_code == 0
    assert pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW")).exit_code == 0
    assert pkictl(home, "enroll-node", "../etc").exit_code == 1
    assert pkictl(home, "revoke", "TW", "--reason", "key-compromise").exit_code == 0
    records = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    assert [r["event"] for r in records] == ["init", "root-crl-signed", "issued", "refused", "revoked"]
    assert records[1]["number"] == 1 and records[1]["revoked"] == 0  # the root key signed the root's first CRL
    assert records[2]["name"] == "TW" and records[3]["subject"] == "../etc" and records[4]["reason"] == "key-compromise"

    ok = pkictl(home, "audit", "verify")
    assert ok.exit_code == 0 and "5 records" in ok.output
    head = pkictl(home, "audit", "head").output.strip()
    assert pkictl(home, "audit", "verify", "--anchor", head).exit_code == 0

    log = home / "audit.log"
    original = log.read_bytes()
    log.write_bytes(original.replace(b'"name":"TW"', b'"name":"TX"', 1))
    edited = pkictl(home, "audit", "verify")
    assert edited.exit_code == 1 and "line 3" in edited.output

    log.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))
    truncated = pkictl(home, "audit", "verify")
    assert truncated.exit_code == 1 and "truncated" in truncated.output


def test_a_bundle_renewing_with_an_encrypted_ca_home_names_the_passphrase_file(tmp_path, passphrase_file):
    """enroll-gateway without --ca-url on an encrypted CA writes renewal.ca_passphrase_file (the
    file it was given), and the bundle's agent renews with it (pki-agent renew-now, no daemon);
    without that line the same renewal fails; with the passphrase from the environment instead,
    the command warns that the agent needs it and how to give it."""
    import subprocess

    import yaml

    from pki_agent.config import load_config

    from support import command

    home = tmp_path / "ca"
    assert pkictl(home, "--passphrase-file", str(passphrase_file), "init-ca").exit_code == 0
    result = pkictl(home, "--passphrase-file", str(passphrase_file), "enroll-gateway", "gw", "--ip", "127.0.0.1",
                    "--listen", "127.0.0.1:0", "--out", str(tmp_path / "gw"))
    assert result.exit_code == 0, result.output
    config_path = tmp_path / "gw" / "agent.yaml"
    assert load_config(config_path).renewal.ca_passphrase_file == passphrase_file.resolve()
    env = {k: v for k, v in os.environ.items() if k != "PKICTL_CA_PASSPHRASE"}
    renewed = subprocess.run([command("pki-agent"), "renew-now", "--config", str(config_path)], capture_output=True, text=True,
                             timeout=60, env=env)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr

    data = yaml.safe_load(config_path.read_text())
    del data["renewal"]["ca_passphrase_file"]
    config_path.write_text(yaml.safe_dump(data))
    failed = subprocess.run([command("pki-agent"), "renew-now", "--config", str(config_path)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert failed.returncode == 1 and "passphrase" in (failed.stdout + failed.stderr).lower()

    warned = CliRunner().invoke(cli, ["--home", str(home), "enroll-node", "TW", "--out", str(tmp_path / "TW")],
                                env={"PKICTL_CA_PASSPHRASE": PASSPHRASE})
    assert warned.exit_code == 0, warned.output
    assert "the agent of TW needs it too: set renewal.ca_passphrase_file" in warned.output
    assert load_config(tmp_path / "TW" / "agent.yaml").renewal.ca_passphrase_file is None
