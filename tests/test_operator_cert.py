"""Operator certificates (``pkictl enroll-operator``): their files and profile, the inventory and
audit records, and that neither side mistakes one for the other: the gateway refuses an operator
certificate as a node, EST does not renew one, and the admin page's check refuses a node's."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import sqlite3
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from pkictl.admin.page import dashboard
from pkictl.cli import cli
from pkictl.inventory import Inventory
from pkictl.operators import NotAnOperator, identify_operator
from pkictl.schema import SCHEMA, SCHEMA_VERSION
from pkictl.admin.timeline import Bar, timeline_svg

from est_support import EST, RunningService, curl, est_body, make_csr, serials
from support import DEADLINE, TLSClient, bundle_context, client_context, live_files, refusal_record, refused

OPERATOR_URI = "spiffe://pkictl.internal/operator/alice"


def enroll_operator(home, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), "enroll-operator", *args])


def audit(home) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def test_enroll_operator_writes_its_files_with_a_clientauth_operator_profile(pki):
    """enroll-operator alice writes key.pem and operator.p12 0600, a certificate with clientAuth only
    and the single URI SAN .../operator/alice, a PKCS#12 that opens with the printed password and
    holds the same certificate; the inventory says kind operator, the audit log 'issued'."""
    result = enroll_operator(pki.home, "alice")
    assert result.exit_code == 0, result.output
    directory = pki.home / "operators" / "alice"
    for name, mode in (("key.pem", 0o600), ("operator.p12", 0o600), ("cert.pem", 0o644), ("fullchain.pem", 0o644)):
        assert stat.S_IMODE((directory / name).stat().st_mode) == mode, name
    certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [OPERATOR_URI] and len(list(sans)) == 1
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    password = re.search(r"operator\.p12 password \(shown once\): (\S+)", result.output).group(1)
    key, in_bundle, chain = pkcs12.load_key_and_certificates((directory / "operator.p12").read_bytes(), password.encode())
    assert in_bundle == certificate and chain == [pki.ca.issuing] and key is not None
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates((directory / "operator.p12").read_bytes(), b"not the password")
    record = pki.ca.inventory.get(certificate.serial_number)
    assert record is not None and record.kind == "operator" and record.name == "alice"
    issued = [r for r in audit(pki.home) if r["event"] == "issued" and r["kind"] == "operator"]
    assert [(r["name"], r["sans"]) for r in issued] == [("alice", [f"URI:{OPERATOR_URI}"])]
    assert not [n for n in directory.parent.iterdir() if n.name.startswith(".")], "no staging directory left"


def test_enroll_operator_refuses_a_second_and_a_bad_name_and_replace_revokes_the_old(pki):
    """A second enroll-operator alice is refused naming --replace, and writes nothing; a name that is
    no DNS label is refused before anything is written; --replace issues anew in the same directory
    and revokes the old certificate as superseded."""
    assert enroll_operator(pki.home, "alice").exit_code == 0
    cert_file = pki.home / "operators" / "alice" / "cert.pem"
    first = x509.load_pem_x509_certificate(cert_file.read_bytes())
    again = enroll_operator(pki.home, "alice")
    assert again.exit_code == 1 and "--replace" in again.output, again.output
    assert x509.load_pem_x509_certificate(cert_file.read_bytes()) == first
    bad = enroll_operator(pki.home, "al ice")
    assert bad.exit_code == 1 and "al ice" in bad.output and not (pki.home / "operators" / "al ice").exists(), bad.output
    replaced = enroll_operator(pki.home, "alice", "--replace")
    assert replaced.exit_code == 0 and f"replaced serial {first.serial_number:x}" in replaced.output, replaced.output
    second = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert second.serial_number != first.serial_number
    old = pki.ca.inventory.get(first.serial_number)
    assert old is not None and old.status == "revoked" and old.revocation_reason == "superseded"


def test_the_gateway_refuses_an_operator_certificate_as_a_node(pki, gateway_agent, caplog):
    """The gateway's listener refuses alice's operator certificate ('no node identity', the detail
    naming an operator certificate) and still serves TW."""
    assert enroll_operator(pki.home, "alice").exit_code == 0
    directory = pki.home / "operators" / "alice"
    how = refused(gateway_agent.port, client_context(pki.node / "ca.pem", fullchain=directory / "fullchain.pem", key=directory / "key.pem"))
    assert how, how
    record = refusal_record(caplog, "no node identity")
    assert "operator certificate" in record.pki_event["detail"], record.pki_event
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    assert client.echo(b"tw still in") == b"tw still in"
    client.close()


def test_est_does_not_renew_an_operator_certificate(pki, tmp_path):
    """simplereenroll with alice's certificate gets 403 saying an operator certificate does not
    renew over EST (and how to get a new one); nothing is issued. TW's renews (the control)."""
    assert enroll_operator(pki.home, "alice").exit_code == 0
    directory = pki.home / "operators" / "alice"
    service = RunningService(pki.home).start()
    try:
        before = serials(pki.home)
        csr, _ = make_csr(tmp_path, subject="/CN=alice", san=f"URI:{OPERATOR_URI}")
        reply = curl(service.url + EST + "/simplereenroll", "--cert", str(directory / "fullchain.pem"), "--key", str(directory / "key.pem"),
                     cacert=pki.home / "ca.pem", data=est_body(csr), content_type="application/pkcs10")
        assert reply.status == 403 and "operator certificate does not renew" in reply.text and "--replace" in reply.text, reply
        assert serials(pki.home) == before
        files = live_files(pki.node)
        tw_csr, _ = make_csr(tmp_path, subject="/CN=TW", san="URI:spiffe://pkictl.internal/node/tw")
        control = curl(service.url + EST + "/simplereenroll", "--cert", str(files["fullchain"]), "--key", str(files["privkey"]),
                       cacert=pki.home / "ca.pem", data=est_body(tw_csr), content_type="application/pkcs10")
        assert control.status == 200, control
    finally:
        service.stop()


