"""``pki-agent renew-now``: a forced renewal, by the running agent or, without one, right here."""

from __future__ import annotations

import asyncio
import signal
import time

from ..config import AgentConfig
from ..errors import AgentError
from ..pidfile import PidFile, running_agent_pid, signal_running_agent
from .state import read_state, state_path

__all__ = ["renew_now"]

_POLL = 0.1  # seconds between reads of the running agent's state file


def renew_now(config: AgentConfig, *, timeout: float) -> tuple[bool, str]:
    """Renew ``config``'s credential now.

    With an agent running for ``config.credential_dir``: send it SIGUSR1 and wait (at most
    ``timeout`` seconds) until its state file records the forced attempt. Without one: take the
    agent's PID file lock, rotate, run the hooks, and release it.

    Returns:
        ``(ok, message)``: ok if a new certificate is in service; the message says what happened.

    Raises:
        AgentError: the running agent cannot be signalled, or did not answer in time.
    """
    if running_agent_pid(config.credential_dir) is not None:
        return _ask_running_agent(config, timeout)
    pid_file = PidFile(config.credential_dir)
    pid_file.acquire()
    try:
        return asyncio.run(_renew_here(config))
    finally:
        pid_file.release()


def _ask_running_agent(config: AgentConfig, timeout: float) -> tuple[bool, str]:
    path = state_path(config.credential_dir)
    before = read_state(path) or {}
    pid = signal_running_agent(config.credential_dir, signal.SIGUSR1)
    if pid is None:  # it stopped in between
        raise AgentError(f"the agent for {config.credential_dir} stopped; run 'pki-agent renew-now' again")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(path) or {}
        if state.get("pid") == pid and state.get("forced_attempts", 0) > (before.get("forced_attempts", 0) if before.get("pid") == pid else 0):
            return _outcome(state, f"the running agent (pid {pid})")
        time.sleep(_POLL)
    raise AgentError(f"the running agent (pid {pid}) did not report a renewal within {timeout:g} s; "
                     "see its log (journalctl -u pki-agent) and 'pki-agent status'")


async def _renew_here(config: AgentConfig) -> tuple[bool, str]:
    from ..daemon import Agent

    agent = Agent(config)
    agent.reload()
    await agent.renew(forced=True)
    await agent.wait_for_hooks()
    return _outcome(agent.state(), "this command (no agent runs for this credential)")


def _outcome(state: dict, who: str) -> tuple[bool, str]:
    attempt = state.get("last_attempt") or {}
    name = state.get("name")
    if attempt.get("result") == "renewed":
        credential = state.get("credential") or {}
        return True, (f"{name}: renewed by {who}: serial {attempt['serial']}, not after {credential.get('not_after')}, "
                      f"next renewal due {state.get('next_attempt')}")
    pairing, unusable = state.get("pairing"), state.get("unusable")
    if pairing:  # the certificate cannot renew (revoked, expired, another CA's): a new one comes by approval
        why = f" ({unusable['reason']}: {unusable['detail']})" if unusable else ""
        return False, (f"{name}: not renewed by {who}: the certificate cannot renew{why}; pairing request code {pairing['code']} "
                       f"waits for approval: on the CA host run 'pkictl approve {name} --code {pairing['code']}'")
    error = attempt.get("error") or "no attempt was recorded"
    return False, f"{name}: renewal by {who} failed: {error}; the current certificate stays in service"
