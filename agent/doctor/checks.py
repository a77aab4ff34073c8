"""``pki-agent doctor``: check this host's agent end to end and name each problem with its fix.

The configuration, the files it points at, the credential (:mod:`pkictl.diagnosis.credential_checks`), the
CRL, the EST server (reachable, our CA, its clock, its CRL), on a node who holds the tunnel's
port (:mod:`pki_agent.doctor.tunnel_checks`) and the gateway as this node sees it (a real test
connection), the local listener and upstream on a gateway, and the installed service
definitions. Nothing is modified; every network wait is bounded (``timeout``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
from pathlib import Path
from typing import Sequence

from pkictl.clock import Clock
from pkictl.diagnosis.credential_checks import CLOCK_AGREEMENT, check_trust_anchor, credential_checks_for
from pkictl.diagnosis.crl_checks import crl_findings
from pkictl.diagnosis.findings import Finding, Severity, check, check_name, run_checks
from pkictl.diagnosis.doctor import service_file_findings
from pkictl.errors import PKIError

from ..config import load_config
from .facts import AgentFacts, gateway_target
from ..errors import ConfigError
from .gateway_checks import GATEWAY_CHECKS
from ..rotation.hooks import BASE_PATH
from ..pidfile import running_agent_pid
from ..rotation.state import read_state, state_path
from .tunnel_checks import check_tunnel_port

__all__ = ["AgentFacts", "AGENT_CHECKS", "diagnose_agent", "gateway_target", "SKEW_WARNING", "SKEW_ERROR"]

E, W, OK = Severity.ERROR, Severity.WARNING, Severity.OK
# Certificates and CRLs are backdated 5 minutes (pkictl.profile): a larger skew makes a fresh
# certificate "not yet valid" on one side. NTP keeps clocks well within a second.
SKEW_WARNING = CLOCK_AGREEMENT
SKEW_ERROR = dt.timedelta(minutes=5)


def _missing(path: Path, what: str, fix: str, *, directory: bool = False) -> Finding | None:
    if (path.is_dir() if directory else path.is_file()):
        return None
    state = "is not a directory" if directory and path.exists() else "is not a file" if path.exists() else "does not exist"
    return Finding("config-files", E, str(path), f"{what} {state}", f"the {what} the configuration names", fix)


@check("config-files")
def check_config_files(facts: AgentFacts):
    """Every file and directory the configuration names exists (hook programs on their PATH)."""
    config, where = facts.config, str(facts.config_path)
    renewal = config.renewal
    candidates = [
        _missing(config.credential_dir, "credential_dir", f"copy the bundle there (tar or rsync -a), or correct credential_dir in {where}",
                 directory=True),
        _missing(renewal.ca_home / "ca.yaml", "CA home (renewal.ca_home)", f"correct renewal.ca_home in {where}: the directory "
                 "pkictl init-ca made") if renewal.ca_home is not None else None,
        _missing(renewal.ca_passphrase_file, "passphrase file (renewal.ca_passphrase_file)",
                 f"create it (0600, the CA key passphrase on one line) or correct {where}") if renewal.ca_passphrase_file else None,
        _missing(config.listener.crl, "CRL file (listener.crl)", "copy crl.pem from the CA host (pkictl sign-crl there), "
                 f"or correct listener.crl in {where}") if config.listener is not None and config.listener.crl else None,
    ]
    yield from (c for c in candidates if c is not None)
    if renewal.ca_passphrase_file is not None and renewal.ca_passphrase_file.is_file():
        mode = stat.S_IMODE(renewal.ca_passphrase_file.stat().st_mode)
        if mode & 0o077:
            yield Finding("config-files", E, str(renewal.ca_passphrase_file), f"mode {mode:04o}: readable by group or others",
                          "0600", f"chmod 600 {renewal.ca_passphrase_file}")
    for hook in config.hooks:
        yield from _hook_findings(hook, where)


def _hook_findings(hook, where: str):
    if hook.run is not None:
        program = hook.run[0]
        path = hook.env.get("PATH", BASE_PATH)
        found = shutil.which(program, path=path) if "/" not in program else (program if os.access(program, os.X_OK) else None)
        if found is None:
            yield Finding("config-files", E, f"hook {hook.describe()}", f"{program} is not an executable program"
                          + ("" if "/" in program else f" on PATH={path}"),
                          "a program the hook can run (after each rotation)",
                          f"give its absolute path in {where}, or set env: {{PATH: ...}} on the hook")
        return
    pid_file = hook.sighup_pid_file
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        yield Finding("config-files", W, f"hook {hook.describe()}", f"{pid_file} is missing or holds no PID: after a rotation "
                      "nothing will be told to reload", "the PID file of the running server", f"start the server, or correct {where}")
        return
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        yield Finding("config-files", W, f"hook {hook.describe()}", f"PID {pid} in {pid_file} is not running (a stale PID file)",
                      "the PID of the running server", "restart the server that writes it")
    except PermissionError:
        pass  # it exists, under another user: the agent's own user may be allowed to signal it


@check("crl")
def check_crl(facts: AgentFacts):
    """The listener's CRL (or, on the CA host, the CA's) is fresh and signed by our issuing CA,
    and the root's CRL beside it by our root."""
    path = facts.crl_path
    if path is None:
        yield Finding("crl", OK, "", "not checked: no CRL on this host (listener.crl, or renewal.ca_home's crl.pem)")
        return
    if not path.is_file():
        return  # reported by config-files
    chain = facts.credential.chain if isinstance(facts.credential.chain, list) else []
    if facts.config.renewal.ca_url:
        fix = f"the agent fetches it from {facts.config.renewal.ca_url}/crl.pem every refresh_interval: is it running, and can it reach the EST server?"
    elif facts.config.renewal.ca_home:
        fix = f"pkictl --home {facts.config.renewal.ca_home} sign-crl (the agent re-signs it at half its validity: is it running?)"
    else:
        fix = "copy a fresh crl.pem from the CA host (pkictl sign-crl there)"
    anchors = facts.credential.anchors if isinstance(facts.credential.anchors, list) else []
    where = f"pkictl --home {facts.config.renewal.ca_home}" if facts.config.renewal.ca_home else "on the CA host, pkictl"
    root_fix = (f"{where} sign-crl --root, with the root key brought back for it (this host's listener checks only the leaf's "
                "CRL; servers that check every level of the chain, such as nginx ssl_crl or haproxy crl-file, need the root's)")
    yield from crl_findings(path, chain, facts.now, fix=fix, roots=anchors, root_fix=root_fix)


