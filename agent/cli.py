"""The ``pki-agent`` command line."""

from __future__ import annotations

import asyncio
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
    from .connlog import configure_logging
    from .daemon import Agent
    from .loops import event_loop_factory

    config = load_config(config_path)
    configure_logging(config.log_format, log_level)
    factory, name = event_loop_factory(loop_name)
    logging.getLogger("pki_agent").info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(Agent(config).run())


@cli.command()
@click.option("--ca-url", required=True, help="The EST server: https://HOST:PORT of 'pkictl serve'.")
@click.option("--fingerprint", required=True, help="sha256:... of the CA's root, from the operator (pkictl enroll-node --token prints it).")
@click.option("--name", required=True, help="This node's name (a DNS label).")
@click.option("--token", help="One-time token from 'pkictl enroll-node NAME --token'; without one, wait for approval.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Read the token from this file instead.")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where to write the bundle (must not exist or be empty).")
@click.option("--wait", type=click.FloatRange(0), default=600, show_default=True, help="Seconds to wait for approval.")
def enroll(ca_url, fingerprint, name, token, token_file, directory, wait) -> None:
    """Get this node's first certificate over EST: key made here, CA pinned by fingerprint."""
    from .enroll import enroll as run_enroll

    if token_file is not None:
        token = token_file.read_text().strip()
    run_enroll(ca_url=ca_url, fingerprint=fingerprint, name=name, directory=directory, token=token, wait=wait, say=click.echo)


def main() -> None:
    """Entry point of the ``pki-agent`` console script."""
    cli(prog_name="pki-agent")
