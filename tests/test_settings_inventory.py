"""CA settings (durations, contradictions, unknown keys) and the SQLite inventory (intent before
signing, unique serials, latest-only view), including two real processes issuing at once."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.errors import AlreadyEnrolledError, SettingsError
from pkictl.inventory import PENDING_TIMEOUT, Inventory
from pkictl.storage.database import DuplicateKey
from pkictl.profile import generate_key
from pkictl.settings import CASettings, format_duration, parse_duration

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


# -- durations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * 86400),
        ("12h", 12 * 3600),
        ("30m", 30 * 60),
        ("10s", 10),
        ("10y", 10 * 365 * 86400),
        ("45", 45),
        (" 7d ", 7 * 86400),
        (3600, 3600),
        (1, 1),
    ],
)
def test_parse_duration_accepts(text, seconds):
    """parse_duration reads <integer><s|m|h|d|y> (y = 365 d), a bare number of seconds and an int of seconds."""
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "0", 0, "-1d", -5, "5w", "abc", "1.5d", "d", "90 days", "1d2h", True, False])
def test_parse_duration_rejects_naming_the_field(text):
    """parse_duration raises SettingsError naming the field for empty, zero, negative, unknown-unit, malformed and boolean values."""
    with pytest.raises(SettingsError) as excinfo:
        parse_duration(text, field="node_lifetime")
    assert str(excinfo.value).startswith("node_lifetime:")
    assert repr(text) in str(excinfo.value)


@pytest.mark.parametrize(
    "value",
    [
        dt.timedelta(days=90),
        dt.timedelta(hours=12),
        dt.timedelta(minutes=30),
        dt.timedelta(seconds=10),
        dt.timedelta(days=3650),
        dt.timedelta(days=366),
        dt.timedelta(seconds=3601),
        dt.timedelta(seconds=90),
        dt.timedelta(hours=36),
    ],
)
def test_format_duration_round_trips(value):
    """format_duration writes a spelling that parse_duration reads back to the same duration."""
    text = format_duration(value)
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [(dt.timedelta(days=90), "90d"), (dt.timedelta(days=3650), "10y"), (dt.timedelta(hours=36), "36h"), (dt.timedelta(seconds=90), "90s")],
)
def test_format_duration_picks_the_largest_exact_unit(value, text):
    """format_duration uses the largest unit that divides the duration exactly."""
    assert format_duration(value) == text


# -- CASettings ------------------------------------------------------------------------------------


def test_default_settings_match_the_design():
    """The defaults are the profile's: 10 y root, 5 y issuing, 90 d leaves, renewal at 2/3, trust domain pkictl.internal."""
    settings = CASettings()
    assert settings.root_lifetime == dt.timedelta(days=3650)
    assert settings.issuing_lifetime == dt.timedelta(days=5 * 365)
    assert settings.lifetime("node") == settings.lifetime("gateway") == dt.timedelta(days=90)
    assert settings.renewal_fraction == pytest.approx(2 / 3)
    assert settings.trust_domain == "pkictl.internal"


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_renewal_fraction_must_be_strictly_between_0_and_1(fraction):
    """renewal_fraction 0, 1 and values outside (0, 1) raise SettingsError naming renewal_fraction."""
    with pytest.raises(SettingsError, match="renewal_fraction"):
        CASettings(renewal_fraction=fraction)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_renewal_fraction_inside_the_interval_is_accepted(fraction):
    """renewal_fraction values strictly between 0 and 1 are accepted."""
    assert CASettings(renewal_fraction=fraction).renewal_fraction == fraction


@pytest.mark.parametrize("field", ["node_lifetime", "gateway_lifetime"])
def test_leaf_lifetime_must_be_shorter_than_the_issuing_ca(field):
    """A node or gateway lifetime equal to or longer than the issuing CA's raises SettingsError; one second shorter is accepted."""
    issuing = dt.timedelta(days=365)
    for lifetime in (issuing, issuing + dt.timedelta(days=1)):
        with pytest.raises(SettingsError, match="issuing_lifetime"):
            CASettings(issuing_lifetime=issuing, **{field: lifetime})
    CASettings(issuing_lifetime=issuing, **{field: issuing - dt.timedelta(seconds=1)})


def test_issuing_lifetime_must_not_exceed_the_root():
    """An issuing CA outliving the root raises SettingsError; equal lifetimes are accepted."""
    with pytest.raises(SettingsError, match="root_lifetime"):
        CASettings(root_lifetime=dt.timedelta(days=365), issuing_lifetime=dt.timedelta(days=366))
    CASettings(root_lifetime=dt.timedelta(days=365), issuing_lifetime=dt.timedelta(days=365))


