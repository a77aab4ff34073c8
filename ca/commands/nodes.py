"""``pkictl nodes``: the fleet view (:mod:`pkictl.fleet`) as a table or JSON, with an exit status."""

from __future__ import annotations


import click

from ..fleet import render_nodes
from ..status import EXIT_CRITICAL, EXIT_OK, EXIT_WARNING

__all__ = ["nodes"]

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
