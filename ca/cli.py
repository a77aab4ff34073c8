"""The ``pkictl`` command line: the group, its error handling and its core commands (the others: :mod:`pkictl.commands`).

Heavy imports (cryptography, yaml) happen inside commands so that ``pkictl --version`` and
``--help`` stay fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .commands.audit import audit
from .commands.common import Home, default_home, duration_option
from .commands.database import db
from .commands.enroll import enroll_gateway, enroll_node
from .commands.nodes import nodes
from .commands.operators import enroll_operator
from .commands.pairing import approve, deny, requests_
from .commands.serve import serve
from .errors import KeyReused, PKIError

__all__ = ["main", "cli", "default_home", "PKIGroup"]


class PKIGroup(click.Group):
    """Turns every PKIError into a ClickException: the message on stderr, exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PKIError as exc:
            # The operator may read whose a reused key is; an EST client may not (KeyReused).
            raise click.ClickException(exc.operator_message if isinstance(exc, KeyReused) else str(exc)) from exc


@click.group(cls=PKIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkictl")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PKICTL_HOME",
    help="CA home directory (default: a per-user data directory; env PKICTL_HOME).",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File (mode 0600) holding the CA key passphrase; or set PKICTL_CA_PASSPHRASE. Never on the command line.",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None, passphrase_file: Path | None) -> None:
    """pkictl: a private CA for mutual TLS between a gateway and its nodes."""
    ctx.obj = Home(home, passphrase_file)


@cli.command("init-ca")
@click.option("--trust-domain", default="pkictl.internal", show_default=True, help="SPIFFE trust domain of node identities.")
@click.option("--node-lifetime", callback=duration_option, help="Validity of node certificates, e.g. 90d (default 90d).")
@click.option("--gateway-lifetime", callback=duration_option, help="Validity of gateway certificates (default 90d).")
@click.option("--renewal-fraction", type=float, default=2 / 3, show_default="2/3", help="Renew after this share of the lifetime.")
@click.option("--db", "db_url", metavar="URL",
              help="Keep the records in this PostgreSQL database, shared by pkictl serve replicas: "
                   "postgresql://USER@HOST/DBNAME?passfile=PATH (never a password in the URL). Default: SQLite in the CA home.")
@click.pass_obj
def init_ca(obj: Home, trust_domain, node_lifetime, gateway_lifetime, renewal_fraction, db_url) -> None:
    """Create a root CA and an issuing CA (ECDSA P-256) in the CA home."""
    from cryptography.hazmat.primitives import hashes

    from .authority import CertificateAuthority
    from .settings import CASettings

    values = {"trust_domain": trust_domain, "renewal_fraction": renewal_fraction}
    if node_lifetime:
        values["node_lifetime"] = node_lifetime
    if gateway_lifetime:
        values["gateway_lifetime"] = gateway_lifetime
    if db_url is not None:
        from .storage.location import check_url

        check_url(db_url)  # before a key is made
    passphrase = obj.passphrase()
    ca = CertificateAuthority.init(obj.home, CASettings(**values), passphrase=passphrase, db_url=db_url)
    fingerprint = ca.root.fingerprint(hashes.SHA256()).hex()
    click.echo(f"created CA in {obj.home}")
    click.echo(f"  root:        {ca.root.subject.rfc4514_string()}  (not after {ca.root.not_valid_after_utc:%Y-%m-%d})")
    click.echo(f"  issuing CA:  {ca.issuing.subject.rfc4514_string()}  (not after {ca.issuing.not_valid_after_utc:%Y-%m-%d})")
    click.echo(f"  trust anchor {obj.home / 'ca.pem'}  sha256:{fingerprint}")
    click.echo(f"  records in   {db_url if db_url else obj.home / 'inventory.sqlite3'}")
    if passphrase:
        click.echo("  CA keys encrypted (PKCS#8, scrypt); commands that sign need the same passphrase")
    else:
        click.echo("  CA keys NOT encrypted (0600 files); give --passphrase-file or PKICTL_CA_PASSPHRASE to encrypt them")
    click.echo(f"  the root key {obj.home / 'root' / 'key.pem'} is needed only to certify a new issuing CA: keep it offline")


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects) instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Include superseded certificates.")
@click.option("--warn-days", type=click.FloatRange(min=0), help="Flag certificates with fewer days left (exit status 3).")
@click.pass_obj
def status(obj: Home, as_json: bool, show_all: bool, warn_days: float | None) -> None:
    """Show every certificate and CRL: expiry, renewal time and state.

    \b
    Exit status:
      0  nothing needs attention ("renewal due" is the agent's job, "revoked" is intended)
      3  something is expiring (less than 1/6 of its lifetime left), within --warn-days,
         or a CRL is overdue for re-signing
      4  a current certificate or a CRL has expired: connections fail now
      1  error (no CA, unreadable inventory)
    """
    import datetime as dt

    from .status import read_status, status_source

    home = obj.require_ca()
    text, code = read_status(status_source(home), dt.datetime.now(dt.timezone.utc),
                             latest_only=not show_all, warn_days=warn_days, as_json=as_json)
    click.echo(text)
    raise SystemExit(code)


