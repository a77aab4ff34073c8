"""The CertificateAuthority's refusals and file protections: init, load, enroll and simple_reenroll
(RFC 7030 4.2.2), each success next to the requests that must be refused."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.errors import (
    AlreadyEnrolledError,
    CAExistsError,
    CANotFoundError,
    InvalidNameError,
    KeyProtectionError,
    PolicyError,
    StoreError,
)
from pkictl.pem import public_key_bytes
from pkictl.store import CredentialStore

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def ca(tmp_path, clock):
    authority = CertificateAuthority.init(tmp_path / "ca", clock=clock)
    yield authority
    authority.close()


def _row_count(home: Path) -> int:
    """Every inventory row, pending and failed included (the public API lists only issued ones)."""
    db = sqlite3.connect(home / "inventory.sqlite3")
    try:
        return db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]
    finally:
        db.close()


def _tree(path: Path) -> dict[str, bytes | str]:
    """A snapshot of every entry under ``path``: file contents, link targets, directories.

    SQLite's WAL index (-shm) and log (-wal) change whenever a connection opens; the inventory's
    rows are compared separately."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            if name.endswith(("-shm", "-wal")) or name.startswith("audit.log"):
                continue  # checked on their own
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = full.read_bytes()
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _csr(key, subject: x509.Name, sans: list[x509.GeneralName] | None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _renewal_csr(cert: x509.Certificate, key=None) -> x509.CertificateSigningRequest:
    """A well-formed renewal request for ``cert``: same subject and SANs, a new key unless ``key``."""
    return _csr(key or ec.generate_private_key(ec.SECP256R1()), cert.subject, _sans(cert))


# -- init ------------------------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca(tmp_path, clock):
    """init on a home that holds a CA raises CAExistsError and leaves the existing CA byte for byte intact."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, clock=clock).close()
    before = _tree(home)
    with pytest.raises(CAExistsError, match="exists"):
        CertificateAuthority.init(home, clock=clock)
    assert _tree(home) == before


def test_init_refuses_leftovers_of_an_interrupted_init(tmp_path, clock):
    """init refuses a home holding root/ but no ca.yaml, and names the leftover."""
    home = tmp_path / "ca"
    (home / "root").mkdir(parents=True)
    with pytest.raises(CAExistsError, match="root"):
        CertificateAuthority.init(home, clock=clock)
    assert sorted(p.name for p in home.iterdir()) == ["root"]
    assert not CertificateAuthority.exists(home)


def test_init_accepts_an_existing_empty_home(tmp_path, clock):
    """init into an existing empty directory succeeds (the control for the refusals above)."""
    home = tmp_path / "ca"
    home.mkdir(mode=0o700)
    CertificateAuthority.init(home, clock=clock).close()
    assert CertificateAuthority.exists(home)
    assert not [p for p in home.iterdir() if p.name.startswith(".init-")]  # staging removed


def test_key_files_are_0600_and_ca_dirs_0700(ca):
    """init creates the root and issuing keys 0600 and the home, root/ and issuing/ directories 0700."""
    home = ca.home
    for part in ("root", "issuing"):
        assert _mode(home / part / "key.pem") == 0o600
        assert _mode(home / part) == 0o700
        assert _mode(home / part / "cert.pem") & 0o022 == 0
    assert _mode(home) == 0o700


def test_enrolled_bundle_key_is_0600_in_a_0700_dir(ca, tmp_path):
    """An enrollment bundle's private key is 0600 and the bundle and version directories are 0700."""
    out = ca.enroll("node", "TW", out=tmp_path / "tw").directory
    version = out / "archive" / "1"
    assert _mode(version / "privkey.pem") == 0o600
    assert _mode(out) == 0o700
    assert _mode(version) == 0o700


# -- load ------------------------------------------------------------------------------------------


def test_load_returns_the_same_ca(ca, clock):
    """load reads back the root, issuing CA and settings that init wrote."""
    loaded = CertificateAuthority.load(ca.home, clock=clock)
    assert loaded.root == ca.root
    assert loaded.issuing == ca.issuing
    assert loaded.settings == ca.settings


def test_load_of_a_missing_ca(tmp_path):
    """load of a directory without ca.yaml raises CANotFoundError pointing at init-ca."""
    with pytest.raises(CANotFoundError, match="init-ca"):
        CertificateAuthority.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CANotFoundError):
        CertificateAuthority.load(tmp_path / "empty")


