"""The running agent's PID file, ``<credential_dir>/.pki-agent.pid``, guarded by a lock.

``pki-agent run`` holds an exclusive ``flock`` on the file for as long as it runs; the kernel
drops the lock when the process dies, however it dies. So a file whose lock is free is stale (a
SIGKILLed agent's), and its PID, perhaps reused by an unrelated process by now, is never
signalled. The lock also keeps a second agent off the same credential directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from pathlib import Path

from pkictl.file_errors import is_write_failure, write_error

from .errors import AgentError

__all__ = ["PID_FILE_NAME", "PidFile", "running_agent_pid", "signal_running_agent"]

PID_FILE_NAME = ".pki-agent.pid"
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)  # CLOEXEC: hooks must not inherit the lock


class PidFile:
    """The lock-guarded PID file of the agent serving ``credential_dir``."""

    def __init__(self, credential_dir: Path) -> None:
        self.path = Path(credential_dir) / PID_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock the file and write this process's PID into it.

        Raises:
            AgentError: another live agent holds the lock, or the file cannot be created.
            DiskWriteError: no room for it (the message names the file and the fix).
        """
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
            except OSError as exc:
                if is_write_failure(exc):
                    raise write_error(self.path, exc, then="run the command again") from None
                raise AgentError(f"cannot create the PID file {self.path}: {exc}") from None
            if not _lock(fd, fcntl.LOCK_EX):
                other = _read_pid(fd)
                os.close(fd)
                raise AgentError(
                    f"another pki-agent (pid {other or 'unknown'}) already runs for {self.path.parent}; "
                    "stop it first, or use 'pki-agent renew-now' to renew while it runs"
                ) from None
            # The previous owner may have unlinked the file between our open and our lock: then we
            # hold a lock on a file nobody else will ever open. Start over on the current file.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # ours: locked above; an empty PID file would only mislead
            os.close(fd)
            if is_write_failure(exc):
                raise write_error(self.path, exc, then="run the command again") from None
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _lock(fd: int, kind: int, *, tries: int = 20) -> bool:
    """Take ``kind`` on ``fd`` without blocking; retry briefly, because ``renew-now`` probes the
    lock with a short shared lock of its own. False if it stays taken."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.01)
    return False


def _read_pid(fd: int) -> int | None:
    # The owner writes its PID right after it took the lock: give it a moment.
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def running_agent_pid(credential_dir: Path) -> int | None:
    """The PID of the agent running for ``credential_dir``, or None if none runs (no PID file, or
    one whose lock is free: its writer died)."""
    path = Path(credential_dir) / PID_FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AgentError(f"{path} is a symlink; the agent writes a plain file there") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # locked: its agent is alive
            pid = _read_pid(fd)
            if pid is None:
                raise AgentError(f"{path} is locked by a running agent but holds no PID") from None
            return pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def signal_running_agent(credential_dir: Path, signum: int = signal.SIGHUP) -> int | None:
    """Send ``signum`` to the agent running for ``credential_dir``.

    Returns:
        Its PID, or None if no agent runs.

    Raises:
        AgentError: an agent runs but cannot be signalled (another user's, for example).
    """
    pid = running_agent_pid(credential_dir)
    if pid is None:
        return None
    try:
        os.kill(pid, signum)
    except OSError as exc:
        raise AgentError(f"cannot send {signal.Signals(signum).name} to the agent (pid {pid}): {exc}") from None
    return pid
