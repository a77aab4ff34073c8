"""Post-rotation hooks: run programs (argument lists, never shell strings) or send SIGHUP, so that
nginx, haproxy or a Node.js gateway pick up the new credential.

Contract of one run (:func:`run_hook`): the program gets exactly the environment
:func:`hook_environment` builds (``PATH=/usr/bin:/bin``, the hook's ``env``, and the PKI_AGENT_*
variables naming the credential), stdin closed, the credential directory as working directory,
its own session (process group); stdout and stderr are captured together (the first
:data:`OUTPUT_LIMIT` bytes are kept for the log); after ``timeout`` the whole process group gets
SIGKILL. Everything is asyncio, so the agent's event loop never blocks on a hook.

:func:`run_hooks` runs a list in order, each with its own retries (``attempts``, ``retry_wait``
doubled after each failure); a failing hook is logged with its exit status and never undoes the
rotation: the new credential stays installed and in service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Sequence

from ..config import Hook

__all__ = ["HookContext", "HookOutcome", "hook_environment", "run_hook", "run_hooks", "OUTPUT_LIMIT", "BASE_PATH"]

log = logging.getLogger("pki_agent.hooks")

OUTPUT_LIMIT = 4096
"""Bytes of a hook's output kept for the log."""

BASE_PATH = "/usr/bin:/bin"

