"""What ``pki-agent doctor`` knows of this host: the loaded configuration, the credential and
its CRLs, the EST exchange, and how far the doctor may reach (the checks of
:mod:`pki_agent.doctor.checks`, :mod:`pki_agent.doctor.gateway_checks` and :mod:`pki_agent.doctor.tunnel_checks`
read it)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from pathlib import Path
from typing import Sequence

from pkictl.bundle_config import parse_address
from pkictl.clock import Clock
from pkictl.diagnosis.credential_facts import CredentialFacts
from pkictl.errors import PKIError
from pkictl.revocation import crls_from_pem, load_crls

from ..config import AgentConfig
from .probe import ESTProbe, probe_est

__all__ = ["AgentFacts", "gateway_target"]


def gateway_target(config: AgentConfig, address: str | None = None, server_name: str | None = None) -> tuple[tuple[str, int], str] | None:
    """Where this node dials the gateway and the name it verifies: ``--gateway``/``--server-name``
    when given, else the config's ``tunnel:`` section (its ``gateway`` and ``server_name``), else
    None (no test connection).

    Raises:
        ValueError: ``address`` is not HOST:PORT.
    """
    tunnel = getattr(config, "tunnel", None)
    if address is None and tunnel is not None:
        address = getattr(tunnel, "gateway", None)
        server_name = server_name or getattr(tunnel, "server_name", None)
    if address is None:
        return None
    host, port = parse_address(address)
    return (host, port), server_name or host


@dataclasses.dataclass
class AgentFacts:
    """The loaded configuration and how far the doctor may reach.

    Args:
        config_path: the configuration file.
        config: the loaded configuration.
        clock: the time source (also for the skew measurement).
        gateway: from :func:`gateway_target`; None skips the test connection.
        offline: open no network connection at all.
        timeout: seconds per connection.
        settle: seconds a test connection waits for the gateway's verdict.
        service_files: units and plists to scan for secrets.
    """

    config_path: Path
    config: AgentConfig
    clock: Clock
    gateway: tuple[tuple[str, int], str] | None = None
    offline: bool = False
    timeout: float = 5.0
    settle: float = 1.0
    service_files: Sequence[Path] = ()

    @functools.cached_property
    def now(self) -> dt.datetime:
        return self.clock.now()

    @functools.cached_property
    def est(self) -> ESTProbe | None:
        """The EST exchange (None offline, without ca_url, or without a ca.pem to verify it by)."""
        anchors = self.config.credential_dir / "ca.pem"
        if self.offline or self.config.renewal.ca_url is None or not anchors.is_file():
            return None
        return probe_est(self.config.renewal.ca_url, anchors, self.clock, timeout=self.timeout)

    @property
    def reenroll(self) -> str:
        name, kind = self.config.name, self.config.kind
        if kind == "node":
            return (f"get a new certificate: on the CA host pkictl enroll-node {name} --token, then here pki-agent enroll "
                    f"(or pkictl enroll-node {name} --replace and copy the bundle with tar or rsync -a)")
        return f"on the CA host pkictl enroll-gateway {name} --dns ... --ip ... --replace, and copy the bundle here (tar or rsync -a)"

    @property
    def crl_path(self) -> Path | None:
        """The CRL file this host keeps: the listener's, or the CA's on the CA host."""
        if self.config.listener is not None and self.config.listener.crl is not None:
            return self.config.listener.crl
        return self.config.renewal.ca_home / "crl.pem" if self.config.renewal.ca_home is not None else None

    @functools.cached_property
    def credential(self) -> CredentialFacts:
        crls = []
        if self.crl_path is not None:
            try:
                crls.append((str(self.crl_path), load_crls(self.crl_path)))
            except PKIError:
                pass  # the crl check reports it
        if self.est is not None and self.est.crl_pem:
            try:
                crls.append((f"{self.config.renewal.ca_url}/crl.pem", crls_from_pem(self.est.crl_pem, source="the EST server")))
            except PKIError:
                pass
        return CredentialFacts(
            directory=self.config.credential_dir, now=self.now, kind=self.config.kind, name=self.config.name,
            trust_domain=self.config.trust_domain, pinned_sha256=self.config.trust_anchor_sha256, crls=crls,
            reenroll=self.reenroll, config=str(self.config_path), renews_over_est=self.config.renewal.ca_url is not None,
            key_group=self._key_group(),
            reference_clock=("the EST server", self.est.skew) if self.est is not None and self.est.skew is not None else None,
        )

    def _key_group(self) -> int | None:
        try:
            return self.config.version_layout().group
        except ValueError:
            return None  # the group is gone: group-readable keys are then reported as such
