"""The ``pki-agent`` command line."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import click

from pkictl import __version__
from pkictl.cli import PKIGroup

__all__ = ["main", "cli"]


@click.group(cls=PKIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pki-agent")
def cli() -> None:
    """pki-agent: renews this host's certificate and serves the gateway's mTLS listener."""


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The agent's YAML configuration.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--loop", "loop_name", default="auto", show_default=True, type=click.Choice(["auto", "uvloop", "asyncio"]),
              help="Event loop: uvloop when installed (pip install 'pkictl[fast]'), else asyncio's own.")
def run(config_path: Path, log_level: str, loop_name: str) -> None:
    """Run in the foreground until SIGTERM (systemd and launchd run it like this)."""
    from .config import load_config
    from .listener.connlog import configure_logging
    from .daemon import Agent
    from pkictl.loops import event_loop_factory

    config = load_config(config_path)
    configure_logging(config.log_format, log_level)
    factory, name = event_loop_factory(loop_name)
    logging.getLogger("pki_agent").info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        # Once serving, what startup built (the CA library, the config models, the contexts) lives
        # as long as the process: gc.freeze() keeps the collector from walking it again and again.
        # Under a handshake flood that walk was 1% of the listener's CPU (bench/gateway_peers.py).
        runner.run(Agent(config, config_path=config_path).run(ready=gc.freeze))


_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                       help="The agent's YAML configuration.")


@cli.command("renew-now")
@_CONFIG
@click.option("--wait", "timeout", type=click.FloatRange(1), default=120, show_default=True,
              help="Seconds to wait for the running agent's answer.")
def renew_now(config_path: Path, timeout: float) -> None:
    """Renew this host's certificate now, whatever the schedule says.

    With an agent running for the credential, it is asked to (SIGUSR1) and this waits for its
    result; without one, this renews, installs and runs the hooks itself (holding the agent's
    PID file lock, so that an agent started meanwhile waits for nothing and refuses to start).
    Exit status 0 if a new certificate is in service, 1 otherwise.
    """
    from .config import load_config
    from .rotation.renew_now import renew_now as run_renew_now

    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    ok, message = run_renew_now(load_config(config_path), timeout=timeout)
    click.echo(message)
    raise SystemExit(0 if ok else 1)


@cli.command()
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(config_path: Path, as_json: bool) -> None:
    """Show this host's credential, next renewal, last attempt and its error, listener, hooks.

    \b
    Exit status:
      0  nothing needs attention
      3  attention: expiring (less than 1/6 of the lifetime left), the last renewal attempt or
         a hook failed, or no agent runs for this credential
      4  the certificate has expired: connections fail now
      1  error (bad configuration)
    """
    import datetime as dt

    from .config import load_config
    from .status import exit_code, host_status, render_status

    report = host_status(load_config(config_path), dt.datetime.now(dt.timezone.utc))
    click.echo(render_status(report, as_json=as_json))
    raise SystemExit(exit_code(report))


@cli.command()
@click.option("--ca-url", required=True, help="The EST server: https://HOST:PORT of 'pkictl serve'.")
@click.option("--fingerprint", required=True, help="sha256:... of the CA's root, from the operator (pkictl enroll-node --token prints it).")
@click.option("--name", required=True, help="This node's name (a DNS label).")
@click.option("--token", help="One-time token from 'pkictl enroll-node NAME --token'; without one, wait for approval.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Read the token from this file instead.")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where to write the bundle (must not exist or be empty).")
@click.option("--wait", type=click.FloatRange(0), default=600, show_default=True, help="Seconds to wait for approval.")
@click.option("--tunnel", help="LISTEN=GATEWAY, e.g. 127.0.0.1:18789=gw.example.lan:8443: the agent listens on LISTEN "
                               "(loopback, plain TCP) and forwards to the gateway's listener over mTLS.")
def enroll(ca_url, fingerprint, name, token, token_file, directory, wait, tunnel) -> None:
    """Get this node's first certificate over EST: key made here, CA pinned by fingerprint."""
    from pkictl.bundle_config import parse_tunnel
    from .enroll import enroll as run_enroll

    if tunnel is not None:
        try:
            tunnel = parse_tunnel(tunnel)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tunnel") from None
    if token is not None and token_file is not None:
        raise click.UsageError("give --token or --token-file, not both")
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise click.BadParameter(f"{token_file} is empty; want the token 'pkictl enroll-node {name} --token' printed",
                                     param_hint="--token-file")
    if token is not None and not token.strip():
        # An empty shell variable (--token "$TOKEN") must not turn into a silent wait for approval.
        raise click.BadParameter(f"is empty (an unset shell variable?); want the token 'pkictl enroll-node {name} --token' "
                                 "printed, or leave --token out to wait for the operator's approval", param_hint="--token")
    run_enroll(ca_url=ca_url, fingerprint=fingerprint, name=name, directory=directory, token=token, wait=wait, say=click.echo,
               tunnel=tunnel)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The agent's YAML configuration.")
