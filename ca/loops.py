"""The event loop pki-agent and pkictl serve run on: uvloop when it is installed, asyncio's own otherwise."""

from __future__ import annotations

import asyncio
from typing import Callable

from .errors import SettingsError

__all__ = ["event_loop_factory"]


def event_loop_factory(choice: str = "auto") -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """A loop factory for ``asyncio.Runner`` and the name of the loop it makes.

    uvloop forwards bulk data through Protocol objects at about half the CPU per GB of asyncio's
    loop on this stack (docs/design.md, "Peers and figures"), so ``auto`` takes it when it
    can be imported.

    Args:
        choice: ``auto``, ``uvloop`` or ``asyncio``.

    Raises:
        SettingsError: ``uvloop`` was asked for and is not installed.
    """
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SettingsError("--loop uvloop: uvloop is not installed; install it with pip install 'pkictl[fast]'") from None
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop, "asyncio"
