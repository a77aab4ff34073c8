"""Listening sockets for the endpoints that accept connections themselves (the EST service's
TLS front, the gateway listener): accepting in the application, not in ``create_server``, gives
every connection its peer address from ``accept()`` itself, so a refusal line names it even when
the client has already reset."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from typing import Iterator

__all__ = ["bind_listening_sockets", "accept_ready", "bind_problem", "ensure_file_limit"]


async def bind_listening_sockets(loop: asyncio.AbstractEventLoop, host: str, port: int, *, backlog: int = 1024,
                                 reuse_port: bool = False) -> list[socket.socket]:
    """Bind every address ``host`` resolves to (all interfaces for ``""``) on ``port``,
    non-blocking and listening; with port 0, every address on the port the first one drew.

    IPv6 sockets are IPv6-only, so that ``[::]`` and ``0.0.0.0`` can be bound side by side.
    With ``reuse_port`` (``SO_REUSEPORT``), further sets of sockets can be bound on the same
    port by this user, and the kernel spreads new connections over all of them.

    Raises:
        OSError: an address cannot be bound; nothing stays bound then.
    """
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_problem(host: str, port: int, exc: OSError) -> str:
    """One line for an address that cannot be bound: which, why, and what to do.

    Args:
        host, port: the address asked for ("" for every interface).
        exc: the error of ``bind()`` (or of resolving ``host``).
    """
    where = f"{f'[{host}]' if ':' in host else host or '*'}:{port}"
    hints = {
        errno.EADDRINUSE: f"another process listens there (find it: ss -ltnp 'sport = :{port}'): stop it, or use another port",
        errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE: use a higher port, or grant the capability",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this host (ip -brief address lists them)",
    }
    return f"cannot listen on {where}: {exc.strerror or exc}; {hints.get(exc.errno or 0, 'check the address')}"


def accept_ready(listening: socket.socket, log: logging.Logger, *, limit: int = 128) -> Iterator[tuple[socket.socket, tuple]]:
    """The connections waiting on ``listening`` (non-blocking), at most ``limit`` per wake-up, as
    asyncio's own accept loop drains its backlog: ``(socket, peer address)`` each.

    An accept that fails for want of resources (EMFILE, ENFILE, ...) is logged on ``log`` and
    ends this round; the connections there are keep being served.
    """
    for _ in range(limit):
        try:
            sock, address = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("accept on %s failed: %s", listening.getsockname(), exc)
            return
        yield sock, address


def ensure_file_limit(wanted: int) -> str | None:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to ``wanted`` if the hard
    limit allows: a 1024 soft limit (the usual default) runs out before a 1024-connection cap.

    Returns:
        None when the process may hold ``wanted`` files, else one line saying what it got and
        how to raise it (accepts beyond the file limit fail, and are logged, before a cap is reached).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return None
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target >= wanted:
        return None
    return (f"open files are limited to {target} (hard limit {hard}), fewer than the {wanted} the connection caps need: "
            "raise LimitNOFILE= in the unit (or ulimit -n), or lower --max-connections")