def test_identify_operator_takes_an_operator_and_refuses_a_node_a_gateway_and_a_revoked_one(pki):
    """identify_operator names alice from her certificate; TW's and the gateway's certificates are
    'not an operator', none is 'no certificate', one signed by this CA with alice's identity but
    never issued is 'unknown', and alice's once revoked is 'revoked'."""
    assert enroll_operator(pki.home, "alice").exit_code == 0
    now = pki.ca.clock.now()

    def der(path):
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)

    def check(data):
        return identify_operator(data, inventory=pki.ca.inventory, trust_domain="pkictl.internal", now=now)

    alice = der(pki.home / "operators" / "alice" / "cert.pem")
    assert check(alice).name == "alice"
    for path in (live_files(pki.node)["cert"], live_files(pki.gateway)["cert"]):
        with pytest.raises(NotAnOperator) as refused_one:
            check(der(path))
        assert refused_one.value.reason == "not an operator"
    with pytest.raises(NotAnOperator) as nothing:
        check(None)
    assert nothing.value.reason == "no certificate"
    # Signed by this CA's issuing key with alice's identity, but never issued (not in the inventory).
    forged = x509.load_pem_x509_certificate((pki.home / "operators" / "alice" / "cert.pem").read_bytes())
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    builder = x509.CertificateBuilder(forged.issuer, forged.subject, forged.public_key(), x509.random_serial_number(),
                                      forged.not_valid_before_utc, forged.not_valid_after_utc, list(forged.extensions))
    with pytest.raises(NotAnOperator) as unknown:
        check(builder.sign(issuing_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    assert unknown.value.reason == "unknown"
    pki.ca.revoke("alice", reason="key-compromise")
    with pytest.raises(NotAnOperator) as revoked:
        check(alice)
    assert revoked.value.reason == "revoked"


def test_an_inventory_of_schema_5_is_migrated_and_takes_operators(tmp_path):
    """An inventory whose certificates table predates the operator kind (schema 5) opens as the current schema
    with its rows kept, indexes rebuilt, and an operator row accepted; schema 5's CHECK refused it."""
    path = tmp_path / "inventory.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(re.sub(r"next_update INTEGER,\n +pem .*", "next_update INTEGER", SCHEMA.replace(", 'operator')", ")")))
    old.execute("PRAGMA user_version = 5")
    old.execute("INSERT INTO certificates (serial, name, name_key, kind, status, sans, requested_at) VALUES ('a', 'TW', 'tw', 'node', 'issued', '[]', 1)")
    with pytest.raises(sqlite3.IntegrityError):
        old.execute("INSERT INTO certificates (serial, name, name_key, kind, status, sans, requested_at) VALUES ('0b', 'a', 'a', 'operator', 'pending', '[]', 1)")
    old.commit()
    old.close()
    inventory = Inventory(path)
    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    inventory.record_intent(serial=0x0C, name="alice", kind="operator", sans=(), now=now, exclusive=True, issuer=None)
    assert inventory.get(0x0A) is not None and inventory.get(0x0A).name == "TW"
    inventory.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'certificates'")}
    db.close()
    assert {"certificates_by_name", "certificates_by_spki", "certificates_current", "certificates_history"} <= indexes


