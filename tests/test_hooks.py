"""Post-rotation hooks with real processes: argument lists with exactly the environment they are
given, timeouts that kill the whole process group, retries, SIGHUP by PID file, and a failing
hook that never undoes a rotation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pki_agent.config import AgentConfig, Hook, RenewalConfig
from pki_agent.daemon import Agent
from pki_agent.rotation.hooks import OUTPUT_LIMIT, HookContext, run_hook, run_hooks
from pki_agent.rotation.state import state_path
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.store import CredentialStore

from support import DEADLINE, wait_until

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def _context(tmp_path: Path) -> HookContext:
    directory = tmp_path / "cred"
    directory.mkdir(exist_ok=True)
    return HookContext("tw", 0xABC, directory)


def _wait_for(path: Path) -> str:
    return wait_until(lambda: path.exists() and path.read_text(), what=f"{path} appearing")


def test_run_hook_gets_exactly_its_environment_and_the_credential_directory(tmp_path, monkeypatch):
    """The program sees PATH, the configured env and the PKI_AGENT_* variables and nothing of the
    agent's own environment, runs in the credential directory, and its output is kept."""
    monkeypatch.setenv("AGENT_ONLY_SECRET", "must-not-leak")
    out = tmp_path / "env.json"
    script = _script(tmp_path / "dump.py", f"""
        import json, os
        json.dump({{"env": dict(os.environ), "cwd": os.getcwd()}}, open({str(out)!r}, "w"))
        print("reloaded")
    """)
    hook = Hook(run=[sys.executable, str(script)], env={"SERVICE": "nginx"})
    context = _context(tmp_path)
    outcome = asyncio.run(run_hook(hook, context))
    assert outcome.ok and outcome.detail == "exit status 0" and outcome.output == "reloaded\n"
    seen = json.loads(out.read_text())
    live = context.credential_dir.resolve() / "live"
    assert seen["cwd"] == str(context.credential_dir.resolve())
    # LC_CTYPE is set by the child Python itself (PEP 538 locale coercion), not inherited.
    assert {k: v for k, v in seen["env"].items() if k != "LC_CTYPE"} == {
        "PATH": "/usr/bin:/bin", "SERVICE": "nginx", "PKI_AGENT_NAME": "tw", "PKI_AGENT_SERIAL": "abc",
        "PKI_AGENT_CERT": str(live / "cert.pem"), "PKI_AGENT_KEY": str(live / "privkey.pem"),
        "PKI_AGENT_CHAIN": str(live / "chain.pem"), "PKI_AGENT_FULLCHAIN": str(live / "fullchain.pem"),
    }


def test_a_hook_given_as_a_shell_string_is_refused_by_the_schema():
    """``run: "systemctl reload nginx"`` is refused with the list form as the fix; so are both
    kinds at once and neither."""
    with pytest.raises(ValueError, match=r"want a list of arguments such as \[systemctl, reload, nginx\]"):
        Hook(run="systemctl reload nginx")
    with pytest.raises(ValueError, match="exactly one of them"):
        Hook(run=["true"], sighup_pid_file="/run/x.pid")
    with pytest.raises(ValueError, match="exactly one of them"):
        Hook()


def test_timeout_kills_the_hooks_whole_process_group(tmp_path):
    """A hook that starts a child and hangs is killed after its timeout, the child with it."""
    child_pid = tmp_path / "child.pid"
    script = _script(tmp_path / "hang.py", f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)
    hook = Hook(run=[sys.executable, str(script)], timeout=dt.timedelta(seconds=1))
    outcome = asyncio.run(run_hook(hook, _context(tmp_path)))
    assert not outcome.ok and outcome.detail.startswith("timed out after 1 s")
    pid = int(_wait_for(child_pid))
    def gone() -> bool:  # the killed child is reaped by init; until then it may linger as a zombie
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, what=f"the end of the hook's child {pid} after the timeout")


def test_output_beyond_the_limit_is_counted_not_kept(tmp_path):
    """A chatty hook's output is kept up to OUTPUT_LIMIT bytes and the rest counted."""
    hook = Hook(run=[sys.executable, "-c", f"print('x' * {OUTPUT_LIMIT + 99}, end='')"])
    outcome = asyncio.run(run_hook(hook, _context(tmp_path)))
    assert outcome.ok and len(outcome.output) == OUTPUT_LIMIT and outcome.truncated == 99


