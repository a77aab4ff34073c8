"""The pkictl CLI in-process (click's CliRunner): init-ca, enroll-node, enroll-gateway and status,
their files and output, and how operator errors turn into messages and exit statuses."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkictl.cli import cli
from pki_agent.config import load_config
from pki_agent.errors import ConfigError
from pkictl.store import CredentialStore

STATUS_FIELDS = {"name", "kind", "serial", "not_after", "days_left", "renewal_due", "state", "attention"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "ca"


def run(runner: CliRunner, home: Path, *args: str, env: dict | None = None):
    """Invoke ``pkictl --home HOME ARGS`` (PKICTL_HOME removed so that nothing reaches the real home)."""
    return runner.invoke(cli, ["--home", str(home), *args], env={"PKICTL_HOME": None, **(env or {})})


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture
def ca_home(runner, home) -> Path:
    _ok(run(runner, home, "init-ca"))
    return home


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# -- init-ca ---------------------------------------------------------------------------------------


def test_init_ca_creates_a_ca_and_prints_the_root_fingerprint(runner, home):
    """init-ca --home creates ca.yaml, the root and issuing CA, and prints the trust anchor's SHA-256 fingerprint."""
    output = _ok(run(runner, home, "init-ca", "--trust-domain", "example.lan", "--node-lifetime", "30d"))
    assert (home / "ca.yaml").is_file()
    root = x509.load_pem_x509_certificate((home / "ca.pem").read_bytes())
    assert f"sha256:{root.fingerprint(hashes.SHA256()).hex()}" in output
    assert str(home) in output
    settings = (home / "ca.yaml").read_text()
    assert "trust_domain: example.lan" in settings and "node_lifetime: 30d" in settings


def test_init_ca_twice_fails(runner, ca_home):
    """A second init-ca on the same home exits 1 with a message that the CA exists, and changes nothing."""
    before = (ca_home / "ca.pem").read_bytes()
    result = run(runner, ca_home, "init-ca")
    assert result.exit_code == 1
    assert "exists" in result.output
    assert "Traceback" not in result.output
    assert (ca_home / "ca.pem").read_bytes() == before


@pytest.mark.parametrize("value", ["0s", "0", "-1d", "5w", "soon"])
def test_bad_node_lifetime_is_a_usage_error(runner, home, value):
    """init-ca --node-lifetime with a zero, negative or malformed duration exits 2 naming the option and creates no CA."""
    result = run(runner, home, "init-ca", "--node-lifetime", value)
    assert result.exit_code == 2
    assert "--node-lifetime" in result.output
    assert not (home / "ca.yaml").exists()


@pytest.mark.parametrize("args", [("--renewal-fraction", "1"), ("--trust-domain", "Bad_Domain"), ("--node-lifetime", "3650d")])
def test_contradictory_settings_exit_1(runner, home, args):
    """init-ca with settings that contradict (fraction 1, bad trust domain, leaf outliving the issuing CA) exits 1 and creates no CA."""
    result = run(runner, home, "init-ca", *args)
    assert result.exit_code == 1, result.output
    assert "Error" in result.output
    assert not (home / "ca.yaml").exists()


# -- enroll ----------------------------------------------------------------------------------------


def test_enroll_node_writes_a_bundle_the_agent_accepts(runner, ca_home):
    """enroll-node TW writes <home>/bundles/TW with a credential and an agent.yaml that load_config accepts as node TW."""
    output = _ok(run(runner, ca_home, "enroll-node", "TW"))
    bundle = ca_home / "bundles" / "TW"
    config = load_config(bundle / "agent.yaml")
    assert (config.kind, config.name) == ("node", "TW")
    assert config.listener is None
    assert config.credential_dir == bundle.resolve()
    assert config.renewal.ca_home == ca_home.resolve()
    assert config.trust_domain == "pkictl.internal"

    credential = CredentialStore(config.credential_dir).load()
    cert = credential.certificate
    assert _cn(cert) == "TW"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert f"{cert.serial_number:x}" in output
    assert "pki-agent run --config" in output


