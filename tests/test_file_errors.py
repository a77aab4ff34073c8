"""Damaged PEM files (truncated, empty, garbage, a key where a certificate goes, a CRL where a
certificate goes) are refused naming the file, the defect and the fix: by ``pki-agent run`` at
start (no traceback), by a reload of the running agent (one ERROR line, the old state serving),
and by ``pkictl`` commands and ``pkictl serve``."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pkictl.authority import CertificateAuthority
from pkictl.settings import CASettings

from est_support import ServeProcess, curl, pkictl
from support import DEADLINE, AgentProcess, TLSClient, bundle_context, command


def _cut(data: bytes) -> bytes:
    """The file cut off at three quarters: inside its last PEM block (of one or of two)."""
    return data[: len(data) * 3 // 4]


def corrupt(path: Path, how: str, pki_files: dict[str, bytes]) -> None:
    """Damage ``path`` in one of the ways files really get damaged (in place: its mode stays)."""
    data = path.read_bytes()
    content = {
        "truncated": _cut(data),
        "empty": b"",
        "garbage": b"\x00\x17not a pem file at all\n" * 20,
        "key": pki_files["key"],
        "certificate": pki_files["certificate"],
        "crl": pki_files["crl"],
    }[how]
    with open(path, "wb") as stream:  # keep the inode and its mode (a key stays 0600)
        stream.write(content)


def _samples(bundle: Path, home: Path) -> dict[str, bytes]:
    version = bundle / os.readlink(bundle / "live")
    return {"key": (version / "privkey.pem").read_bytes(), "certificate": (version / "cert.pem").read_bytes(),
            "crl": (home / "crl.pem").read_bytes()}


@pytest.fixture
def gateway(tmp_path):
    """A CA home and gateway gw's bundle, its agent listening on 127.0.0.1 port 0."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings())
    bundle = ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"]).directory
    node = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    config = bundle / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gw", "kind": "gateway", "credential_dir": ".",
        "renewal": {"ca_home": str(tmp_path / "ca"), "check_interval": "1h"},
        "listener": {"listen": "127.0.0.1:0", "upstream": "127.0.0.1:9", "allow": ["*"], "crl": str(tmp_path / "ca" / "crl.pem")},
    }))
    return config, bundle, node, tmp_path / "ca"


# (file, how it is damaged, words the message must hold about the defect, words of the fix)
START_CASES = [
    ("ca.pem", "truncated", "is truncated", "root/cert.pem"),
    ("ca.pem", "empty", "is empty", "root/cert.pem"),
    ("ca.pem", "garbage", "is not PEM", "root/cert.pem"),
    ("ca.pem", "key", "holds a private key, not a certificate", "root/cert.pem"),
    ("ca.pem", "crl", "holds a CRL, not a certificate", "root/cert.pem"),
    ("fullchain.pem", "truncated", "is truncated", "cat cert.pem chain.pem > fullchain.pem"),
    ("fullchain.pem", "key", "holds a private key, not a certificate", "cat cert.pem chain.pem > fullchain.pem"),
    ("fullchain.pem", "certificate", "not cert.pem then chain.pem", "cat cert.pem chain.pem > fullchain.pem"),
    ("cert.pem", "crl", "holds a CRL, not a certificate", "--replace"),
    ("privkey.pem", "certificate", "holds a certificate, not a private key", "--replace"),
    ("privkey.pem", "truncated", "is truncated", "--replace"),
    ("privkey.pem", "empty", "is empty", "--replace"),
    ("crl.pem", "truncated", "is truncated", "pkictl sign-crl"),
    ("crl.pem", "certificate", "holds a certificate, not a CRL", "pkictl sign-crl"),
]


def _target(name: str, bundle: Path, home: Path) -> Path:
    if name == "ca.pem":
        return bundle / "ca.pem"
    if name == "crl.pem":
        return home / "crl.pem"
    return bundle / os.readlink(bundle / "live") / name


@pytest.mark.parametrize(("name", "how", "problem", "fix"), START_CASES, ids=[f"{c[0]}-{c[1]}" for c in START_CASES])
def test_agent_refuses_to_start_naming_the_damaged_file_and_the_fix(gateway, name, how, problem, fix):
    """pki-agent run with a damaged file exits 1 with one message: the file's path, what is wrong
    with it, and the fix; no traceback, no bare OpenSSL error."""
    config, bundle, _, home = gateway
    path = _target(name, bundle, home)
    corrupt(path, how, _samples(bundle, home))
    result = subprocess.run([command("pki-agent"), "run", "--config", str(config)], capture_output=True, text=True,
                            timeout=DEADLINE + 10)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and problem in result.stderr and "fix: " in result.stderr and fix in result.stderr, result.stderr
    assert "PEM lib" not in result.stderr and "_ssl.c" not in result.stderr


