"""enroll-node --csr: the CSR contributes its key and proof of possession, never an identity."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.errors import PolicyError
from pkictl.pem import public_key_bytes
from pkictl.policy import MAX_CSR_BYTES, parse_csr
from pkictl.profile import generate_key

IDENTITY = "spiffe://pkictl.internal/node/tw"
IDENTITY_SAN = x509.UniformResourceIdentifier(IDENTITY)


@pytest.fixture
def ca(tmp_path):
    authority = CertificateAuthority.init(tmp_path / "ca")
    yield authority
    authority.close()


def _csr(key=None, *, subject=(("CN", "TW"),), sans=(IDENTITY_SAN,), ca=None):
    key = key or generate_key()
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(oids[k], v) for k, v in subject]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return key, builder.sign(key, hashes.SHA256())


def _rows(ca) -> int:
    return sqlite3.connect(ca.home / "inventory.sqlite3").execute("SELECT COUNT(*) FROM certificates").fetchone()[0]


@pytest.mark.parametrize("subject, sans", [((("CN", "TW"),), (x509.UniformResourceIdentifier(IDENTITY),)), ((), ()), ((("CN", "tw"),), ())])
def test_csr_key_is_certified_with_the_identity_from_policy(ca, tmp_path, subject, sans):
    """A CSR with CN=TW and the identity URI, or with neither, gets a node certificate for its own
    key carrying CN=TW and exactly the identity URI; no private key is written."""
    key, csr = _csr(subject=subject, sans=sans)
    cert = ca.enroll_csr("TW", csr, out=tmp_path / "out").certificate
    assert public_key_bytes(cert.public_key()) == public_key_bytes(key.public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "TW"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ca.pem", "cert.pem", "chain.pem", "fullchain.pem"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ca": True}, "CA:TRUE"),
        ({"sans": (x509.UniformResourceIdentifier(IDENTITY), x509.DNSName("evil.example"))}, "subject alternative names"),
        ({"sans": (x509.UniformResourceIdentifier("spiffe://pkictl.internal/node/other"),)}, "subject alternative names"),
        ({"subject": (("CN", "admin"),)}, "another identity"),
        ({"subject": (("CN", "TW"), ("O", "admins"))}, "another identity"),
    ],
)
def test_csr_asking_for_more_than_its_key_is_refused(ca, tmp_path, kwargs, message):
    """CA:TRUE, extra SANs, another node's identity or extra subject attributes are refused with
    the rule named, and nothing is recorded or written."""
    _, csr = _csr(**kwargs)
    rows = _rows(ca)
    with pytest.raises(PolicyError, match=message):
        ca.enroll_csr("TW", csr, out=tmp_path / "out")
    assert _rows(ca) == rows and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", [rsa.generate_private_key(65537, 1024), ec.generate_private_key(ec.SECP256K1())])
def test_weak_or_unsupported_keys_are_refused(ca, tmp_path, key):
    """An RSA-1024 key and a secp256k1 key are refused with what is wanted."""
    _, csr = _csr(key)
    with pytest.raises(PolicyError, match="want"):
        ca.enroll_csr("TW", csr, out=tmp_path / "out")


def test_csr_with_a_broken_signature_is_refused(ca, tmp_path):
    """A CSR whose signature does not verify proves nothing and is refused."""
    _, csr = _csr()
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(PolicyError, match="possession"):
        ca.enroll_csr("TW", forged, out=tmp_path / "out")


def test_oversized_and_garbage_input_is_refused_before_parsing(tmp_path):
    """More than MAX_CSR_BYTES, or bytes that are no CSR, give a clear PolicyError."""
    with pytest.raises(PolicyError, match="at most"):
        parse_csr(b"A" * (MAX_CSR_BYTES + 1), source="big.csr")
    with pytest.raises(PolicyError, match="PKCS#10"):
        parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n", source="bad.csr")


def test_cli_enrolls_a_csr_made_by_openssl(ca, tmp_path):
    """pkictl enroll-node TW --csr FILE certifies a CSR made by 'openssl req', not by our code."""
    openssl = shutil.which("openssl")
    assert openssl
    subprocess.run([openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "tw.key"), "-subj", "/CN=TW", "-out", str(tmp_path / "tw.csr")],
                   check=True, capture_output=True, timeout=30)
    result = CliRunner().invoke(cli, ["--home", str(ca.home), "enroll-node", "TW", "--csr", str(tmp_path / "tw.csr"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "the key stays on the node" in result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "cert.pem").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "tw.key").read_bytes(), None)
    assert public_key_bytes(cert.public_key()) == public_key_bytes(key.public_key())
    verify = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "out" / "ca.pem"), "-untrusted", str(tmp_path / "out" / "chain.pem"),
                             "-purpose", "sslclient", str(tmp_path / "out" / "cert.pem")], capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_cli_refuses_a_csr_for_another_identity(ca, tmp_path):
    """pkictl enroll-node TW --csr with CN=admin exits 1 naming the rule, and writes nothing."""
    _, csr = _csr(subject=(("CN", "admin"),))
    (tmp_path / "admin.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = CliRunner().invoke(cli, ["--home", str(ca.home), "enroll-node", "TW", "--csr", str(tmp_path / "admin.csr"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "another identity" in result.output
    assert not (tmp_path / "out").exists()


def test_gateway_dns_names_longer_than_253_characters_are_refused(ca, tmp_path):
    """A gateway DNS name of valid labels but 254+ characters is refused (RFC 1035 2.3.4); 253 is accepted."""
    labels = ["a" * 63] * 3 + ["b" * 61]  # 63*3 + 61 + 3 dots = 253
    ok = ".".join(labels)
    assert len(ok) == 253
    ca.enroll("gateway", "gw", out=tmp_path / "gw", dns_names=[ok])
    with pytest.raises(PolicyError, match="253"):
        ca.enroll("gateway", "gw2", out=tmp_path / "gw2", dns_names=["c" + ok])
