"""trust_anchor_sha256 in agent.yaml: written by both enroll commands, validated by the schema."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pki_agent.config import load_config
from pki_agent.enroll import enroll
from pki_agent.errors import ConfigError
from pkictl.cli import cli
from pkictl.est.wire import root_fingerprint

from est_support import RunningService


def anchor_sha256(bundle) -> str:
    return x509.load_pem_x509_certificate((bundle / "ca.pem").read_bytes()).fingerprint(hashes.SHA256()).hex()


def test_pkictl_enroll_writes_the_roots_fingerprint(tmp_path) -> None:
    """The agent.yaml of a pkictl enroll-node bundle pins the root in its ca.pem."""
    runner = CliRunner()
    home = str(tmp_path / "ca")
    assert runner.invoke(cli, ["--home", home, "init-ca"]).exit_code == 0
    result = runner.invoke(cli, ["--home", home, "enroll-node", "TW", "--out", str(tmp_path / "TW")])
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "TW" / "agent.yaml")
    assert config.trust_anchor_sha256 == anchor_sha256(tmp_path / "TW")


def test_pki_agent_enroll_writes_the_fingerprint_it_was_given(pki, tmp_path) -> None:
    """pki-agent enroll records the --fingerprint it checked the root against."""
    service = RunningService(pki.home).start()
    try:
        token, _ = pki.ca.create_token("nodeb")
        enroll(ca_url=service.url, fingerprint=root_fingerprint(pki.ca.root), name="nodeb", directory=tmp_path / "nodeb",
               token=token, wait=5, say=lambda _: None)
    finally:
        service.stop()
    assert load_config(tmp_path / "nodeb" / "agent.yaml").trust_anchor_sha256 == anchor_sha256(tmp_path / "nodeb")


@pytest.mark.parametrize("written", ["sha256:" + "AB:" * 31 + "AB", "ab" * 32, "SHA256:" + "ab" * 32])
def test_fingerprint_spellings_are_normalised(tmp_path, written) -> None:
    """pkictl's sha256:<hex>, upper case, colons between bytes or bare hex all load as 64 lower-case hex digits."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "trust_anchor_sha256": written}))
    assert load_config(path).trust_anchor_sha256 == "ab" * 32


def test_malformed_fingerprint_is_refused_with_the_field_named(tmp_path) -> None:
    """A fingerprint of the wrong length is a ConfigError naming trust_anchor_sha256 and the expected form."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "trust_anchor_sha256": "sha256:abc"}))
    with pytest.raises(ConfigError, match=r"trust_anchor_sha256: .*want sha256:<64 hex digits>"):
        load_config(path)