def test_agent_starts_with_intact_files(gateway):
    """Negative control: the same bundle, undamaged, starts and serves a node."""
    config, bundle, node, _ = gateway
    agent = AgentProcess(config)
    try:
        _, port = agent.wait_ready()
        client = TLSClient(port, bundle_context(node))
        client.close()
    finally:
        assert agent.stop() == 0


@pytest.mark.parametrize(("name", "how", "problem"), [
    ("ca.pem", "truncated", "is truncated"),
    ("ca.pem", "crl", "holds a CRL, not a certificate"),
    ("fullchain.pem", "garbage", "is not PEM"),
    ("crl.pem", "empty", "is empty"),
])
def test_reload_of_a_damaged_file_is_one_error_line_and_keeps_serving(pki, start_gateway_agent, caplog, name, how, problem):
    """A reload meeting a damaged file logs one ERROR naming the file and the fix (once, not at
    every check), and the listener keeps serving the old credential; once the file is restored,
    the reload succeeds."""
    running = start_gateway_agent()
    path = _target(name, pki.gateway, pki.home)
    original = path.read_bytes()
    corrupt(path, how, _samples(pki.gateway, pki.home))
    caplog.clear()
    if name == "fullchain.pem":  # inside the live version: no change the watcher sees, so SIGHUP's reload
        assert running.call(running.agent.reload) is False
    else:  # the watcher's and the periodic check's path (the check at start may run it too: said once)
        running.call(running.agent.reload_if_changed)
        running.call(running.agent.reload_if_changed)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert message.startswith("reload failed, still serving serial")
    assert str(path) in message and problem in message and "fix: " in message, message
    assert errors[0].exc_info is None
    client = TLSClient(running.port, bundle_context(pki.node))  # the old context still serves
    assert client.echo(b"still here") == b"still here"
    client.close()
    path.write_bytes(original)
    caplog.clear()
    assert running.call(running.agent.reload) is True
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("relative", "how", "problem"), [
    ("root/cert.pem", "truncated", "is truncated"),
    ("root/cert.pem", "key", "holds a private key, not a certificate"),
    ("issuing/cert.pem", "empty", "is empty"),
    ("issuing/key.pem", "certificate", "holds a certificate, not a private key"),
])
def test_pkictl_names_a_damaged_ca_file_and_the_fix(tmp_path, relative, how, problem):
    """pkictl commands that load the CA refuse a damaged CA file naming it, the defect and the
    fix (a backup of the CA home), with exit 1 and no traceback; intact, the same command works."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca")
    pkictl(home, "enroll-node", "TW", "--out", str(tmp_path / "TW"))  # negative control: intact, it works
    path = home / relative
    corrupt(path, how, {"key": (tmp_path / "TW" / "privkey.pem").read_bytes(),
                        "certificate": (tmp_path / "TW" / "cert.pem").read_bytes(), "crl": (home / "crl.pem").read_bytes()})
    result = pkictl(home, "enroll-node", "TX", "--out", str(tmp_path / "TX"), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and problem in result.stderr and "fix: restore it from a backup" in result.stderr, result.stderr


@pytest.mark.parametrize(("name", "how"), [("ca.pem", "truncated"), ("fullchain.pem", "key"), ("privkey.pem", "empty")])
def test_pkictl_serve_replaces_a_damaged_service_credential(tmp_path, name, how):
    """pkictl serve meets a damaged file of its own credential (<home>/service): it says which,
    makes it anew from the CA, and serves EST that curl verifies against the root."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca")
    first = ServeProcess(home)
    assert first.stop() == 0
    service = home / "service"
    path = _target(name, service, home)
    corrupt(path, how, {"key": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
                        "certificate": (home / "root" / "cert.pem").read_bytes(), "crl": (home / "crl.pem").read_bytes()})
    serve = ServeProcess(home)
    try:
        serve.log.wait_for(r"WARNING.*" + str(path).replace(".", r"\."))
        reply = curl(f"{serve.url}/.well-known/est/cacerts", cacert=home / "root" / "cert.pem")
        assert reply.returncode == 0 and reply.status == 200, reply.stderr
    finally:
        assert serve.stop() == 0
    assert "Traceback" not in serve.log.text()
