"""Renewal time and state as pure functions of (certificate, now), and the agent acting on them
with an injected clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from pki_agent.config import AgentConfig, RenewalConfig
from pki_agent.daemon import Agent, backoff_delay
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.renewal import certificate_state, is_due, renewal_time
from pkictl.settings import CASettings
from pkictl.store import CredentialStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LIFETIME = dt.timedelta(days=90)
SECOND = dt.timedelta(seconds=1)


def test_renewal_time_is_two_thirds_of_the_lifetime():
    """A 90-day certificate is due 60 days after notBefore."""
    assert renewal_time(T0, T0 + LIFETIME) == T0 + dt.timedelta(days=60)


@pytest.mark.parametrize("offset, due", [(-SECOND, False), (dt.timedelta(0), True), (SECOND, True)])
def test_due_one_second_either_side(offset, due):
    """Not due one second before the renewal time, due at it and one second after."""
    at = T0 + dt.timedelta(days=60) + offset
    assert is_due(at, T0, T0 + LIFETIME) is due


def test_jitter_moves_renewal_earlier_by_its_share_of_the_lifetime():
    """A jitter of 0.05 renews 4.5 days (5% of 90) before the 2/3 mark, and never later."""
    assert renewal_time(T0, T0 + LIFETIME, jitter=0.05) == T0 + dt.timedelta(days=55.5)
    assert not is_due(T0 + dt.timedelta(days=55.5) - SECOND, T0, T0 + LIFETIME, jitter=0.05)


@pytest.mark.parametrize("fraction, jitter", [(0, 0), (1, 0), (0.5, 0.5), (0.5, -0.1)])
def test_out_of_range_fraction_or_jitter_is_refused(fraction, jitter):
    """Fractions outside (0, 1) and jitter outside [0, fraction) raise ValueError."""
    with pytest.raises(ValueError):
        renewal_time(T0, T0 + LIFETIME, fraction=fraction, jitter=jitter)


def test_naive_datetimes_are_refused():
    """A naive datetime is an error, never silently taken as local time."""
    with pytest.raises(ValueError, match="naive"):
        renewal_time(T0.replace(tzinfo=None), T0 + LIFETIME)


@pytest.mark.parametrize(
    "days, state",
    [(-1, "not yet valid"), (0, "ok"), (59.9, "ok"), (60, "renewal due"), (74.9, "renewal due"), (75.1, "expiring"), (90, "expired")],
)
def test_states_through_the_lifetime(days, state):
    """ok until 2/3, renewal due until 1/6 of the lifetime is left, then expiring, then expired."""
    assert certificate_state(T0 + dt.timedelta(days=days), T0, T0 + LIFETIME) == state


def test_backoff_grows_and_is_capped():
    """Retry delays stay within [initial, min(cap, initial x 2^(n-1))]."""
    rng = random.Random(7)
    for failures in range(1, 15):
        ceiling = min(600, 10 * 2 ** (failures - 1))
        for _ in range(20):
            assert 10 <= backoff_delay(failures, initial=10, maximum=600, rng=rng) <= ceiling


def _node_agent(tmp_path, clock):
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(), clock=clock)
    bundle = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    ca.close()
    config = AgentConfig(name="TW", kind="node", credential_dir=bundle, renewal=RenewalConfig(ca_home=tmp_path / "ca", jitter=0))
    return Agent(config, clock=clock), CredentialStore(bundle)


def test_agent_renews_exactly_at_the_due_time(tmp_path):
    """With an injected clock the agent does nothing one second before the due time and
    installs a successor (new serial, new key) at it."""
    clock = FixedClock(T0)
    agent, store = _node_agent(tmp_path, clock)
    agent.reload()
    first = store.load()
    due = agent.renewal_due()
    assert due == first.certificate.not_valid_before_utc + LIFETIME * 2 / 3

    clock.set(due - SECOND)
    asyncio.run(agent.check())
    assert store.load().certificate.serial_number == first.certificate.serial_number

    clock.set(due)
    asyncio.run(agent.check())
    second = store.load()
    assert second.certificate.serial_number != first.certificate.serial_number
    assert second.certificate.public_key() != first.certificate.public_key()
    assert agent.credential.certificate.serial_number == second.certificate.serial_number
    assert agent.renewal_due() > due


def test_failed_renewal_keeps_the_credential_and_backs_off(tmp_path):
    """When the CA is unavailable the agent keeps its certificate on disk and in service and
    schedules a retry after the backoff, not at once."""
    clock = FixedClock(T0)
    agent, store = _node_agent(tmp_path, clock)
    agent.reload()
    first = store.load()
    (tmp_path / "ca" / "ca.yaml").rename(tmp_path / "ca" / "ca.yaml.away")  # the CA is gone

    clock.set(agent.renewal_due())
    assert asyncio.run(agent.renew()) is False
    assert store.load().certificate.serial_number == first.certificate.serial_number
    assert agent.credential.certificate.serial_number == first.certificate.serial_number
    assert agent.next_attempt == clock.now() + dt.timedelta(seconds=10)  # first retry: retry_initial

    (tmp_path / "ca" / "ca.yaml.away").rename(tmp_path / "ca" / "ca.yaml")
    asyncio.run(agent.check())  # retry not yet due
    assert store.load().certificate.serial_number == first.certificate.serial_number
    clock.advance(10)
    asyncio.run(agent.check())
    assert store.load().certificate.serial_number != first.certificate.serial_number


def test_ca_host_agent_re_signs_the_crl_at_half_its_validity(tmp_path):
    """On the CA host the agent's periodic check leaves the CRL alone one second before half its
    validity and re-signs it at that moment (an expired CRL would lock every client out)."""
    from cryptography import x509

    from pkictl.revocation import load_crls

    clock = FixedClock(T0)
    agent, _ = _node_agent(tmp_path, clock)
    agent.reload()
    crl_path = tmp_path / "ca" / "crl.pem"
    first, _root = load_crls(crl_path)
    half = first.last_update_utc + (first.next_update_utc - first.last_update_utc) / 2

    def number():
        crl, _root = load_crls(crl_path)
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    clock.set(half - SECOND)
    asyncio.run(agent.maintain())
    assert number() == 1
    clock.set(half)
    asyncio.run(agent.maintain())
    assert number() == 2
