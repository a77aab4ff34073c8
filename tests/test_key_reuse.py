"""One key, one identity: a CSR whose key is a CA key of this CA (root, issuing: current, pending,
retired) or is certified for, or waits for approval as, another identity is refused; the same
identity with its own key (a renewal) is not. The CLI names the holder for the operator; what an
EST client reads does not."""

from __future__ import annotations

import datetime as dt
import pickle
import sqlite3

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.inventory import SCHEMA_VERSION
from pkictl.errors import KeyReused, PendingApproval, PolicyError
from pkictl.pem import private_key_from_pem
from pkictl.profile import generate_key, node_identity

from csr_support import audit_records, disk_state, openssl_csr, openssl_key
from support import live_files


def enroll_csr(home, name, path, *extra: str):
    return CliRunner().invoke(cli, ["--home", str(home), "enroll-node", name, "--csr", str(path), *extra])


def assert_refused(home, result, before, message: str) -> None:
    """Exit status 1 with ``message``; no row, request, token or bundle written; audited with it."""
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert disk_state(home) == before
    record = audit_records(home)[-1]
    assert record["event"] == "refused" and record["operation"] == "enroll-csr" and message in record["reason"], record


def _csr(key, name: str, *, sans=()):
    """A CSR for ``key`` with CN=``name`` made with cryptography (for the library-level calls)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256())


def _key(path):
    return private_key_from_pem(path.read_bytes(), source=str(path))


@pytest.mark.parametrize("role", ["root", "issuing", "pending", "retired"])
def test_cli_refuses_a_csr_made_with_a_ca_key(pki, tmp_path, role):
    """enroll-node --csr with the key of the root, the current issuing CA, a pending issuing CA
    (rotate-issuing, not active yet) or a retired one (rotated out) is refused as a CA key,
    naming which; nothing is written."""
    if role == "pending":
        pki.ca.rotate_issuing(activate_in=dt.timedelta(days=1))
        key = pki.home / "pending-issuing" / "key.pem"
    elif role == "retired":
        old = pki.ca.issuing.serial_number
        pki.ca.rotate_issuing(activate_in=dt.timedelta(0))
        key = pki.home / "retired" / f"{old:x}" / "key.pem"
    else:
        key = pki.home / role / "key.pem"
    ca_role = "root" if role == "root" else "issuing"
    before = disk_state(pki.home)
    result = enroll_csr(pki.home, "n2", openssl_csr(tmp_path, key, subject="/CN=n2"))
    assert_refused(pki.home, result, before, f"the key is the {ca_role} CA's (pkictl {ca_role.capitalize()} CA ")
    assert "a CA key never certifies an end entity; make a new key for node n2" in result.output


def test_cli_refuses_a_key_certified_for_another_identity_and_names_it(pki, tmp_path):
    """enroll-node n2 --csr with node TW's key, or with gateway gw's, is refused naming TW or gw
    and its serial for the operator (CLI and audit log); after TW is revoked its key stays TW's."""
    tw, gw = live_files(pki.node)["privkey"], live_files(pki.gateway)["privkey"]
    tw_serial = f"{pki.ca.inventory.current('node', 'TW').serial:x}"
    gw_serial = f"{pki.ca.inventory.current('gateway', 'gw').serial:x}"
    for key, holder in ((tw, f"node TW (serial {tw_serial})"), (gw, f"gateway gw (serial {gw_serial})")):
        before = disk_state(pki.home)
        result = enroll_csr(pki.home, "n2", openssl_csr(tmp_path, key, subject="/CN=n2"))
        assert_refused(pki.home, result, before, f"the key is already certified for {holder}: a key belongs to one identity")
    pki.ca.revoke_records([pki.ca.inventory.current("node", "TW")], reason="key-compromise")
    before = disk_state(pki.home)
    result = enroll_csr(pki.home, "n2", openssl_csr(tmp_path, tw, subject="/CN=n2"))
    assert_refused(pki.home, result, before, f"the key is already certified for node TW (serial {tw_serial})")


