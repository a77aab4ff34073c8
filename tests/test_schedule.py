"""Renewal scheduling through failures, clock jumps and expiry, with an injected clock: retries
back off but never wait past a quarter of the time left, failures get louder as expiry nears, a
floor keeps renewals apart, and the state file says what happened."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random

import pytest

from pki_agent.config import AgentConfig, RenewalConfig
from pki_agent.daemon import Agent
from pki_agent.rotation.schedule import RETRY_FLOOR, failure_log_level, renewal_floor, retry_delay
from pki_agent.rotation.state import state_path
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.settings import CASettings
from pkictl.store import CredentialStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LIFETIME = dt.timedelta(days=90)
SECOND = dt.timedelta(seconds=1)


def _agent(tmp_path, clock, **renewal):
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(), clock=clock)
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    config = AgentConfig(name="TW", kind="node", credential_dir=bundle,
                         renewal=RenewalConfig(ca_home=tmp_path / "ca", jitter=0, **renewal))
    agent = Agent(config, clock=clock, rng=random.Random(1))
    agent.reload()
    return agent, CredentialStore(bundle)


def _ca_away(tmp_path):
    (tmp_path / "ca" / "ca.yaml").rename(tmp_path / "ca" / "ca.yaml.away")


def _ca_back(tmp_path):
    (tmp_path / "ca" / "ca.yaml.away").rename(tmp_path / "ca" / "ca.yaml")


def test_retry_delay_is_backoff_capped_by_a_quarter_of_the_time_left():
    """Far from expiry the backoff rules; near it, the wait is at most a quarter of what is left
    and at least the 1 s floor; after expiry the agent still retries on the plain backoff."""
    rng = random.Random(3)
    far = retry_delay(20, left=dt.timedelta(days=20), initial=10, maximum=3600, rng=rng)
    assert 10 <= far <= 3600
    near = [retry_delay(20, left=dt.timedelta(minutes=40), initial=10, maximum=3600, rng=rng) for _ in range(50)]
    assert max(near) <= 600 and min(near) >= 10
    assert retry_delay(20, left=dt.timedelta(seconds=2), initial=10, maximum=3600, rng=rng) == RETRY_FLOOR.total_seconds()
    assert 10 <= retry_delay(20, left=-dt.timedelta(hours=1), initial=10, maximum=3600, rng=rng) <= 3600


@pytest.mark.parametrize("share, level", [(0.5, logging.WARNING), (0.8 - 1e-6, logging.WARNING), (0.8, logging.ERROR),
                                          (0.99, logging.ERROR), (1.0, logging.CRITICAL), (1.2, logging.CRITICAL)])
def test_failure_log_level_rises_at_80_percent_and_at_expiry(share, level):
    """WARNING before 80 % of the lifetime, ERROR from 80 %, CRITICAL from notAfter on."""
    assert failure_log_level(T0 + LIFETIME * share, T0, T0 + LIFETIME) == level


def test_failed_attempts_get_louder_and_close_in_on_expiry(tmp_path, caplog):
    """With the CA gone, attempts at 2/3, 80 % and past expiry log WARNING, ERROR and CRITICAL; each
    next attempt is within a quarter of the time left; the certificate stays installed throughout."""
    caplog.set_level(logging.INFO, logger="pki_agent")
    clock = FixedClock(T0)
    agent, store = _agent(tmp_path, clock, retry_max=dt.timedelta(days=30))
    cert = store.load().certificate
    _ca_away(tmp_path)
    for share, level in [(2 / 3, logging.WARNING), (0.8, logging.ERROR), (0.97, logging.ERROR), (1.01, logging.CRITICAL)]:
        clock.set(cert.not_valid_before_utc + LIFETIME * share)
        caplog.clear()
        assert asyncio.run(agent.renew()) is False
        (record,) = [r for r in caplog.records if "renewal of TW failed" in r.getMessage()]
        assert record.levelno == level, record.getMessage()
        left = cert.not_valid_after_utc - clock.now()
        wait = agent.next_attempt - clock.now()
        if left > dt.timedelta(0):
            assert RETRY_FLOOR <= wait <= max(left / 4, RETRY_FLOOR)
        assert store.load().certificate.serial_number == cert.serial_number
    assert "EXPIRED" in record.getMessage()


def test_a_forward_clock_jump_renews_at_the_next_check_and_a_backward_one_does_not(tmp_path):
    """A check after the clock jumped past the due time renews; after a jump back to before the
    new certificate's due time, checks do nothing (the due time comes from the certificate)."""
    clock = FixedClock(T0)
    agent, store = _agent(tmp_path, clock)
    first = store.load().certificate
    clock.set(T0 + dt.timedelta(days=80))  # slept through the due time (day 60)
    asyncio.run(agent.check())
    second = store.load().certificate
    assert second.serial_number != first.serial_number
    clock.set(T0 + dt.timedelta(days=10))  # the clock is corrected backwards
    asyncio.run(agent.check())
    asyncio.run(agent.check())
    assert store.load().certificate.serial_number == second.serial_number


