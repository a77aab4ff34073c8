"""Doctor checks of a CRL file: readable, signed by a CA we know, fresh, and (on the CA host) with the root's CRL.

With CRL checking on, a missing or expired CRL refuses every client, so a CRL is re-signed at
half its validity; past that, whoever re-signs it is not running (docs/design.md).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Sequence

from cryptography import x509

from .findings import Finding, Severity
from ..errors import StoreError
from ..crl import crl_due, issuer_of, load_crls, signed_by

__all__ = ["crl_findings", "CLOCK_TOLERANCE"]

# A thisUpdate this far in the future means the clocks disagree (CRLs are backdated 5 minutes).
CLOCK_TOLERANCE = dt.timedelta(minutes=5)


def crl_findings(path: Path, issuers: Sequence[x509.Certificate], now: dt.datetime, *, fix: str,
                 check: str = "crl", roots: Sequence[x509.Certificate] = (), root_fix: str | None = None,
                 want_root: bool = False) -> list[Finding]:
    """Findings about the CRL file ``path`` at ``now``.

    Args:
        issuers: issuing CA certificates whose CRLs may be in the file; a CRL of one of them must
            carry its valid signature. CRLs of other issuers are judged by their dates only.
        fix: what makes an issuing CA's CRL fresh again in this setting (who re-signs or fetches it).
        check: the check name to report under.
        roots: trust anchors: a CRL of one of them is the root's CRL (docs/design.md, "CRLs for
            every level of the chain"), which must verify with the root's key.
        root_fix: what makes the root's CRL fresh again (its key is offline); None uses ``fix``.
        want_root: a file without the root's CRL is a warning (the CA host: servers that check
            every level of the chain refuse every client without it).

    Returns:
        Errors for a missing, unreadable, forged or expired CRL, warnings for an overdue one, a
        thisUpdate in the future (RFC 5280 5.1.2.4-5) or a missing root CRL; empty when all is well.
    """
    try:
        crls = load_crls(path)
    except StoreError as exc:
        return [Finding(check, Severity.ERROR, str(path), str(exc).removeprefix(f"{path}: "),
                        "a PEM CRL of each issuing CA (with CRL checking on, none means every client is refused)", fix)]
    findings = []
    for crl in crls:
        root = issuer_of(crl, roots)
        findings += _one_crl(crl, path, now, check=check, root=root, signer=root or issuer_of(crl, issuers),
                             fix=(root_fix or fix) if root is not None else fix)
    if want_root and roots and not any(issuer_of(crl, roots) is not None for crl in crls):
        findings.append(Finding(check, Severity.WARNING, str(path), f"holds no CRL of the root {roots[0].subject.rfc4514_string()}: "
                                "servers that check every level of the chain (nginx ssl_crl, haproxy crl-file) refuse every client",
                                "the root's CRL beside the issuing CA's", root_fix or fix))
    return findings


def _one_crl(crl: x509.CertificateRevocationList, path: Path, now: dt.datetime, *, check: str, root: x509.Certificate | None,
             signer: x509.Certificate | None, fix: str) -> list[Finding]:
    who = f"the root's CRL ({crl.issuer.rfc4514_string()})" if root is not None else f"the CRL of {crl.issuer.rfc4514_string()}"
    if signer is not None and not signed_by(crl, signer):
        return [Finding(check, Severity.ERROR, str(path), f"{who} does not verify with that CA's key "
                        "(another CA generation with the same name, or forged)", f"a CRL signed by {crl.issuer.rfc4514_string()}", fix)]
    this_update, next_update = crl.last_update_utc, crl.next_update_utc
    if next_update is None:
        return [Finding(check, Severity.ERROR, str(path), f"{who} has no nextUpdate", "a nextUpdate (RFC 5280 5.1.2.5)", fix)]
    if now >= next_update:
        refused = "servers that check every level of the chain (nginx, haproxy) refuse every client" if root is not None else \
            "with CRL checking on, every client is refused"
        return [Finding(check, Severity.ERROR, str(path), f"{who} expired at {next_update.isoformat()}: {refused}",
                        "a CRL before its nextUpdate", fix)]
    if this_update - now > CLOCK_TOLERANCE:
        return [Finding(check, Severity.WARNING, str(path), f"{who} was signed at {this_update.isoformat()}, "
                        f"{(this_update - now).total_seconds():.0f} s in this host's future: the clocks disagree",
                        "a clock within a few minutes of the CA's", "fix the clock (timedatectl set-ntp true; chronyc tracking)")]
    if crl_due(this_update, next_update, now):
        if root is not None:
            return [Finding(check, Severity.WARNING, str(path), f"{who} is due for re-signing (half its validity passed): it "
                            f"expires at {next_update.isoformat()} ({(next_update - now).days} days)",
                            "the root's CRL re-signed before its nextUpdate", fix)]
        left = (next_update - now).total_seconds() / 3600
        return [Finding(check, Severity.WARNING, str(path), f"{who} is overdue for re-signing "
                        f"(half its validity passed; it expires in {left:.1f} h)", "a CRL re-signed at half its validity", fix)]
    return []
