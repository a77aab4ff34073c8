"""Values from a peer, made safe for one log line: ``key=value`` fields as the listener writes them.

A request path, a header, a node name or a certificate subject comes from the peer. Written as
it is, ``%0A`` in a path (decoded to a newline) would start a forged log line. :func:`quoted`
renders a value as Python's ``repr`` does (``'...'`` with ``\\n``, ``\\x1b``, ``\\u2028`` and
every other non-printable character escaped); :func:`bare` leaves a plain token unquoted, as
the listener's ``node=tw serial=3a9f`` fields are, and quotes anything else.
"""

from __future__ import annotations

import re

__all__ = ["bare", "peer_name", "quoted"]

_TOKEN = re.compile(r"[A-Za-z0-9._:@/+\-\[\]]+")


def quoted(value: object) -> str:
    """``repr`` of ``str(value)``: quoted, every control and non-printable character escaped.

    Args:
        value: anything; None renders as ``None``, not quoted.

    Returns:
        One line of printable characters (``str.isprintable`` holds for every character but
        the quotes' content is escaped as ``repr`` escapes it).
    """
    if value is None:
        return "None"
    return repr(value if isinstance(value, str) else str(value))


def bare(value: object) -> str:
    """``value`` unquoted when it is a plain token (letters, digits, ``._:@/+-[]``), else :func:`quoted`."""
    text = value if isinstance(value, str) else str(value)
    return text if _TOKEN.fullmatch(text) else quoted(text)


def peer_name(address: tuple | None) -> str:
    """``host:port``, IPv6 hosts in brackets, from a socket address; ``?`` when there is none."""
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
