"""Doctor test support: the problems a list of findings reports, a snapshot that proves nothing
changed on disk, and ways to break a credential for real."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

from pkictl.diagnosis.findings import Finding, Severity


def problems(findings: list[Finding]) -> list[tuple[str, str]]:
    """``(check, severity)`` of every warning and error, in order."""
    return [(f.check, f.severity.label) for f in findings if f.severity > Severity.OK]


def only(findings: list[Finding], check: str) -> Finding:
    """The single warning or error, which must come from ``check``."""
    bad = [f for f in findings if f.severity > Severity.OK]
    assert [f.check for f in bad] == [check], "\n".join(f.line() for f in bad)
    return bad[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, mode and content hash (or link target).

    SQLite's ``-shm`` file is left out: it is the WAL index in shared memory, which every reader
    (a read-only one too) updates with its read marks; it holds no data.
    """
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if name.endswith(".sqlite3-shm"):
                continue
            info = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                state[str(path)] = ("dir", info.st_mode)
            else:
                state[str(path)] = ("file", info.st_mode, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def live_version(bundle: Path) -> Path:
    return bundle / os.readlink(bundle / "live")


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Overwrite ``path`` (a file in an archive version) the way a careless hand would."""
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_config(path: Path, data: dict) -> Path:
    """An agent.yaml holding ``data`` (paths as strings)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
