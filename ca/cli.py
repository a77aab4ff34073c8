"""The ``pkictl`` command line: a thin shell over :mod:`pkictl.authority`.

Heavy imports (cryptography, yaml) happen inside commands so that ``pkictl --version`` and
``--help`` stay fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .errors import KeyReused, PKIError
from .commands.nodes import nodes

__all__ = ["main", "cli", "default_home", "PKIGroup"]


def default_home() -> Path:
    """The per-user CA home (``~/.local/share/pkictl`` on Linux), used without --home/PKICTL_HOME."""
    import platformdirs

    return Path(platformdirs.user_data_dir("pkictl", appauthor=False))


class _Obj:
    def __init__(self, home: Path | None, passphrase_file: Path | None) -> None:
        self.home = home or default_home()
        self.passphrase_file = passphrase_file

    def passphrase(self) -> bytes | None:
        import os

        from .keys import read_passphrase

        return read_passphrase(passphrase_file=self.passphrase_file, environ=os.environ)

    def require_ca(self) -> Path:
        """The home, after checking a CA is there (without loading its keys)."""
        from .errors import CANotFoundError

        if not (self.home / "ca.yaml").exists():
            raise CANotFoundError(f"no CA in {self.home}: run 'pkictl init-ca' first, or pass --home / set PKICTL_HOME")
        return self.home

    def load_ca(self):
        from .authority import CertificateAuthority

        return CertificateAuthority.load(self.home, passphrase=self.passphrase())


def _duration(ctx, param, value):
    if value is None:
        return None
    from .settings import parse_duration

    try:
        return parse_duration(value, field=f"--{param.name.replace('_', '-')}")
    except PKIError as exc:
        raise click.BadParameter(str(exc)) from None


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
    ctx.obj = _Obj(home, passphrase_file)


@cli.command("init-ca")
@click.option("--trust-domain", default="pkictl.internal", show_default=True, help="SPIFFE trust domain of node identities.")
@click.option("--node-lifetime", callback=_duration, help="Validity of node certificates, e.g. 90d (default 90d).")
@click.option("--gateway-lifetime", callback=_duration, help="Validity of gateway certificates (default 90d).")
@click.option("--renewal-fraction", type=float, default=2 / 3, show_default="2/3", help="Renew after this share of the lifetime.")
@click.pass_obj
def init_ca(obj: _Obj, trust_domain, node_lifetime, gateway_lifetime, renewal_fraction) -> None:
    """Create a root CA and an issuing CA (ECDSA P-256) in the CA home."""
    from cryptography.hazmat.primitives import hashes

    from .authority import CertificateAuthority
    from .settings import CASettings

    values = {"trust_domain": trust_domain, "renewal_fraction": renewal_fraction}
    if node_lifetime:
        values["node_lifetime"] = node_lifetime
    if gateway_lifetime:
        values["gateway_lifetime"] = gateway_lifetime
    passphrase = obj.passphrase()
    ca = CertificateAuthority.init(obj.home, CASettings(**values), passphrase=passphrase)
    fingerprint = ca.root.fingerprint(hashes.SHA256()).hex()
    click.echo(f"created CA in {obj.home}")
    click.echo(f"  root:        {ca.root.subject.rfc4514_string()}  (not after {ca.root.not_valid_after_utc:%Y-%m-%d})")
    click.echo(f"  issuing CA:  {ca.issuing.subject.rfc4514_string()}  (not after {ca.issuing.not_valid_after_utc:%Y-%m-%d})")
    click.echo(f"  trust anchor {obj.home / 'ca.pem'}  sha256:{fingerprint}")
    if passphrase:
        click.echo("  CA keys encrypted (PKCS#8, scrypt); commands that sign need the same passphrase")
    else:
        click.echo("  CA keys NOT encrypted (0600 files); give --passphrase-file or PKICTL_CA_PASSPHRASE to encrypt them")
    click.echo(f"  the root key {obj.home / 'root' / 'key.pem'} is needed only to certify a new issuing CA: keep it offline")


def _write_agent_config(obj: _Obj, ca, enrollment, kind: str, name: str, listener: dict | None, ca_url: str | None = None,
                        tunnel: dict | None = None) -> Path:
    from cryptography.hazmat.primitives import hashes

    from .bundle_config import render_agent_config
    from .files import atomic_write
    from .keys import is_encrypted

    path = enrollment.directory / "agent.yaml"
    passphrase_file = None
    if ca_url is None and is_encrypted((ca.home / "issuing" / "key.pem").read_bytes()):
        # This bundle's agent renews with the CA keys themselves: it needs the same passphrase.
        if obj.passphrase_file is not None:
            passphrase_file = obj.passphrase_file.resolve()
        else:
            click.echo(f"warning: the CA keys are encrypted and their passphrase came from PKICTL_CA_PASSPHRASE; the "
                       f"agent of {name} needs it too: set renewal.ca_passphrase_file in {path} to a 0600 file "
                       "holding it, or enroll with --ca-url to renew over EST", err=True)
    text = render_agent_config(
        name=name, kind=kind, trust_domain=ca.settings.trust_domain,
        ca_home=None if ca_url else ca.home.resolve(), ca_url=ca_url, ca_passphrase_file=passphrase_file,
        fraction=ca.settings.renewal_fraction, listener=listener, tunnel=tunnel,
        trust_anchor_sha256=ca.root.fingerprint(hashes.SHA256()).hex(),
    )
    atomic_write(path, text.encode())
    return path


_REPLACE_FIX = "to issue a new one and revoke the old (superseded), pass --replace"


def _service_url(home: Path) -> str | None:
    """The URL ``pkictl serve`` announced in ``<home>/service/url`` when it last started, if any."""
    try:
        url = (home / "service" / "url").read_text().strip()
    except OSError:
        return None
    return url if url.startswith("https://") else None


def _report_enrollment(enrollment, config_path: Path) -> None:
    cert = enrollment.certificate
    click.echo(f"issued {cert.subject.rfc4514_string()} serial {cert.serial_number:x}, not after {cert.not_valid_after_utc.isoformat()}")
    click.echo(f"bundle: {enrollment.directory}  (cert.pem chain.pem fullchain.pem privkey.pem ca.pem agent.yaml)")
    click.echo(f"run its agent: pki-agent run --config {config_path}")


_REPLACE_HELP = "Issue anew although NAME holds a current certificate, and revoke the old one (superseded)."
_CA_URL_HELP = "The bundle's agent renews over EST from this 'pkictl serve' (https://HOST:PORT) instead of the CA home."


def _tunnel(ctx, param, value):
    if value is None:
        return None
    from .bundle_config import parse_tunnel

    try:
        return parse_tunnel(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_TUNNEL_HELP = ("LISTEN=GATEWAY, e.g. 127.0.0.1:18789=gw.example.lan:8443: the node's agent listens on LISTEN "
                "(loopback, plain TCP) and forwards to the gateway's listener over mTLS.")


def _ca_url(ctx, param, value):
    if value is not None and not (value.startswith("https://") and "/" not in value[len("https://"):].rstrip("/")):
        raise click.BadParameter(f"{value!r}: want https://HOST:PORT")
    return value


@cli.command("enroll-node")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Bundle directory (default <home>/bundles/NAME).")
@click.option("--replace", is_flag=True, help=_REPLACE_HELP)
@click.option("--csr", "csr_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Certify the key of this CSR (PEM or DER) made on the node; no key is written.")
@click.option("--token", "token", is_flag=True, help="Print a one-time token for 'pki-agent enroll' on the node instead (EST); "
                                                    "any other EST client sends it to simpleenroll in HTTP Basic authentication, "
                                                    "user NAME and password the token (curl -u NAME:TOKEN). "
                                                    "With --replace its certificate replaces a current one.")
@click.option("--token-ttl", callback=_duration, help="How long the token is valid (default 10m).")
@click.option("--ca-url", callback=_ca_url, help=_CA_URL_HELP)
@click.option("--tunnel", callback=_tunnel, help=_TUNNEL_HELP)
@click.pass_obj
def enroll_node(obj: _Obj, name: str, out: Path | None, replace: bool, csr_path: Path | None, token: bool, token_ttl, ca_url, tunnel) -> None:
    """Issue node NAME's client certificate (clientAuth) and write its bundle.

    With --token nothing is issued yet: the node makes its own key and enrolls over EST
    (pkictl serve), sending the token in HTTP Basic authentication (user NAME, password the
    token; the name is compared without case, the token exactly). The token is spent by the one
    enrollment it authenticates. A wrong, expired or spent token, or one of another node, gets
    401 and spends nothing; a CSR that breaks the policy gets 400 before the token is looked at.
    """
    if tunnel is not None and (token or csr_path is not None):
        raise click.UsageError("--tunnel goes into the agent.yaml of a bundle written here; with --token give "
                               "--tunnel to 'pki-agent enroll' on the node, with --csr write the tunnel: section yourself")
    from .errors import AlreadyEnrolledError

    if token:
        from .est.wire import root_fingerprint

        ca = obj.load_ca()
        kwargs = {"ttl": token_ttl} if token_ttl else {}
        try:
            secret, expires = ca.create_token(name, replace=replace, **kwargs)
        except AlreadyEnrolledError as exc:
            raise exc.with_fix("for a token whose certificate replaces it (and revokes the old one), pass --replace too") from None
        click.echo(f"token for {name} (single use, valid until {expires:%Y-%m-%d %H:%M:%S} UTC):")
        click.echo(f"  {secret}")
        click.echo(f"root fingerprint: {root_fingerprint(ca.root)}")
        url = ca_url or _service_url(ca.home)
        click.echo(f"on {name}: pki-agent enroll --name {name} --ca-url {url or 'https://CA-HOST:PORT'} "
                   f"--fingerprint {root_fingerprint(ca.root)} --token {secret} --dir /var/lib/pki-agent/{name}")
        click.echo(f"  any other EST client: POST {url or 'https://CA-HOST:PORT'}/.well-known/est/simpleenroll with HTTP Basic "
                   f"user {name}, password the token")
        if url is None:
            click.echo("  (CA-HOST:PORT: where 'pkictl serve' listens; it has not run from this CA home yet, or give --ca-url)")
        if replace:
            click.echo(f"  its certificate replaces the current one of {name}, which is then revoked (superseded)")
        return
    if csr_path is not None:
        from .policy import MAX_CSR_BYTES

        with open(csr_path, "rb") as f:
            csr = f.read(MAX_CSR_BYTES + 1)  # the cap is checked by the CA, which audits the refusal
        ca = obj.load_ca()
        try:
            enrollment = ca.enroll_csr(name, csr, out=out or ca.home / "bundles" / name, replace=replace)
        except AlreadyEnrolledError as exc:
            raise exc.with_fix(_REPLACE_FIX) from None
        cert = enrollment.certificate
        click.echo(f"issued {cert.subject.rfc4514_string()} serial {cert.serial_number:x}, not after {cert.not_valid_after_utc.isoformat()}")
        click.echo(f"certificate: {enrollment.directory}  (cert.pem chain.pem fullchain.pem ca.pem; the key stays on the node)")
        return
    ca = obj.load_ca()
    try:
        enrollment = ca.enroll("node", name, out=out, replace=replace)
    except AlreadyEnrolledError as exc:
        raise exc.with_fix(_REPLACE_FIX) from None
    _report_enrollment(enrollment, _write_agent_config(obj, ca, enrollment, "node", name, None, ca_url, tunnel))


@cli.command("enroll-gateway")
@click.argument("name")
@click.option("--dns", "dns_names", multiple=True, help="DNS name nodes dial (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="IP address nodes dial (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Bundle directory (default <home>/bundles/NAME).")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="Where the agent's mTLS listener accepts nodes.")
@click.option("--upstream", default="127.0.0.1:18789", show_default=True, help="The real gateway (plain TCP) the listener forwards to.")
@click.option("--allow", "allow", multiple=True, metavar="NODE",
              help="A node the listener lets through (repeatable); without it the bundle's agent.yaml says allow: ['*'] (every node of this CA).")
@click.option("--replace", is_flag=True, help=_REPLACE_HELP)
@click.option("--ca-url", callback=_ca_url, help=_CA_URL_HELP + " The CRL is then kept in the bundle and refreshed from it.")
@click.pass_obj
def enroll_gateway(obj: _Obj, name, dns_names, ip_addresses, out, listen, upstream, allow, replace, ca_url) -> None:
    """Issue gateway NAME's server certificate (serverAuth) and write its bundle."""
    from .bundle_config import parse_address

    from .names import validate_name

    for option, value in (("--listen", listen), ("--upstream", upstream)):
        try:
            parse_address(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    for node in allow:
        if node != "*":
            try:
                validate_name(node)
            except PKIError as exc:
                raise click.BadParameter(str(exc), param_hint="--allow") from None
    from .errors import AlreadyEnrolledError

    ca = obj.load_ca()
    try:
        enrollment = ca.enroll("gateway", name, out=out, dns_names=dns_names, ip_addresses=ip_addresses, replace=replace)
    except AlreadyEnrolledError as exc:
        raise exc.with_fix(_REPLACE_FIX) from None
    if ca_url:  # another host: its own copy of the CRL, refreshed over EST by its agent
        from .files import atomic_write

        atomic_write(enrollment.directory / "crl.pem", ca.crl_path.read_bytes())
        listener = {"listen": listen, "upstream": upstream, "crl": "crl.pem", "allow": allow}
    else:
        listener = {"listen": listen, "upstream": upstream, "crl": ca.crl_path.resolve(), "allow": allow}
    path = _write_agent_config(obj, ca, enrollment, "gateway", name, listener, ca_url)
    _report_enrollment(enrollment, path)
    if allow and "*" not in allow:
        click.echo(f"its listener lets through: {', '.join(n.lower() for n in allow)} (listener.allow in agent.yaml)")
    else:
        click.echo("its listener lets through every node of this CA (allow: ['*'] in agent.yaml; restrict with --allow NODE)")


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects) instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Include superseded certificates.")
@click.option("--warn-days", type=click.FloatRange(min=0), help="Flag certificates with fewer days left (exit status 3).")
@click.pass_obj
def status(obj: _Obj, as_json: bool, show_all: bool, warn_days: float | None) -> None:
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

    from .status import read_status

    home = obj.require_ca()
    text, code = read_status(home / "inventory.sqlite3", dt.datetime.now(dt.timezone.utc),
                             latest_only=not show_all, warn_days=warn_days, as_json=as_json)
    click.echo(text)
    raise SystemExit(code)


