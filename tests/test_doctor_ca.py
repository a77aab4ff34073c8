"""pkictl doctor on a CA home: healthy reports nothing, each broken state exactly its problem, and nothing is ever changed."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess

from cryptography.hazmat.primitives import serialization

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.diagnosis.crl_checks import crl_findings
from pkictl.diagnosis.doctor import diagnose_ca
from pkictl.pem import private_key_to_pem
from pkictl.profile import generate_key
from pkictl.revocation import build_crl, load_crls
from pkictl.est.serve import ESTService
from pkictl.settings import CASettings

from doctor_support import only, problems, replace_file, snapshot
from support import command

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts
PASSPHRASE = b"correct horse battery staple"


def doctor(pki, *, now=None, **kwargs):
    return diagnose_ca(pki.home, clock=FixedClock(now or NOW), **kwargs)


def test_healthy_ca_reports_nothing_and_changes_nothing(pki) -> None:
    """A CA with a gateway, a node and a revocation passes every check, and its home is byte for byte the same afterwards."""
    pki.ca.enroll("node", "gone", out=pki.home.parent / "gone")
    pki.ca.revoke("gone")
    before = snapshot(pki.home.parent)
    findings = doctor(pki)
    assert problems(findings) == []
    assert {f.check for f in findings} >= {"ca-home", "ca-keys", "ca-certificates", "crl", "crl-inventory", "inventory", "audit-log",
                                          "service-credential", "service-files"}
    assert snapshot(pki.home.parent) == before


def test_no_ca_is_one_error(tmp_path) -> None:
    """A directory without a CA is one ca-home error pointing at --home."""
    assert "--home" in only(diagnose_ca(tmp_path, clock=FixedClock(NOW)), "ca-home").fix


def test_issuing_key_readable_by_others(pki) -> None:
    """issuing/key.pem at 0644 is exactly one ca-keys error with chmod 600 as the fix; the doctor does not chmod it."""
    key = pki.home / "issuing" / "key.pem"
    key.chmod(0o644)
    found = only(doctor(pki), "ca-keys")
    assert found.fix == f"chmod 600 {key}" and oct(key.stat().st_mode & 0o777) == "0o644"


def test_issuing_key_swapped(pki) -> None:
    """Another (0600) key in issuing/key.pem is exactly one ca-keys error saying it does not match the certificate."""
    replace_file(pki.home / "issuing" / "key.pem", private_key_to_pem(generate_key()), 0o600)
    assert "does not match" in only(doctor(pki), "ca-keys").problem


def test_encrypted_keys_are_checked_only_with_the_passphrase(tmp_path) -> None:
    """Encrypted CA keys: without the passphrase an ok note, with it a real match check, with a wrong one an error."""
    CertificateAuthority.init(tmp_path / "ca", CASettings(), passphrase=PASSPHRASE).close()
    clock = FixedClock(NOW)
    notes = [f.problem for f in diagnose_ca(tmp_path / "ca", clock=clock) if f.check == "ca-keys"]
    assert len(notes) == 2 and all(n.startswith("encrypted") for n in notes)
    assert problems(diagnose_ca(tmp_path / "ca", clock=clock, passphrase=PASSPHRASE)) == []
    wrong = diagnose_ca(tmp_path / "ca", clock=clock, passphrase=b"not the passphrase at all")
    assert problems(wrong) == [("ca-keys", "error"), ("ca-keys", "error")]


def test_trust_anchor_file_replaced(pki) -> None:
    """ca.pem holding the issuing CA instead of the root is exactly one ca-certificates error."""
    shutil.copy(pki.home / "issuing" / "cert.pem", pki.home / "ca.pem")
    assert "not the root" in only(doctor(pki), "ca-certificates").problem


def test_issuing_ca_about_to_refuse_issuance(tmp_path) -> None:
    """An issuing CA of 100 days with 90-day leaves refuses issuance in 10 days: a ca-certificates warning now, an error once refused."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(issuing_lifetime=dt.timedelta(days=100)))
    ca.close()
    found = only(diagnose_ca(tmp_path / "ca", clock=FixedClock(NOW)), "ca-certificates")
    assert found.severity.label == "warning" and found.fix == "pkictl rotate-issuing"
    later = [f for f in diagnose_ca(tmp_path / "ca", clock=FixedClock(NOW + dt.timedelta(days=11))) if f.check == "ca-certificates"]
    assert [f.severity.label for f in later] == ["error"] and "refused now" in later[0].problem


