"""The agent.yaml the CA side writes (pkictl.bundle_config) loads with pki-agent's schema in every
variant, and the address rules the enroll commands apply are the ones the agent applies."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki_agent.config import load_config
from pki_agent.errors import ConfigError
from pkictl.bundle_config import parse_tunnel, render_agent_config

FINGERPRINT = "ab" * 32

VARIANTS = {
    "node, CA home": dict(kind="node", ca_home=Path("/var/lib/pkictl")),
    "node, EST": dict(kind="node", ca_url="https://ca.example.lan:8443"),
    "node, EST, tunnel": dict(kind="node", ca_url="https://ca.example.lan:8443",
                              tunnel={"listen": "127.0.0.1:18789", "gateway": "gw.example.lan:8443"}),
    "gateway, CA home": dict(kind="gateway", ca_home=Path("/var/lib/pkictl"),
                             listener={"listen": "0.0.0.0:8443", "upstream": "127.0.0.1:18789", "crl": "/var/lib/pkictl/crl.pem"}),
    "gateway, EST, allow list": dict(kind="gateway", ca_url="https://ca.example.lan:8443",
                                     listener={"listen": "[::]:8443", "upstream": "127.0.0.1:18789", "crl": "crl.pem", "allow": ["TW", "n2"]}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_written_config_loads_with_the_agents_schema(variant, tmp_path):
    """Each variant of the bundle's agent.yaml loads, with what it was written with."""
    options = VARIANTS[variant]
    path = tmp_path / "agent.yaml"
    path.write_text(render_agent_config(name="tw", trust_domain="example.lan", trust_anchor_sha256=FINGERPRINT, **options))
    config = load_config(path)
    assert config.kind == options["kind"] and config.trust_domain == "example.lan"
    assert config.trust_anchor_sha256 == FINGERPRINT
    assert config.renewal.ca_url == options.get("ca_url")
    assert (config.renewal.ca_home is None) == ("ca_home" not in options)
    if "listener" in options:
        assert config.listener.upstream == ("127.0.0.1", 18789)
        assert config.listener.allow == sorted(n.lower() for n in options["listener"].get("allow", ["*"]))
    if "tunnel" in options:
        assert config.tunnel.listen == ("127.0.0.1", 18789) and config.tunnel.gateway == ("gw.example.lan", 8443)


def test_a_config_the_agent_would_refuse_is_refused_when_it_is_loaded(tmp_path):
    """Negative control: the schema does check what is written (a tunnel on a LAN address)."""
    path = tmp_path / "agent.yaml"
    path.write_text(render_agent_config(name="tw", kind="node", trust_domain="example.lan", ca_url="https://ca:8443",
                                        tunnel={"listen": "192.168.1.5:18789", "gateway": "gw:8443"}))
    with pytest.raises(ConfigError, match="tunnel.listen: .*loopback only"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:18789", "want LISTEN=GATEWAY"),
    ("0.0.0.0:18789=gw:8443", r"listen: 0\.0\.0\.0: the tunnel takes plain TCP, so it listens on loopback only"),
    ("127.0.0.1:18789=gw:0", "gateway: gw:0: the gateway's port must be given"),
    ("127.0.0.1:x=gw", "listen: .*the port must be a number; gateway: .*want HOST:PORT"),
])
def test_parse_tunnel_names_what_is_wrong(text, message):
    """--tunnel is refused with the part that is wrong and what is expected."""
    with pytest.raises(ValueError, match=message):
        parse_tunnel(text)


def test_parse_tunnel_accepts_loopback_in_and_a_named_gateway_out():
    """The accepted form gives the tunnel: settings as written."""
    assert parse_tunnel(" 127.0.0.1:18789=gw.example.lan:8443 ") == {"listen": "127.0.0.1:18789", "gateway": "gw.example.lan:8443"}
    assert parse_tunnel("[::1]:18789=[fd00::1]:8443") == {"listen": "[::1]:18789", "gateway": "[fd00::1]:8443"}


@pytest.mark.parametrize("example", ["gateway.yaml", "node.yaml"])
def test_the_commented_example_configs_load(example, tmp_path):
    """config/gateway.yaml and config/node.yaml are valid agent configurations as shipped."""
    source = Path(__file__).resolve().parents[1] / "config" / example
    config = load_config(source)
    assert config.renewal.ca_url == "https://ca.example.lan:8443"
    if config.kind == "gateway":
        assert config.listener.crl is not None and config.renewal.crl_refresh_interval.total_seconds() == 60
    else:
        assert config.renewal.reenroll == "approval" and config.tunnel is not None