def test_load_refuses_a_group_readable_issuing_key(ca, clock):
    """load refuses an issuing key of mode 0640 with KeyProtectionError telling the operator to chmod 600."""
    key = ca.home / "issuing" / "key.pem"
    os.chmod(key, 0o640)
    with pytest.raises(KeyProtectionError, match="chmod 600"):
        CertificateAuthority.load(ca.home, clock=clock)
    os.chmod(key, 0o600)
    CertificateAuthority.load(ca.home, clock=clock).close()


def test_load_refuses_a_symlinked_issuing_key(ca, clock, tmp_path):
    """load refuses an issuing key that is a symlink, even to a 0600 file holding the right key."""
    key = ca.home / "issuing" / "key.pem"
    moved = tmp_path / "elsewhere.pem"
    os.rename(key, moved)
    os.symlink(moved, key)
    assert _mode(moved) == 0o600
    with pytest.raises(KeyProtectionError, match="symlink"):
        CertificateAuthority.load(ca.home, clock=clock)


# -- enroll: names, duplicates, output directory ---------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a b", "a\x00b", "x" * 64, "tw,O=admins", "", "-tw", "tw-", "tw.lan", "tw/x"])
@pytest.mark.parametrize("kind", ["node", "gateway"])
def test_enroll_refuses_an_invalid_name_before_touching_disk(ca, kind, name):
    """enroll of a name that is not a DNS label raises InvalidNameError with no inventory row and
    no file written; only the audit log records the refusal."""
    before = _tree(ca.home)
    rows = _row_count(ca.home)
    with pytest.raises(InvalidNameError, match="DNS label"):
        ca.enroll(kind, name, dns_names=["gw.example.lan"])
    assert _row_count(ca.home) == rows
    assert _tree(ca.home) == before
    last = json.loads((ca.home / "audit.log").read_text().splitlines()[-1])
    assert (last["event"], last["operation"], last["subject"], last["error"]) == ("refused", "enroll", name, "InvalidNameError")
    assert not (ca.home / "bundles").exists()
    assert not (ca.home / "x").exists()  # "../x" would land here


@pytest.mark.parametrize("name", ["x" * 63, "TW", "node-07", "7"])
def test_enroll_accepts_valid_names(ca, name):
    """Names that are DNS labels (up to 63 characters, inner hyphens) enroll into <home>/bundles/<name>."""
    enrollment = ca.enroll("node", name)
    assert enrollment.directory == ca.home / "bundles" / name
    assert (enrollment.directory / "cert.pem").exists()
    assert ca.inventory.get(enrollment.certificate.serial_number).status == "issued"


@pytest.mark.parametrize("second", ["TW", "tw", "Tw"])
def test_enroll_refuses_an_enrolled_name_in_any_case(ca, tmp_path, second):
    """A second enrollment of TW (in any case) raises AlreadyEnrolledError and leaves the first bundle untouched."""
    first = ca.enroll("node", "TW", out=tmp_path / "first")
    bundle = _tree(first.directory)
    rows = _row_count(ca.home)
    with pytest.raises(AlreadyEnrolledError, match="already enrolled"):
        ca.enroll("node", second, out=tmp_path / "second")
    assert _tree(first.directory) == bundle
    assert not (tmp_path / "second").exists()
    assert _row_count(ca.home) == rows
    # control: the same name as a gateway is a different identity and is accepted
    ca.enroll("gateway", second, out=tmp_path / "gw", ip_addresses=["10.0.0.1"])


def test_enroll_twice_with_the_default_bundle_dir_reports_the_enrolled_name(ca):
    """A second 'enroll TW' with the default bundle directory is refused as AlreadyEnrolledError, not as an --out problem."""
    first = ca.enroll("node", "TW")
    bundle = _tree(first.directory)
    with pytest.raises(AlreadyEnrolledError):
        ca.enroll("node", "TW")
    assert _tree(first.directory) == bundle


def test_enroll_is_allowed_again_after_expiry(ca, clock, tmp_path):
    """Once TW's certificate has expired, TW may enroll again (the refusal is only for a current certificate)."""
    first = ca.enroll("node", "TW", out=tmp_path / "first")
    clock.set(first.certificate.not_valid_after_utc - dt.timedelta(seconds=1))
    with pytest.raises(AlreadyEnrolledError):
        ca.enroll("node", "TW", out=tmp_path / "early")
    clock.set(first.certificate.not_valid_after_utc + dt.timedelta(seconds=1))
    second = ca.enroll("node", "TW", out=tmp_path / "second")
    assert second.certificate.serial_number != first.certificate.serial_number