def test_crl_expired_by_the_clock(pki) -> None:
    """Judged one second after the CRL's nextUpdate (7 days on), crl.pem is exactly one crl error naming pkictl sign-crl."""
    crl = load_crls(pki.ca.crl_path)[0]
    found = only(doctor(pki, now=crl.next_update_utc + dt.timedelta(seconds=1)), "crl")
    assert "expired at" in found.problem and "pkictl sign-crl" in found.fix
    middle = crl.last_update_utc + (crl.next_update_utc - crl.last_update_utc) / 2
    assert problems(doctor(pki, now=middle - dt.timedelta(seconds=1))) == []
    assert only(doctor(pki, now=middle + dt.timedelta(seconds=1)), "crl").severity.label == "warning"


def test_crl_findings_states(pki, tmp_path) -> None:
    """crl_findings: fresh passes; past half a warning; thisUpdate ahead of the clock a warning; a forged CRL and a missing file errors."""
    crl = load_crls(pki.ca.crl_path)[0]
    issuers = [pki.ca.issuing]
    middle = crl.last_update_utc + (crl.next_update_utc - crl.last_update_utc) / 2
    assert crl_findings(pki.ca.crl_path, issuers, NOW, fix="f") == []
    assert [f.severity.label for f in crl_findings(pki.ca.crl_path, issuers, middle, fix="f")] == ["warning"]
    early = crl_findings(pki.ca.crl_path, issuers, crl.last_update_utc - dt.timedelta(minutes=10), fix="f")
    assert [f.severity.label for f in early] == ["warning", "warning"] and "clocks disagree" in early[0].problem  # and the root's
    forged = build_crl(issuer=pki.ca.issuing, issuer_key=generate_key(), revoked=[], number=99, now=NOW, lifetime=dt.timedelta(days=7))
    path = tmp_path / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    assert "does not verify" in crl_findings(path, issuers, NOW, fix="f")[0].problem
    assert "no CRL file" in crl_findings(tmp_path / "none.pem", issuers, NOW, fix="f")[0].problem


def test_older_crl_restored_misses_a_revocation(pki) -> None:
    """crl.pem put back to before pkictl revoke TW: crl-inventory names the revoked serial missing (error) and the older CRL number (warning)."""
    old = pki.ca.crl_path.read_bytes()
    [record] = pki.ca.revoke("TW")
    pki.ca.crl_path.write_bytes(old)
    findings = doctor(pki)
    assert problems(findings) == [("crl-inventory", "warning"), ("crl-inventory", "error")]
    assert [f.subject for f in findings if f.severity.label == "error"] == [f"serial {record.serial:x}"]


def test_node_expiring_in_the_inventory(tmp_path) -> None:
    """A 1-day node certificate judged 2 hours before its end is one inventory warning; after its end an error with --replace as the fix."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(node_lifetime=dt.timedelta(days=1)))
    cert = ca.enroll("node", "TW", out=tmp_path / "TW").certificate
    ca.close()
    found = only(diagnose_ca(tmp_path / "ca", clock=FixedClock(cert.not_valid_after_utc - dt.timedelta(hours=2))), "inventory")
    assert found.severity.label == "warning" and found.subject.startswith("node TW") and "pki-agent doctor" in found.fix
    found = only(diagnose_ca(tmp_path / "ca", clock=FixedClock(cert.not_valid_after_utc + dt.timedelta(seconds=1))), "inventory")
    assert found.severity.label == "error" and "pkictl enroll-node TW --replace" in found.fix


def test_audit_log_edited(pki) -> None:
    """One edited byte in audit.log is exactly one audit-log error."""
    log = pki.home / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"name":"TW"', b'"name":"TX"', 1))
    assert "does not verify" in only(doctor(pki), "audit-log").problem


def test_est_service_credential(pki) -> None:
    """The EST service's own credential passes once pkictl serve made it; its key at 0644 is a service-key-permissions error."""
    ESTService(pki.ca, listen=("127.0.0.1", 0)).ensure_credential()
    assert problems(doctor(pki)) == []
    key = pki.home / "service" / os.readlink(pki.home / "service" / "live") / "privkey.pem"
    key.chmod(0o644)
    assert only(doctor(pki), "service-key-permissions").fix == f"chmod 600 {key}"


