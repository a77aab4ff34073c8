"""pkictl status's SQL against the reference rules of pkictl.renewal, and which rows it lists."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from pki_agent.rotation.rotate import LocalCA, rotate
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.renewal import certificate_state
from pkictl.settings import CASettings
from pkictl.status import read_status
from pkictl.store import CredentialStore

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def home(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings(), clock=FixedClock(T0))
    ca.enroll("node", "TW", out=tmp_path / "TW")
    ca.close()
    return tmp_path / "ca"


def _rows(home, now, **kwargs):
    text, code = read_status(home / "inventory.sqlite3", now, as_json=True, **kwargs)
    return json.loads(text), code


@pytest.mark.parametrize("days", [-0.01, 0, 1, 59.99, 60, 60.01, 74.9, 75.1, 89.99, 90, 120])
def test_sql_states_match_the_reference(home, days):
    """For times across a node certificate's life, the state status computes in SQL equals
    pkictl.renewal.certificate_state, and days_left is exact to the thousandth."""
    now = T0 + dt.timedelta(days=days)
    rows, _ = _rows(home, now)
    (node,) = [r for r in rows if r["kind"] == "node"]
    record = CertificateAuthority.load(home).record("TW", "node")
    assert node["state"] == certificate_state(now, record.not_before, record.not_after)
    assert node["days_left"] == pytest.approx((record.not_after - now).total_seconds() / 86400, abs=1e-3)


def test_only_the_newest_certificate_of_a_name_is_listed(home, tmp_path):
    """After two renewals status lists TW once, with the newest serial, and exits 0; --all lists
    all three."""
    clock = FixedClock(T0 + dt.timedelta(days=61))
    store = CredentialStore(tmp_path / "TW")
    serials = [store.load().certificate.serial_number]
    for _ in range(2):
        serials.append(rotate(store, store.load(), LocalCA(home, clock), clock).certificate.serial_number)
        clock.advance(3600)
    LocalCA(home, clock).refresh_crl()  # as the CA host's agent does; the day-0 CRL has expired
    rows, code = _rows(home, clock.now())
    assert [r["serial"] for r in rows if r["kind"] == "node"] == [f"{serials[-1]:x}"]
    assert code == 0  # the superseded certificates are not counted
    history, _ = _rows(home, clock.now(), latest_only=False)
    assert sorted(r["serial"] for r in history if r["kind"] == "node") == sorted(f"{s:x}" for s in serials)


def test_rows_come_in_display_order(home, tmp_path):
    """Root, issuing CA, gateways, nodes by name, then CRLs."""
    ca = CertificateAuthority.load(home, clock=FixedClock(T0))
    ca.enroll("node", "alpha", out=tmp_path / "alpha")
    ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"])
    ca.close()
    rows, _ = _rows(home, T0)
    assert [(r["kind"], r["name"]) for r in rows][2:] == [("gateway", "gw"), ("node", "alpha"), ("node", "TW"),
                                                           ("crl", rows[1]["name"]), ("crl", rows[0]["name"])]  # the root's CRL last
    assert [r["kind"] for r in rows][:2] == ["root", "issuing"]