def test_enroll_into_a_non_empty_out_dir_is_refused_before_issuance(ca, tmp_path):
    """enroll into a non-empty --out directory raises StoreError with no certificate issued and the directory untouched."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rows = _row_count(ca.home)
    with pytest.raises(StoreError, match="not empty"):
        ca.enroll("node", "TW", out=out)
    assert _row_count(ca.home) == rows
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # control: TW was not consumed, and an existing empty directory is accepted
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ca.enroll("node", "TW", out=empty).directory == empty


def test_enroll_into_a_file_is_refused(ca, tmp_path):
    """enroll with --out naming an existing file raises StoreError and issues nothing."""
    target = tmp_path / "file"
    target.write_text("x")
    rows = _row_count(ca.home)
    with pytest.raises(StoreError):
        ca.enroll("node", "TW", out=target)
    assert _row_count(ca.home) == rows


# -- enroll: gateway SAN policy --------------------------------------------------------------------


def test_gateway_needs_a_dns_name_or_ip(ca, tmp_path):
    """A gateway with neither --dns nor --ip raises PolicyError and issues nothing."""
    rows = _row_count(ca.home)
    with pytest.raises(PolicyError, match="--dns"):
        ca.enroll("gateway", "gw", out=tmp_path / "gw")
    assert _row_count(ca.home) == rows
    assert not (tmp_path / "gw").exists()
    assert ca.enroll("gateway", "gw", out=tmp_path / "gw2", ip_addresses=["192.168.1.10"]).certificate


@pytest.mark.parametrize("dns", ["localhost", "LOCALHOST", "api.localhost", "localhost.", "api.localhost."])
def test_gateway_localhost_is_refused(ca, tmp_path, dns):
    """--dns localhost (any case, a *.localhost name, or either written with the root's trailing dot) is refused with PolicyError suggesting --ip 127.0.0.1."""
    rows = _row_count(ca.home)
    with pytest.raises(PolicyError, match="127.0.0.1"):
        ca.enroll("gateway", "gw", out=tmp_path / "gw", dns_names=[dns])
    assert _row_count(ca.home) == rows
    # control: a real name with a trailing dot is accepted and certified without the dot
    cert = ca.enroll("gateway", "gw", out=tmp_path / "ok", dns_names=["gw.example.lan."]).certificate
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["gw.example.lan"]


@pytest.mark.parametrize(("dns", "ip"), [(["bad name.lan"], []), (["*.example.lan"], []), ([], ["300.1.1.1"]), ([], ["gw.example.lan"])])
def test_gateway_malformed_sans_are_refused(ca, tmp_path, dns, ip):
    """Malformed --dns names and --ip addresses raise PolicyError and issue nothing."""
    rows = _row_count(ca.home)
    with pytest.raises(PolicyError):
        ca.enroll("gateway", "gw", out=tmp_path / "gw", dns_names=dns, ip_addresses=ip)
    assert _row_count(ca.home) == rows


def test_unknown_kind_is_refused(ca, tmp_path):
    """enroll of a kind other than node or gateway raises PolicyError and issues nothing."""
    rows = _row_count(ca.home)
    with pytest.raises(PolicyError):
        ca.enroll("issuing", "sub", out=tmp_path / "sub")
    assert _row_count(ca.home) == rows


def test_issue_refuses_weak_keys(ca):
    """issue refuses a P-192 key and an RSA-1024 key (PolicyError) but accepts P-384."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    rows = _row_count(ca.home)
    with pytest.raises(PolicyError, match="P-256"):
        ca.issue("node", "weak", ec.generate_private_key(ec.SECP192R1()).public_key())
    with pytest.raises(PolicyError, match="2048"):
        ca.issue("node", "weak", rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    assert _row_count(ca.home) == rows
    ca.issue("node", "strong", ec.generate_private_key(ec.SECP384R1()).public_key())


# -- simple_reenroll -------------------------------------------------------------------------------


@pytest.fixture
def node(ca, tmp_path):
    """TW's enrollment and its current private key, read back from the bundle."""
    enrollment = ca.enroll("node", "TW", out=tmp_path / "tw")
    key = CredentialStore(enrollment.directory).load().private_key
    return enrollment.certificate, key


@pytest.fixture
def gateway(ca, tmp_path):
    enrollment = ca.enroll("gateway", "gw", out=tmp_path / "gw", dns_names=["gw.example.lan"], ip_addresses=["10.0.0.1"])
    return enrollment.certificate


@pytest.mark.parametrize("which", ["node", "gateway"])
def test_simple_reenroll_issues_a_successor(ca, clock, request, which):
    """simple_reenroll returns a certificate with the same subject and SANs, a new serial and the CSR's new key."""
    current = request.getfixturevalue(which)
    current = current[0] if which == "node" else current
    clock.advance(60 * 86400)  # past the 2/3 renewal point, still valid
    new_key = ec.generate_private_key(ec.SECP256R1())
    renewed = ca.simple_reenroll(_renewal_csr(current, new_key), current)
    assert renewed.subject == current.subject
    assert _sans(renewed) == _sans(current)
    assert renewed.serial_number != current.serial_number
    assert public_key_bytes(renewed.public_key()) == public_key_bytes(new_key.public_key())
    assert public_key_bytes(renewed.public_key()) != public_key_bytes(current.public_key())
    assert renewed.not_valid_before_utc > current.not_valid_before_utc
    assert renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        current.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    renewed.verify_directly_issued_by(ca.issuing)
    assert ca.inventory.get(renewed.serial_number).status == "issued"
    assert ca.record(current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, which).serial == renewed.serial_number


def _assert_refused(ca, csr, current, match: str) -> None:
    rows = _row_count(ca.home)
    with pytest.raises(PolicyError, match=match):
        ca.simple_reenroll(csr, current)
    assert _row_count(ca.home) == rows  # nothing issued, not even a pending intent


def test_reenroll_refuses_a_different_subject(ca, node):
    """A renewal CSR whose subject differs from the current certificate's (CN=admin) is refused."""
    current, _ = node
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    _assert_refused(ca, _csr(ec.generate_private_key(ec.SECP256R1()), other, _sans(current)), current, "subject")


def test_reenroll_refuses_an_extra_subject_attribute(ca, node):
    """A renewal CSR that adds O=admins to the subject is refused."""
    current, _ = node
    subject = x509.Name(list(current.subject) + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "admins")])
    _assert_refused(ca, _csr(ec.generate_private_key(ec.SECP256R1()), subject, _sans(current)), current, "subject")


