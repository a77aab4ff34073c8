"""``pkictl nodes``: the fleet view (:mod:`pkictl.fleet`) as a table or JSON, with an exit status."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import click

from ..logfmt import bare
from ..status import EXIT_CRITICAL, EXIT_OK, EXIT_WARNING

__all__ = ["nodes", "render_nodes"]

_HEADER = ("NAME", "CERTIFICATE", "SERIAL", "NOT AFTER (UTC)", "CONNECTED", "SINCE (UTC)", "PEER", "OPEN", "IN", "OUT",
           "LAST SEEN (UTC)", "LAST REFUSAL", "ATTENTION")


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def render_nodes(rows: list, gateways: list, *, as_json: bool) -> str:
    """The text (or JSON: ``{"nodes": [...], "gateways": [...]}``, times ISO 8601 UTC, serials hex)
    of ``pkictl nodes``."""
    if as_json:
        def value(v):
            return v.isoformat() if isinstance(v, dt.datetime) else v

        nodes = [{k: (f"{v:x}" if k == "serial" and v is not None else value(v)) for k, v in dataclasses.asdict(r).items()} for r in rows]
        states = [{"name": g.name, "serial": f"{g.serial:x}", "received_at": g.received_at.isoformat(), "interval": g.interval,
                   "reporting": g.reporting} for g in gateways]
        return json.dumps({"nodes": nodes, "gateways": states}, indent=2)
    table = [_HEADER]
    for r in rows:
        connected = {True: "yes", False: "no", None: "unknown"}[r.connected]
        refusal = f"{_when(r.last_refusal_at)} {bare(r.last_refusal_reason)}" if r.last_refusal_reason else "-"
        known = r.connected is not None
        table.append((r.name, r.certificate_state, f"{r.serial:x}"[:16] if r.serial is not None else "-", _when(r.not_valid_after),
                      connected, _when(r.connected_since) if known else "unknown", bare(r.peer) if r.peer else "-",
                      str(r.open_connections) if known else "?", str(r.bytes_in) if known else "?",
                      str(r.bytes_out) if known else "?", _when(r.last_seen) if known else "unknown", refusal, r.attention or ""))
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    if not gateways:
        lines.append("no gateway has reported: connections are unknown (a gateway's pki-agent reports to pkictl serve or to this CA home)")
    for g in gateways:
        if not g.reporting:
            lines.append(f"gateway {g.name} NOT REPORTING since {_when(g.received_at)} UTC (heartbeat every {g.interval:g} s): "
                         "its connections are unknown; check its pki-agent (pki-agent status on the gateway)")
    return "\n".join(lines)


@click.command("nodes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({\"nodes\": [...], \"gateways\": [...]}) instead of a table.")
@click.option("--disconnected-after", default="10m", show_default=True,
              help="A node that has connected before (or is named by --expect) and has not been seen for longer needs attention.")
@click.option("--expect", "expected", multiple=True, metavar="NODE", help="A node that should be connected (repeatable).")
@click.pass_obj
def nodes(obj, as_json: bool, disconnected_after: str, expected: tuple[str, ...]) -> None:
    """One row per enrolled node: its certificate, and its connections at the gateways.

    \b
    Exit status (as pkictl status):
      0  nothing needs attention
      3  a node needs attention: its certificate is expiring, revoked or pending approval, it
         should be connected and has not been for longer than --disconnected-after, or a
         gateway is not reporting
      4  a node's certificate has expired
      1  error (no CA, a bad option)
    """
    from ..authority import CertificateAuthority
    from ..clock import SystemClock
    from ..errors import PKIError
    from ..fleet import fleet_view, gateway_states
    from ..names import validate_name
    from ..settings import CASettings, parse_duration

    try:
        after = parse_duration(disconnected_after, field="--disconnected-after")
        for name in expected:
            validate_name(name)
    except PKIError as exc:
        raise click.BadParameter(str(exc)) from None
    home = obj.require_ca()
    now = SystemClock().now()
    # The fleet view reads the inventory and the settings only: made without loading (and so
    # without the passphrase of) the issuing key, as pkictl status reads no key either.
    ca = CertificateAuthority.__new__(CertificateAuthority)
    ca.home, ca.settings, ca._inventory = home, CASettings.load(home / "ca.yaml"), None
    try:
        rows = fleet_view(ca, now=now, disconnected_after=after, expected=expected)
        gateways = gateway_states(ca, now=now)
    finally:
        ca.close()
    click.echo(render_nodes(rows, gateways, as_json=as_json))
    code = EXIT_OK
    if any(r.attention for r in rows) or any(not g.reporting for g in gateways):
        code = EXIT_WARNING
    if any(r.certificate_state == "expired" for r in rows):
        code = EXIT_CRITICAL
    raise SystemExit(code)
