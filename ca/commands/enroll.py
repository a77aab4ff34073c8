"""``pkictl enroll-node`` and ``pkictl enroll-gateway``: a node's or gateway's certificate, as a bundle or a one-time token."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import PKIError
from .common import Home, duration_option

__all__ = ["enroll_node", "enroll_gateway"]



def _write_agent_config(obj: Home, ca, enrollment, kind: str, name: str, listener: dict | None, ca_url: str | None = None,
                        tunnel: dict | None = None) -> Path:
    from cryptography.hazmat.primitives import hashes

    from ..bundle_config import render_agent_config
    from ..files import atomic_write
    from ..keys import is_encrypted

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
    from ..bundle_config import parse_tunnel

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


@click.command("enroll-node")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Bundle directory (default <home>/bundles/NAME).")
@click.option("--replace", is_flag=True, help=_REPLACE_HELP)
@click.option("--csr", "csr_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Certify the key of this CSR (PEM or DER) made on the node; no key is written.")
@click.option("--token", "token", is_flag=True, help="Print a one-time token for 'pki-agent enroll' on the node instead (EST); "
                                                    "any other EST client sends it to simpleenroll in HTTP Basic authentication, "
                                                    "user NAME and password the token (curl -u NAME:TOKEN). "
                                                    "With --replace its certificate replaces a current one.")
@click.option("--token-ttl", callback=duration_option, help="How long the token is valid (default 10m).")
@click.option("--ca-url", callback=_ca_url, help=_CA_URL_HELP)
@click.option("--tunnel", callback=_tunnel, help=_TUNNEL_HELP)
@click.pass_obj
def enroll_node(obj: Home, name: str, out: Path | None, replace: bool, csr_path: Path | None, token: bool, token_ttl, ca_url, tunnel) -> None:
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
    from ..errors import AlreadyEnrolledError

    if token:
        from ..est.wire import root_fingerprint

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
        from ..policy import MAX_CSR_BYTES

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


@click.command("enroll-gateway")
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
def enroll_gateway(obj: Home, name, dns_names, ip_addresses, out, listen, upstream, allow, replace, ca_url) -> None:
    """Issue gateway NAME's server certificate (serverAuth) and write its bundle."""
    from ..bundle_config import parse_address

    from ..names import validate_name

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
    from ..errors import AlreadyEnrolledError

    ca = obj.load_ca()
    try:
        enrollment = ca.enroll("gateway", name, out=out, dns_names=dns_names, ip_addresses=ip_addresses, replace=replace)
    except AlreadyEnrolledError as exc:
        raise exc.with_fix(_REPLACE_FIX) from None
    if ca_url:  # another host: its own copy of the CRL, refreshed over EST by its agent
        from ..files import atomic_write

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