def test_the_floor_keeps_two_renewals_apart(tmp_path):
    """When the CA returns a certificate that is due at once (its renewal fraction tiny), the next
    attempt waits for the floor, min(min_interval, lifetime / 10), and not a moment less."""
    clock = FixedClock(T0)
    agent, store = _agent(tmp_path, clock, fraction=0.00005, min_interval=dt.timedelta(minutes=5))  # due 6.5 min after notBefore
    clock.set(agent.renewal_due())
    asyncio.run(agent.check())
    renewed_at = clock.now()
    second = store.load().certificate
    floor = renewal_floor(dt.timedelta(minutes=5), second)
    assert floor == dt.timedelta(minutes=5)
    assert agent.next_attempt == renewed_at + floor
    clock.set(renewed_at + floor - SECOND)
    asyncio.run(agent.check())
    assert store.load().certificate.serial_number == second.serial_number
    clock.set(renewed_at + floor)
    asyncio.run(agent.check())
    assert store.load().certificate.serial_number != second.serial_number


def test_floor_is_at_most_a_tenth_of_the_lifetime():
    """Short-lived certificates (seconds, in tests and the demo) get a floor of a tenth of their lifetime."""

    class Cert:
        not_valid_before_utc = T0
        not_valid_after_utc = T0 + dt.timedelta(seconds=20)

    assert renewal_floor(dt.timedelta(minutes=5), Cert()) == dt.timedelta(seconds=2)


def test_state_file_records_attempts_and_their_errors(tmp_path):
    """The state file names the served serial, and after a failure the error, the failure count
    and the next attempt; after the retry succeeds, the new serial and no error."""
    clock = FixedClock(T0)
    agent, store = _agent(tmp_path, clock)
    path = state_path(store.directory)
    first = store.load().certificate
    assert json.loads(path.read_text())["credential"]["serial"] == f"{first.serial_number:x}"
    _ca_away(tmp_path)
    clock.set(agent.renewal_due())
    asyncio.run(agent.check())
    state = json.loads(path.read_text())
    assert state["last_attempt"]["result"] == "failed"
    assert str(tmp_path / "ca") in state["last_attempt"]["error"]  # names the CA that refused
    assert state["failures"] == 1 and state["next_attempt"] == agent.next_attempt.isoformat(timespec="seconds")
    _ca_back(tmp_path)
    clock.set(agent.next_attempt)
    asyncio.run(agent.check())
    state = json.loads(path.read_text())
    second = store.load().certificate
    assert state["last_attempt"] == {**state["last_attempt"], "result": "renewed", "serial": f"{second.serial_number:x}", "error": None}
    assert state["credential"]["serial"] == f"{second.serial_number:x}" and state["failures"] == 0