@cli.command("revoke")
@click.argument("target")
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason: unspecified, key-compromise, affiliation-changed, superseded, "
                   "cessation-of-operation, privilege-withdrawn.")
@click.pass_obj
def revoke(obj: Home, target: str, reason: str) -> None:
    """Revoke TARGET (a serial number, or a name: all its current certificates) and re-sign the CRL."""
    from .revocation import parse_reason

    reason = parse_reason(reason)  # before the CA is even loaded
    ca = obj.load_ca()
    for record in ca.revoke(target, reason=reason):
        click.echo(f"revoked {record.kind} {record.name} serial {record.serial:x} ({reason})")
    click.echo(f"CRL re-signed: {ca.crl_path}")


@cli.command("sign-crl")
@click.option("--root", "with_root", is_flag=True,
              help="Also sign the root's CRL (root_crl_lifetime, 365 days by default); needs the root key back at "
                   "<home>/root/key.pem for this command.")
@click.pass_obj
def sign_crl(obj: Home, with_root: bool) -> None:
    """Re-sign the CRL of each active issuing CA now, from the inventory (pkictl doctor's fix for
    an overdue, expired or stale crl.pem); with --root, the root's CRL too.

    \b
    crl.pem always carries the root's last CRL beside the issuing CAs': servers that check every
    level of the chain (nginx ssl_crl, haproxy crl-file) refuse every client without it.
    """
    from .revocation import load_crls
    from .root_crl import read_root_crl, root_crl_path

    ca = obj.load_ca()
    if with_root:
        root_crl = ca.sign_root_crl()  # and the issuing CAs' CRLs with it
        crls = [c for c in load_crls(ca.crl_path) if c.issuer != ca.root.subject]
    else:
        crls, root_crl = ca.sign_crl(), read_root_crl(ca.home, ca.root)
    def next_update(crl) -> str:
        return crl.next_update_utc.isoformat() if crl.next_update_utc is not None else "none"

    for crl in crls:
        click.echo(f"signed the CRL of {crl.issuer.rfc4514_string()}: {len(crl)} revoked, next update {next_update(crl)}")
    if root_crl is None:
        click.echo(f"no root CRL in {root_crl_path(ca.home)}: servers that check every level of the chain (nginx ssl_crl, "
                   "haproxy crl-file) refuse every client; run pkictl sign-crl --root with the root key back")
    elif with_root:
        click.echo(f"signed the root's CRL ({root_crl.issuer.rfc4514_string()}): {len(root_crl)} revoked, next update "
                   f"{next_update(root_crl)}; move {ca.home / 'root' / 'key.pem'} offline again")
    else:
        click.echo(f"kept the root's CRL: next update {next_update(root_crl)} "
                   "(renew it before then: pkictl sign-crl --root, with the root key back)")
    click.echo(f"written to {ca.crl_path}")


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print every finding (ok ones too) as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also print the checks that passed.")
@click.option("--unit", "units", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A unit or plist to scan for secrets, besides the installed ones found (repeatable).")
@click.pass_obj
def doctor(obj: Home, as_json: bool, show_all: bool, units: tuple[Path, ...]) -> None:
    """Check this CA host end to end; one line per problem, with its fix. Changes nothing.

    \b
    Checks: CA files and permissions, CA keys (mode, match with their certificates; encrypted
    keys only with the passphrase), root and issuing CA validity, crl.pem freshness and its
    agreement with the inventory, certificates needing attention, the audit log's chain, the EST
    service's own credential, and installed units and plists holding secrets.

    \b
    Exit status:
      0  nothing to fix
      3  a warning: something needs attention soon (overdue CRL, expiring certificate, ...)
      4  an error: something is broken now (expired, mismatched key, key readable by others, ...)
      1  the doctor could not run (e.g. an unreadable passphrase file)
    """
    from .clock import SystemClock
    from .diagnosis.findings import exit_status, render
    from .diagnosis.doctor import diagnose_ca
    from .diagnosis.secretscan import installed_service_files

    findings = diagnose_ca(obj.home, clock=SystemClock(), passphrase=obj.passphrase(),
                           service_files=[*installed_service_files(), *units])
    click.echo(render(findings, as_json=as_json, show_ok=show_all))
    raise SystemExit(exit_status(findings))


def _delay(ctx, param, value):
    if value is None:
        return None
    from .settings import parse_duration

    try:
        return parse_duration(value, field=f"--{param.name.replace('_', '-')}", allow_zero=True)
    except PKIError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("rotate-issuing")
@click.option("--activate-in", "activate_in", callback=_delay, metavar="DURATION",
              help="Publish the new issuing CA now, issue from it after DURATION (e.g. 10m; 0s at once). "
                   "Default: issuing_activation_delay in ca.yaml (10m).")
@click.pass_obj
def rotate_issuing(obj: Home, activate_in) -> None:
    """Create the next issuing CA (needs the root key); certificates already issued keep working.

    \b
    The new issuing CA is published at once: its CRL goes into crl.pem (and /crl.pem of pkictl
    serve), its certificate into /cacerts. It issues only after the activation delay, so that
    every gateway has fetched its CRL first (a gateway checking CRLs refuses a node certificate
    whose issuer's CRL it lacks); until then the current issuing CA keeps issuing. The trust
    anchor (the root, ca.pem) does not change. The old issuing CA keeps signing its CRL while a
    certificate it issued is unexpired; agents move to the new one at their next renewal. A
    running pkictl serve follows without a restart. See README, "Rotating the issuing CA".
    """
    ca = obj.load_ca()
    old = ca.issuing
    new = ca.rotate_issuing(activate_in=activate_in)
    if ca.issuing.serial_number == new.serial_number:
        click.echo(f"retired: {old.subject.rfc4514_string()} (serial {old.serial_number:x}); keeps signing its CRL until its last certificate expires")
        click.echo(f"issuing: {new.subject.rfc4514_string()} (serial {new.serial_number:x}, not after {new.not_valid_after_utc:%Y-%m-%d}), from now on")
    else:
        when = ca.pending.activate_at
        click.echo(f"new issuing CA: {new.subject.rfc4514_string()} (serial {new.serial_number:x}, not after {new.not_valid_after_utc:%Y-%m-%d})")
        click.echo(f"  published now in {ca.home / 'pending-issuing'}; it issues from {when.isoformat(timespec='seconds')}, "
                   f"when the CA is next used (pkictl serve checks every --check-interval)")
        click.echo(f"  until then {old.subject.rfc4514_string()} (serial {old.serial_number:x}) keeps issuing; "
                   "every gateway must fetch crl.pem before that time (a pki-agent gateway renewing over EST does every "
                   "renewal.crl_refresh_interval, 60 s by default; one on this host reads crl.pem itself)")
    click.echo(f"CRLs of both written to {ca.crl_path}; move {ca.home / 'root' / 'key.pem'} offline again")


@cli.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("pkictl-demo"), show_default=True, help="Where the demo CA, bundles and logs go (must not exist).")
@click.option("--lifetime", default="15s", show_default=True, help="Gateway, node and service certificate lifetime (10s to 60s), short so that every certificate rotates during the demo.")
@click.option("--port", type=click.IntRange(1, 65531), help="Use ports PORT..PORT+4 (CA service, gateway listener, upstream, TW's and N2's tunnels) instead of free ones.")
def demo(directory: Path, lifetime: str, port: int | None) -> None:
    """Run the real setup on this machine, on loopback: the CA as an EST service, a gateway, nodes
    TW (token) and N2 (approval) with their tunnels, rotations, a revocation. About 16 seconds."""
    from .demo import run_demo

    run_demo(directory, lifetime=lifetime, port=port, echo=click.echo)


for _command in (enroll_node, enroll_gateway, enroll_operator, serve, requests_, approve, deny, audit, nodes, db):
    cli.add_command(_command)


def main() -> None:
    """Entry point of the ``pkictl`` console script."""
    cli(prog_name="pkictl")