# After the program exits, how long to keep reading output that a child it left behind may still
# hold the pipe open for (a daemon it started, say): the hook's result does not wait for those.
_DRAIN_AFTER_EXIT = 1.0


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook is told about the credential now in service.

    Attributes:
        name: the node or gateway name.
        serial: the certificate's serial number.
        credential_dir: the credential directory (absolute).
    """

    name: str
    serial: int
    credential_dir: Path

    def variables(self) -> dict[str, str]:
        """The PKI_AGENT_* variables: NAME, SERIAL (lower-case hex, as in the logs) and the
        paths of the live files CERT, KEY, CHAIN and FULLCHAIN."""
        live = Path(os.path.abspath(self.credential_dir)) / "live"
        return {
            "PKI_AGENT_NAME": self.name,
            "PKI_AGENT_SERIAL": f"{self.serial:x}",
            "PKI_AGENT_CERT": str(live / "cert.pem"),
            "PKI_AGENT_KEY": str(live / "privkey.pem"),
            "PKI_AGENT_CHAIN": str(live / "chain.pem"),
            "PKI_AGENT_FULLCHAIN": str(live / "fullchain.pem"),
        }


@dataclasses.dataclass(frozen=True)
class HookOutcome:
    """The result of one attempt.

    Attributes:
        ok: the program exited with status 0 (or the signal was delivered).
        detail: ``exit status N``, ``killed by SIGNAME``, ``timed out after S s`` or the error.
        output: the first :data:`OUTPUT_LIMIT` bytes of stdout and stderr, decoded leniently.
        truncated: how many further bytes of output were dropped.
    """

    ok: bool
    detail: str
    output: str = ""
    truncated: int = 0

    def output_for_log(self) -> str:
        if not self.output and not self.truncated:
            return "no output"
        text = self.output.rstrip("\n")
        more = f" [... {self.truncated} more bytes]" if self.truncated else ""
        return f"output: {text!r}{more}"


def hook_environment(hook: Hook, context: HookContext) -> dict[str, str]:
    """The complete environment of a ``run`` hook: PATH, then ``hook.env`` (which may set its own
    PATH), then the PKI_AGENT_* variables of ``context``. Nothing is inherited from the agent."""
    return {"PATH": BASE_PATH, **hook.env, **context.variables()}


async def run_hook(hook: Hook, context: HookContext) -> HookOutcome:
    """Run ``hook`` once for ``context`` (see the module docstring for the contract).

    Returns:
        The outcome; failures are reported in it, never raised (except cancellation, which
        kills the hook's process group first).
    """
    if hook.sighup_pid_file is not None:
        return _send_sighup(hook.sighup_pid_file)
    assert hook.run is not None
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook.run, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=hook_environment(hook, context), cwd=context.credential_dir, start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        return HookOutcome(False, f"cannot start: {exc}")
    kept = bytearray()
    dropped = 0

    async def read() -> None:
        nonlocal dropped
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            room = OUTPUT_LIMIT - len(kept)
            kept.extend(chunk[:room])
            dropped += max(0, len(chunk) - room)

    reader = asyncio.ensure_future(read())
    timed_out = False
    try:
        try:
            status = await asyncio.wait_for(proc.wait(), hook.timeout.total_seconds())
        except asyncio.TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            status = await proc.wait()
        try:
            await asyncio.wait_for(asyncio.shield(reader), _DRAIN_AFTER_EXIT)
        except asyncio.TimeoutError:
            pass
    finally:
        if proc.returncode is None:  # cancelled while it ran: leave nothing behind
            _kill_group(proc.pid)
        reader.cancel()
    output = kept.decode("utf-8", "replace")
    if timed_out:
        return HookOutcome(False, f"timed out after {hook.timeout.total_seconds():g} s: killed its process group", output, dropped)
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return HookOutcome(False, f"killed by {name}", output, dropped)
    return HookOutcome(status == 0, f"exit status {status}", output, dropped)


def _kill_group(pid: int) -> None:
    # The hook leads its own session (start_new_session), so its group id is its pid.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _send_sighup(pid_file: Path) -> HookOutcome:
    try:
        text = Path(pid_file).read_text().strip()
    except OSError as exc:
        return HookOutcome(False, f"cannot read the PID file: {exc}")
    try:
        pid = int(text.split()[0]) if text else 0
    except ValueError:
        return HookOutcome(False, f"{pid_file} holds {text[:40]!r}, want a process ID")
    if pid <= 1:  # kill(0) and kill(-1) would signal whole groups; pid 1 is init
        return HookOutcome(False, f"{pid_file} holds PID {pid}, want a process ID above 1")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return HookOutcome(False, f"cannot send SIGHUP to PID {pid}: {exc}")
    return HookOutcome(True, f"SIGHUP sent to PID {pid}")


async def run_hooks(hooks: Sequence[Hook], context: HookContext, *, results: list[dict] | None = None, clock=None) -> bool:
    """Run ``hooks`` in order for ``context``, each retried after a failure, and log each result.

    A hook that still fails after its ``attempts`` is logged as an ERROR and the next hook runs
    all the same: one service that cannot reload must not keep the others on the old credential.

    Args:
        results: if given, one dict per hook is appended: ``hook`` (its description), ``ok``,
            ``attempts`` (how many it took), ``detail`` and ``time`` (ISO 8601 UTC, from
            ``clock``), for the agent's state file.
        clock: a :class:`pkictl.clock.Clock` for ``time`` (default the system clock).

    Returns:
        True if every hook succeeded (at some attempt).
    """
    from pkictl.clock import SystemClock

    clock = clock or SystemClock()
    all_ok = True
    for index, hook in enumerate(hooks, 1):
        name = f"hook {index} {hook.describe()}"
        wait = hook.retry_wait.total_seconds()
        for attempt in range(1, hook.attempts + 1):
            outcome = await run_hook(hook, context)
            if outcome.ok or attempt == hook.attempts:
                if results is not None:
                    results.append({"hook": hook.describe(), "ok": outcome.ok, "attempts": attempt, "detail": outcome.detail,
                                    "time": clock.now().isoformat(timespec="seconds")})
            if outcome.ok:
                log.info("%s for serial %x: %s; %s", name, context.serial, outcome.detail, outcome.output_for_log())
                break
            if attempt < hook.attempts:
                log.warning("%s for serial %x failed (attempt %d of %d): %s; %s; retrying in %g s",
                            name, context.serial, attempt, hook.attempts, outcome.detail, outcome.output_for_log(), wait)
                await asyncio.sleep(wait)
                wait *= 2
            else:
                log.error("%s for serial %x failed (attempt %d of %d): %s; %s; giving up until the next rotation "
                          "(serial %x stays installed and in service)",
                          name, context.serial, attempt, hook.attempts, outcome.detail, outcome.output_for_log(), context.serial)
                all_ok = False
    return all_ok