@pytest.mark.parametrize("domain", ["", "Pkictl.Internal", "a_b.lan", "example.lan/", "-example.lan", "example.lan.", "spiffe://x", "a b"])
def test_bad_trust_domain_is_refused(domain):
    """A trust domain that is not a lower-case DNS name raises SettingsError naming trust_domain."""
    with pytest.raises(SettingsError, match="trust_domain"):
        CASettings(trust_domain=domain)


@pytest.mark.parametrize("domain", ["example.lan", "pkictl.internal", "a", "corp-1.example"])
def test_good_trust_domain_is_accepted(domain):
    """Lower-case DNS names are accepted as trust domains."""
    assert CASettings(trust_domain=domain).trust_domain == domain


def test_from_dict_refuses_unknown_keys():
    """from_dict raises SettingsError naming the unknown key and the source; the known keys alone are accepted."""
    with pytest.raises(SettingsError) as excinfo:
        CASettings.from_dict({"node_lifetime": "30d", "node_lifetim": "30d"}, source="ca.yaml")
    assert "node_lifetim" in str(excinfo.value) and "ca.yaml" in str(excinfo.value)
    assert CASettings.from_dict({"node_lifetime": "30d"}).node_lifetime == dt.timedelta(days=30)


def test_from_dict_names_the_file_and_field_of_a_bad_value():
    """from_dict reports a malformed duration with the source and field name."""
    with pytest.raises(SettingsError) as excinfo:
        CASettings.from_dict({"gateway_lifetime": "5w"}, source="/etc/ca.yaml")
    assert "/etc/ca.yaml" in str(excinfo.value) and "gateway_lifetime" in str(excinfo.value)
    with pytest.raises(SettingsError, match="ca.yaml"):
        CASettings.from_dict(["node_lifetime"], source="ca.yaml")


def test_from_dict_names_the_field_of_a_non_numeric_fraction():
    """from_dict reports a renewal_fraction that is not a number with the source and the field name."""
    with pytest.raises(SettingsError) as excinfo:
        CASettings.from_dict({"renewal_fraction": "two thirds"}, source="/etc/ca.yaml")
    assert "/etc/ca.yaml" in str(excinfo.value)
    assert "renewal_fraction" in str(excinfo.value)
    assert CASettings.from_dict({"renewal_fraction": "0.5"}).renewal_fraction == 0.5


def test_settings_round_trip_through_to_dict():
    """from_dict(to_dict(s)) == s for non-default settings."""
    settings = CASettings(trust_domain="example.lan", node_lifetime=dt.timedelta(hours=36), gateway_lifetime=dt.timedelta(days=30), renewal_fraction=0.5)
    assert CASettings.from_dict(settings.to_dict()) == settings
    assert settings.to_dict()["node_lifetime"] == "36h"


def test_settings_are_frozen():
    """CASettings is immutable after construction."""
    settings = CASettings()
    with pytest.raises(AttributeError):
        settings.renewal_fraction = 0.9  # type: ignore[misc]


# -- Inventory -------------------------------------------------------------------------------------


@pytest.fixture
def inventory(tmp_path):
    inv = Inventory(tmp_path / "inventory.sqlite3")
    yield inv
    inv.close()


def _intent(inv: Inventory, serial: int, name: str = "TW", kind: str = "node", *, now=NOW, exclusive=True, sans=()):
    inv.record_intent(serial=serial, name=name, kind=kind, sans=sans, now=now, exclusive=exclusive)


