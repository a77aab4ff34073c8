"""Find what looks like a secret in a service definition (systemd unit, launchd plist) or config,
and where the service definitions of pki-agent and pkictl serve are installed on a host.

No unit or plist may hold a secret: a unit is world-readable and ``systemctl show`` prints its
environment to any user; a plist sits in /Library/LaunchDaemons for everyone to read. The
patterns are deliberately eager (a false alarm costs a rename, a missed token costs a rotation);
what is known not to be a secret is removed from a line before they look at it.
"""

from __future__ import annotations

import plistlib
import re
from pathlib import Path
from typing import NamedTuple

__all__ = ["SecretHit", "SECRET_PATTERNS", "find_secrets", "scan_file", "redact", "environment_files",
           "systemd_installed_paths", "launchd_installed_paths", "installed_service_files"]

# What a secret tends to look like in a text file. The base64 pattern wants upper case, lower case
# and a digit so that long words and paths (CapabilityBoundingSet) do not count.
SECRET_PATTERNS = {
    "password": re.compile(r"password", re.IGNORECASE),
    "passphrase": re.compile(r"passphrase", re.IGNORECASE),
    "token": re.compile(r"token", re.IGNORECASE),
    "secret": re.compile(r"secret", re.IGNORECASE),
    "API key": re.compile(r"api[_-]?key|access[_-]?key", re.IGNORECASE),
    # Provider keys (sk-..., sk_live_...) and bearer credentials, too short or dashed for the base64 rule.
    "API key value": re.compile(r"\bsk[-_][A-Za-z0-9_-]{12,}"),
    "bearer credential": re.compile(r"\bbearer\s+\S{8,}", re.IGNORECASE),
    "PEM private key": re.compile(r"BEGIN .*PRIVATE KEY"),
    "hex string": re.compile(r"\b[0-9A-Fa-f]{32,}\b"),
    "base64 string": re.compile(r"(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])[A-Za-z0-9+/]{32,}={0,2}"),
}

# Pointers to secrets and public values are no secrets: pkictl's option naming the CA passphrase
# file, the agent's setting naming it (renewal.ca_passphrase_file), that file's documented path
# (the pkictl serve unit tells the operator where the passphrase goes), and a certificate
# fingerprint (trust_anchor_sha256: or sha256:<hex>, which pkictl prints for anyone to compare).
_NOT_SECRETS = re.compile(
    r"(?:--)?passphrase-file\b|\bca_passphrase_file\b|(?:/usr/local)?/etc/pkictl/passphrase\b"
    r"|\btrust_anchor_sha256:\s*(?:sha256:)?[0-9A-Fa-f:]{64,95}|\bsha256:[0-9A-Fa-f]{64}\b"
)


class SecretHit(NamedTuple):
    """One line that looks secret: its number (from 1), the pattern's name, and the line."""

    line: int
    pattern: str
    text: str


def find_secrets(text: str) -> list[SecretHit]:
    """Every ``(line number, pattern name, line)`` of ``text`` that looks like a secret, one hit
    per pattern and line."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        scrubbed = _NOT_SECRETS.sub("", line)
        for name, pattern in SECRET_PATTERNS.items():
            if pattern.search(scrubbed):
                hits.append(SecretHit(number, name, line))
    return hits


def scan_file(path: Path) -> list[SecretHit]:
    """:func:`find_secrets` over a file; a binary plist is scanned in its XML form (line numbers
    are then those of ``plutil -convert xml1``'s output).

    Raises:
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"bplist"):
        try:
            data = plistlib.dumps(plistlib.loads(data), fmt=plistlib.FMT_XML)
        except (plistlib.InvalidFileException, ValueError, TypeError):
            pass  # not a valid plist: scan its bytes as text all the same
    return find_secrets(data.decode("utf-8", errors="replace"))


# A name that says its value is secret, and that value: KEY=VALUE, key: value, --opt=VALUE,
# --opt VALUE, a quoted value whole. The name may sit inside a longer one (GATEWAY_TOKEN,
# --gateway-token).
_SECRET_NAME = r"[\w.-]*(?:password|passphrase|token|secret|api[_-]?key|access[_-]?key|bearer)[\w.-]*"
_NAMED_VALUE = re.compile(rf"(?i)({_SECRET_NAME}(?:\s*[=:]\s*|\s+))(\"[^\"]*\"|'[^']*'|[^\s\"']+)")


def redact(line: str, limit: int = 100) -> str:
    """``line`` with every value that could be a secret replaced by ``<redacted>``, for a report
    that names the line without repeating the secret: the value of every secret-named key or
    option (wherever it sits on the line), the last ``KEY=VALUE`` of the line, and every string
    that a value pattern matched."""
    line = line.strip()
    line = _NAMED_VALUE.sub(r"\1<redacted>", line)
    line = re.sub(r"([=:]\s*)(?!<redacted>)[^=:\s]+$", r"\1<redacted>", line)  # KEY=VALUE, key: value
    for name in ("hex string", "base64 string", "API key value"):
        line = SECRET_PATTERNS[name].sub("<redacted>", line)
    line = re.sub(r"-----BEGIN .*", "-----BEGIN <redacted>", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


_ENVIRONMENT_FILE = re.compile(r"^\s*EnvironmentFile\s*=\s*-?(\S+)", re.MULTILINE)


def environment_files(path: Path) -> list[Path]:
    """The files a systemd unit or drop-in loads with ``EnvironmentFile=`` (systemd.exec(5); a
    leading ``-`` only means "ignore if missing"), resolved against the unit's directory when
    relative; [] when ``path`` cannot be read. Their contents become the service's environment,
    so a token there is as shared as one in the unit."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [Path(path).parent / found for found in _ENVIRONMENT_FILE.findall(text)]


def systemd_installed_paths() -> list[Path]:
    """Where units of pki-agent and pkictl serve are installed, drop-ins (systemctl edit) included."""
    paths = []
    for root in (Path("/etc/systemd/system"), Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"),
                 Path.home() / ".config/systemd/user"):
        for unit in ("pki-agent.service", "pkictl-serve.service"):
            paths.append(root / unit)
            dropins = root / f"{unit}.d"
            if dropins.is_dir():
                paths.extend(sorted(dropins.glob("*.conf")))
    return paths


def launchd_installed_paths() -> list[Path]:
    """Where the plists of pki-agent and pkictl serve are installed (system daemons, user agents)."""
    return [root / f"net.pkictl.{which}.plist"
            for root in (Path("/Library/LaunchDaemons"), Path.home() / "Library/LaunchAgents") for which in ("agent", "serve")]


def installed_service_files() -> list[Path]:
    """The service definitions of pki-agent and pkictl serve that exist on this host (any service manager)."""
    return [p for p in (*systemd_installed_paths(), *launchd_installed_paths()) if p.is_file()]
