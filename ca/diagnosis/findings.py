"""Findings of ``pkictl doctor`` and ``pki-agent doctor``: severities, one-line rendering, JSON, exit status.

A check is a small named function of some facts about the host that returns findings; it never
modifies anything. A finding names one problem in one line: what is wrong, what was expected,
and the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Callable, Iterable, Sequence, TypeVar

__all__ = [
    "Severity",
    "Finding",
    "Check",
    "check",
    "check_name",
    "run_checks",
    "exit_status",
    "render",
    "EXIT_OK",
    "EXIT_WARNING",
    "EXIT_ERROR",
]

# The same codes as `pkictl status` (pkictl.status): 3 needs attention soon, 4 is broken now.
EXIT_OK = 0
EXIT_WARNING = 3
EXIT_ERROR = 4

T = TypeVar("T")


class Severity(enum.IntEnum):
    """How bad a finding is; ordered, so ``max()`` gives the worst."""

    OK = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class Finding:
    """One result of one check.

    Attributes:
        check: the check's name, e.g. ``key-match`` (stable: scripts match on it).
        severity: ok, warning or error.
        subject: what the finding is about (a file, a host:port, a node).
        problem: what is wrong (or, for ok, what was found).
        expected: what was expected instead ("" for ok).
        fix: the command or action that fixes it ("" for ok).
    """

    check: str
    severity: Severity
    subject: str
    problem: str
    expected: str = ""
    fix: str = ""

    def line(self) -> str:
        """The finding as one line of text: ``error key-match SUBJECT: PROBLEM; expected ...; fix: ...``."""
        parts = [f"{self.subject}: {self.problem}" if self.subject else self.problem]
        if self.expected:
            parts.append(f"expected {self.expected}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        message = " ".join("; ".join(parts).split())  # one line, whatever the parts hold
        return f"{self.severity.label:7} {self.check:20} {message}"

    def as_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity.label, "subject": self.subject,
                "problem": self.problem, "expected": self.expected, "fix": self.fix}


Check = Callable[[T], Iterable[Finding]]


def check(name: str) -> Callable[[Callable[[T], Iterable[Finding]]], Callable[[T], Iterable[Finding]]]:
    """Name a check function: ``@check("key-match")``; :func:`run_checks` reports a check that
    found nothing as ``ok`` under that name."""

    def decorate(function):
        function.check_name = name
        return function

    return decorate


def check_name(function: Callable) -> str:
    """The name :func:`check` gave ``function`` (else the function's own name)."""
    return getattr(function, "check_name", function.__name__)


def run_checks(checks: Sequence[Callable[[T], Iterable[Finding]]], facts: T) -> list[Finding]:
    """Run each check on ``facts`` in order; a check that finds nothing yields one ``ok`` finding.

    A check that raises (a bug, or a state nobody foresaw) becomes an error finding naming the
    exception, so that one broken check does not hide what the others found.
    """
    findings: list[Finding] = []
    for function in checks:
        name = check_name(function)
        try:
            found = list(function(facts))
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed
            found = [Finding(name, Severity.ERROR, "", f"the check itself failed: {type(exc).__name__}: {exc}",
                             "a check that completes", "report this as a bug of pkictl, with the output of --json")]
        findings.extend(found or [Finding(name, Severity.OK, "", "passed")])
    return findings


def exit_status(findings: Iterable[Finding]) -> int:
    """:data:`EXIT_OK`, :data:`EXIT_WARNING` or :data:`EXIT_ERROR` for the worst finding."""
    worst = max((f.severity for f in findings), default=Severity.OK)
    return {Severity.OK: EXIT_OK, Severity.WARNING: EXIT_WARNING, Severity.ERROR: EXIT_ERROR}[worst]


def render(findings: Sequence[Finding], *, as_json: bool = False, show_ok: bool = False) -> str:
    """The report: one line per warning and error (and per ok with ``show_ok``) and a summary
    line; or, with ``as_json``, an object ``{"findings": [...], "worst": ..., "exit_status": N}``
    holding every finding, ok ones included."""
    worst = max((f.severity for f in findings), default=Severity.OK)
    if as_json:
        return json.dumps({"findings": [f.as_dict() for f in findings], "worst": worst.label,
                           "exit_status": exit_status(findings)}, indent=1)
    lines = [f.line() for f in findings if show_ok or f.severity > Severity.OK]
    counts = {s: sum(1 for f in findings if f.severity == s) for s in Severity}
    checks = len({f.check for f in findings})
    lines.append(f"{checks} checks: {counts[Severity.ERROR]} errors, {counts[Severity.WARNING]} warnings"
                 + ("" if worst else ", nothing to fix"))
    return "\n".join(lines)
