"""``pkictl enroll-operator``: an operator's client certificate for the admin page, as files and a
PKCS#12 bundle to import into a browser (:mod:`pkictl.operators`)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["enroll_operator"]


@click.command("enroll-operator")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Directory to write (default <home>/operators/NAME).")
@click.option("--replace", is_flag=True, help="Issue anew although NAME holds a current operator certificate, revoke the old "
                                              "one (superseded) and replace the directory's files.")
@click.pass_obj
def enroll_operator(obj, name: str, out: Path | None, replace: bool) -> None:
    """Issue operator NAME's client certificate for the admin page of pkictl serve (--admin-listen).

    \b
    Writes (atomically, the keys 0600):
      key.pem, cert.pem, fullchain.pem, ca.pem   for curl and scripts
      operator.p12                               for a browser: import it with the password printed
    An operator certificate opens the admin page only: the gateway refuses it as a node, and EST
    does not renew it (run this again with --replace before it expires).
    """
    from ..errors import AlreadyEnrolledError
    from ..operators import Operators

    ca = obj.load_ca()
    try:
        enrolled = Operators(ca).enroll(name, out=out, replace=replace)
    except AlreadyEnrolledError as exc:
        raise exc.with_fix("to issue a new one and revoke the old (superseded), pass --replace") from None
    finally:
        ca.close()
    cert = enrolled.certificate
    click.echo(f"issued operator {name}: serial {cert.serial_number:x}, not after {cert.not_valid_after_utc.isoformat()}")
    click.echo(f"files: {enrolled.directory}  (key.pem cert.pem fullchain.pem ca.pem operator.p12)")
    click.echo(f"operator.p12 password (shown once): {enrolled.p12_password}")
    click.echo("import operator.p12 into the browser (Chromium: Settings > Privacy and security > Security > Manage "
               "certificates > Your certificates > Import), then open the admin page of 'pkictl serve --admin-listen'")
    for serial in enrolled.replaced:
        click.echo(f"  replaced serial {serial:x}, now revoked (superseded)")