def test_failing_hook_is_retried_then_reported_and_the_next_hook_still_runs(tmp_path, caplog):
    """A hook that fails twice and then succeeds takes three attempts; one that always fails is
    logged as an ERROR after its attempts, and the hook after it runs all the same."""
    caplog.set_level(logging.INFO, logger="pki_agent.hooks")
    counter = tmp_path / "count"
    flaky = _script(tmp_path / "flaky.py", f"""
        import pathlib, sys
        p = pathlib.Path({str(counter)!r})
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        sys.exit(0 if n >= 3 else 7)
    """)
    marker = tmp_path / "last-ran"
    hooks = [
        Hook(run=[sys.executable, str(flaky)], attempts=3, retry_wait=dt.timedelta(seconds=0.01)),
        Hook(run=[sys.executable, "-c", "import sys; sys.exit(3)"], attempts=2, retry_wait=dt.timedelta(seconds=0.01)),
        Hook(run=[sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ran')"]),
    ]
    results: list[dict] = []
    assert asyncio.run(run_hooks(hooks, _context(tmp_path), results=results)) is False
    assert counter.read_text() == "3" and marker.read_text() == "ran"
    assert [(r["ok"], r["attempts"], r["detail"]) for r in results] == [
        (True, 3, "exit status 0"), (False, 2, "exit status 3"), (True, 1, "exit status 0")]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "exit status 3" in errors[0].getMessage() and "stays installed" in errors[0].getMessage()


def test_sighup_pid_file_signals_that_process_and_refuses_bad_pids(tmp_path):
    """The process named in the PID file gets SIGHUP; a PID file naming PID 1, or holding text,
    or missing, is a failure that signals nobody."""
    ready, got = tmp_path / "ready", tmp_path / "got-hup"
    script = _script(tmp_path / "reloadable.py", f"""
        import signal, time
        signal.signal(signal.SIGHUP, lambda *_: open({str(got)!r}, "w").write("hup"))
        open({str(ready)!r}, "w").write("ready")
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        _wait_for(ready)
        pid_file = tmp_path / "service.pid"
        pid_file.write_text(f"{proc.pid}\n")
        outcome = asyncio.run(run_hook(Hook(sighup_pid_file=pid_file), _context(tmp_path)))
        assert outcome.ok and outcome.detail == f"SIGHUP sent to PID {proc.pid}"
        assert _wait_for(got) == "hup"
    finally:
        proc.kill()
        proc.wait(DEADLINE)
    for content, expected in [("1\n", "above 1"), ("nginx\n", "want a process ID")]:
        pid_file.write_text(content)
        outcome = asyncio.run(run_hook(Hook(sighup_pid_file=pid_file), _context(tmp_path)))
        assert not outcome.ok and expected in outcome.detail
    outcome = asyncio.run(run_hook(Hook(sighup_pid_file=tmp_path / "missing.pid"), _context(tmp_path)))
    assert not outcome.ok and "cannot read the PID file" in outcome.detail


def test_agent_runs_hooks_after_a_rotation_and_a_failing_hook_changes_nothing(tmp_path):
    """After a renewal the hooks see the new serial in PKI_AGENT_SERIAL; a hook that fails leaves
    the new credential installed and in service, and the state file records both results."""
    clock = FixedClock(T0)
    ca = CertificateAuthority.init(tmp_path / "ca", clock=clock)
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    seen = tmp_path / "serial"
    config = AgentConfig(
        name="TW", kind="node", credential_dir=bundle, renewal=RenewalConfig(ca_home=tmp_path / "ca", jitter=0),
        hooks=[Hook(run=[sys.executable, "-c", f"import os; open({str(seen)!r}, 'w').write(os.environ['PKI_AGENT_SERIAL'])"]),
               Hook(run=[sys.executable, "-c", "raise SystemExit(9)"], attempts=1)],
    )
    agent = Agent(config, clock=clock)
    agent.reload()
    first = CredentialStore(bundle).load().certificate

    async def rotate() -> bool:
        clock.set(agent.renewal_due())
        renewed = await agent.renew()
        await agent.wait_for_hooks()
        return renewed

    assert asyncio.run(rotate()) is True
    second = CredentialStore(bundle).load().certificate
    assert second.serial_number != first.serial_number
    assert seen.read_text() == f"{second.serial_number:x}"
    assert agent.credential.certificate.serial_number == second.serial_number
    hooks = json.loads(state_path(bundle).read_text())["hooks"]
    assert [(h["ok"], h["detail"]) for h in hooks] == [(True, "exit status 0"), (False, "exit status 9")]
