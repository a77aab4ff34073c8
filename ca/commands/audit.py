"""``pkictl audit verify`` and ``audit head``: the CA's hash-chained audit log."""

from __future__ import annotations


import click

from .common import Home

__all__ = ["audit"]



@click.group("audit")
def audit() -> None:
    """The CA's hash-chained audit log (<home>/audit.log)."""


@audit.command("verify")
@click.option("--anchor", help="SEQ:HASH of a record you noted earlier (e.g. from 'audit head'), to detect a rewrite up to it.")
@click.pass_obj
def audit_verify(obj: Home, anchor: str | None) -> None:
    """Check the log's hash chain and its head; exit 1 when it was edited or truncated."""
    from ..audit import open_audit_log
    from ..clock import SystemClock

    home = obj.require_ca()
    pin = None
    if anchor:
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise click.BadParameter("want SEQ:HASH, e.g. 42:3f9a...(64 hex digits)", param_hint="--anchor")
        pin = (int(seq), digest.lower())
    log = open_audit_log(home, clock=SystemClock())
    result = log.verify(anchor=pin)
    if not result.ok:
        raise click.ClickException(f"audit log {log.path} does not verify: {result.problem}")
    click.echo(f"audit log ok: {result.records} records" + (f" ({result.note})" if result.note else ""))


@audit.command("head")
@click.pass_obj
def audit_head(obj: Home) -> None:
    """Print SEQ:HASH of the last record: note it somewhere else to pin the log with --anchor."""
    from ..audit import open_audit_log
    from ..clock import SystemClock

    head = open_audit_log(obj.require_ca(), clock=SystemClock()).head()
    click.echo(f"{head[0]}:{head[1]}" if head else "0:(empty)")
