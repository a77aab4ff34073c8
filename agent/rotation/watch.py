"""Reload as soon as the credential, trust anchors or CRL change on disk (watchfiles: inotify, FSEvents).

The watcher only says "look again": the agent compares what it loaded with what is on disk and
reloads on a difference, exactly as its periodic check does. So a missed or spurious event costs
nothing but latency, and the periodic check stays the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["watch_files", "file_stamp", "credential_stamp"]

log = logging.getLogger("pki_agent.watch")


def file_stamp(path: Path | None) -> tuple | None:
    """Identity of a file's content as far as a reload cares: inode, mtime, size (None if absent)."""
    try:
        info = os.stat(path) if path else None
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size) if info else None


def credential_stamp(store, crl: Path | None) -> tuple:
    """What a reload reads from, as comparable values: the version ``live`` points to, and the
    identities of the trust anchors file and the CRL file. A difference means "reload"."""
    try:
        live = os.readlink(store.live)
    except OSError:
        live = None
    return live, file_stamp(crl), file_stamp(store.trust_anchors_path)


async def watch_files(paths: Iterable[Path], on_change: Callable[[], object], stop: asyncio.Event, *, step_ms: int = 50) -> None:
    """Call ``on_change()`` on the running loop after any of ``paths`` is created, replaced,
    changed or removed, until ``stop`` is set.

    The parent directories are watched, not the files: an atomic replace (a rename over the
    file, or a new ``live`` symlink) gives the path a new inode that a watch on the old one would
    never see.

    Args:
        paths: the files to watch (a symlink counts as itself, not its target).
        on_change: called once per batch of changes; its exceptions are logged, not raised.
        stop: ends the watch.
        step_ms: how long to wait for more changes before reporting a batch, in milliseconds.

    Never raises: if the watch cannot start (no inotify instance left, directory missing), the
    reason is logged and the function returns; the periodic check still reloads.
    """
    from watchfiles import awatch

    wanted = {os.path.abspath(p) for p in paths}  # noqa: ASYNC240 - no disk access (at most getcwd), once at start
    directories = sorted({os.path.dirname(p) for p in wanted})

    def relevant(_change, path: str) -> bool:
        return os.path.abspath(path) in wanted

    # awatch sets its watches up in this task's first step, before its first await; the check
    # scheduled here runs right after, so a change made before the watches existed is not missed.
    asyncio.get_running_loop().call_soon(on_change)
    try:
        async for changes in awatch(*directories, watch_filter=relevant, stop_event=stop, recursive=False,
                                    debounce=1600, step=step_ms):
            log.debug("changed on disk: %s", sorted(path for _, path in changes))
            try:
                on_change()
            except Exception:  # a failed reload is the caller's to log; keep watching
                log.exception("reloading after a change on disk failed")
    except Exception as exc:  # noqa: BLE001 - e.g. inotify watch limit reached
        log.warning("cannot watch %s for changes (%s); the periodic check still reloads", ", ".join(directories), exc)
