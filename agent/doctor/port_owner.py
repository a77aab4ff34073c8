"""Who holds a local TCP port: the process listening on it, and what it answers (for ``pki-agent doctor``).

The one seam over the operating system is :func:`listening_process`, built on psutil (Linux
reads ``/proc/net/tcp*`` and ``/proc/*/fd``; macOS needs root to see other users' sockets).
"""

from __future__ import annotations

import dataclasses
import socket

import psutil

__all__ = ["PortHolder", "listening_process", "first_answer"]

_ANY = {"0.0.0.0", "::", ""}


@dataclasses.dataclass(frozen=True)
class PortHolder:
    """The process holding a listening socket.

    Attributes:
        pid: its process id.
        command: its command line (or its name when the command line cannot be read),
            shortened to 100 characters; unescaped: quote it before it reaches a line.
    """

    pid: int
    command: str


def _command(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        text = " ".join(process.cmdline()) or process.name()
    except (psutil.Error, OSError):
        return "?"
    return text if len(text) <= 100 else text[:97] + "..."


def listening_process(address: tuple[str, int]) -> PortHolder | None:
    """The process listening on TCP ``address`` (a socket bound to it or to the wildcard of its
    family), or None when none is found or this user may not see it.

    Args:
        address: ``(host, port)``, the host an IP address.
    """
    host, port = address
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None  # macOS without root: not knowable
    for connection in connections:
        local = connection.laddr
        if (connection.status == psutil.CONN_LISTEN and connection.pid and local and local.port == port
                and (local.ip == host or local.ip in _ANY)):
            return PortHolder(connection.pid, _command(connection.pid))
    return None


def first_answer(address: tuple[str, int], *, timeout: float, limit: int = 200) -> str | None:
    """The first line a server at ``address`` answers to ``GET / HTTP/1.1`` (RFC 9112 3), at
    most ``limit`` bytes; "" when it closes without a word, None when it says nothing within
    ``timeout`` seconds or the connection fails. Unescaped: quote it before it reaches a line."""
    request = f"GET / HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nConnection: close\r\n\r\n".encode()
    data = b""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(request)
            while b"\n" not in data and len(data) < limit:
                chunk = sock.recv(limit - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:  # a timeout too: what arrived before it is the answer
        if not data:
            return None
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