def test_unit_with_a_token(pki, tmp_path) -> None:
    """A unit setting a token is one service-files error naming the file, the line and the patterns, but not the token itself."""
    unit = tmp_path / "pkictl-serve.service"
    secret = "s3cr3tVALUEabcdefghijklmnopqrstuv12"
    unit.write_text(f"[Service]\nExecStart=/usr/local/bin/pkictl serve\nEnvironment=GATEWAY_TOKEN={secret}\n")
    found = only(doctor(pki, service_files=[unit]), "service-files")
    assert found.subject == f"{unit} line 3" and "token" in found.problem and "GATEWAY_TOKEN=<redacted>" in found.problem
    assert secret not in found.line()
    unit.write_text("[Service]\nExecStart=/usr/local/bin/pkictl --passphrase-file /etc/pkictl/passphrase serve\n")
    assert problems(doctor(pki, service_files=[unit])) == []


def test_every_reported_value_is_redacted_and_environment_files_are_scanned(pki, tmp_path) -> None:
    """The installed pkictl doctor, run as a process on a unit with --gateway-token=VALUE, an
    API_KEY=sk-... and an EnvironmentFile= holding a token, reports each line without its value
    (and keeps the option after it); a clean EnvironmentFile= and an absent optional one add nothing."""
    token, api_key, env_token = "hunter2hunter2", "sk-proj-4f9Qx2Lm8Rt7Vw1Zb6Nc", "envfileTOKENvalue77"
    env = tmp_path / "gateway.env"
    env.write_text(f"# the gateway's environment\nOPENCLAW_GATEWAY_TOKEN={env_token}\n")
    unit = tmp_path / "pkictl-serve.service"
    unit.write_text("[Service]\n"
                    f"ExecStart=/usr/local/bin/gateway --gateway-token={token} --verbose\n"
                    f'Environment="API_KEY={api_key}"\n'
                    f"EnvironmentFile=-{env}\n"
                    f"EnvironmentFile=-{tmp_path / 'absent.env'}\n")
    run = subprocess.run([command("pkictl"), "--home", str(pki.home), "doctor", "--all", "--unit", str(unit)],
                         capture_output=True, text=True, timeout=60)
    report = run.stdout + run.stderr
    for secret in (token, api_key, env_token):
        assert secret not in report
    assert "--gateway-token=<redacted> --verbose" in report
    assert "API_KEY=<redacted>" in report
    assert f"{env} line 2" in report and "OPENCLAW_GATEWAY_TOKEN=<redacted>" in report
    assert "absent.env" not in report
    assert run.returncode != 0
    env.write_text("LOG_LEVEL=info\n")
    unit.write_text(f"[Service]\nExecStart=/usr/local/bin/pkictl serve\nEnvironmentFile={env}\n")
    assert problems(doctor(pki, service_files=[unit])) == []


def test_rotated_issuing_ca_needs_the_crl_of_both(pki) -> None:
    """After pkictl rotate-issuing the CA is healthy with two CRLs in crl.pem; a crl.pem holding only the new one is a crl-inventory error."""
    old = pki.ca.issuing
    pki.ca.rotate_issuing()
    assert problems(doctor(pki)) == []
    crls = load_crls(pki.ca.crl_path)
    assert len(crls) == 3  # both issuing CAs' and the root's
    pki.ca.crl_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls if c.issuer != old.subject))
    found = only(doctor(pki), "crl-inventory")
    assert found.problem.startswith("no CRL of pkictl Issuing CA") and "which the inventory says is active" in found.problem
