"""What ``pki-agent run`` says at start about a credential it can load but should not serve: the doctor's checks, logged.

A credential that loads (key and certificate match, files complete) can still be useless: not
yet valid, of another CA, with an empty chain, or beside a ca.pem that is not the pinned root.
The agent serves it anyway (a reload fully succeeds or changes nothing, and there may be nothing
better), but says so before ``ready``, one line per problem, with the file and the fix, from the
same checks ``pki-agent doctor`` runs (docs/design.md, "Start-up checks"). Nothing here opens a
network connection or writes a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pkictl.clock import Clock
from pkictl.diagnosis.credential_checks import check_chain, check_issuer, check_trust_anchor, check_validity
from pkictl.diagnosis.findings import Finding, Severity, run_checks

from ..config import AgentConfig
from ..doctor.facts import AgentFacts

__all__ = ["STARTUP_CHECKS", "startup_findings", "log_startup_findings"]

log = logging.getLogger("pki_agent")

# The credential checks whose failure a loaded credential does not already rule out. The CRL's
# expiry is said by the reload itself (every reload, not only at start); revocation likewise.
STARTUP_CHECKS = (check_chain, check_issuer, check_validity, check_trust_anchor)


def startup_findings(config: AgentConfig, config_path: Path | None, clock: Clock) -> list[Finding]:
    """The warnings and errors of :data:`STARTUP_CHECKS` for the credential of ``config`` now.

    Args:
        config: the agent's validated configuration.
        config_path: its file, named in fixes (None: "the agent configuration").
        clock: the time to judge validity at.

    Returns:
        Findings of severity WARNING or ERROR only, in check order (empty when all is well).
    """
    facts = AgentFacts(config_path=config_path or Path("the agent configuration"), config=config, clock=clock, offline=True)
    return [f for f in run_checks(STARTUP_CHECKS, facts.credential) if f.severity > Severity.OK]


def log_startup_findings(config: AgentConfig, config_path: Path | None, clock: Clock) -> int:
    """Log each finding of :func:`startup_findings` as one line at its severity (WARNING or
    ERROR), prefixed ``start-up check``; return how many were logged."""
    findings = startup_findings(config, config_path, clock)
    for finding in findings:
        level = logging.ERROR if finding.severity >= Severity.ERROR else logging.WARNING
        log.log(level, "start-up check %s", " ".join(finding.line().split()[1:]))
    return len(findings)