def _certificate(serial: int, not_before: dt.datetime, lifetime: dt.timedelta = dt.timedelta(days=90)) -> x509.Certificate:
    """A real self-signed certificate with the given serial and validity, to record as issued."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test {serial:x}")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_before + lifetime)
            .sign(key, hashes.SHA256()))


def _issue(inv: Inventory, serial: int, name: str = "TW", kind: str = "node", *, now=NOW, exclusive=True, sans=()):
    _intent(inv, serial, name, kind, now=now, exclusive=exclusive, sans=sans)
    inv.record_issued(_certificate(serial, now))


def test_intent_is_pending_until_issued(inventory):
    """record_intent stores a pending row that records() does not list; record_issued makes it
    issued with its validity, SPKI fingerprint and PEM."""
    serial = 0x1234_5678_9ABC_DEF0_1234
    _intent(inventory, serial, sans=["DNS:gw.example.lan"])
    pending = inventory.get(serial)
    assert pending.status == "pending" and pending.not_after is None and pending.pem == ""
    assert pending.sans == ("DNS:gw.example.lan",)
    assert inventory.records() == []
    certificate = _certificate(serial, NOW)
    inventory.record_issued(certificate)
    issued = inventory.get(serial)
    assert (issued.status, issued.not_before, issued.not_after) == ("issued", NOW, NOW + dt.timedelta(days=90))
    assert issued.pem == certificate.public_bytes(serialization.Encoding.PEM).decode()
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert issued.spki_sha256 == hashlib.sha256(spki).hexdigest()
    assert inventory.records() == [issued]
    assert inventory.get(serial + 1) is None


def _signed(inv: Inventory, serial: int, sign, name: str = "TW", *, exclusive=True):
    return inv.record_signed(serial=serial, name=name, kind="node", sans=(), now=NOW, exclusive=exclusive, issuer=None, sign=sign)


def test_record_signed_commits_the_row_and_the_certificate_together(inventory):
    """record_signed stores the issued row of the certificate sign() made; a sign() that raises
    leaves no row and the name free; a taken name or serial is refused before sign() runs."""
    certificate = _signed(inventory, 7, lambda: _certificate(7, NOW))
    assert inventory.get(7).status == "issued" and inventory.get(7).pem == certificate.public_bytes(serialization.Encoding.PEM).decode()

    def broken():
        raise RuntimeError("the signer failed")

    with pytest.raises(RuntimeError, match="the signer failed"):
        _signed(inventory, 8, broken, "n2")
    assert inventory.get(8) is None
    _signed(inventory, 9, lambda: _certificate(9, NOW), "n2")  # the name stayed free

    def must_not_sign():
        raise AssertionError("sign() ran for a refused request")

    with pytest.raises(AlreadyEnrolledError):
        _signed(inventory, 10, must_not_sign, "tw")
    with pytest.raises(DuplicateKey):
        _signed(inventory, 7, must_not_sign, "n3", exclusive=False)
    assert inventory.get(10) is None and inventory.get(7).name == "TW"


def test_duplicate_serial_raises_integrity_error(inventory):
    """Recording a serial number a second time raises DuplicateKey and keeps the first row."""
    _issue(inventory, 42, "TW")
    with pytest.raises(DuplicateKey):
        _intent(inventory, 42, "other", exclusive=False)
    assert inventory.get(42).name == "TW"
    _intent(inventory, 43, "other", exclusive=False)


def test_exclusive_intent_refuses_a_current_name_case_insensitively(inventory):
    """An exclusive intent for a name holding an unexpired issued certificate (any case) raises AlreadyEnrolledError."""
    _issue(inventory, 1, "TW")
    with pytest.raises(AlreadyEnrolledError):
        _intent(inventory, 2, "tw")
    assert inventory.get(2) is None
    _intent(inventory, 3, "tw", exclusive=False)  # a renewal is allowed
    _intent(inventory, 4, "tw", kind="gateway")  # another kind is another identity
    _intent(inventory, 5, "tw", now=NOW + dt.timedelta(days=91))  # after expiry


def test_records_latest_only(inventory):
    """records(latest_only=True) returns the newest issued certificate per (kind, name), names compared without case."""
    _issue(inventory, 1, "TW", now=NOW)
    _issue(inventory, 2, "tw", now=NOW + dt.timedelta(days=60), exclusive=False)
    _issue(inventory, 3, "TW", now=NOW + dt.timedelta(days=30), exclusive=False)
    _issue(inventory, 4, "TW", kind="gateway", now=NOW)
    _issue(inventory, 5, "alpha", now=NOW)
    _intent(inventory, 6, "TW", now=NOW + dt.timedelta(days=80), exclusive=False)  # pending, newer: not listed

    latest = inventory.records(latest_only=True)
    assert [(r.kind, r.name, r.serial) for r in latest] == [("gateway", "TW", 4), ("node", "alpha", 5), ("node", "tw", 2)]
    history = inventory.records(latest_only=False)
    assert sorted(r.serial for r in history) == [1, 2, 3, 4, 5]


def test_records_lists_ca_certificates_first(inventory):
    """records() orders root, issuing, gateways, then nodes."""
    _issue(inventory, 1, "a-node", now=NOW)
    _issue(inventory, 2, "gw", kind="gateway", now=NOW)
    _issue(inventory, 3, "issuing CA", kind="issuing", now=NOW, exclusive=False)
    _issue(inventory, 4, "root CA", kind="root", now=NOW, exclusive=False)
    assert [r.kind for r in inventory.records()] == ["root", "issuing", "gateway", "node"]


def test_inventory_survives_reopening(tmp_path):
    """Rows written by one Inventory are read by a new one on the same file."""
    first = Inventory(tmp_path / "inv.sqlite3")
    _issue(first, 7, "TW")
    first.close()
    second = Inventory(tmp_path / "inv.sqlite3")
    assert second.get(7).status == "issued"
    second.close()


# -- two processes issuing at once -----------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pkictl.authority import CertificateAuthority

    home, prefix, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    ca = CertificateAuthority.load(home)
    ca.inventory  # open the database before the start signal
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start issuing together
    for n in range(40):
        ca.enroll("node", f"{prefix}-{n}", out=out / f"{prefix}-{n}")
    ca.close()
    print("done", flush=True)
    """
)


