"""Doctor checks of a CRL file: readable, signed by a CA we know, and fresh.

With CRL checking on, a missing or expired CRL refuses every client, so a CRL is re-signed at
half its validity; past that, whoever re-signs it is not running (docs/design.md).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Sequence

from cryptography import x509

from .diagnosis import Finding, Severity
from .errors import StoreError
from .revocation import crl_due, load_crls, signed_by

__all__ = ["crl_findings", "CLOCK_TOLERANCE"]

# A thisUpdate this far in the future means the clocks disagree (CRLs are backdated 5 minutes).
CLOCK_TOLERANCE = dt.timedelta(minutes=5)


def crl_findings(path: Path, issuers: Sequence[x509.Certificate], now: dt.datetime, *, fix: str,
                 check: str = "crl") -> list[Finding]:
    """Findings about the CRL file ``path`` at ``now``.

    Args:
        issuers: CA certificates whose CRLs may be in the file; a CRL of one of them must carry
            its valid signature. CRLs of other issuers are judged by their dates only.
        fix: what makes the CRL fresh again in this setting (who re-signs or fetches it).
        check: the check name to report under.

    Returns:
        Errors for a missing, unreadable, forged or expired CRL, warnings for an overdue one or a
        thisUpdate in the future (RFC 5280 5.1.2.4-5); empty when all is well.
    """
    try:
        crls = load_crls(path)
    except StoreError as exc:
        return [Finding(check, Severity.ERROR, str(path), str(exc).removeprefix(f"{path}: "),
                        "a PEM CRL of each issuing CA (with CRL checking on, none means every client is refused)", fix)]
    findings = []
    for crl in crls:
        who = crl.issuer.rfc4514_string()
        signer = next((c for c in issuers if c.subject == crl.issuer), None)
        if signer is not None and not signed_by(crl, signer):
            findings.append(Finding(check, Severity.ERROR, str(path), f"the CRL of {who} does not verify with that CA's key "
                                    "(another CA generation with the same name, or forged)", f"a CRL signed by {who}", fix))
            continue
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        if next_update is None:
            findings.append(Finding(check, Severity.ERROR, str(path), f"the CRL of {who} has no nextUpdate",
                                    "a nextUpdate (RFC 5280 5.1.2.5)", fix))
        elif now >= next_update:
            findings.append(Finding(check, Severity.ERROR, str(path), f"the CRL of {who} expired at {next_update.isoformat()}: "
                                    "with CRL checking on, every client is refused", "a CRL before its nextUpdate", fix))
        elif this_update - now > CLOCK_TOLERANCE:
            findings.append(Finding(check, Severity.WARNING, str(path), f"the CRL of {who} was signed at {this_update.isoformat()}, "
                                    f"{(this_update - now).total_seconds():.0f} s in this host's future: the clocks disagree",
                                    "a clock within a few minutes of the CA's", "fix the clock (timedatectl set-ntp true; chronyc tracking)"))
        elif crl_due(this_update, next_update, now):
            left = (next_update - now).total_seconds() / 3600
            findings.append(Finding(check, Severity.WARNING, str(path), f"the CRL of {who} is overdue for re-signing "
                                    f"(half its validity passed; it expires in {left:.1f} h)", "a CRL re-signed at half its validity", fix))
    return findings
