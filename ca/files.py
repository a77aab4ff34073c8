"""Careful file writes: keys born 0600 in 0700 directories, atomic replacement, fsync."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import KeyProtectionError

__all__ = [
    "make_private_dir",
    "write_new_file",
    "atomic_write",
    "fsync_dir",
    "read_private_file",
    "PRIVATE_FILE_MODE",
    "PUBLIC_FILE_MODE",
]

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, or accept an existing real directory.

    The mode is given at creation (never chmod-ed afterwards) so there is no window in which
    the directory is readable by others.

    Raises:
        KeyProtectionError: ``path`` exists as a symlink or as something other than a directory.
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise KeyProtectionError(
                f"{path} exists and is not a plain directory; pkictl keeps keys only in real "
                "directories: move it away and run the command again"
            ) from None
    return path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (create, rename, symlink) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> None:
    """Create ``path`` with ``mode`` and ``data``, fsync it; refuse to overwrite or follow a link.

    Raises:
        FileExistsError: ``path`` exists already (also when it is a symlink).
    """
    fd = os.open(path, _CREATE_FLAGS, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    write_new_file(tmp, data, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_private_file(path: Path) -> bytes:
    """Read a private key file after checking it is protected.

    Raises:
        KeyProtectionError: the file is a symlink, not a regular file, or readable or writable by
            group or others; the message says how to fix it.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if path.is_symlink():
            raise KeyProtectionError(
                f"{path} is a symlink; pkictl loads private keys only from regular files: "
                "replace the link with the key file itself"
            ) from None
        raise exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyProtectionError(f"{path} is not a regular file; expected a PEM private key file")
        if info.st_mode & 0o077:
            raise KeyProtectionError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, readable by group or others; "
                f"expected 0600: run chmod 600 {path}"
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
