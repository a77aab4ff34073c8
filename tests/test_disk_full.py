"""A full disk (a real tmpfs of 256 KiB) or a file size limit (RLIMIT_FSIZE) during a renewal:
the message names the path and the fix, the live credential is unchanged and still loads, the
half-written version and temporary files are gone, and after space is freed the next renewal
succeeds; leftovers of a killed write are removed at the next start."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pkictl.authority import CertificateAuthority
from pkictl.settings import CASettings
from pkictl.store import CredentialStore

from support import DEADLINE, AgentProcess, command

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test, unmounted whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, *, leave_pages: int) -> list[Path]:
    """Fill ``disk`` but ``leave_pages`` pages; returns the filler files (delete them to free space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        spacers = []
        for number in range(leave_pages):  # one page each, freed below
            spacer = disk / f"spacer{number}"
            spacer.write_bytes(b"x")
            spacers.append(spacer)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * PAGE)
    finally:
        os.close(fd)
    for spacer in spacers:
        spacer.unlink()
    return [filler]


def _node(tmp_path: Path, disk: Path) -> tuple[Path, Path, Path]:
    """A CA (on the normal disk) and node TW's bundle on ``disk``; returns (home, bundle, config)."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings())
    bundle = ca.enroll("node", "TW", out=disk / "TW").directory
    ca.close()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "credential_dir": str(bundle),
                                      "renewal": {"ca_home": str(tmp_path / "ca"), "check_interval": "1h"}}))
    return tmp_path / "ca", bundle, config


def renew_now(config: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([command("pki-agent"), "renew-now", "--config", str(config)], capture_output=True, text=True,
                          timeout=DEADLINE + 10, **kwargs)


def leftovers(bundle: Path) -> list[str]:
    """Temporary files and archive versions other than the live one."""
    live = os.readlink(bundle / "live")
    temps = [p.name for p in bundle.iterdir() if p.name.endswith(".tmp")]
    versions = [f"archive/{p.name}" for p in (bundle / "archive").iterdir() if f"archive/{p.name}" != live]
    return temps + versions


@needs_root
@pytest.mark.parametrize("leave_pages", [1, 4], ids=["room-for-the-pid-file", "room-for-two-files-more"])
def test_renewal_on_a_full_disk_names_the_path_and_leaves_live_intact(tmp_path, small_disk, leave_pages):
    """renew-now on a full tmpfs fails naming the file it could not write and the fix (df -h, then
    renew-now); live still points at the old, loadable version, no half-written version or
    temporary file is left; after freeing space renew-now succeeds and installs a new serial."""
    home, bundle, config = _node(tmp_path, small_disk)
    store = CredentialStore(bundle)
    before = store.load().certificate.serial_number
    live_before = os.readlink(bundle / "live")
    fillers = fill(small_disk, leave_pages=leave_pages)

    result = renew_now(config)
    assert result.returncode != 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert f"cannot write {bundle}/" in output and "no space left on the filesystem of" in output, output
    assert f"df -h {bundle}" in output and "pki-agent renew-now" in output and "[Errno" not in output, output
    assert os.readlink(bundle / "live") == live_before
    assert store.load().certificate.serial_number == before
    assert leftovers(bundle) == [], leftovers(bundle)

    for filler in fillers:
        filler.unlink()
    result = renew_now(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert store.load().certificate.serial_number != before
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]


@needs_root
def test_state_file_on_a_full_disk_is_a_warning_naming_it_and_leaves_no_temp_file(tmp_path, small_disk):
    """The agent's state file cannot be written on a full disk: one WARNING names the file and
    the fix, the agent keeps running, and no temporary state file stays behind."""
    _, bundle, config = _node(tmp_path, small_disk)
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        fillers = fill(small_disk, leave_pages=0)
        mark = agent.log.mark()
        os.kill(agent.proc.pid, __import__("signal").SIGHUP)  # a reload rewrites the state file
        line = agent.log.wait_for(r"WARNING.*cannot write the state file.*", start=mark).group(0)
        assert "no space left on the filesystem of" in line and f"df -h {bundle}" in line and ".tmp" not in line, line
        assert agent.proc.poll() is None
        assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]
        for filler in fillers:
            filler.unlink()
    finally:
        assert agent.stop() == 0


_INSTALL_UNDER_LIMIT = """
import resource, signal, sys
from pkictl.store import CredentialStore
store = CredentialStore(sys.argv[1])
credential = store.load()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    store.install(credential)
except OSError as exc:
    print(f"errno={exc.errno} {exc}")
    sys.exit(2)
print("installed")
"""


def test_file_size_limit_names_the_file_and_removes_the_partial_version(tmp_path):
    """An install under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) smaller than
    fullchain.pem fails with EFBIG naming the file and the limit to raise; the partial version is
    removed and live unchanged. Negative control: without the limit the install succeeds and
    leaves no temporary file."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings())
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    live_before = os.readlink(bundle / "live")
    cert_size = (bundle / "cert.pem").stat().st_size
    result = subprocess.run([sys.executable, "-c", _INSTALL_UNDER_LIMIT, str(bundle), str(cert_size + 10)],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"errno={errno.EFBIG} cannot write {bundle}/archive/2/" in result.stdout, result.stdout
    assert "ulimit -f" in result.stdout and "LimitFSIZE=" in result.stdout
    assert os.readlink(bundle / "live") == live_before
    assert leftovers(bundle) == []

    result = subprocess.run([sys.executable, "-c", _INSTALL_UNDER_LIMIT, str(bundle), str(1 << 30)],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.stdout.strip() == "installed", result.stdout + result.stderr
    assert os.readlink(bundle / "live") != live_before
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]


def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    """At start the agent removes an incomplete archive version newer than live and temporary
    files of dead processes, logging each; the live version, an older complete version and a
    temporary file of a running process stay."""
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings())
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    store = CredentialStore(bundle)
    store.install(store.load())  # version 2 is live, version 1 complete
    half = bundle / "archive" / "3"
    half.mkdir(mode=0o700)
    (half / "cert.pem").write_bytes((bundle / "cert.pem").read_bytes())
    (half / "chain.pem").write_bytes(b"")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = bundle / f".ca.pem.{dead}.tmp"
    stale.write_bytes(b"half")
    mine = bundle / f".agent.yaml.{os.getpid()}.tmp"  # a writer that is still running
    mine.write_bytes(b"busy")
    (bundle / ".live.3.tmp").symlink_to("archive/3")
    config = bundle / "agent.yaml"
    config.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "credential_dir": ".",
                                      "renewal": {"ca_home": str(tmp_path / "ca"), "check_interval": "1h"}}))
    agent = AgentProcess(config)
    try:
        agent.wait_ready()
        text = agent.log.text()
    finally:
        assert agent.stop() == 0
    assert f"removed {half}, left half-written" in text and f"removed {stale}" in text, text
    assert not half.exists() and not stale.exists() and not (bundle / ".live.3.tmp").is_symlink()
    assert mine.exists()
    assert os.readlink(bundle / "live") == "archive/2" and (bundle / "archive" / "1" / "privkey.pem").is_file()
    assert store.load().certificate.serial_number
