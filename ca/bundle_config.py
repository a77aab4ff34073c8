"""What a bundle's ``agent.yaml`` says, written by the CA side (``pkictl enroll-*``, ``pki-agent
enroll``) and read by pki-agent's schema (agent/config.py): the addresses it holds and the
commented text itself.

The rules on addresses live here so that the commands that write a config refuse what the agent
would refuse, before anything is issued.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

__all__ = ["parse_address", "check_loopback", "check_gateway_port", "parse_tunnel", "render_agent_config"]


def parse_address(value: str | tuple) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port`` into ``(host, port)``.

    Raises:
        ValueError: not of that form, or the port is outside 0..65535 (0 = any free port).
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = str(value[0]), value[1]
    else:
        text = str(value).strip()
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address {text!r}: want HOST:PORT such as 127.0.0.1:8443 or [::1]:8443")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    try:
        port = int(port)
    except (TypeError, ValueError, OverflowError):  # [host, null], [host, [1]], [host, .inf] from YAML
        raise ValueError(f"address {value!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {value!r}: port {port} outside 0..65535")
    return host, port


def check_loopback(value: tuple[str, int]) -> tuple[str, int]:
    """``value`` if its host is a loopback address (or ``localhost``): where the node's plain-TCP
    tunnel may listen.

    Raises:
        ValueError: any other host.
    """
    host = value[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host}: the tunnel takes plain TCP, so it listens on loopback only (127.0.0.1 or [::1]); "
                         "anyone who could reach it elsewhere would speak to the gateway as this node")
    return value


def check_gateway_port(value: tuple[str, int]) -> tuple[str, int]:
    """``value`` if it names a port (a node dials the gateway; port 0 means nothing there).

    Raises:
        ValueError: port 0.
    """
    if value[1] == 0:
        raise ValueError(f"{value[0]}:0: the gateway's port must be given")
    return value


def parse_tunnel(text: str) -> dict[str, str]:
    """Parse the ``--tunnel LISTEN=GATEWAY`` of the enroll commands, e.g.
    ``127.0.0.1:18789=gw.example.lan:8443``, into the ``tunnel:`` settings it stands for.

    Raises:
        ValueError: not of that form, LISTEN is not on loopback, or GATEWAY has no port.
    """
    listen, sep, gateway = str(text).partition("=")
    if not sep or not listen or not gateway:
        raise ValueError(f"{text!r}: want LISTEN=GATEWAY such as 127.0.0.1:18789=gw.example.lan:8443")
    problems = []
    try:
        check_loopback(parse_address(listen))
    except ValueError as exc:
        problems.append(f"listen: {exc}")
    try:
        check_gateway_port(parse_address(gateway))
    except ValueError as exc:
        problems.append(f"gateway: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return {"listen": listen.strip(), "gateway": gateway.strip()}


def _allow_yaml(names) -> str:
    names = list(names or ["*"])
    return "[" + ", ".join("'*'" if n == "*" else n.lower() for n in names) + "]"


def render_agent_config(
    *,
    name: str,
    kind: str,
    trust_domain: str,
    ca_home: Path | None = None,
    ca_url: str | None = None,
    ca_passphrase_file: Path | None = None,
    fraction: float = 2 / 3,
    check_interval: str = "60s",
    listener: dict | None = None,
    tunnel: dict | None = None,
    written_by: str | None = None,
    trust_anchor_sha256: str | None = None,
) -> str:
    """The commented ``agent.yaml`` that ``pkictl enroll-*`` and ``pki-agent enroll`` write into a bundle.

    Args:
        name, kind, trust_domain: whose credential (``node`` or ``gateway``).
        ca_home: renew with the CA in this directory (an agent on the CA host), or
        ca_url: renew over EST from this ``https://HOST:PORT``; a node then also re-pairs by
            approval by itself when its certificate becomes unusable (``reenroll: approval``).
        ca_passphrase_file: with ``ca_home``, the file holding the CA key passphrase.
        fraction: renewal point, as a share of the lifetime.
        check_interval: the agent's periodic check, e.g. ``"60s"``.
        listener: a gateway's ``{"listen", "upstream", "allow", "crl"}``.
        tunnel: a node's ``{"listen", "gateway"}`` (:func:`parse_tunnel`).
        written_by: the command named in the header comment.
        trust_anchor_sha256: the root's fingerprint (hex), recorded for ``pki-agent doctor``.
    """
    lines = [
        f"# pki-agent configuration for {kind} {name}, written by {written_by or f'pkictl enroll-{kind}'}.",
        "# Paths are relative to this file. Run: pki-agent run --config agent.yaml",
        f"name: {name}",
        f"kind: {kind}",
        f"trust_domain: {trust_domain}",
    ]
    if trust_anchor_sha256:
        lines.append(f"trust_anchor_sha256: sha256:{trust_anchor_sha256}  # the root in ca.pem (pki-agent doctor checks it)")
    lines += [
        "credential_dir: .          # this bundle: live/ -> archive/N/ holds the current credential",
        "renewal:",
        (f"  ca_home: {ca_home}  # renew with the CA directly (CA host only)" if ca_home is not None
         else f"  ca_url: {ca_url}  # renew over EST with the current certificate"),
        f"  fraction: {fraction:.4f}         # renew after this share of the certificate's lifetime",
        "  jitter: 0.05             # ... up to 5% of the lifetime earlier",
        f"  check_interval: {check_interval}      # level-triggered re-check (survives sleep and clock jumps)",
    ]
    if ca_home is not None and ca_passphrase_file is not None:
        lines.append(f"  ca_passphrase_file: {ca_passphrase_file}  # the CA keys are encrypted: the agent signs with them")
    if ca_url is not None and listener and listener.get("crl"):
        lines.append("  crl_refresh_interval: 60s  # fetch the CRL this often: how soon a revocation reaches the listener")
    if ca_url is not None and kind == "node":
        lines.append("  reenroll: approval       # a revoked or expired certificate: new key, pairing request (pkictl approve)")
    if listener:
        lines += [
            "listener:",
            f"  listen: \"{listener['listen']}\"      # nodes connect here with mTLS",
            f"  upstream: \"{listener['upstream']}\"  # the real gateway, plain TCP on loopback",
            f"  allow: {_allow_yaml(listener.get('allow'))}  # node names let through; ['*'] = every node of this CA",
            "  handshake_timeout: 10s",
            "  max_connections: 1024",
            "  idle_timeout: 10m",
        ]
        if listener.get("crl"):
            lines.append(f"  crl: {listener['crl']}  # refuse revoked nodes; reloaded when it changes")
    if tunnel:
        lines += [
            "tunnel:",
            f"  listen: \"{tunnel['listen']}\"    # local clients connect here in plain TCP (loopback only)",
            f"  gateway: \"{tunnel['gateway']}\"  # ... and reach the gateway over mTLS with this node's certificate",
            "  connect_timeout: 10s",
        ]
    # pki-agent's schema (agent/config.py) loads every variant of this: tests/test_bundle_config.py.
    return "\n".join(lines) + "\n"