@check("est-server")
def check_est_server(facts: AgentFacts):
    """The EST server of renewal.ca_url answers and proves it is our CA (renewals need both)."""
    url = facts.config.renewal.ca_url
    if url is None:
        return [Finding("est-server", OK, "", "not checked: no renewal.ca_url")]
    if facts.offline:
        return [Finding("est-server", OK, url, "not checked: --offline")]
    probe = facts.est
    if probe is None:
        return []  # no ca.pem: the trust-anchor check says so
    if probe.verify_failed and facts.credential.pin_mismatch:
        return [Finding("est-server", E, url, f"cannot be verified ({probe.error}): ca.pem is not the pinned root "
                        "(the trust-anchor finding)", "ca.pem holding the pinned root",
                        "restore ca.pem as the trust-anchor finding says; nothing to change on the EST server")]
    if probe.verify_failed:
        return [Finding("est-server", E, url, f"does not prove it is our CA ({probe.error})",
                        f"a server certificate from our CA naming {url.split('//')[1].rstrip('/')}",
                        f"check renewal.ca_url in {facts.config_path}; on the CA host, pkictl serve --dns/--ip must name it")]
    if probe.error:
        return [Finding("est-server", W, url, f"cannot be reached ({probe.error}): renewals and CRL refreshes fail meanwhile",
                        "pkictl serve answering", "check that pkictl serve runs on the CA host, the address, and the firewall")]
    return []


@check("clock-skew")
def check_clock_skew(facts: AgentFacts):
    """This host's clock agrees with the EST server's (its HTTP Date header)."""
    probe = facts.est
    if probe is None or probe.skew is None:
        return [Finding("clock-skew", OK, "", "not checked: no answer from an EST server with a Date header")]
    skew = probe.skew.total_seconds()
    if abs(probe.skew) <= SKEW_WARNING:
        assert facts.config.renewal.ca_url is not None, "the EST server answered: it has a URL"
        return [Finding("clock-skew", OK, facts.config.renewal.ca_url, f"{skew:+.0f} s against the EST server")]
    side = "behind" if skew > 0 else "ahead of"
    severity = E if abs(probe.skew) > SKEW_ERROR else W
    return [Finding("clock-skew", severity, "this host's clock", f"{abs(skew):.0f} s {side} the EST server's "
                    f"({facts.config.renewal.ca_url}): new certificates may look not yet valid, CRLs expired",
                    f"at most {SKEW_WARNING.total_seconds():.0f} s", "fix the clock (timedatectl set-ntp true; chronyc tracking)")]


