"""What every ``pkictl`` command shares: the CA home it acts on and the parsing of a duration option."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import PKIError

__all__ = ["Home", "default_home", "duration_option"]


def default_home() -> Path:
    """The per-user CA home (``~/.local/share/pkictl`` on Linux), used without --home/PKICTL_HOME."""
    import platformdirs

    return Path(platformdirs.user_data_dir("pkictl", appauthor=False))


class Home:
    """The CA home a command acts on (``--home``, ``PKICTL_HOME`` or the per-user default) and its passphrase."""

    def __init__(self, home: Path | None, passphrase_file: Path | None) -> None:
        self.home = home or default_home()
        self.passphrase_file = passphrase_file

    def passphrase(self) -> bytes | None:
        import os

        from ..keys import read_passphrase

        return read_passphrase(passphrase_file=self.passphrase_file, environ=os.environ)

    def require_ca(self) -> Path:
        """The home, after checking a CA is there (without loading its keys)."""
        from ..errors import CANotFoundError

        if not (self.home / "ca.yaml").exists():
            raise CANotFoundError(f"no CA in {self.home}: run 'pkictl init-ca' first, or pass --home / set PKICTL_HOME")
        return self.home

    def load_ca(self):
        from ..authority import CertificateAuthority

        return CertificateAuthority.load(self.home, passphrase=self.passphrase())


def duration_option(ctx, param, value):
    if value is None:
        return None
    from ..settings import parse_duration

    try:
        return parse_duration(value, field=f"--{param.name.replace('_', '-')}")
    except PKIError as exc:
        raise click.BadParameter(str(exc)) from None


