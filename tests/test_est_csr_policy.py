"""The CSR policy over EST: a real ``pkictl serve`` (one signing worker, so that refusals cross its
pipe) and curl as the client. Bodies that are not exactly one CSR, weak signatures, RSA e=3, CA
keys and another identity's key are refused with a 4xx whose body says why (without naming the
other identity), audited, and nothing is written: the token is not spent."""

from __future__ import annotations

import base64
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkictl.profile import node_identity

from csr_support import audit_records, disk_state, openssl_csr, openssl_key
from est_support import EST, ServeProcess, curl, est_body, pkictl
from support import DEADLINE, command, live_files

IDENTITY = f"URI:{node_identity('pkictl.internal', 'tw')}"


@pytest.fixture
def serve(pki):
    """A real 'pkictl serve' on ``pki``'s CA, issuing in one signing worker process."""
    process = ServeProcess(pki.home, "--workers", "1")
    yield process
    assert process.stop() == 0


def _token(pki, name: str = "n2") -> str:
    return pkictl(pki.home, "enroll-node", name, "--token").stdout.splitlines()[1].strip()


def _enroll(pki, serve, body: bytes, *, name: str | None = "n2", token: str | None = None):
    auth = ["-u", f"{name}:{token}"] if token is not None else []
    return curl(serve.url + EST + "/simpleenroll", *auth, cacert=pki.home / "ca.pem", data=body, content_type="application/pkcs10")


def _reenroll(pki, serve, body: bytes):
    files = live_files(pki.node)
    return curl(serve.url + EST + "/simplereenroll", "--cert", str(files["fullchain"]), "--key", str(files["privkey"]),
                cacert=pki.home / "ca.pem", data=body, content_type="application/pkcs10")


def test_simpleenroll_refuses_bodies_that_are_not_exactly_one_csr(pki, serve, tmp_path):
    """Junk characters or base64 after the CSR's base64, a second CSR after it, bytes after the DER, and the root
    certificate before a PEM CSR are each a 400 naming what was found; the token survives them
    all and then enrolls n2 with the clean body (control)."""
    token = _token(pki)
    der_path = openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", der=True)
    der = der_path.read_bytes()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    body = est_body(der_path)
    cases = {
        "junk characters after the base64": (body + b"!!junk!!\n", "request body: not base64"),
        "bytes after the DER": (base64.encodebytes(der + b"\x00\x00"), f"2 bytes follow the {len(der)}-byte DER CSR"),
        "two CSRs": (base64.encodebytes(der + der), f"{len(der)} bytes follow the {len(der)}-byte DER CSR"),
        "root then PEM CSR": ((pki.home / "ca.pem").read_bytes() + pem,
                              "found 2 PEM blocks (CERTIFICATE, CERTIFICATE REQUEST); want exactly one CERTIFICATE REQUEST"),
    }
    before = disk_state(pki.home)
    for case, (data, message) in cases.items():
        reply = _enroll(pki, serve, data, token=token)
        assert reply.status == 400 and message in reply.text, (case, reply)
    # base64 of junk after the CSR's: past its padding, or (no padding) decoded into bytes after the DER
    reply = _enroll(pki, serve, body + base64.encodebytes(b"junk"), token=token)
    assert reply.status == 400 and ("not base64 (Excess data after padding)" in reply.text or "4 bytes follow the" in reply.text), reply
    assert disk_state(pki.home) == before  # no certificate, no request, the token unspent

    reply = _enroll(pki, serve, body, token=token)
    assert reply.status == 200, reply