def test_two_processes_issuing_at_once_lose_nothing(tmp_path):
    """Two processes each enrolling 40 nodes into one CA at the same time leave all 80 + 2 CA records, every serial distinct."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, clock=FixedClock(NOW)).close()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(home), prefix, str(tmp_path / "bundles")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for prefix in ("p0", "p1")
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, (stdout, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr
        assert stdout.strip() == "done"

    inventory = Inventory(home / "inventory.sqlite3")
    try:
        records = inventory.records(latest_only=False)
        rows = inventory._db.execute("SELECT status, COUNT(*) FROM certificates GROUP BY status").fetchall()
    finally:
        inventory.close()
    assert len(records) == 82
    assert len({r.serial for r in records}) == 82
    assert sorted(r.kind for r in records).count("node") == 80
    expected = {f"p{i}-{n}" for i in range(2) for n in range(40)}
    assert {r.name for r in records if r.kind == "node"} == expected
    assert [tuple(r) for r in rows] == [("issued", 82)]  # nothing pending or failed
    assert len(list((tmp_path / "bundles").iterdir())) == 80


def test_a_name_being_signed_is_not_enrolled_twice_but_a_crashed_intent_expires(tmp_path):
    """A fresh 'pending' row for TW blocks a second first-enrollment of TW; one older than
    PENDING_TIMEOUT (a crash's remains) does not."""

    inventory = Inventory(tmp_path / "inventory.sqlite3")
    now = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    inventory.record_intent(serial=1, name="TW", kind="node", sans=(), now=now, exclusive=True)
    with pytest.raises(AlreadyEnrolledError, match="being enrolled"):
        inventory.record_intent(serial=2, name="tw", kind="node", sans=(), now=now + dt.timedelta(seconds=1), exclusive=True)
    later = now + dt.timedelta(seconds=PENDING_TIMEOUT + 1)
    inventory.record_intent(serial=3, name="TW", kind="node", sans=(), now=later, exclusive=True)
    assert inventory.get(3).status == "pending"
    inventory.close()


def test_a_version_1_inventory_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    """An inventory written by schema 1 (tokens without 'replaces', certificates without
    'successor') opens as the current schema: its token still works and is a plain one, new
    tokens may replace, a certificate row has a successor column; a second open changes nothing."""
    from pkictl.schema import SCHEMA, SCHEMA_VERSION

    path = tmp_path / "inventory.sqlite3"
    old = sqlite3.connect(path)
    version_1 = re.sub(r"used_at( +)INTEGER,(.*)\n +replaces .*\n", r"used_at\1INTEGER \2\n", SCHEMA)
    version_1 = re.sub(r"\n +successor +TEXT,.*", "", version_1)  # schema 3's column
    version_1 = re.sub(r"next_update INTEGER,\n +pem .*", "next_update INTEGER", version_1)  # schema 7's column
    version_1 = version_1.split("CREATE TABLE IF NOT EXISTS gateway_reports")[0]  # schemas 4 and 5's tables
    old.executescript(version_1)
    assert "replaces" not in [c[1] for c in old.execute("PRAGMA table_info(tokens)")]
    old.execute("PRAGMA user_version = 1")
    old.execute("INSERT INTO tokens (token_sha256, name, name_key, created_at, expires_at) VALUES ('aa', 'TW', 'tw', 0, 4102444800)")
    old.commit()
    old.close()

    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    for _ in range(2):
        inventory = Inventory(path)
        assert inventory.token_replaces("tw", "aa", now) is False
        inventory.close()
    inventory = Inventory(path)
    inventory.add_token("n2", "bb", now=now, expires_at=now + dt.timedelta(minutes=10), replaces=True)
    assert inventory.token_replaces("N2", "bb", now) is True
    assert inventory.consume_token("tw", "aa", now) and inventory.token_replaces("tw", "aa", now) is None
    inventory.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert "pem" in [c[1] for c in db.execute("PRAGMA table_info(crls)")]
    assert "successor" in [c[1] for c in db.execute("PRAGMA table_info(certificates)")]
    assert "report" in [c[1] for c in db.execute("PRAGMA table_info(gateway_reports)")]
    assert "peer" in [c[1] for c in db.execute("PRAGMA table_info(issuance_peers)")]
