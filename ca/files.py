"""Careful file writes: keys born 0600 in 0700 directories, atomic replacement, fsync."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import DiskWriteError, KeyProtectionError
from .file_errors import is_write_failure, write_error

__all__ = [
    "make_private_dir",
    "open_dir_to_group",
    "write_new_file",
    "atomic_write",
    "fsync_dir",
    "remove_stale_temp_files",
    "read_private_file",
    "read_ca_key_file",
    "ca_key_protection_problem",
    "key_mode_problem",
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


def open_dir_to_group(path: Path, group: int) -> None:
    """Give the real directory ``path`` to ``group`` with mode 0750 (list and enter, not write).

    Raises:
        OSError: ``path`` is a symlink or no directory (ELOOP, ENOTDIR), or this account may not
            give it to ``group``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fchown(fd, -1, group)
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (create, rename, symlink) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE, *, group: int | None = None) -> None:
    """Create ``path`` with ``mode`` and ``data``, fsync it; refuse to overwrite or follow a link.

    A write that fails half-way removes the file it created: a partial file left behind would
    read as a damaged one (docs/design.md, "Files on disk").

    Args:
        group: a group id to give the file to; then ``mode`` is set exactly (not filtered by the
            umask, which the service's ``UMask=0077`` would make 0600), before any byte is written.

    Raises:
        FileExistsError: ``path`` exists already (also when it is a symlink).
        PermissionError: this account may not give files to ``group`` (neither root nor a member).
        DiskWriteError: no room or a broken disk (ENOSPC, EDQUOT, EFBIG, EIO, EROFS); the message
            names ``path`` and the fix; nothing is left at ``path``.
    """
    try:
        fd = os.open(path, _CREATE_FLAGS, mode & 0o700 if group is not None else mode)
    except OSError as exc:
        if is_write_failure(exc):
            raise write_error(path, exc) from None
        raise
    try:
        if group is not None:
            # Owner-only until the file is the group's: the data comes after both calls.
            os.fchown(fd, -1, group)
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        _unlink_quietly(path)
        if isinstance(exc, OSError) and is_write_failure(exc):
            raise write_error(path, exc) from None
        raise
    os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or the disk refuses even that: the next start's sweep retries


# atomic_write's temporary name: ".<name>.<pid>.tmp" beside the file it replaces.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def atomic_write(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    Raises:
        DiskWriteError: no room or a broken disk; ``path`` is unchanged and the temporary file
            removed (or, if even that failed, swept by :func:`remove_stale_temp_files`).
        OSError: other failures (permissions, a missing directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    try:
        write_new_file(tmp, data, mode)
    except DiskWriteError as exc:  # name the file the operator knows, not its temporary twin
        raise write_error(path, exc) from None
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        if is_write_failure(exc):
            raise write_error(path, exc) from None
        raise


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``directory`` when its process
    died (or the disk filled) between writing and renaming: ``.<name>.<pid>.tmp`` of a process
    that no longer runs. Those of running processes (another writer, right now) stay.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.is_dir() or _running(int(match.group(1))):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process
    return True


def key_mode_problem(info: os.stat_result, group: int | None = None) -> str | None:
    """Why a file holding a private key (``info`` from ``stat``) is not protected, or None.

    A key is private to its owner (no bits for group or others) or, when ``group`` is given,
    readable, never writable, by that one group: the consumer the operator named
    (``credential_group`` in the agent's configuration; docs/design.md, "Files for other software").
    """
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077 or (group is not None and mode & 0o077 == 0o040 and info.st_gid == group):
        return None
    if group is not None and mode & 0o077 == 0o040:
        return f"mode {mode:04o}, readable by group {info.st_gid}, not by the configured group {group}"
    return f"mode {mode:04o}, readable by group or others"


def read_private_file(path: Path, *, group: int | None = None) -> bytes:
    """Read a private key file after checking it is protected (:func:`key_mode_problem`).

    Args:
        group: a group id that may read the key (mode 0640, that group); None: 0600 only.

    Raises:
        KeyProtectionError: the file is a symlink, not a regular file, or readable or writable by
            group or others (beyond ``group``'s read); the message says how to fix it.
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
        problem = key_mode_problem(info, group)
        if problem is not None:
            if group is None:
                raise KeyProtectionError(f"{path} has {problem}; expected 0600: run chmod 600 {path}")
            raise KeyProtectionError(f"{path} has {problem}; expected 0640 of group {group} or 0600: "
                                     f"run chgrp {group} {path} && chmod 640 {path}")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def ca_key_protection_problem(path: Path) -> tuple[str, str] | None:
    """``(problem, fix)`` when the CA key file ``path`` or its directory is not this user's own,
    or the directory lets group or others in; None when both are protected. The key file's own
    mode is :func:`read_private_file`'s check.

    A CA key in a directory others can list, or a key file or directory another account owns
    (which can chmod it, or replace it), is not under this account's control, whatever its mode.
    """
    path = Path(path)
    uid = os.geteuid()
    directory = path.parent
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a real directory (a symlink?)", f"put the key in a directory of its own, mode 0700: mkdir -m 700 {directory}"
    if info.st_uid != uid:
        return (f"{directory} belongs to uid {info.st_uid}, not to this account (uid {uid})",
                f"run pkictl as the account that owns the CA, or chown -R {uid} {directory.parent}")
    if info.st_mode & 0o077:
        return f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}, open to group or others", f"chmod 700 {directory}"
    key = path.lstat()
    if key.st_uid != uid:
        return f"{path} belongs to uid {key.st_uid}, not to this account (uid {uid})", f"chown {uid} {path}"
    return None


def read_ca_key_file(path: Path) -> bytes:
    """:func:`read_private_file` for a CA key, after :func:`ca_key_protection_problem`.

    Raises:
        KeyProtectionError: the key, or its directory, is not protected (the message says how to fix it).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.exists():  # a missing key is read_private_file's FileNotFoundError, as for any key
        problem = ca_key_protection_problem(path)
        if problem is not None:
            raise KeyProtectionError(f"{problem[0]}: pkictl refuses to use the CA key {path}; fix: {problem[1]}")
    return read_private_file(path)
