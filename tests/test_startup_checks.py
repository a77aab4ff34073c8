"""'pki-agent run' serves a credential it can load but should not serve only after saying so:
one WARNING or ERROR line per problem, before 'ready', naming the file and the fix (a real
agent process for each problem, and a healthy twin that says nothing of the kind)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.diagnosis.credential_facts import fingerprint
from pkictl.crl import build_crl
from pkictl.pem import certificates_from_pem
from pkictl.settings import CASettings

from doctor_support import live_version, replace_file
from support import AgentProcess

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def _config(pki, echo_server, directory: Path, name: str = "gw", *, crl: Path | None = None, **settings) -> Path:
    config = directory.parent / f"{directory.name}-agent.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "kind": "gateway", "credential_dir": str(directory),
        "renewal": {"ca_home": str(pki.home), "check_interval": "1h"},
        "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_server.port}", "crl": str(crl or pki.ca.crl_path),
                     "allow": ["*"]},
        **settings,
    }))
    return config


def _not_yet_valid(pki, echo_server, tmp_path: Path) -> Path:
    """A gateway certificate of our CA issued with the CA's clock 30 days ahead."""
    early = CertificateAuthority.load(pki.home, clock=FixedClock(NOW + dt.timedelta(days=30)))
    try:
        bundle = early.enroll("gateway", "early", out=tmp_path / "early", ip_addresses=["127.0.0.1"]).directory
    finally:
        early.close()
    return _config(pki, echo_server, bundle, "early")


def _expired_crl(pki, echo_server, tmp_path: Path) -> Path:
    """listener.crl holds our issuing CA's CRL whose nextUpdate passed nine days ago."""
    key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    crl = build_crl(issuer=pki.ca.issuing, issuer_key=key, revoked=[], number=1, now=NOW - dt.timedelta(days=10),
                    lifetime=dt.timedelta(days=1))
    path = tmp_path / "expired-crl.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return _config(pki, echo_server, pki.gateway, crl=path)


def _pin_mismatch(pki, echo_server, tmp_path: Path) -> Path:
    return _config(pki, echo_server, pki.gateway, trust_anchor_sha256="ab" * 32)


def _other_ca(pki, echo_server, tmp_path: Path) -> Path:
    """A gateway bundle of another CA beside our ca.pem (bundles of two CAs mixed up)."""
    other = CertificateAuthority.init(tmp_path / "other-ca", CASettings())
    try:
        bundle = other.enroll("gateway", "gw", out=tmp_path / "other-gw", ip_addresses=["127.0.0.1"]).directory
    finally:
        other.close()
    shutil.copyfile(pki.gateway / "ca.pem", bundle / "ca.pem")
    return _config(pki, echo_server, bundle)


def _empty_chain(pki, echo_server, tmp_path: Path) -> Path:
    replace_file(live_version(pki.gateway) / "chain.pem", b"")
    return _config(pki, echo_server, pki.gateway)


# case -> (how to break it, level, words the line must hold: the file and the fix)
CASES = {
    "not yet valid": (_not_yet_valid, "ERROR", [r"start-up check validity \S+/early/archive/1: CN=early serial \w+ is not valid before",
                                                r"this host.s clock is behind or the CA.s clock was ahead"]),
    "CRL expired": (_expired_crl, "ERROR", [r"CRL loaded from \S+/expired-crl\.pem has EXPIRED", "pkictl sign-crl"]),
    "pin mismatch": (_pin_mismatch, "ERROR", [r"start-up check trust-anchor \S+/gw/ca\.pem: holds sha256:\w+ .*not the pinned root",
                                              r"set trust_anchor_sha256 in \S+gw-agent\.yaml"]),
    "another CA": (_other_ca, "ERROR", [r"start-up check issuer \S+/other-gw/archive/1: CN=gw serial \w+ is not issued by our CA "
                                        r"\(issuer CN=pkictl Issuing CA", "pkictl enroll-gateway gw"]),
    # an empty chain.pem beside a full fullchain.pem is refused when the credential loads (tests/test_file_errors.py)
}


@pytest.mark.parametrize("case", list(CASES))
def test_agent_warns_at_start_about_a_credential_it_should_not_serve(case, pki, echo_server, tmp_path):
    """The agent starts (it has nothing better to serve) but logs the problem once, at its level,
    before 'ready', with the file and the fix."""
    make, level, words = CASES[case]
    agent = AgentProcess(make(pki, echo_server, tmp_path))
    try:
        agent.wait_ready()
        ready = agent.log.last_index
        agent.log.wait_for(rf" {level} pki_agent: {words[0]}")
        assert agent.log.last_index < ready, agent.log.text()
        line = agent.log.lines[agent.log.last_index]
        for pattern in words[1:]:
            assert re.search(pattern, line), line
        before = agent.log.lines[:ready]
        assert len([x for x in before if " WARNING " in x or " ERROR " in x]) == 1, "\n".join(before)
    finally:
        agent.stop()


def test_a_healthy_gateway_starts_without_a_warning(pki, echo_server, tmp_path):
    """The twin: our gateway's own bundle, unpinned and pinned to the right root, starts with no
    WARNING or ERROR line and no start-up check line."""
    root = certificates_from_pem((pki.gateway / "ca.pem").read_bytes(), source="ca.pem")[0]
    for settings in ({}, {"trust_anchor_sha256": fingerprint(root)}):
        agent = AgentProcess(_config(pki, echo_server, pki.gateway, **settings))
        try:
            agent.wait_ready()
            before = agent.log.lines[:agent.log.last_index + 1]
            assert not [x for x in before if " WARNING " in x or " ERROR " in x or "start-up check" in x], "\n".join(before)
        finally:
            agent.stop()