def test_page_and_timeline_escape_what_nodes_and_gateways_supplied():
    """A node name, peer, attention text or gateway name holding markup reaches the page and the
    timeline escaped: no element of theirs, their text shown."""
    evil = '<img src=x onerror="alert(1)">'
    node = {"name": evil, "certificate_state": "ok", "serial": "0a", "not_valid_after": None, "connected": True, "peer": evil,
            "open_connections": 1, "bytes_in": 0, "bytes_out": 0, "attention": evil}
    fleet = {"nodes": [node], "gateways": [{"name": evil, "reporting": True, "received_at": "2026-12-01T00:00:00+00:00", "interval": 1.0}]}
    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    svg = timeline_svg([Bar(evil, 10, now - dt.timedelta(days=1), now + dt.timedelta(days=2), now + dt.timedelta(days=1), "ok")], now=now)
    page = dashboard(operator=evil, fleet=fleet, requests=[{"name": evil, "code": evil, "peer": evil, "age_seconds": 3}],
                     timeline=svg, token="t", refresh=3, now=now)
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


def test_timeline_marks_the_renewal_point_and_now_where_they_fall():
    """A certificate valid for 3 days, renewal at 2 days, now at 1 day: its bar spans the plot, the
    renewal tick sits at 2/3 of it and the now line at 1/3."""
    start = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    svg = timeline_svg([Bar("node tw", 10, start, start + dt.timedelta(days=3), start + dt.timedelta(days=2), "ok")],
                       now=start + dt.timedelta(days=1))
    left, width = (float(v) for v in re.search(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svg).groups())
    renewal = float(re.search(r'class="renewal" x1="([\d.]+)"', svg).group(1))
    now = float(re.search(r'class="now" x1="([\d.]+)"', svg).group(1))
    assert abs(renewal - (left + width * 2 / 3)) < 1 and abs(now - (left + width / 3)) < 1, svg