@pytest.mark.parametrize(
    "sans",
    [
        [x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/admin")],
        [x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/tw"), x509.DNSName("gw.example.lan")],
        [],
        None,
    ],
    ids=["other-uri", "extra-dns", "empty", "no-san-extension"],
)
def test_reenroll_refuses_different_sans(ca, node, sans):
    """A renewal CSR whose SANs differ from the current certificate's (other, extra, none) is refused."""
    current, _ = node
    _assert_refused(ca, _csr(ec.generate_private_key(ec.SECP256R1()), current.subject, sans), current, "alternative names")


def test_reenroll_refuses_a_gateway_adding_a_name(ca, gateway):
    """A gateway renewal CSR that adds a DNS name to its SANs is refused."""
    sans = _sans(gateway) + [x509.DNSName("evil.example.lan")]
    _assert_refused(ca, _csr(ec.generate_private_key(ec.SECP256R1()), gateway.subject, sans), gateway, "alternative names")


def test_reenroll_refuses_the_current_key(ca, node):
    """A renewal CSR for the key of the current certificate is refused: a renewal must rekey."""
    current, key = node
    assert public_key_bytes(key.public_key()) == public_key_bytes(current.public_key())
    _assert_refused(ca, _renewal_csr(current, key), current, "rekey")


def test_reenroll_refuses_a_csr_with_a_bad_signature(ca, node):
    """A CSR whose signature does not verify under the key it carries (no proof of possession) is refused."""
    current, _ = node
    der = bytearray(_renewal_csr(current).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    _assert_refused(ca, tampered, current, "signature")


def test_reenroll_refuses_a_trustme_certificate(ca, node):
    """A current certificate issued by a foreign (trustme) CA is refused, even with the node's subject and SAN in the CSR."""
    current, _ = node
    leaf = trustme.CA().issue_cert("tw.example.lan", common_name="TW")
    foreign = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    _assert_refused(ca, _renewal_csr(foreign), foreign, "not issued by this CA")


def test_reenroll_refuses_another_pkictl_cas_certificate(ca, clock, tmp_path):
    """A node certificate from a second pkictl CA (same trust domain, same name TW) is refused by the first CA."""
    other = CertificateAuthority.init(tmp_path / "other-ca", clock=clock)
    foreign = other.enroll("node", "TW", out=tmp_path / "other-tw").certificate
    other.close()
    ca.enroll("node", "TW", out=tmp_path / "tw")
    _assert_refused(ca, _renewal_csr(foreign), foreign, "not issued by this CA")


def test_reenroll_ends_at_not_after(ca, clock, node):
    """A certificate renews one second before its notAfter and is refused one second after it."""
    current, _ = node
    clock.set(current.not_valid_after_utc + dt.timedelta(seconds=1))
    _assert_refused(ca, _renewal_csr(current), current, "not valid now")
    clock.set(current.not_valid_after_utc - dt.timedelta(seconds=1))
    assert ca.simple_reenroll(_renewal_csr(current), current).subject == current.subject
