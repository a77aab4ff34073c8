"""``pki-agent status``: this host's credential, its renewal, the agent's last attempt and error,
the listener or tunnel and the hooks, from the credential on disk (the truth) and the agent's state file.

Exit status (as ``pkictl status``): 0 nothing needs attention; 3 attention: the certificate is
expiring (less than 1/6 of its lifetime left), the last renewal attempt failed, a hook failed, or
no agent runs; 4 the certificate has expired (connections fail now); 1 an error (bad config).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from typing import Any

from pkictl.errors import PKIError
from pkictl.logfmt import bare
from pkictl.renewal import certificate_state, renewal_time
from pkictl.store import CredentialStore

from .config import AgentConfig
from .pidfile import running_agent_pid
from .rotation.state import iso, read_state, state_path

__all__ = ["host_status", "render_status", "exit_code"]


def host_status(config: AgentConfig, now: dt.datetime) -> dict[str, Any]:
    """Everything ``pki-agent status`` shows, as a JSON-serialisable dict.

    Keys: ``name``, ``kind``, ``agent`` (``running``, ``pid``), ``credential`` (from disk:
    ``serial``, ``not_after``, ``days_left``, ``state``, ``renewal_due``; or ``error``),
    ``state`` (the agent's state file, or None), ``problems`` (one line each), ``connections``
    (a gateway's per-node table from the running agent's status endpoint, or None).
    """
    problems: list[str] = []
    try:
        store = CredentialStore(config.credential_dir, layout=config.version_layout())
    except ValueError:  # the group is gone: read as without it (a group-readable key is then reported)
        store = CredentialStore(config.credential_dir)
    try:
        cert = store.load().certificate
        credential = {
            "serial": f"{cert.serial_number:x}", "not_after": iso(cert.not_valid_after_utc),
            "days_left": round((cert.not_valid_after_utc - now).total_seconds() / 86400, 2),
            "state": certificate_state(now, cert.not_valid_before_utc, cert.not_valid_after_utc, fraction=config.renewal.fraction),
            "renewal_due": iso(renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction=config.renewal.fraction)),
        }
        if credential["state"] in ("expiring", "expired"):
            problems.append(f"the certificate (serial {credential['serial']}) is {credential['state']}: not after {credential['not_after']}")
    except PKIError as exc:
        credential = {"error": str(exc)}
        problems.append(f"credential: {exc}")
    try:
        pid = running_agent_pid(config.credential_dir)
    except PKIError as exc:
        pid = None
        problems.append(str(exc))
    try:
        state = read_state(state_path(config.credential_dir))
    except PKIError as exc:
        state = None
        problems.append(str(exc))
    if pid is None:
        problems.append(f"no pki-agent runs for {config.credential_dir}: start it (pki-agent run --config ...) or its service")
    if state is not None:
        attempt = state.get("last_attempt") or {}
        if attempt.get("result") == "failed":
            problems.append(f"the last renewal attempt ({attempt.get('started')}) failed: {attempt.get('error')}; "
                            f"{state.get('failures', 0)} failure(s) in a row, next attempt {state.get('next_attempt')}")
        unusable, pairing = state.get("unusable"), state.get("pairing")
        if unusable:
            problems.append(f"the certificate can no longer renew: {unusable['reason']} ({unusable['detail']})")
        if pairing:
            problems.append(f"waiting for approval of a new certificate: on the CA host run 'pkictl approve {config.name} "
                            f"--code {pairing['code']}' (compare the code with 'pkictl requests')")
        elif state.get("pairing_denied"):
            problems.append("the operator denied this node's pairing request; SIGHUP (systemctl reload pki-agent) asks again with a new key")
        for hook in state.get("hooks") or []:
            if not hook.get("ok"):
                problems.append(f"hook {hook.get('hook')} failed after {hook.get('attempts')} attempt(s): {hook.get('detail')}")
        served = (state.get("credential") or {}).get("serial")
        if pid is not None and served and "serial" in credential and served != credential["serial"]:
            problems.append(f"the agent serves serial {served} but {store.live} holds {credential['serial']}: "
                            "reload it (systemctl reload pki-agent, or kill -HUP the agent)")
    connections = None
    if pid is not None and state is not None and config.listener is not None:
        connections = _connection_table(state.get("status_server") or [], problems)
    return {"name": config.name, "kind": config.kind, "agent": {"running": pid is not None, "pid": pid},
            "credential": credential, "state": state, "problems": problems, "connections": connections}


def _connection_table(addresses: list[str], problems: list[str]) -> list[dict] | None:
    """The running listener's per-node table, from the agent's status endpoint (``GET
    /connections``); None without one (``metrics.listen`` unset) or when it does not answer."""
    if not addresses:
        return None
    url = f"http://{addresses[0]}/connections"
    try:
        # No proxy: the endpoint is this host's own (an http_proxy variable must not send it elsewhere).
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as response:
            table = json.loads(response.read())
    except (OSError, ValueError) as exc:
        problems.append(f"the agent's status endpoint {url} does not answer ({exc}): its connections are unknown")
        return None
    return table if isinstance(table, list) else None


def exit_code(status: dict[str, Any]) -> int:
    """The documented exit status of ``status`` (module docstring)."""
    if status["credential"].get("state") == "expired":
        return 4
    return 3 if status["problems"] else 0


def render_status(status: dict[str, Any], *, as_json: bool = False) -> str:
    """The text ``pki-agent status`` prints (or JSON with ``as_json``)."""
    if as_json:
        return json.dumps(status, indent=2, sort_keys=True)
    state = status["state"] or {}
    agent = status["agent"]
    lines = [f"{status['kind']} {status['name']}"]
    if agent["running"]:
        lines.append(f"  agent          running (pid {agent['pid']}) since {state.get('started') or '?'}")
    else:
        seen = f" (its state file was last written {state['updated']})" if state.get("updated") else ""
        lines.append(f"  agent          not running{seen}")
    cred = status["credential"]
    if "error" in cred:
        lines.append(f"  credential     ERROR: {cred['error']}")
    else:
        lines.append(f"  credential     serial {cred['serial']}, not after {cred['not_after']} ({cred['days_left']} days left), {cred['state']}")
        due = (state.get("credential") or {}).get("renewal_due") or cred["renewal_due"]
        lines.append(f"  renewal        due {due}, next attempt {state.get('next_attempt') or due}")
    attempt = state.get("last_attempt")
    if attempt:
        outcome = f"renewed, serial {attempt['serial']}" if attempt["result"] == "renewed" else f"FAILED: {attempt['error']}"
        lines.append(f"  last attempt   {attempt['started']}{' (renew-now)' if attempt.get('forced') else ''}: {outcome}")
    listener = state.get("listener")
    if listener:
        lines.append(f"  listener       listening on {', '.join(listener['addresses'])}")
    tunnel = state.get("tunnel")
    if tunnel:
        lines.append(f"  tunnel         {', '.join(tunnel['addresses'])} -> {tunnel['gateway']}")
    connections = status.get("connections")
    if connections is not None:
        lines.append(f"  connections    {sum(n['open_connections'] for n in connections)} open, {len(connections)} node(s) seen")
        for n in connections:
            since = f" since {n['connected_since']} from {bare(n['peer'])}" if n["open_connections"] else f", last seen {n['last_seen']}"
            refusal = f"; last refusal {n['last_refusal_at']} {bare(n['last_refusal_reason'])}" if n["last_refusal_reason"] else ""
            lines.append(f"    {bare(n['node'])}: {n['open_connections']} open{since}, in {n['bytes_in']} B, out {n['bytes_out']} B{refusal}")
    elif listener:
        lines.append("  connections    unknown here: set metrics.listen in the agent's configuration to see them")
    for hook in state.get("hooks") or []:
        lines.append(f"  hook           {hook['hook']}: {'ok' if hook['ok'] else 'FAILED'} ({hook['detail']}) at {hook['time']}")
    lines += [f"  problem        {p}" for p in status["problems"]]
    return "\n".join(lines)
