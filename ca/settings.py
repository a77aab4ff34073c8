"""CA settings (trust domain, lifetimes, renewal fraction): a frozen value stored as YAML."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from typing import Any

from .errors import SettingsError

__all__ = ["CASettings", "parse_duration", "format_duration", "DEFAULT_RENEWAL_FRACTION"]

DEFAULT_RENEWAL_FRACTION = 2 / 3

_DURATION = re.compile(r"\s*(\d+)\s*([smhdy]?)\s*")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}


def parse_duration(text: str | int, *, field: str = "duration", allow_zero: bool = False) -> dt.timedelta:
    """Parse ``90d``, ``12h``, ``30m``, ``10s``, ``10y`` or a bare number of seconds.

    Args:
        text: the duration as written by an operator, or an int of seconds.
        field: the name of the setting, for the error message.
        allow_zero: accept ``0s`` (a delay that may be none).

    Returns:
        A positive timedelta (or zero, with ``allow_zero``).

    Raises:
        SettingsError: not of the form ``<integer><unit>``, not positive, or longer than a
            timedelta holds (999999999 days).
    """
    if isinstance(text, bool):
        raise SettingsError(f"{field}: got {text!r}, want a duration such as 90d, 12h or 30s")
    if isinstance(text, int):
        seconds = text
    else:
        match = _DURATION.fullmatch(str(text))
        if not match:
            raise SettingsError(
                f"{field}: got {text!r}, want a duration such as 90d, 12h, 30m or 10s "
                "(units: s, m, h, d, y = 365 d)"
            )
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise SettingsError(f"{field}: got {text!r}, want a duration greater than zero")
    try:
        return dt.timedelta(seconds=seconds)
    except OverflowError:  # timedelta holds at most 999999999 days
        raise SettingsError(f"{field}: got {text!r}, want a duration of at most {dt.timedelta.max.days}d") from None


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact ``<integer><unit>`` spelling of ``value`` (inverse of parse_duration)."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    for unit in ("y", "d", "h", "m"):
        if seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


@dataclasses.dataclass(frozen=True)
class CASettings:
    """Policy of one CA, fixed at ``init-ca`` and kept in ``<home>/ca.yaml``.

    Attributes:
        trust_domain: the SPIFFE trust domain of node identities (``spiffe://<trust_domain>/...``).
        root_lifetime: validity of the root certificate.
        issuing_lifetime: validity of the issuing CA; must outlive every end-entity certificate.
        node_lifetime: validity of node (client) certificates, 90 days by default.
        gateway_lifetime: validity of gateway (server) certificates, 90 days by default.
        renewal_fraction: renew at notBefore + fraction x lifetime, in (0, 1); 2/3 by default.
        crl_lifetime: nextUpdate - thisUpdate of each issuing CA's CRL; it is re-signed after half of it.
        root_crl_lifetime: nextUpdate - thisUpdate of the root's CRL, 365 days by default. The
            root key is offline, so this CRL is signed only at init-ca, rotate-issuing and
            ``pkictl sign-crl --root`` (or re-signed at half of it while the root key is in the
            CA home); at most the root_lifetime. Servers that check every level of the chain
            (nginx ``ssl_crl``, haproxy ``crl-file``) refuse every client once it has expired.
        issuing_activation_delay: how long a new issuing CA (``pkictl rotate-issuing``) is
            published before it issues, 10 minutes by default. It must exceed how often gateways
            fetch crl.pem (pki-agent: ``renewal.crl_refresh_interval``, 60 s): a gateway without
            the new CA's CRL refuses its node certificates.
        superseded_grace: how long after a renewal its predecessor stays unrevoked, 10 minutes
            by default: time for the host to install the successor and for the software using
            it to reload. Then the predecessor is revoked with reason superseded (RFC 5280 5.3.1)
            at the next CRL check, so that a copy of the old key opens nothing; 0 revokes at once.
        pending_requests_per_name: enrollment requests (no token: they wait for ``pkictl
            approve``) that may wait at once under one node name, 3 by default; more are refused
            unrecorded, so that anyone reaching the EST port cannot bury a node's real request.
        pending_requests_total: requests that may wait at once, 100 by default.
        pending_request_ttl: how long a request waits before it expires unapproved (it is
            dropped, and audited as approval-request-expired), a day by default.
    """

    trust_domain: str = "pkictl.internal"
    root_lifetime: dt.timedelta = dt.timedelta(days=3650)
    issuing_lifetime: dt.timedelta = dt.timedelta(days=5 * 365)
    node_lifetime: dt.timedelta = dt.timedelta(days=90)
    gateway_lifetime: dt.timedelta = dt.timedelta(days=90)
    renewal_fraction: float = DEFAULT_RENEWAL_FRACTION
    crl_lifetime: dt.timedelta = dt.timedelta(days=7)
    root_crl_lifetime: dt.timedelta = dt.timedelta(days=365)
    issuing_activation_delay: dt.timedelta = dt.timedelta(minutes=10)
    superseded_grace: dt.timedelta = dt.timedelta(minutes=10)
    pending_requests_per_name: int = 3
    pending_requests_total: int = 100
    pending_request_ttl: dt.timedelta = dt.timedelta(days=1)

    def __post_init__(self) -> None:
        for name in ("pending_requests_per_name", "pending_requests_total"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SettingsError(f"{name}: got {getattr(self, name)!r}, want a whole number of at least 1")
        if self.pending_requests_per_name > self.pending_requests_total:
            raise SettingsError(f"pending_requests_per_name: got {self.pending_requests_per_name}, want at most "
                                f"pending_requests_total ({self.pending_requests_total})")
        if self.pending_request_ttl <= dt.timedelta(0):
            raise SettingsError("pending_request_ttl: want a positive duration such as 1d or 12h")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?", self.trust_domain):
            raise SettingsError(
                f"trust_domain: got {self.trust_domain!r}, want a lower-case DNS name such as "
                "example.lan (SPIFFE trust domain)"
            )
        if not 0 < self.renewal_fraction < 1:
            raise SettingsError(
                f"renewal_fraction: got {self.renewal_fraction}, want a number between 0 and 1 "
                "(2/3 = renew after two thirds of the lifetime)"
            )
        if self.issuing_lifetime > self.root_lifetime:
            raise SettingsError(
                f"issuing_lifetime: got {format_duration(self.issuing_lifetime)}, want at most the "
                f"root_lifetime {format_duration(self.root_lifetime)}"
            )
        if self.root_crl_lifetime > self.root_lifetime:
            raise SettingsError(
                f"root_crl_lifetime: got {format_duration(self.root_crl_lifetime)}, want at most the "
                f"root_lifetime {format_duration(self.root_lifetime)}"
            )
        longest_leaf = max(self.node_lifetime, self.gateway_lifetime)
        if longest_leaf >= self.issuing_lifetime:
            raise SettingsError(
                f"end-entity lifetime {format_duration(longest_leaf)} must be shorter than the "
                f"issuing_lifetime {format_duration(self.issuing_lifetime)}"
            )

    def lifetime(self, kind: str) -> dt.timedelta:
        """Validity of a new certificate of ``kind`` (``root``, ``issuing``, ``node``, ``gateway``;
        ``service``, the EST service's server certificate, lives as long as a gateway's, and
        ``operator``, a person's client certificate for the admin page, as long as a node's)."""
        return getattr(self, f"{ {'service': 'gateway', 'operator': 'node'}.get(kind, kind)}_lifetime")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = format_duration(value) if isinstance(value, dt.timedelta) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "settings") -> "CASettings":
        """Build settings from a mapping as stored in ca.yaml.

        Raises:
            SettingsError: unknown keys, malformed durations or contradictory values; the
                message names ``source`` and the field.
        """
        if not isinstance(data, dict):
            raise SettingsError(f"{source}: want a mapping of settings, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted((str(key) for key in data if key not in known), key=str)  # YAML keys may be numbers or null
        if unknown:
            raise SettingsError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if isinstance(known[key].default, dt.timedelta):
                    # A lifetime must be positive; a delay or a grace may be zero (at once).
                    values[key] = parse_duration(value, field=key, allow_zero=not key.endswith("_lifetime"))
                elif isinstance(known[key].default, int) and not isinstance(known[key].default, bool):
                    try:
                        values[key] = int(value)
                    except (TypeError, ValueError, OverflowError):  # OverflowError: .inf
                        raise SettingsError(f"{key}: got {value!r}, want a whole number") from None
                elif key == "renewal_fraction":
                    try:
                        values[key] = float(value)
                    except (TypeError, ValueError):
                        raise SettingsError(f"renewal_fraction: got {value!r}, want a number between 0 and 1") from None
                else:
                    values[key] = str(value)
            return cls(**values)
        except (SettingsError, ValueError, TypeError) as exc:
            raise SettingsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> "CASettings":
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SettingsError(f"{path}: not valid YAML (UTF-8 text): {exc}") from None
        return cls.from_dict(data, source=str(path))
