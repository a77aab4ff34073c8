"""Validation of node and gateway names, before a name touches disk or the inventory."""

from __future__ import annotations

import re

from .errors import InvalidNameError

__all__ = ["validate_name", "name_key"]

# A name is one DNS label (RFC 1035 section 2.3.1, as relaxed by RFC 1123 section 2.1): it goes
# into file paths, a CN and a URI path segment, so nothing else may pass.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def validate_name(name: str) -> str:
    """Check that ``name`` is a DNS label and return it unchanged.

    Args:
        name: a node or gateway name such as ``TW``.

    Returns:
        ``name`` itself; case is kept for display, comparisons use :func:`name_key`.

    Raises:
        InvalidNameError: the name is empty, longer than 63 characters, or holds anything but
            ASCII letters, digits and inner hyphens (RFC 1123 section 2.1).
    """
    if not isinstance(name, str) or not _LABEL.fullmatch(name):
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        raise InvalidNameError(
            f"invalid name {shown}: a name is a DNS label of 1 to 63 characters, ASCII letters, "
            "digits and hyphens, starting and ending with a letter or digit (for example TW or "
            "node-07)"
        )
    return name


def name_key(name: str) -> str:
    """The case-insensitive comparison key of a valid name (DNS names compare without case)."""
    return validate_name(name).lower()