def test_the_same_identity_may_keep_its_key(pki, tmp_path):
    """Negative control: TW re-enrolled with its own key (--replace: renew, not rekey) and n2 with
    a new key are certified; the name compares without case (tw is TW)."""
    tw = live_files(pki.node)["privkey"]
    result = enroll_csr(pki.home, "tw", openssl_csr(tmp_path, tw, subject="/CN=tw"), "--replace", "--out", str(tmp_path / "tw-out"))
    assert result.exit_code == 0, result.output
    result = enroll_csr(pki.home, "n2", openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2"))
    assert result.exit_code == 0, result.output


def test_a_key_waiting_for_approval_is_refused_for_another_name(pki, tmp_path):
    """A key that waits for approval as n3's is refused for n4, on the CLI naming n3 and its code,
    and over simple_enroll without naming it, as after n3's request is denied; no request is
    recorded for n4."""
    key = generate_key()
    with pytest.raises(PendingApproval) as pending:
        pki.ca.simple_enroll(_csr(key, "n3"), name=None, token=None, peer="127.0.0.1")
    path = tmp_path / "n4.csr"
    path.write_bytes(_csr(key, "n4").public_bytes(serialization.Encoding.PEM))
    before = disk_state(pki.home)
    result = enroll_csr(pki.home, "n4", path)
    assert_refused(pki.home, result, before, f"the key already waits for approval as node n3's (code {pending.value.code}")

    with pytest.raises(KeyReused) as refused:
        pki.ca.simple_enroll(_csr(key, "n4"), name=None, token=None, peer="127.0.0.1")
    assert str(refused.value) == ("the key already waits for approval as another identity's: a key belongs to one identity; "
                                  "make a new key for node n4")
    assert "n3" not in str(refused.value) and pending.value.code not in str(refused.value)
    assert disk_state(pki.home) == before

    # denied for n3, then presented for n4: refused, still without naming n3
    pki.ca.deny("n3")
    before = disk_state(pki.home)
    with pytest.raises(PolicyError, match="already presented for another node; make a new key for n4") as refused_again:
        pki.ca.simple_enroll(_csr(key, "n4"), name=None, token=None, peer="127.0.0.1")
    assert "n3" not in str(refused_again.value)
    assert disk_state(pki.home) == before


def test_a_token_is_not_spent_on_a_reused_key(pki):
    """simple_enroll with a valid token and TW's key is refused without saying whose it is, and
    the token still enrolls n2 with a key of its own afterwards."""
    token, _ = pki.ca.create_token("n2")
    tw_key = _key(live_files(pki.node)["privkey"])
    before = disk_state(pki.home)
    with pytest.raises(KeyReused) as refused:
        pki.ca.simple_enroll(_csr(tw_key, "n2"), name="n2", token=token, peer="127.0.0.1")
    assert "another identity" in str(refused.value) and "TW" not in str(refused.value)
    assert "node TW" in refused.value.operator_message
    assert disk_state(pki.home) == before
    assert audit_records(pki.home)[-1]["reason"] == refused.value.operator_message  # the operator's log names TW
    certificate = pki.ca.simple_enroll(_csr(generate_key(), "n2"), name="n2", token=token, peer="127.0.0.1")
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n2"


def test_issue_checks_the_key_in_its_own_transaction(pki):
    """CertificateAuthority.issue, which every issuance goes through, refuses another identity's
    key by itself (the check runs in the transaction that records the certificate)."""
    tw_key = _key(live_files(pki.node)["privkey"])
    before = disk_state(pki.home)
    with pytest.raises(KeyReused, match="already certified for another identity"):
        pki.ca.issue("gateway", "gw2", tw_key.public_key(), dns_names=["gw2.example.lan"])
    with pytest.raises(KeyReused, match="the key is the issuing CA's"):
        pki.ca.issue("node", "n2", pki.ca.issuing.public_key())
    assert disk_state(pki.home) == before


def test_a_renewal_to_another_identitys_key_is_refused(pki):
    """simple_reenroll of TW with a CSR for gw's key is refused; with a new key it renews (control)."""
    current = x509.load_pem_x509_certificate(live_files(pki.node)["cert"].read_bytes())
    identity = (x509.UniformResourceIdentifier(node_identity("pkictl.internal", "TW")),)
    gw_key = _key(live_files(pki.gateway)["privkey"])
    before = disk_state(pki.home)
    with pytest.raises(KeyReused, match="already certified for another identity"):
        pki.ca.simple_reenroll(_csr(gw_key, "TW", sans=identity), current)
    assert disk_state(pki.home) == before
    assert pki.ca.simple_reenroll(_csr(generate_key(), "TW", sans=identity), current).subject == current.subject


def test_key_reused_survives_the_signing_workers_pickle():
    """KeyReused pickles (signing workers send it back to the service) with both messages."""
    exc = pickle.loads(pickle.dumps(KeyReused("public", operator_message="for the operator")))
    assert isinstance(exc, KeyReused) and str(exc) == "public" and exc.operator_message == "for the operator"


def test_an_existing_inventory_gets_the_key_index(tmp_path):
    """An inventory made before the SPKI index gets it on open, without a schema version change."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.close()
    db = sqlite3.connect(tmp_path / "ca" / "inventory.sqlite3")
    db.execute("DROP INDEX certificates_by_spki")
    db.commit()
    db.close()
    ca = CertificateAuthority.load(tmp_path / "ca")
    try:
        ca.enroll("node", "n1", out=tmp_path / "n1")
    finally:
        ca.close()
    db = sqlite3.connect(tmp_path / "ca" / "inventory.sqlite3")
    assert db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'certificates_by_spki'").fetchone()
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # and the migrations ran
    plan = " ".join(str(r[-1]) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT serial FROM certificates WHERE spki_sha256 = ? AND NOT (kind = ? AND name_key = ?)", ("x", "node", "n")))
    db.close()
    assert "certificates_by_spki" in plan, plan