def test_enroll_node_with_out(runner, ca_home, tmp_path):
    """enroll-node --out writes the bundle there and not under <home>/bundles."""
    out = tmp_path / "elsewhere"
    _ok(run(runner, ca_home, "enroll-node", "node-07", "--out", str(out)))
    assert load_config(out / "agent.yaml").name == "node-07"
    assert not (ca_home / "bundles" / "node-07").exists()


def test_enroll_gateway_with_dns_and_ip(runner, ca_home):
    """enroll-gateway --dns --ip issues a serverAuth (and clientAuth, to renew) certificate with exactly those SANs and an agent.yaml with a listener."""
    _ok(run(runner, ca_home, "enroll-gateway", "gw", "--dns", "gw.example.lan", "--ip", "127.0.0.1", "--ip", "::1", "--listen", "127.0.0.1:0"))
    bundle = ca_home / "bundles" / "gw"
    config = load_config(bundle / "agent.yaml")
    assert (config.kind, config.name) == ("gateway", "gw")
    assert config.listener.listen == ("127.0.0.1", 0)
    assert config.listener.upstream == ("127.0.0.1", 18789)
    cert = CredentialStore(bundle).load().certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.example.lan"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def test_enroll_gateway_writes_an_explicit_allow_list(runner, ca_home):
    """Without --allow the bundle's listener says allow: ['*'] and the output says so; with
    --allow the list holds exactly those nodes, lower case; an invalid --allow is a usage error."""
    assert "every node of this CA" in _ok(run(runner, ca_home, "enroll-gateway", "gw", "--ip", "127.0.0.1"))
    assert "allow: ['*']" in (ca_home / "bundles" / "gw" / "agent.yaml").read_text()
    assert load_config(ca_home / "bundles" / "gw" / "agent.yaml").listener.allowed_names is None
    output = _ok(run(runner, ca_home, "enroll-gateway", "gw2", "--ip", "127.0.0.1", "--allow", "TW", "--allow", "node-7"))
    assert load_config(ca_home / "bundles" / "gw2" / "agent.yaml").listener.allowed_names == {"tw", "node-7"}
    assert "lets through: tw, node-7" in output
    bad = run(runner, ca_home, "enroll-gateway", "gw3", "--ip", "127.0.0.1", "--allow", "not a name")
    assert bad.exit_code == 2 and "--allow" in bad.output and not (ca_home / "bundles" / "gw3").exists()


