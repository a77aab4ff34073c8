"""``pkictl requests``, ``approve`` and ``deny``: the enrollment requests waiting for an operator."""

from __future__ import annotations


import click

from .common import Home

__all__ = ["requests_", "approve", "deny"]



@click.command("requests")
@click.pass_obj
def requests_(obj: Home) -> None:
    """List enrollment requests waiting for approval: name, code, the address it came from, when
    it was filed and how long it has waited (expired ones, older than pending_request_ttl, are not
    listed)."""
    import datetime as dt

    from ..inventory import Inventory
    from ..settings import CASettings, format_duration

    home = obj.require_ca()
    settings = CASettings.load(home / "ca.yaml")
    inventory = Inventory.open(home)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        rows = [(row, inventory.unexpired(row["name"], ["node"], now))
                for row in inventory.pending_requests(now=now, ttl=settings.pending_request_ttl)]
    finally:
        inventory.close()
    if not rows:
        click.echo("no pending requests")
        return
    click.echo(f"{'NAME':24}  {'CODE':9}  {'FROM':22}  {'FILED (UTC)':19}  {'WAITING':8}  NOTE")
    for row, current in rows:
        note = f"replaces serial {current[0].serial:x} (valid until {current[0].not_after:%Y-%m-%d %H:%M})" if current else ""
        filed = dt.datetime.fromtimestamp(row["requested_at"], dt.timezone.utc)
        waiting = f"{int(now.timestamp() - row['requested_at'])} s"
        click.echo(f"{row['name']:24}  {row['code']:9}  {row['peer'] or '?':22}  {filed:%Y-%m-%d %H:%M:%S}  {waiting:8}  {note}".rstrip())
    click.echo(f"{len(rows)} waiting (at most {settings.pending_requests_per_name} per name and {settings.pending_requests_total} in all; "
               f"each expires after {format_duration(settings.pending_request_ttl)})")
    click.echo("approve one with: pkictl approve NAME --code CODE (compare the code with the one the node shows)")


@click.command("approve")
@click.argument("name")
@click.option("--code", required=True, help="The code the node shows (and 'pkictl requests' lists).")
@click.pass_obj
def approve(obj: Home, name: str, code: str) -> None:
    """Approve NAME's pending enrollment; its agent gets the certificate at its next poll.

    A node that still holds a valid certificate gets a new one all the same (the operator
    approved this key for this name): the old certificate is then revoked as superseded.
    """
    replaced = obj.load_ca().approve(name, code=code)
    click.echo(f"approved {name} ({code.upper()}); it gets its certificate at its next poll")
    for record in replaced:
        click.echo(f"  it replaces {record.kind} {record.name} serial {record.serial:x} (valid until "
                   f"{record.not_after:%Y-%m-%d %H:%M:%S} UTC), which is revoked (superseded) once the new one is issued")


@click.command("deny")
@click.argument("name")
@click.pass_obj
def deny(obj: Home, name: str) -> None:
    """Deny NAME's pending enrollment requests."""
    count = obj.load_ca().deny(name)
    click.echo(f"denied {count} request(s) of {name}")
