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
def run(config_path: Path, log_level: str) -> None:
    """Run in the foreground until SIGTERM (systemd and launchd run it like this)."""
    from .config import load_config
    from .daemon import Agent

    config = load_config(config_path)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    asyncio.run(Agent(config).run())


def main() -> None:
    """Entry point of the ``pki-agent`` console script."""
    cli(prog_name="pki-agent")