@check("agent")
def check_agent(facts: AgentFacts):
    """The agent that ran for this credential still runs, and its last renewal attempt and hooks
    succeeded (its state file, :mod:`pki_agent.rotation.state`). A credential no agent ever ran for is
    not reported here (a bundle just copied); ``pki-agent status`` says no agent runs."""
    directory, config = facts.config.credential_dir, facts.config_path
    try:
        pid = running_agent_pid(directory)
        state = read_state(state_path(directory)) or {}
    except PKIError as exc:
        return [Finding("agent", W, str(directory), str(exc), "a running agent and its state file",
                        f"restart the agent (systemctl restart pki-agent, or pki-agent run --config {config})")]
    findings = []
    if not state:
        return [Finding("agent", OK, str(directory), "no agent has run for this credential yet")]
    if pid is None:
        findings.append(Finding("agent", W, str(directory), "no pki-agent runs for this credential: nothing will renew it",
                                "a running pki-agent", f"systemctl enable --now pki-agent (or pki-agent run --config {config})"))
    attempt = state.get("last_attempt") or {}
    if attempt.get("result") == "failed":
        findings.append(Finding("agent", W, str(directory), f"the last renewal attempt ({attempt.get('started')}) failed: "
                                f"{attempt.get('error')} ({state.get('failures', 0)} in a row)", "a successful renewal",
                                f"fix the cause named, then pki-agent renew-now --config {config}"))
    for hook in state.get("hooks") or []:
        if not hook.get("ok"):
            findings.append(Finding("agent", W, f"hook {hook.get('hook')}", f"failed after the last rotation: {hook.get('detail')}",
                                    "every hook to succeed", "fix the hook's program, then pki-agent renew-now to run it again"))
    if not findings:
        findings.append(Finding("agent", OK, str(directory), f"pki-agent runs (pid {pid}); last attempt: {attempt.get('result') or 'none yet'}"))
    return findings


AGENT_CHECKS = (check_config_files, check_crl, check_est_server, check_clock_skew, check_agent)  # with CREDENTIAL_CHECKS after the first


def diagnose_agent(config_path: Path, *, clock: Clock, gateway: str | None = None, server_name: str | None = None,
                   offline: bool = False, timeout: float = 5.0, settle: float = 1.0,
                   service_files: Sequence[Path] = ()) -> list[Finding]:
    """Every finding for the agent configured by ``config_path`` at ``clock.now()``; nothing is modified.

    Args:
        gateway, server_name: where a node dials the gateway (see :func:`gateway_target`).
        offline: open no network connection.
        timeout: seconds per network connection.
        settle: seconds a test connection waits for the gateway's verdict on our certificate.
        service_files: unit and plist files to scan for secrets.

    Returns:
        The findings, ok ones included, in check order.
    """
    units = service_file_findings(list(service_files))  # whatever else is wrong, a secret in a unit is worth knowing
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Finding("config", E, str(config_path), str(exc).removeprefix(f"{config_path}: "), "a configuration the agent accepts",
                        f"edit {config_path} (schema and examples: config/*.yaml)"), *units]
    try:
        target = gateway_target(config, gateway, server_name)
    except ValueError as exc:
        return [Finding("config", E, "--gateway", str(exc), "HOST:PORT", "pass --gateway HOST:PORT"), *units]
    facts = AgentFacts(config_path=Path(config_path), config=config, clock=clock, gateway=target, offline=offline,
                       timeout=timeout, settle=settle, service_files=service_files)
    first, *rest = AGENT_CHECKS
    findings: list[Finding] = []
    credential_checks: tuple = ()
    if config.credential_dir.is_dir():  # else config-files says so, and every credential check would repeat it
        credential_checks = credential_checks_for(facts.credential)
        if facts.credential.pin_mismatch:  # the cause of what the other checks see: reported first (docs/design.md)
            findings += run_checks([check_trust_anchor], facts.credential)
            credential_checks = credential_checks[1:]
    findings += run_checks([first], facts)
    findings += run_checks(credential_checks, facts.credential)
    findings += run_checks(rest, facts)
    # A node dials the gateway through its tunnel; a gateway runs the listener in front of its upstream.
    if config.kind == "node":
        if config.tunnel is not None:
            findings += run_checks([check_tunnel_port], facts)
        findings += run_checks([c for c in GATEWAY_CHECKS if check_name(c) == "gateway"], facts)
    elif config.listener is not None:
        findings += run_checks([c for c in GATEWAY_CHECKS if check_name(c) != "gateway"], facts)
    return findings + units