def _admin_request(port: int, home, method: str, path: str, *, host: str | None = None, body: str | None = None,
                   headers: dict | None = None) -> tuple[int, str]:
    """One request to the admin page with alice's certificate, by Python's http.client (``host``: the Host header)."""
    directory = home / "operators" / "alice"
    context = client_context(home / "ca.pem", fullchain=directory / "fullchain.pem", key=directory / "key.pem")
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=DEADLINE)
    try:
        connection.putrequest(method, path, skip_host=True)
        connection.putheader("Host", host or f"127.0.0.1:{port}")
        for name, value in {**(headers or {}), **({"Content-Type": "application/x-www-form-urlencoded"} if body else {})}.items():
            connection.putheader(name, value)
        data = body.encode() if body else b""
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def test_the_page_refuses_another_host_name_and_revokes_by_an_existing_serial_only(pki):
    """A request whose Host is not a name of the service certificate gets 421 (DNS rebinding), the
    right one 200; a revocation naming serial 'abc', which is no certificate's but node abc's name,
    is refused (400) and abc keeps its certificate, while TW's real serial revokes TW."""
    assert enroll_operator(pki.home, "alice").exit_code == 0
    abc = pki.ca.enroll("node", "abc", out=pki.home / "abc-bundle").certificate
    service = RunningService(pki.home, admin_listen=("127.0.0.1", 0)).start()
    try:
        port = service.service.admin.addresses[0][1]
        status, text = _admin_request(port, pki.home, "GET", "/", host=f"rebound.example:{port}")
        assert status == 421 and "rebound.example" in text, text
        status, page = _admin_request(port, pki.home, "GET", "/")
        assert status == 200 and 'data-node="abc"' in page
        token = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
        origin = {"Origin": f"https://127.0.0.1:{port}"}
        status, text = _admin_request(port, pki.home, "POST", "/revoke", body=f"csrf={token}&serial=abc&reason=key-compromise", headers=origin)
        assert status == 400 and "no certificate of this CA has it" in text, text
        assert pki.ca.inventory.get(abc.serial_number).status == "issued"
        tw = x509.load_pem_x509_certificate(live_files(pki.node)["cert"].read_bytes())
        status, text = _admin_request(port, pki.home, "POST", "/revoke", body=f"csrf={token}&serial={tw.serial_number:x}&reason=key-compromise",
                                      headers=origin)
        assert status == 200 and "revoked node TW" in text, text
    finally:
        service.stop()
    refused = [r for r in audit(pki.home) if r["event"] == "refused" and r.get("operation") == "admin revoke"]
    assert [(r["subject"], r["operator"]) for r in refused] == [("abc", "alice")]


def test_serve_refuses_a_malformed_admin_listen_before_loading_the_ca(tmp_path):
    """pkictl serve --admin-listen nonsense exits 2 naming the option and the form wanted."""
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "none"), "serve", "--admin-listen", "nonsense"])
    assert result.exit_code == 2 and "--admin-listen" in result.output and "HOST:PORT" in result.output, result.output


def test_status_lists_operator_certificates_and_warns_before_they_expire(pki):
    """`pkictl status` shows alice's operator certificate (kind spelled out whole), in JSON too,
    and --warn-days beyond its lifetime flags it (exit status 3); without operators none is listed."""
    assert not [r for r in json.loads(CliRunner().invoke(cli, ["--home", str(pki.home), "status", "--json"]).output)
                if r["kind"] == "operator"]
    assert enroll_operator(pki.home, "alice").exit_code == 0
    serial = x509.load_pem_x509_certificate((pki.home / "operators" / "alice" / "cert.pem").read_bytes()).serial_number
    table = CliRunner().invoke(cli, ["--home", str(pki.home), "status"])
    [row] = [line for line in table.output.splitlines() if line.split()[:2] == ["alice", "operator"]]
    assert f"{serial:x}"[:16] in row, table.output
    rows = json.loads(CliRunner().invoke(cli, ["--home", str(pki.home), "status", "--json"]).output)
    assert [r["name"] for r in rows if r["kind"] == "operator"] == ["alice"]
    lifetime_days = str(int(pki.ca.settings.lifetime("node").days) + 1)
    warned = CliRunner().invoke(cli, ["--home", str(pki.home), "status", "--json", "--warn-days", lifetime_days])
    assert warned.exit_code == 3, warned.output
    [flagged] = [r for r in json.loads(warned.output) if r["kind"] == "operator"]
    assert flagged["attention"] and not [r for r in rows if r["kind"] == "operator"][0]["attention"], (flagged, rows)