def test_simpleenroll_refuses_weak_signatures_and_rsa_exponent_3(pki, serve, tmp_path):
    """A SHA-1 or MD5 signed CSR and an RSA key with e=3 are 400s naming the hash or the exponent,
    each audited as a simpleenroll refusal; the token then enrolls a SHA-384 CSR (control)."""
    token = _token(pki)
    cases = {
        "SHA-1": (openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", digest="sha1", der=True),
                  "the CSR is signed with SHA-1; want SHA-256, SHA-384 or SHA-512"),
        "MD5": (openssl_csr(tmp_path, openssl_key(tmp_path, "rsa"), subject="/CN=n2", digest="md5", der=True),
                "the CSR is signed with MD5; want SHA-256, SHA-384 or SHA-512"),
        "e=3": (openssl_csr(tmp_path, openssl_key(tmp_path, "rsa-e3"), subject="/CN=n2", der=True),
                "RSA public exponent: got e=3, want 65537"),
    }
    for case, (path, message) in cases.items():
        before = disk_state(pki.home)
        reply = _enroll(pki, serve, est_body(path), token=token)
        assert reply.status == 400 and message in reply.text, (case, reply)
        assert disk_state(pki.home) == before, case
        record = audit_records(pki.home)[-1]
        assert record["event"] == "refused" and record["operation"] == "simpleenroll" and message in record["reason"], (case, record)

    reply = _enroll(pki, serve, est_body(openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", digest="sha384", der=True)), token=token)
    assert reply.status == 200, reply


def test_simpleenroll_refuses_a_ca_key_and_another_identitys_key_without_naming_it(pki, serve, tmp_path):
    """With a valid token, a CSR made with the issuing CA's key is a 400 naming it a CA key; one
    made with TW's key is a 400 saying only "another identity" (the audit record names TW). A key
    waiting for approval as n3's is refused for n4 the same way. Nothing is written."""
    token = _token(pki)
    before = disk_state(pki.home)
    reply = _enroll(pki, serve, est_body(openssl_csr(tmp_path, pki.home / "issuing" / "key.pem", subject="/CN=n2", der=True)), token=token)
    assert reply.status == 400 and "the key is the issuing CA's" in reply.text and "a CA key never certifies" in reply.text, reply

    reply = _enroll(pki, serve, est_body(openssl_csr(tmp_path, live_files(pki.node)["privkey"], subject="/CN=n2", der=True)), token=token)
    assert reply.status == 400, reply
    assert "the key is already certified for another identity: a key belongs to one identity; make a new key for node n2" in reply.text
    assert "TW" not in reply.text, reply.text
    record = audit_records(pki.home)[-1]
    assert record["operation"] == "simpleenroll" and "already certified for node TW (serial" in record["reason"], record
    assert disk_state(pki.home) == before

    key = openssl_key(tmp_path)
    pending = _enroll(pki, serve, est_body(openssl_csr(tmp_path, key, subject="/CN=n3", der=True)), name=None)
    assert pending.status == 202, pending
    before = disk_state(pki.home)
    reply = _enroll(pki, serve, est_body(openssl_csr(tmp_path, key, subject="/CN=n4", der=True)), name=None)
    assert reply.status == 400 and "already waits for approval as another identity's" in reply.text, reply
    assert "n3" not in reply.text, reply.text
    assert disk_state(pki.home) == before

    reply = _enroll(pki, serve, est_body(openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", der=True)), token=token)
    assert reply.status == 200, reply  # control: the token was not spent by the refusals


def test_simplereenroll_refuses_another_identitys_key_and_a_sha1_csr(pki, serve, tmp_path):
    """TW renewing to gw's key gets 403 "another identity" (not naming gw); a SHA-1 renewal CSR
    gets 403 naming SHA-1; TW renews with a new key (control)."""
    before = disk_state(pki.home)
    reply = _reenroll(pki, serve, est_body(openssl_csr(tmp_path, live_files(pki.gateway)["privkey"], subject="/CN=TW", san=IDENTITY, der=True)))
    assert reply.status == 403 and "already certified for another identity" in reply.text and "gw" not in reply.text, reply
    record = audit_records(pki.home)[-1]
    assert record["operation"] == "simple_reenroll" and "already certified for gateway gw" in record["reason"], record

    reply = _reenroll(pki, serve, est_body(openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=TW", san=IDENTITY, digest="sha1", der=True)))
    assert reply.status == 403 and "the CSR is signed with SHA-1; want SHA-256, SHA-384 or SHA-512" in reply.text, reply
    assert disk_state(pki.home) == before

    reply = _reenroll(pki, serve, est_body(openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=TW", san=IDENTITY, der=True)))
    assert reply.status == 200, reply


@pytest.mark.parametrize("address", ["0.0.0.0", "ff02::1"])
def test_serve_refuses_to_certify_itself_for_an_undialable_address(pki, address):
    """pkictl serve --ip 0.0.0.0 or a multicast address exits 1 before it listens, saying why,
    and writes no service certificate."""
    before = disk_state(pki.home)
    result = subprocess.run([command("pkictl"), "--home", str(pki.home), "serve", "--listen", "127.0.0.1:0", "--ip", address,
                             "--workers", "0"], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1, result
    assert f"--ip {address!r} is " in result.stderr and "no client can dial it" in result.stderr, result.stderr
    assert "ready: EST" not in result.stderr
    assert disk_state(pki.home).certificates == before.certificates
    assert not (pki.home / "service").exists()


def test_body_level_refusals_are_audited(pki, serve, tmp_path):
    """A simpleenroll body that is not base64, base64 that is no CSR, a wrong Content-Type, a body
    over the limit, and a simplereenroll body that is no CSR are each answered (400, 413) and
    recorded as a refusal in the audit log with the peer and the reason; a clean enrollment
    after them adds an 'issued' record and no refusal (control)."""
    token = _token(pki)
    body = est_body(openssl_csr(tmp_path, openssl_key(tmp_path), subject="/CN=n2", der=True))
    url = serve.url + EST + "/simpleenroll"
    auth = ("-u", f"n2:{token}")
    cases = [
        (curl(url, *auth, cacert=pki.home / "ca.pem", data=b"%%% not base64 %%%", content_type="application/pkcs10"), 400, "simple_enroll", "not base64"),
        (curl(url, *auth, cacert=pki.home / "ca.pem", data=base64.encodebytes(b"no CSR at all"), content_type="application/pkcs10"), 400, "simple_enroll", "want"),
        (curl(url, *auth, cacert=pki.home / "ca.pem", data=body, content_type="text/plain"), 400, "simple_enroll", "Content-Type 'text/plain'"),
        (curl(url, *auth, cacert=pki.home / "ca.pem", data=b"A" * 40000, content_type="application/pkcs10"), 413, "simple_enroll", ""),
        (_reenroll(pki, serve, b"%%%"), 400, "simple_reenroll", "not base64"),
    ]
    records = [r for r in audit_records(pki.home) if r["event"] == "refused"]
    assert len(records) == len(cases)
    for (reply, status, operation, words), record in zip(cases, records, strict=True):
        assert reply.status == status, reply
        assert record["operation"] == operation and record["peer"] == "127.0.0.1" and words in record["reason"], record
    before = len(audit_records(pki.home))
    assert _enroll(pki, serve, body, token=token).status == 200
    assert "refused" not in [r["event"] for r in audit_records(pki.home)[before:]]
    assert "issued" in [r["event"] for r in audit_records(pki.home)[before:]]
