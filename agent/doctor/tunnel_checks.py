"""Doctor check of a node's tunnel port: is it pki-agent's tunnel that local clients reach on ``tunnel.listen``?

A client on the node dials ``tunnel.listen`` (127.0.0.1:18789 by default) and cannot tell our
tunnel from a stale program left on the port (such as the Node.js gateway client that answered
"401 Unauthorized" before pkictl): the doctor compares the process holding the socket with the
agent's PID file, and names a stranger by its pid, command line and first answer
(docs/design.md, "The node-side doctor", on the tunnel port).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkictl.diagnosis.findings import Finding, Severity, check
from pkictl.errors import PKIError
from pkictl.logfmt import quoted

from ..pidfile import running_agent_pid
from .port_owner import first_answer, listening_process
from .probe import tcp_connect
from ..service import backend_for

if TYPE_CHECKING:
    from .facts import AgentFacts

__all__ = ["check_tunnel_port"]

E, W, OK = Severity.ERROR, Severity.WARNING, Severity.OK


@check("tunnel")
def check_tunnel_port(facts: "AgentFacts"):
    """The tunnel's local port (``tunnel.listen``) is held by the pki-agent running for this
    credential (its PID file, :mod:`pki_agent.pidfile`), not by nothing or by another program."""
    tunnel = facts.config.tunnel
    if tunnel is None:
        return
    host, port = tunnel.listen
    where = f"{host}:{port}"
    if facts.offline or port == 0:
        yield Finding("tunnel", OK, where, "not checked: --offline, or tunnel.listen port 0 (a port chosen at each start)")
        return
    service = backend_for()
    start = f"{service.start_command()} (or pki-agent run --config {facts.config_path})"
    try:
        agent = running_agent_pid(facts.config.credential_dir)
    except (PKIError, OSError):
        agent = None  # the agent check reports an unreadable PID file; a user who may not read it cannot tell either
    error = tcp_connect((host, port), timeout=facts.timeout)
    if error:
        if agent is None:
            yield Finding("tunnel", E, where, f"nothing listens ({error}): pki-agent is not running, so local clients cannot reach "
                          "the gateway", "pki-agent's tunnel listening there", f"start it: {start}")
        else:
            yield Finding("tunnel", E, where, f"nothing listens ({error}), though pki-agent runs (pid {agent}): its tunnel is not up",
                          "pki-agent's tunnel listening there", f"read its log ({service.log_command()}), then restart it")
        return
    holder = listening_process((host, port))
    if holder is not None and holder.pid == agent:
        yield Finding("tunnel", OK, where, f"held by pki-agent (pid {agent}), forwarding to {tunnel.gateway[0]}:{tunnel.gateway[1]}")
        return
    ours = f"pki-agent (pid {agent})" if agent is not None else "pki-agent, which is not running"
    if holder is None and agent is not None:
        yield Finding("tunnel", W, where, f"cannot tell which process holds it (this user may not list sockets); pki-agent runs "
                      f"(pid {agent})", "pki-agent's tunnel", "run pki-agent doctor as root, or compare with ss -ltnp / lsof -i")
        return
    # Not ours. A stranger's answer is unescaped peer data: quoted before it reaches the finding.
    answer = first_answer((host, port), timeout=facts.settle)
    says = ("it answers nothing to an HTTP request" if answer is None else "it closes without a word" if answer == ""
            else f"it answers {quoted(answer)}")
    who = f"pid {holder.pid} ({quoted(holder.command)})" if holder is not None else "another process"
    kill = f"kill {holder.pid}" if holder is not None else "find it with ss -ltnp or lsof -i, then kill it"
    then = f"start pki-agent: {start}" if agent is None else f"restart pki-agent (its tunnel cannot bind): {service.log_command()}"
    yield Finding("tunnel", E, where, f"held by {who}, not by {ours}: {says}; local clients reach it instead of the gateway",
                  "pki-agent's tunnel", f"stop it ({kill}) and {then}")