@cli.command("revoke")
@click.argument("target")
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason: unspecified, key-compromise, affiliation-changed, superseded, "
                   "cessation-of-operation, privilege-withdrawn.")
@click.pass_obj
def revoke(obj: _Obj, target: str, reason: str) -> None:
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
def sign_crl(obj: _Obj, with_root: bool) -> None:
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
def doctor(obj: _Obj, as_json: bool, show_all: bool, units: tuple[Path, ...]) -> None:
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
def rotate_issuing(obj: _Obj, activate_in) -> None:
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


@cli.command("serve")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT of the EST service (HTTPS).")
@click.option("--dns", "dns_names", multiple=True, help="DNS name nodes use to reach the service (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="IP address nodes use to reach the service (repeatable).")
@click.option("--retry-after", type=click.IntRange(1, 3600), default=10, show_default=True, help="Seconds a pending enrollment is told to wait.")
@click.option("--check-interval", type=click.FloatRange(0.1), default=60.0, show_default=True, help="Seconds between checks of the service certificate, the CRL and a new issuing CA.")
@click.option("--rate", type=click.FloatRange(0.1), default=5.0, show_default=True, help="Requests per second per client address or identity.")
@click.option("--burst", type=click.IntRange(1), default=20, show_default=True, help="Requests a client may send at once.")
@click.option("--workers", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Processes that issue beside the TLS/HTTP event loop (0 = issue in the serving process).")
@click.option("--loop", "loop_name", default="auto", show_default=True, type=click.Choice(["auto", "uvloop", "asyncio"]),
              help="Event loop: uvloop when installed (pip install 'pkictl[fast]'), else asyncio's own.")
@click.option("--handshake-timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds a client has to finish its TLS handshake.")
@click.option("--header-timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds a connection has to send a complete request header (after its handshake or the previous answer).")
@click.option("--body-timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True,
              help="Seconds a request has to send its body once its header is in (then HTTP 408).")
@click.option("--max-connections", type=click.IntRange(2, 65536), default=1024, show_default=True,
              help="Connections open at once; a quarter is kept for clients presenting a certificate of this CA.")
@click.option("--max-connections-per-peer", type=click.IntRange(1, 65536), default=None,
              help="Connections open at once from one address.  [default: a quarter of --max-connections]")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve GET /healthz and Prometheus GET /metrics over plain HTTP here (keep it on loopback: no authentication).")
@click.option("--group-commit/--no-group-commit", default=True, show_default=True,
              help="Signing workers commit the issuances queued to them together: one SQLite commit and one audit-log fsync for all.")
@click.option("--max-pending", type=click.IntRange(1), default=None,
              help="Enrollments in hand at once; beyond, 503 with Retry-After.  [default: issuances/s measured x --max-queue-delay]")
@click.option("--max-queue-delay", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="Seconds the enrollment admitted last may wait for its answer (derives --max-pending).")
@click.pass_obj
def serve(obj: _Obj, listen, dns_names, ip_addresses, retry_after, check_interval, rate, burst, workers, loop_name,
          handshake_timeout, header_timeout, body_timeout, max_connections, max_connections_per_peer, metrics_listen,
          group_commit, max_pending, max_queue_delay) -> None:
    """Serve EST (RFC 7030) so that nodes enroll and renew over the network; also the CRL.

    Runs in the foreground until SIGTERM (systemd/pkictl-serve.service). It issues and renews its
    own server certificate, re-signs the CRL in time, and follows pkictl rotate-issuing without a
    restart. SIGHUP reloads its certificate and the issuing CA from disk. Every refused client
    (TLS handshake or EST request) is logged with its address and reason.

    \b
    Endpoints (under /.well-known/est):
      GET  cacerts         the CA certificates (PKCS#7, base64)
      GET  csrattrs        what a CSR must carry (RFC 7030 4.5)
      POST simpleenroll    a first certificate: HTTP Basic user = the node name, password = the
                           one-time token of 'pkictl enroll-node NAME --token' (401 if wrong,
                           expired or spent); without credentials, 202 until 'pkictl approve'
      POST simplereenroll  a renewal, authenticated by the current certificate (TLS client cert)
    and GET /crl (DER), /crl.pem. Every 4xx answer says what was wrong and what was expected.
    """
    import asyncio
    import logging

    from .bundle_config import check_loopback, parse_address
    from .loops import event_loop_factory

    from .admission import AdmissionLimits
    from .authority import CertificateAuthority
    from .est.wire import root_fingerprint
    from .est.front import FrontLimits
    from .est.serve import ESTService
    from .est.shedding import SheddingPolicy
    from .est.signers import SignerPool
    from .sockets import ensure_file_limit

    per_peer = max_connections_per_peer or max(1, max_connections // 4)
    if per_peer > max_connections:
        raise click.BadParameter(f"got {per_peer}, want at most --max-connections ({max_connections})",
                                 param_hint="--max-connections-per-peer")
    limits = FrontLimits(header_timeout=header_timeout, body_timeout=body_timeout,
                         admission=AdmissionLimits(total=max_connections, per_peer=per_peer, reserved=max_connections // 4))

    try:
        host, port = parse_address(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    status_address = None
    if metrics_listen is not None:
        try:
            status_address = parse_address(metrics_listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-listen") from None
    try:
        check_loopback((host, port))
        loopback = True
    except ValueError:
        loopback = False
    if not loopback and not dns_names and not ip_addresses:
        raise click.UsageError(f"--listen {listen} reaches beyond this host: give the --dns names or --ip addresses nodes dial, so that they can verify the service")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    passphrase = obj.passphrase()
    ca = CertificateAuthority.load(obj.home, passphrase=passphrase)
    signers = SignerPool(obj.home, passphrase=passphrase, workers=workers, group_commit=group_commit) if workers else None
    # Until a rate is measured, 100 issuances/s per worker (one did 147/s in bench/est_reenroll.py, on a shared
    # machine): too high queues more than --max-queue-delay at first, too low idles the service while the herd
    # sleeps (docs/design.md, "Group commit and load shedding").
    shedding = SheddingPolicy(max_pending=max_pending, max_delay=max_queue_delay, prior_rate=100.0 * max(workers, 1))
    service = ESTService(ca, listen=(host, port), dns_names=list(dns_names), ip_addresses=list(ip_addresses) or None,
                         retry_after=retry_after, check_interval=check_interval, rate=rate, burst=burst, signers=signers,
                         handshake_timeout=handshake_timeout, limits=limits, metrics_listen=status_address, shedding=shedding)

    def ready(bound: int) -> None:
        from .files import atomic_write

        dialed = (list(dns_names) or list(ip_addresses) or [host])[0]
        url = f"https://{f'[{dialed}]' if ':' in dialed else dialed}:{bound}"
        # What 'pkictl enroll-node --token' prints for the node to dial (nothing secret).
        atomic_write(obj.home / "service" / "url", (url + "\n").encode())
        logging.getLogger("pkictl.serve").info("ready: EST on %s%s (root %s)", url, "/.well-known/est", root_fingerprint(ca.root))
        if service.status_server is not None:
            logging.getLogger("pkictl.serve").info("metrics and health on %s", ", ".join(
                f"http://{f'[{h}]' if ':' in h else h}:{p}/metrics" for h, p in service.status_server.addresses))

    short = ensure_file_limit(max_connections + 64)  # listening sockets, the CA's files, workers' pipes
    if short:
        logging.getLogger("pkictl.serve").warning("%s", short)
    factory, loop_label = event_loop_factory(loop_name)
    logging.getLogger("pkictl.serve").info("event loop: %s, %s", loop_label,
                                           f"{workers} signing worker(s)" if workers else "issuing in this process")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(service.run(ready=ready))


@cli.command("requests")
@click.pass_obj
def requests_(obj: _Obj) -> None:
    """List enrollment requests waiting for approval: name, code, the address it came from, when
    it was filed and how long it has waited (expired ones, older than pending_request_ttl, are not
    listed)."""
    import datetime as dt

    from .inventory import Inventory
    from .settings import CASettings, format_duration

    home = obj.require_ca()
    settings = CASettings.load(home / "ca.yaml")
    inventory = Inventory(home / "inventory.sqlite3")
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


@cli.command("approve")
@click.argument("name")
@click.option("--code", required=True, help="The code the node shows (and 'pkictl requests' lists).")
@click.pass_obj
def approve(obj: _Obj, name: str, code: str) -> None:
    """Approve NAME's pending enrollment; its agent gets the certificate at its next poll.

    A node that still holds a valid certificate gets a new one all the same (the operator
    approved this key for this name): the old certificate is then revoked as superseded.
    """
    replaced = obj.load_ca().approve(name, code=code)
    click.echo(f"approved {name} ({code.upper()}); it gets its certificate at its next poll")
    for record in replaced:
        click.echo(f"  it replaces {record.kind} {record.name} serial {record.serial:x} (valid until "
                   f"{record.not_after:%Y-%m-%d %H:%M:%S} UTC), which is revoked (superseded) once the new one is issued")


@cli.command("deny")
@click.argument("name")
@click.pass_obj
def deny(obj: _Obj, name: str) -> None:
    """Deny NAME's pending enrollment requests."""
    count = obj.load_ca().deny(name)
    click.echo(f"denied {count} request(s) of {name}")


@cli.group("audit")
def audit() -> None:
    """The CA's hash-chained audit log (<home>/audit.log)."""


@audit.command("verify")
@click.option("--anchor", help="SEQ:HASH of a record you noted earlier (e.g. from 'audit head'), to detect a rewrite up to it.")
@click.pass_obj
def audit_verify(obj: _Obj, anchor: str | None) -> None:
    """Check the log's hash chain and its head; exit 1 when it was edited or truncated."""
    from .audit import AuditLog
    from .clock import SystemClock

    home = obj.require_ca()
    pin = None
    if anchor:
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise click.BadParameter("want SEQ:HASH, e.g. 42:3f9a...(64 hex digits)", param_hint="--anchor")
        pin = (int(seq), digest.lower())
    result = AuditLog(home / "audit.log", clock=SystemClock()).verify(anchor=pin)
    if not result.ok:
        raise click.ClickException(f"audit log {home / 'audit.log'} does not verify: {result.problem}")
    click.echo(f"audit log ok: {result.records} records" + (f" ({result.note})" if result.note else ""))


@audit.command("head")
@click.pass_obj
def audit_head(obj: _Obj) -> None:
    """Print SEQ:HASH of the last record: note it somewhere else to pin the log with --anchor."""
    from .audit import AuditLog
    from .clock import SystemClock

    head = AuditLog(obj.require_ca() / "audit.log", clock=SystemClock()).head()
    click.echo(f"{head[0]}:{head[1]}" if head else "0:(empty)")


@cli.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("pkictl-demo"), show_default=True, help="Where the demo CA, bundles and logs go (must not exist).")
@click.option("--lifetime", default="15s", show_default=True, help="Gateway, node and service certificate lifetime (10s to 60s), short so that every certificate rotates during the demo.")
@click.option("--port", type=click.IntRange(1, 65531), help="Use ports PORT..PORT+4 (CA service, gateway listener, upstream, TW's and N2's tunnels) instead of free ones.")
def demo(directory: Path, lifetime: str, port: int | None) -> None:
    """Run the real setup on this machine, on loopback: the CA as an EST service, a gateway, nodes
    TW (token) and N2 (approval) with their tunnels, rotations, a revocation. About 16 seconds."""
    from .demo import run_demo

    run_demo(directory, lifetime=lifetime, port=port, echo=click.echo)


cli.add_command(nodes)


def main() -> None:
    """Entry point of the ``pkictl`` console script."""
    cli(prog_name="pkictl")
