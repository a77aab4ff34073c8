"""Replacing a node's certificate over EST: the operator's approval of a node that still holds a
valid certificate, tokens that may replace one, and refusals that name options that exist.

Real ``pkictl serve`` (in process on its own loop), real ``pkictl`` commands, curl as the node.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest
from cryptography import x509

from pkictl.authority import CertificateAuthority
from pkictl.inventory import Inventory
from pkictl.settings import CASettings

from est_support import EST, RunningService, certs_only, curl, est_body, make_csr, pkictl, public_key_der, serials


@pytest.fixture
def service(tmp_path: Path):
    """A CA with node N2 enrolled (a valid certificate), served over EST."""
    home = tmp_path / "ca"
    ca = CertificateAuthority.init(home, CASettings())
    ca.enroll("node", "N2", out=tmp_path / "N2")
    ca.close()
    running = RunningService(home).start()
    yield running
    running.stop()


def enroll(service: RunningService, csr: Path, *args: str):
    return curl(service.url + EST + "/simpleenroll", *args, cacert=service.home / "ca.pem", data=est_body(csr),
                content_type="application/pkcs10")


def code_of(key_pem: Path) -> str:
    digest = base64.b32encode(hashlib.sha256(public_key_der(key_pem)).digest())[:8].decode()
    return f"{digest[:4]}-{digest[4:]}"


def n2_records(home: Path):
    inventory = Inventory(home / "inventory.sqlite3")
    try:
        return {r.serial: r for r in inventory.records(latest_only=False) if r.name.lower() == "n2"}
    finally:
        inventory.close()


def test_approving_a_node_that_holds_a_valid_certificate_replaces_and_revokes_it(service, tmp_path):
    """N2 (valid certificate) asks for approval with a new key; 'pkictl approve' says which serial
    it replaces; the next poll gets the new certificate and the old serial is revoked as
    superseded and on the CRL served."""
    home = service.home
    (old,) = n2_records(home).values()
    csr, key = make_csr(tmp_path, subject="/CN=N2")
    assert enroll(service, csr).status == 202
    listed = pkictl(home, "requests").stdout
    assert re.search(rf"^N2 +{code_of(key)} .* replaces serial {old.serial:x} \(valid until ", listed, re.M), listed
    approved = pkictl(home, "approve", "N2", "--code", code_of(key))
    assert f"it replaces node N2 serial {old.serial:x}" in approved.stdout and "revoked (superseded)" in approved.stdout
    assert n2_records(home)[old.serial].status == "issued"  # not before the new certificate exists

    reply = enroll(service, csr)
    assert reply.status == 200, reply
    (new,) = certs_only(reply.body)
    records = n2_records(home)
    assert records[new.serial_number].status == "issued"
    assert (records[old.serial].status, records[old.serial].revocation_reason) == ("revoked", "superseded")
    crl = x509.load_der_x509_crl(curl(service.url + "/crl", cacert=home / "ca.pem").body)
    assert crl.get_revoked_certificate_by_serial_number(old.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None


def test_approving_a_node_without_a_valid_certificate_revokes_nothing(service, tmp_path):
    """Negative twin: a new node approved by the same path gets its certificate and nothing else
    is revoked, and approve names no replacement."""
    home = service.home
    csr, key = make_csr(tmp_path, subject="/CN=N3")
    assert enroll(service, csr).status == 202
    assert "replaces" not in pkictl(home, "requests").stdout
    approved = pkictl(home, "approve", "N3", "--code", code_of(key))
    assert "replaces" not in approved.stdout
    assert enroll(service, csr).status == 200
    assert [r.status for r in n2_records(home).values()] == ["issued"]


def test_a_token_for_a_node_with_a_valid_certificate_needs_replace(service, tmp_path):
    """'enroll-node N2 --token' is refused naming --replace (an option it has); with --replace the
    token's certificate replaces the old one, which is revoked as superseded."""
    home = service.home
    (old,) = n2_records(home).values()
    refused = pkictl(home, "enroll-node", "N2", "--token", check=False)
    assert refused.returncode == 1 and "already enrolled" in refused.stderr and "pass --replace too" in refused.stderr
    assert "pkictl enroll-node N2 --token" not in refused.stderr  # names the fix once, no made-up command

    made = pkictl(home, "enroll-node", "N2", "--token", "--replace").stdout
    token = made.splitlines()[1].strip()
    assert "its certificate replaces the current one of N2" in made
    csr, key = make_csr(tmp_path, subject="/CN=N2")
    before = serials(home)
    reply = enroll(service, csr, "--user", f"N2:{token}")
    assert reply.status == 200, reply
    (new,) = certs_only(reply.body)
    assert serials(home) - before == {new.serial_number}
    assert n2_records(home)[old.serial].revocation_reason == "superseded"


def test_a_plain_token_is_not_spent_when_the_name_got_a_certificate_meanwhile(tmp_path):
    """A token made for a free name is refused (403, naming --token --replace) once the name holds
    a valid certificate, and stays unspent: after the holder is revoked the same token works."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, CASettings()).close()
    token = pkictl(home, "enroll-node", "N2", "--token").stdout.splitlines()[1].strip()
    pkictl(home, "enroll-node", "N2", "--out", str(tmp_path / "N2"))
    running = RunningService(home).start()
    try:
        csr, _ = make_csr(tmp_path, subject="/CN=N2")
        refused = enroll(running, csr, "--user", f"N2:{token}")
        assert refused.status == 403 and "pkictl enroll-node N2 --token --replace" in refused.text, refused
        pkictl(home, "revoke", "N2")
        assert enroll(running, csr, "--user", f"N2:{token}").status == 200
    finally:
        running.stop()


def test_enroll_node_without_replace_names_the_option(tmp_path):
    """A second 'enroll-node N2' is refused with the serial and the --replace fix."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, CASettings()).close()
    pkictl(home, "enroll-node", "N2", "--out", str(tmp_path / "a"))
    refused = pkictl(home, "enroll-node", "N2", "--out", str(tmp_path / "b"), check=False)
    assert refused.returncode == 1
    assert re.search(r"node N2 is already enrolled \(serial [0-9a-f]+, valid until .*\); its agent renews it; "
                     r"to issue a new one and revoke the old \(superseded\), pass --replace", refused.stderr), refused.stderr


def test_the_token_command_prints_the_url_pkictl_serve_announced(tmp_path):
    """Before 'pkictl serve' ever ran, enroll-node --token prints a placeholder and says what it
    stands for; once a real 'pkictl serve' has started on this CA home, it prints its URL."""
    from est_support import ServeProcess

    home = tmp_path / "ca"
    CertificateAuthority.init(home, CASettings()).close()
    before = pkictl(home, "enroll-node", "TW", "--token").stdout
    assert "--ca-url https://CA-HOST:PORT " in before and "where 'pkictl serve' listens" in before
    serve = ServeProcess(home)
    try:
        after = pkictl(home, "enroll-node", "N2", "--token").stdout
    finally:
        serve.stop()
    assert f"--ca-url https://127.0.0.1:{serve.port} " in after and "CA-HOST" not in after
    assert "--ca-url https://ca.example.lan:9 " in pkictl(home, "enroll-node", "N3", "--token", "--ca-url", "https://ca.example.lan:9").stdout
