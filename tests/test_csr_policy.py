"""The CSR policy through the pkictl CLI: exactly one CSR per input, SHA-2 signatures, RSA
exponent 65537, and only IP addresses a client can dial; every refusal says what it found and
what it wants, is audited, and writes nothing. CSRs and keys are made by openssl."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkictl.cli import cli
from pkictl.errors import PolicyError
from pkictl.policy import parse_csr

from csr_support import audit_records, disk_state, openssl_csr, openssl_key
from est_support import pkictl


def enroll_csr(pki, path, name: str = "n2"):
    """``pkictl enroll-node NAME --csr PATH`` in-process; the bundle goes to <home>/bundles/NAME."""
    return CliRunner().invoke(cli, ["--home", str(pki.home), "enroll-node", name, "--csr", str(path)])


def assert_refused(pki, result, before, message: str, operation: str) -> None:
    """Exit status 1 with ``message``, nothing written, and the refusal audited with the same reason."""
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert disk_state(pki.home) == before
    record = audit_records(pki.home)[-1]
    assert record["event"] == "refused" and record["operation"] == operation, record
    assert message in record["reason"], record


def _inputs(pki, tmp_path) -> dict[str, tuple[bytes, str]]:
    """Hostile CSR files -> (bytes, what the refusal must say)."""
    csr = openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2").read_bytes()
    other = openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2").read_bytes()
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    root = (pki.home / "ca.pem").read_bytes()
    return {
        "CA certificate then CSR": (root + csr, "found 2 PEM blocks (CERTIFICATE, CERTIFICATE REQUEST); want exactly one CERTIFICATE REQUEST"),
        "two CSRs": (csr + other, "found 2 PEM blocks (CERTIFICATE REQUEST, CERTIFICATE REQUEST); want exactly one CERTIFICATE REQUEST"),
        "PEM then junk": (csr + b"junk\n", "4 bytes of other data after the PEM block; want exactly one CERTIFICATE REQUEST"),
        "text then PEM": (b"Subject: n2\n" + csr, "11 bytes of other data before the PEM block"),
        "a certificate": (root, "found 1 PEM block (CERTIFICATE); want exactly one CERTIFICATE REQUEST"),
        "DER then bytes": (der + b"\x00\x01\x02", f"3 bytes follow the {len(der)}-byte DER CSR; want exactly one CSR and nothing after it"),
    }


def test_cli_refuses_any_input_but_exactly_one_csr(pki, tmp_path):
    """enroll-node --csr refuses a CA certificate before the CSR, two CSRs, junk after or text before
    the PEM block, a certificate alone, and bytes after the DER, saying what it found; nothing is
    written and each refusal is audited."""
    for case, (data, message) in _inputs(pki, tmp_path).items():
        path = tmp_path / "input.csr"
        path.write_bytes(data)
        before = disk_state(pki.home)
        result = enroll_csr(pki, path)
        assert not (pki.home / "bundles" / "n2").exists(), case
        assert_refused(pki, result, before, message, "enroll-csr")


@pytest.mark.parametrize("der", [False, True])
def test_cli_accepts_one_csr_with_whitespace_around_it(pki, tmp_path, der):
    """Negative control: one PEM CSR with blank lines and spaces around it, or one DER CSR alone, is certified."""
    path = openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", der=der)
    if not der:
        path.write_bytes(b"\n \n" + path.read_bytes() + b"\n\n  \n")
    result = enroll_csr(pki, path)
    assert result.exit_code == 0, result.output
    assert (pki.home / "bundles" / "n2" / "cert.pem").is_file()


def test_parse_csr_escapes_what_it_quotes_from_the_input(tmp_path):
    """A PEM label with an escape sequence is named escaped, never raw, in the refusal."""
    with pytest.raises(PolicyError, match=r"found 1 PEM block \(\\x1b\[31mX\)") as caught:
        parse_csr(b"-----BEGIN \x1b[31mX-----\nAAAA\n-----END \x1b[31mX-----\n", source="x.csr")
    assert "\x1b" not in str(caught.value)


def test_cli_refuses_rsa_exponent_3(pki, tmp_path):
    """An RSA-2048 key with e=3 (openssl genpkey rsa_keygen_pubexp:3) is refused naming the
    exponent; the same CSR with e=65537 is certified (control)."""
    path = openssl_csr(tmp_path, openssl_key(tmp_path, "rsa-e3"), subject="/CN=n2")
    before = disk_state(pki.home)
    assert_refused(pki, enroll_csr(pki, path), before, "RSA public exponent: got e=3, want 65537", "enroll-csr")

    control = enroll_csr(pki, openssl_csr(tmp_path, openssl_key(tmp_path, "rsa"), subject="/CN=n2"))
    assert control.exit_code == 0, control.output


def _unknown_algorithm_csr(tmp_path) -> bytes:
    """An RSA CSR whose signature algorithm says md2WithRSAEncryption (1.2.840.113549.1.1.2),
    which cryptography does not know (reading signature_hash_algorithm raises)."""
    der = openssl_csr(tmp_path, openssl_key(tmp_path, "rsa"), subject="/CN=n2", der=True).read_bytes()
    sha256_rsa = bytes.fromhex("06092a864886f70d01010b")  # OID 1.2.840.113549.1.1.11
    assert der.count(sha256_rsa) == 1
    return der.replace(sha256_rsa, sha256_rsa[:-1] + b"\x02")


def test_cli_refuses_csrs_signed_with_weak_or_unknown_hashes(pki, tmp_path):
    """A CSR signed with SHA-1 or MD5 (openssl req -sha1 / -md5) is refused naming the hash, not
    as a signature that does not verify; one with an unknown algorithm names its OID."""
    cases = {
        "SHA-1": (openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", digest="sha1").read_bytes(),
                  "the CSR is signed with SHA-1; want SHA-256, SHA-384 or SHA-512"),
        "MD5": (openssl_csr(tmp_path, openssl_key(tmp_path, "rsa"), subject="/CN=n2", digest="md5").read_bytes(),
                "the CSR is signed with MD5; want SHA-256, SHA-384 or SHA-512"),
        "SHA-224": (openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", digest="sha224").read_bytes(),
                    "the CSR is signed with SHA-224; want SHA-256, SHA-384 or SHA-512"),
        "unknown": (_unknown_algorithm_csr(tmp_path), "signed with an algorithm pkictl does not accept (OID 1.2.840.113549.1.1.2)"),
    }
    for case, (data, message) in cases.items():
        path = tmp_path / f"{case}.csr"
        path.write_bytes(data)
        before = disk_state(pki.home)
        result = enroll_csr(pki, path)
        assert "does not verify" not in result.output, (case, result.output)
        assert_refused(pki, result, before, message, "enroll-csr")


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
def test_cli_accepts_sha2_signed_csrs(pki, tmp_path, digest):
    """Negative control: CSRs signed with SHA-256, SHA-384 or SHA-512 are certified."""
    result = enroll_csr(pki, openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", digest=digest))
    assert result.exit_code == 0, result.output


UNDIALABLE = {
    "0.0.0.0": "the unspecified address",
    "::": "the unspecified address",
    "255.255.255.255": "the limited broadcast address",
    "224.0.0.1": "a multicast address",
    "239.255.255.250": "a multicast address",
    "ff02::1": "a multicast address",
    "::ffff:224.0.0.1": "a multicast address",
}


@pytest.mark.parametrize("address", UNDIALABLE)
def test_enroll_gateway_refuses_addresses_no_client_can_dial(pki, address):
    """enroll-gateway --ip with an unspecified, limited broadcast or multicast address (IPv4-mapped
    too) exits 1 saying why and what to pass instead; no key, bundle or inventory row is written."""
    before = disk_state(pki.home)
    result = CliRunner().invoke(cli, ["--home", str(pki.home), "enroll-gateway", "gw2", "--ip", address])
    assert_refused(pki, result, before, f"--ip {address!r} is {UNDIALABLE[address]}", "enroll")
    assert "no client can dial it; pass the address clients dial" in result.output
    assert "such as 192.168.1.10 (127.0.0.1 or ::1 for loopback)" in result.output
    assert not (pki.home / "bundles" / "gw2").exists()


@pytest.mark.parametrize("address", ["192.168.1.10", "10.0.0.255", "::1", "fe80::1"])
def test_enroll_gateway_accepts_unicast_addresses(pki, address):
    """Negative control: unicast addresses (a .255 host in a larger subnet, loopback, link-local) are certified."""
    result = CliRunner().invoke(cli, ["--home", str(pki.home), "enroll-gateway", "gw2", "--ip", address])
    assert result.exit_code == 0, result.output


def test_installed_pkictl_refuses_a_certificate_and_csr_and_a_multicast_ip(pki, tmp_path):
    """The installed pkictl command (a subprocess) refuses a file holding the root and a CSR, and
    enroll-gateway --ip 224.0.0.1, with the same messages and exit status 1, writing nothing."""
    both = tmp_path / "both.pem"
    both.write_bytes((pki.home / "ca.pem").read_bytes() + openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2").read_bytes())
    before = disk_state(pki.home)
    result = pkictl(pki.home, "enroll-node", "n2", "--csr", str(both), check=False)
    assert result.returncode == 1 and "found 2 PEM blocks (CERTIFICATE, CERTIFICATE REQUEST)" in result.stderr, result
    result = pkictl(pki.home, "enroll-gateway", "gw2", "--ip", "224.0.0.1", check=False)
    assert result.returncode == 1 and "--ip '224.0.0.1' is a multicast address: no client can dial it" in result.stderr, result
    assert disk_state(pki.home) == before
