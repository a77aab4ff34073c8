"""The agent's state file, ``<credential_dir>/.pki-agent.state.json``: what ``pki-agent status``
and ``renew-now`` read about the running agent (credential, next attempt, last attempt and its
error, listener, hooks).

The agent rewrites it whole, atomically (:func:`pkictl.files.atomic_write`), when something in it
changes: at start, on every reload, renewal attempt and hook result, and at stop. Readers see the
old or the new file, never a mix. It holds no secret (names, serial numbers, times, errors), and
it is advisory: the credential on disk stays the truth, and status reads that too.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pkictl.files import atomic_write

from ..errors import AgentError

__all__ = ["STATE_FILE_NAME", "STATE_VERSION", "state_path", "write_state", "read_state", "iso"]

STATE_FILE_NAME = ".pki-agent.state.json"
STATE_VERSION = 1


def state_path(credential_dir: Path) -> Path:
    """Where the agent of ``credential_dir`` keeps its state file."""
    return Path(credential_dir) / STATE_FILE_NAME


def iso(value: dt.datetime | None) -> str | None:
    """An aware datetime as ISO 8601 UTC (seconds), None as None."""
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file with ``state`` (JSON-serialisable), adding ``version``."""
    atomic_write(Path(path), (json.dumps({"version": STATE_VERSION, **state}, indent=2, sort_keys=True) + "\n").encode(), 0o640)


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file's content, or None if there is none (the agent never ran here).

    Raises:
        AgentError: the file exists but is not a state file of this version.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentError(f"{path}: unreadable agent state ({exc}); it is rewritten when the agent starts") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise AgentError(f"{path}: not an agent state file of version {STATE_VERSION}; it is rewritten when the agent starts")
    return data