def test_listener_without_allow_does_not_load(tmp_path):
    """A hand-written listener section without allow is refused at load time, naming the field
    and the two ways to fill it, instead of letting every node in."""
    config = tmp_path / "agent.yaml"
    config.write_text("name: gw\nkind: gateway\nlistener:\n  listen: 127.0.0.1:8443\n  upstream: 127.0.0.1:18789\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert "listener.allow" in str(error.value) and "['*']" in str(error.value)


def test_enroll_gateway_without_names_fails(runner, ca_home):
    """enroll-gateway with neither --dns nor --ip exits 1 saying which option is needed, and writes no bundle."""
    result = run(runner, ca_home, "enroll-gateway", "gw")
    assert result.exit_code == 1
    assert "--dns" in result.output
    assert not (ca_home / "bundles" / "gw").exists()


def test_enroll_gateway_bad_listen_address_is_a_usage_error(runner, ca_home):
    """enroll-gateway --listen without a port exits 2 naming --listen, before anything is issued."""
    result = run(runner, ca_home, "enroll-gateway", "gw", "--ip", "10.0.0.1", "--listen", "0.0.0.0")
    assert result.exit_code == 2
    assert "--listen" in result.output
    assert not (ca_home / "bundles" / "gw").exists()


@pytest.mark.parametrize("args", [["a b"], ["../x"], ["tw,O=admins"], ["x" * 64], ["tw-"], ["--", "-tw"]])
def test_enroll_node_bad_name_says_what_a_name_may_contain(runner, ca_home, args):
    """enroll-node with an invalid name exits 1 explaining that a name is letters, digits and hyphens, with no traceback and no bundle."""
    result = run(runner, ca_home, "enroll-node", *args)
    assert result.exit_code == 1
    assert "ASCII letters, digits and hyphens" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert not (ca_home / "bundles").exists()


def test_enroll_node_already_enrolled_fails(runner, ca_home, tmp_path):
    """enroll-node of a name enrolled already (in another case) exits 1 saying it is already enrolled."""
    _ok(run(runner, ca_home, "enroll-node", "TW"))
    result = run(runner, ca_home, "enroll-node", "tw", "--out", str(tmp_path / "again"))
    assert result.exit_code == 1
    assert "already enrolled" in result.output
    assert not (tmp_path / "again").exists()


# -- status ----------------------------------------------------------------------------------------


@pytest.fixture
def enrolled_home(runner, ca_home) -> Path:
    _ok(run(runner, ca_home, "enroll-node", "TW"))
    _ok(run(runner, ca_home, "enroll-gateway", "gw", "--dns", "gw.example.lan", "--ip", "127.0.0.1"))
    return ca_home


def test_status_json(runner, enrolled_home):
    """status --json lists root, issuing CA, gateway, node and the CRLs (the issuing CA's, then the
    root's) with name, kind, serial, not_after, days_left, renewal_due, state and attention."""
    rows = json.loads(_ok(run(runner, enrolled_home, "status", "--json")))
    assert [r["kind"] for r in rows] == ["root", "issuing", "gateway", "node", "crl", "crl"]
    assert [r["name"] for r in rows][-2:] == [rows[1]["name"], rows[0]["name"]]
    for row in rows:
        assert set(row) == STATUS_FIELDS
        assert row["state"] == "ok" and row["attention"] == 0
        not_after = dt.datetime.fromisoformat(row["not_after"])
        due = dt.datetime.fromisoformat(row["renewal_due"])
        assert due < not_after
        assert isinstance(row["days_left"], (int, float))
        if row["kind"] == "crl":
            assert row["serial"] == "#1"  # the CRL number of the first CRL, signed by init-ca
        else:
            int(row["serial"], 16)
    by_kind = {r["kind"]: r for r in rows}
    node = CredentialStore(enrolled_home / "bundles" / "TW").load().certificate
    assert by_kind["node"]["name"] == "TW"
    assert by_kind["node"]["serial"] == f"{node.serial_number:x}"
    assert dt.datetime.fromisoformat(by_kind["node"]["not_after"]) == node.not_valid_after_utc
    assert 89.9 < by_kind["node"]["days_left"] <= 90
    assert by_kind["gateway"]["name"] == "gw"
    # renewal at 2/3 of the 90-day lifetime: 60 days after notBefore
    assert dt.datetime.fromisoformat(by_kind["node"]["renewal_due"]) == node.not_valid_before_utc + dt.timedelta(days=60)


def test_status_table_has_a_row_per_certificate(runner, enrolled_home):
    """status prints a header and one row per certificate (root, issuing CA, gateway, node) and
    per CRL, each with its kind and serial."""
    rows = json.loads(_ok(run(runner, enrolled_home, "status", "--json")))
    lines = _ok(run(runner, enrolled_home, "status")).splitlines()
    assert lines[0].split()[:3] == ["NAME", "KIND", "SERIAL"]
    assert len(lines) == 1 + 6
    for line, row in zip(lines[1:], rows, strict=True):
        assert line.startswith(row["name"])
        assert f" {row['kind']} " in line
        assert row["serial"][:16] in line
        assert line.endswith(row["state"])


def test_status_without_a_ca_fails(runner, tmp_path):
    """status with no CA in the home exits 1 and tells the operator to run init-ca."""
    result = run(runner, tmp_path / "nothing", "status")
    assert result.exit_code == 1
    assert "init-ca" in result.output
    assert "Traceback" not in result.output


# -- PKICTL_HOME ---------------------------------------------------------------------------------


def test_pkictl_home_env_var_is_honoured(runner, tmp_path):
    """Without --home, PKICTL_HOME picks the CA home for init-ca, enroll-node and status; --home overrides it."""
    home = tmp_path / "from-env"
    env = {"PKICTL_HOME": str(home)}
    _ok(runner.invoke(cli, ["init-ca"], env=env))
    assert (home / "ca.yaml").is_file()
    _ok(runner.invoke(cli, ["enroll-node", "TW"], env=env))
    assert (home / "bundles" / "TW" / "agent.yaml").is_file()
    rows = json.loads(_ok(runner.invoke(cli, ["status", "--json"], env=env)))
    assert [r["name"] for r in rows if r["kind"] == "node"] == ["TW"]

    # control: another PKICTL_HOME has no CA, and an explicit --home wins over the variable
    empty = tmp_path / "empty"
    result = runner.invoke(cli, ["status"], env={"PKICTL_HOME": str(empty)})
    assert result.exit_code == 1 and str(empty) in result.output
    _ok(runner.invoke(cli, ["--home", str(home), "status"], env={"PKICTL_HOME": str(empty)}))


def test_serve_on_any_loopback_address_needs_no_names_and_a_wider_listen_does(runner, ca_home, tmp_path):
    """'pkictl serve --listen 127.0.0.2:0' (all of 127/8 is loopback) starts without --dns/--ip and
    names itself by that address; --listen 0.0.0.0:0 without names is refused before anything
    starts, saying which options give them."""
    import os
    import subprocess

    from support import DEADLINE, LogWatcher, close_pipes, command

    refused = run(runner, ca_home, "serve", "--listen", "0.0.0.0:0")
    assert refused.exit_code == 2 and "give the --dns names or --ip addresses nodes dial" in refused.output
    proc = subprocess.Popen([command("pkictl"), "--home", str(ca_home), "serve", "--listen", "127.0.0.2:0", "--workers", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        LogWatcher(proc.stderr).wait_for(r"ready: EST on https://127\.0\.0\.2:\d+")
    finally:
        proc.terminate()
        assert proc.wait(DEADLINE) == 0
        close_pipes(proc)


def test_sign_crl_command_re_signs_the_issuing_crl_and_keeps_the_roots(runner, ca_home):
    """'pkictl sign-crl' writes crl.pem anew: the issuing CA's CRL signed again with the next CRL
    number and the revoked serial still listed, the root's CRL
    carried byte for byte; it says what it signed, kept and wrote. Without a CA it exits 1.

    Mutation: the command's ``ca.sign_crl()`` replaced by ``load_crls(ca.crl_path)`` (nothing
    signed) fails the CRL-number check."""
    from cryptography.hazmat.primitives import serialization

    from pkictl.crl import crl_number, load_crls

    _ok(run(runner, ca_home, "enroll-node", "TW"))
    revoked = _ok(run(runner, ca_home, "revoke", "TW"))
    serial = int(revoked.split("serial ")[1].split()[0], 16)
    crl_path = ca_home / "crl.pem"
    before = load_crls(crl_path)

    output = _ok(run(runner, ca_home, "sign-crl"))

    after = load_crls(crl_path)
    assert len(after) == len(before) == 2  # the issuing CA's, then the root's
    (old_issuing, old_root), (issuing, root) = before, after
    assert issuing.issuer == old_issuing.issuer and crl_number(issuing) == crl_number(old_issuing) + 1
    der = serialization.Encoding.DER
    assert issuing.public_bytes(der) != old_issuing.public_bytes(der)
    assert issuing.get_revoked_certificate_by_serial_number(serial) is not None
    assert root.public_bytes(der) == old_root.public_bytes(der)
    assert f"signed the CRL of {issuing.issuer.rfc4514_string()}: 1 revoked, next update {issuing.next_update_utc.isoformat()}" in output
    assert f"kept the root's CRL: next update {root.next_update_utc.isoformat()}" in output
    assert f"written to {crl_path}" in output

    missing = run(runner, ca_home.parent / "nothing-here", "sign-crl")
    assert missing.exit_code == 1 and str(ca_home.parent / "nothing-here") in missing.output