@click.option("--gateway", help="HOST:PORT of the gateway this node dials, for a test connection (default: the config's tunnel).")
@click.option("--server-name", help="The DNS name or IP address the node verifies the gateway by (default: the --gateway host).")
@click.option("--offline", is_flag=True, help="Open no network connection (no EST server, gateway, listener or upstream checks).")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=5.0, show_default=True, help="Seconds per network connection.")
@click.option("--unit", "units", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A unit or plist to scan for secrets, besides the installed ones found (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print every finding (ok ones too) as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also print the checks that passed.")
def doctor(config_path: Path, gateway, server_name, offline, timeout, units, as_json, show_all) -> None:
    """Check this host's agent end to end; one line per problem, with its fix. Changes nothing.

    \b
    Checks: the configuration and every file it names; the credential (live link, archive, key
    permissions, key and certificate match, chain, issuer, validity, identity, trust anchor
    against trust_anchor_sha256, revocation against the CRL on disk and the EST server's); the
    CRL; the EST server (reachable, our CA, its clock by its Date header); on a node a test
    connection to the gateway; on a gateway its listener and upstream; installed units and
    plists holding secrets.

    \b
    Exit status:
      0  nothing to fix
      3  a warning: something needs attention soon (overdue CRL, expiring certificate, ...)
      4  an error: something is broken now (expired, revoked, refused by the gateway, ...)
    """
    from pkictl.clock import SystemClock
    from pkictl.diagnosis.findings import exit_status, render

    from .doctor.checks import diagnose_agent
    from pkictl.diagnosis.secretscan import installed_service_files

    findings = diagnose_agent(config_path, clock=SystemClock(), gateway=gateway, server_name=server_name, offline=offline,
                              timeout=timeout, service_files=[*installed_service_files(), *units])
    click.echo(render(findings, as_json=as_json, show_ok=show_all))
    raise SystemExit(exit_status(findings))


@cli.command("install-service")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The agent's YAML configuration.")
@click.option("--user", help="Run the service as this account (default: pki-agent with systemd, root with launchd).")
@click.option("--platform", type=click.Choice(["systemd", "launchd"]), help="The service manager (default: this system's).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of the standard place.")
@click.option("--program", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The pki-agent to run (default: this one).")
@click.option("--dry-run", is_flag=True, help="Print the definition and where it would go; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing file with other content.")
def install_service(config_path: Path, user, platform, output, program, dry_run, force) -> None:
    """Write the service definition for this platform from the configuration.

    A systemd unit (/etc/systemd/system/pki-agent.service) or a launchd plist
    (/Library/LaunchDaemons/net.pkictl.agent.plist) that runs this pki-agent with this config,
    may write only the credential directory (and the CA home on the CA host), and holds no
    secret: anything that looks like one is refused.
    """
    from .service import backend_for, install_service as write

    backend = backend_for(platform)
    if user is None and backend.name == "systemd":
        user = "pki-agent"
    write(config_path, backend=backend, user=user, output=output, program=program, dry_run=dry_run, force=force, say=click.echo)


def main() -> None:
    """Entry point of the ``pki-agent`` console script."""
    cli(prog_name="pki-agent")
