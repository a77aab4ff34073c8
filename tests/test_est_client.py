"""The agent's EST client against the real service: enrollment with a pinned root, renewal with
the current certificate, and every refusal reported for what it is."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading

import pytest
import trustme
import yaml

from pki_agent.config import load_config
from pki_agent.enroll import enroll
from pki_agent.errors import CredentialUnusable, RenewalError
from pki_agent.est_client import ESTClient
from pki_agent.rotation.rotate import rotate
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock, SystemClock
from pkictl.errors import AuthenticationError
from pkictl.est.wire import root_fingerprint
from pkictl.est.serve import ESTService
from pkictl.store import CredentialStore

from support import DEADLINE, wait_until


class RunningService:
    """pkictl serve's ESTService on its own event loop thread (the CA is loaded there: SQLite
    connections belong to the thread that opened them)."""

    def __init__(self, home) -> None:
        self.home = home
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.service = ESTService(CertificateAuthority.load(self.home), listen=("127.0.0.1", 0), retry_after=1, check_interval=3600)

        def ready(port: int) -> None:
            self.port = port
            self.ready.set()

        self.loop.run_until_complete(self.service.run(ready=ready, handle_signals=False))

    def __enter__(self) -> "RunningService":
        self.thread.start()
        assert self.ready.wait(DEADLINE), "the EST service did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.service.stop)
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "the EST service did not stop"
        self.loop.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def ca(tmp_path):
    authority = CertificateAuthority.init(tmp_path / "ca")
    yield authority
    authority.close()


@pytest.fixture
def service(ca):
    with RunningService(ca.home) as running:
        yield running


def _token(ca, name="TW"):
    return ca.create_token(name)[0]


def test_token_enrollment_writes_a_bundle_that_renews_over_est(ca, service, tmp_path):
    """pki-agent enroll with a token writes a verified bundle whose agent.yaml renews over EST,
    and a renewal through the EST client installs a successor from the same CA."""
    enroll(ca_url=service.url, fingerprint=root_fingerprint(ca.root), name="TW", directory=tmp_path / "TW",
           token=_token(ca), say=lambda _: None)
    store = CredentialStore(tmp_path / "TW")
    config = load_config(tmp_path / "TW" / "agent.yaml")
    assert config.renewal.ca_url == service.url and config.kind == "node" and config.name == "TW"
    first = store.load()
    client = ESTClient(service.url, anchors_path=store.trust_anchors_path, store=store)
    second = rotate(store, first, client, SystemClock())
    assert second.certificate.serial_number != first.certificate.serial_number
    assert second.chain[0].subject == ca.issuing.subject
    assert store.load().certificate.serial_number == second.certificate.serial_number


def test_wrong_fingerprint_writes_nothing(ca, service, tmp_path):
    """A root fingerprint that does not match the server's root stops enrollment before any key
    or request leaves the node, naming both fingerprints."""
    with pytest.raises(AuthenticationError, match="someone in between"):
        enroll(ca_url=service.url, fingerprint="sha256:" + "00" * 32, name="TW", directory=tmp_path / "TW",
               token=_token(ca), say=lambda _: None)
    assert not (tmp_path / "TW").exists()
    rows = sqlite3.connect(ca.home / "inventory.sqlite3").execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    assert rows == 0


def test_denied_request_is_reported_as_denied(ca, service, tmp_path):
    """A node waiting for approval learns that the operator denied it, with the reason."""
    errors: list[BaseException] = []
    codes: list[str] = []

    def wait() -> None:
        try:
            enroll(ca_url=service.url, fingerprint=root_fingerprint(ca.root), name="n2", directory=tmp_path / "n2",
                   wait=DEADLINE, say=codes.append)
        except BaseException as exc:  # noqa: BLE001 - examined below
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(ca.inventory.pending_requests, what="the request reaching the CA", interval=0.02)
    ca.deny("n2")
    thread.join(DEADLINE)
    assert any("waiting for approval" in line for line in codes)
    assert len(errors) == 1 and isinstance(errors[0], AuthenticationError) and "denied" in str(errors[0])
    assert not (tmp_path / "n2").exists()


def test_revoked_certificate_renewal_is_refused_with_the_reason(ca, service, tmp_path):
    """After revocation the EST server refuses the renewal with the reason 'revoked' (its
    Pkictl-Refusal header), the client raises CredentialUnusable saying so, and the credential on
    disk is unchanged."""
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    store = CredentialStore(bundle)
    current = store.load()
    ca.revoke("TW")
    with pytest.raises(CredentialUnusable, match="is revoked") as refused:
        rotate(store, current, ESTClient(service.url, anchors_path=store.trust_anchors_path, store=store), SystemClock())
    assert refused.value.reason == "revoked"
    assert store.load().certificate.serial_number == current.certificate.serial_number


def test_expired_certificate_is_refused_at_the_tls_layer_and_said_so(ca, service, tmp_path):
    """An expired client certificate is refused in the TLS handshake; the client reports that
    the server refused its certificate (CredentialUnusable: retrying changes nothing), not a
    network error. (The agent itself knows an expired certificate before it asks.)"""
    ca.clock = FixedClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=100))
    bundle = ca.enroll("node", "old", out=tmp_path / "old").directory
    store = CredentialStore(bundle)
    with pytest.raises(CredentialUnusable, match="refused our certificate at the TLS layer") as refused:
        rotate(store, store.load(), ESTClient(service.url, anchors_path=store.trust_anchors_path, store=store), SystemClock())
    assert refused.value.reason == "refused" and "expired, not issued by this CA, or not for clientAuth" in refused.value.detail


def test_unreachable_server_is_a_network_error_and_the_agent_keeps_its_credential(ca, tmp_path):
    """With no server listening the renewal fails as 'cannot reach', and the agent keeps serving
    its certificate and schedules a retry."""
    from pki_agent.config import AgentConfig, RenewalConfig
    from pki_agent.daemon import Agent

    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    with RunningService(ca.home) as running:
        url = running.url  # a port that was ours and is closed after this block
    agent = Agent(AgentConfig(name="TW", kind="node", credential_dir=bundle, renewal=RenewalConfig(ca_url=url, jitter=0)))
    agent.reload()
    serial = agent.credential.certificate.serial_number
    store = CredentialStore(bundle)
    with pytest.raises(RenewalError, match="cannot reach"):
        rotate(store, store.load(), ESTClient(url, anchors_path=store.trust_anchors_path, store=store), SystemClock())
    assert asyncio.run(agent.renew()) is False
    assert agent.credential.certificate.serial_number == serial and agent.next_attempt is not None


def test_a_server_that_is_not_our_ca_is_refused(ca, tmp_path):
    """Trusting a foreign anchor (trustme), the client refuses to talk to our server: the server
    must prove it is the CA the node pinned."""
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    foreign = trustme.CA()
    foreign.cert_pem.write_to_path(str(tmp_path / "foreign.pem"))
    store = CredentialStore(bundle)
    with RunningService(ca.home) as running:
        with pytest.raises(RenewalError, match="does not prove it is our CA"):
            ESTClient(running.url, anchors_path=tmp_path / "foreign.pem", store=store).cacerts()


def test_config_refuses_both_renewal_sources(tmp_path):
    """ca_home and ca_url together are a contradiction, refused at load time with both named."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"name": "TW", "kind": "node", "renewal": {"ca_home": "ca", "ca_url": "https://ca:8443"}}))
    from pki_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="ca_home.*ca_url"):
        load_config(path)


@pytest.mark.parametrize("args", [["--token", ""], ["--token", "  "], ["--token-file", "EMPTY"]])
def test_an_empty_token_is_refused_before_anything_is_asked(args, tmp_path):
    """'pki-agent enroll --token ""' (an empty shell variable) or an empty token file is an error
    naming the option, not a silent wait for approval; nothing is written and nothing is sent (the
    CA URL does not even answer)."""
    import subprocess

    from support import command

    empty = tmp_path / "token"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = subprocess.run([command("pki-agent"), "enroll", "--ca-url", "https://127.0.0.1:9", "--fingerprint", "sha256:" + "ab" * 32,
                             "--name", "TW", "--dir", str(tmp_path / "TW"), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is empty" in result.stderr and args[0] in result.stderr and "approval" not in result.stdout
    assert not (tmp_path / "TW").exists()
