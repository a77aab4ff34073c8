"""credential_group: a consumer running as its own user (a Node.js gateway) reads the key through
its group, another unprivileged user cannot, and every install keeps it so; the doctor accepts
the configured group and still flags a key others can read. Run as root (CI is): the test makes
a real group and users and removes them."""

from __future__ import annotations

import asyncio
import datetime as dt
import grp
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from pki_agent.config import AgentConfig, RenewalConfig, load_config
from pki_agent.daemon import Agent
from pki_agent.errors import ConfigError
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.diagnosis.credential_checks import check_key_permissions
from pkictl.diagnosis.credential_facts import CredentialFacts

from support import DEADLINE, LogWatcher, TLSClient, bundle_context, refused, client_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes a group and users: run as root (CI does)")

# A TLS server as the consumer would run it: the key and certificate from the stable paths.
NODE_SERVER = """
const fs = require('fs'), tls = require('tls');
const [key, cert, ca] = process.argv.slice(1);
const server = tls.createServer({key: fs.readFileSync(key), cert: fs.readFileSync(cert), ca: fs.readFileSync(ca),
                                 requestCert: true, rejectUnauthorized: true}, (socket) => socket.end('hello from node\\n'));
server.listen(0, '127.0.0.1', () => console.log('listening ' + server.address().port));
"""


@pytest.fixture
def accounts():
    """A new group, a user in it (the consumer) and a user not in it; removed afterwards."""
    tag = secrets.token_hex(3)
    group, member, other = f"pkt{tag}", f"pkt{tag}m", f"pkt{tag}o"
    for tool in ("groupadd", "useradd", "runuser", "node"):
        assert shutil.which(tool), f"{tool} is required for the credential_group test (passwd, util-linux, nodejs)"
    made: list[list[str]] = []
    try:
        subprocess.run(["groupadd", group], check=True)
        made.append(["groupdel", group])
        for user, extra in ((member, ["-G", group]), (other, [])):
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, user], check=True)
            made.insert(0, ["userdel", user])
        yield group, member, other
    finally:
        for argv in made:
            subprocess.run(argv, check=False)


@pytest.fixture
def shared_dir():
    """A directory every user can enter (pytest's tmp_path is root's alone), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pkictl-group-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _as(user: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=DEADLINE)


def _node_server(user: str, gateway: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["runuser", "-u", user, "--", "node", "-e", NODE_SERVER, str(gateway / "privkey.pem"),
                             str(gateway / "fullchain.pem"), str(gateway / "ca.pem")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # runuser waits for node: stop the whole group
    match = LogWatcher(proc.stdout).wait_for(r"listening (\d+)")
    return proc, int(match.group(1))


def _modes(gateway: Path, gid: int) -> dict[str, tuple[int, int]]:
    version = gateway / os.readlink(gateway / "live")
    paths = {"dir": gateway, "archive": gateway / "archive", "version": version,
             **{name: version / name for name in ("privkey.pem", "combined.pem", "cert.pem", "fullchain.pem")}}
    return {name: (stat.S_IMODE(path.lstat().st_mode), path.lstat().st_gid == gid) for name, path in paths.items()}


def test_a_consumer_in_credential_group_serves_tls_and_others_cannot_read(accounts, shared_dir, tmp_path):
    """With credential_group, a Node.js TLS server run as a member of the group loads the gateway's
    key and serves node TW (a client without a certificate refused), another user gets EACCES; a
    rotation under the service's UMask=0077 keeps 0750 directories and 0640 keys of the group."""
    group, member, other = accounts
    gid = grp.getgrnam(group).gr_gid
    clock = FixedClock(dt.datetime.now(dt.timezone.utc))
    ca = CertificateAuthority.init(tmp_path / "ca", clock=clock)
    gateway = ca.enroll("gateway", "gw", out=shared_dir / "gw", ip_addresses=["127.0.0.1"]).directory
    node = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    assert _as(member, "cat", str(gateway / "privkey.pem")).returncode != 0  # 0700 as enrolled: the group is not in yet

    agent = Agent(AgentConfig(name="gw", kind="gateway", credential_dir=gateway, credential_group=group,
                              renewal=RenewalConfig(ca_home=tmp_path / "ca", jitter=0)), clock=clock)
    umask = os.umask(0o077)  # as systemd/pki-agent.service runs it
    try:
        assert agent.conform_layout() is True  # applied at start, as a new version of the same credential
        agent.reload()
        expected = {"dir": (0o750, True), "archive": (0o750, True), "version": (0o750, True), "privkey.pem": (0o640, True),
                    "combined.pem": (0o640, True), "cert.pem": (0o644, True), "fullchain.pem": (0o644, True)}
        assert _modes(gateway, gid) == expected
        first = agent.store.load().certificate

        proc, port = _node_server(member, gateway)
        try:
            client = TLSClient(port, bundle_context(node))
            assert client.server_serial() == first.serial_number
            assert client.sock.makefile("rb").readline() == b"hello from node\n"
            client.close()
            assert refused(port, client_context(node / "ca.pem"))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(DEADLINE)
        denied = _as(other, "node", "-e", f"require('fs').readFileSync({str(gateway / 'privkey.pem')!r})")
        assert denied.returncode != 0 and "EACCES" in denied.stdout + denied.stderr

        assert asyncio.run(agent.renew()) is True
    finally:
        os.umask(umask)
    second = agent.store.load().certificate
    assert second.serial_number != first.serial_number
    assert _modes(gateway, gid) == expected
    read = _as(member, "node", "-e", f"const c = require('crypto'), fs = require('fs'); "
               f"console.log(new c.X509Certificate(fs.readFileSync({str(gateway / 'cert.pem')!r})).checkPrivateKey("
               f"c.createPrivateKey(fs.readFileSync({str(gateway / 'privkey.pem')!r}))) ? 'match' : 'mismatch')")
    assert read.stdout.strip() == "match", read.stdout + read.stderr
    assert _as(other, "cat", str(gateway / "combined.pem")).returncode != 0

    facts = CredentialFacts(directory=gateway, now=clock.now(), kind="gateway", key_group=gid)
    assert list(check_key_permissions(facts)) == []  # the configured group is no error
    key = gateway / "live" / "privkey.pem"
    assert [f.problem for f in check_key_permissions(CredentialFacts(directory=gateway, now=clock.now(), kind="gateway"))][0] \
        == "mode 0640, readable by group or others"  # without credential_group it is
    key.chmod(0o644)
    assert [f.fix for f in check_key_permissions(facts)] == [f"chgrp {gid} {key.resolve()} && chmod 640 {key.resolve()}"]


def test_credential_group_must_exist(tmp_path):
    """A credential_group that is no group on this host fails the configuration at load, saying how to create it."""
    path = tmp_path / "agent.yaml"
    path.write_text("name: gw\nkind: gateway\ncredential_group: no-such-group-pkictl\n")
    with pytest.raises(ConfigError, match=r"credential_group: .*no group 'no-such-group-pkictl' on this host: create it \(groupadd"):
        load_config(path)
