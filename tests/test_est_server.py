"""The EST service (``pkictl serve``, RFC 7030) over real HTTPS on 127.0.0.1, with curl and
openssl as the clients: cacerts, token and approval bootstrap (simpleenroll), renewal by the
current certificate (simplereenroll), the request caps, the CRL, and the service renewing its
own server certificate while it runs."""

from __future__ import annotations

import datetime as dt
import http.client
import re
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.pem import certificates_to_pem, private_key_to_pem
from pkictl.profile import generate_key
from pkictl.settings import CASettings

from est_support import (
    CURL,
    EST,
    OPENSSL,
    RunningService,
    ServeProcess,
    certs_only,
    curl,
    est_body,
    make_csr,
    openssl,
    pkictl,
    public_key_der,
    serials,
)
from support import DEADLINE, live_files

PKCS7 = "application/pkcs7-mime; smime-type=certs-only"  # RFC 7030 4.1.3 / 4.2.3
TW_URI = "spiffe://pkictl.internal/node/tw"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def est():
    """Start :class:`RunningService` instances on a CA home; all are stopped after the test."""
    started: list[RunningService] = []

    def start(home: Path, **options) -> RunningService:
        service = RunningService(home, **options)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    """A CA home with a root and an issuing CA and no node enrolled yet."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, CASettings()).close()
    return home


# -- helpers ---------------------------------------------------------------------------------------


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def uris(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


def only_certificate(body: bytes) -> x509.Certificate:
    certificates = certs_only(body)
    assert len(certificates) == 1, f"want exactly the issued certificate (RFC 7030 4.2.3), got {len(certificates)}"
    return certificates[0]


def openssl_verify_client(home: Path, certificate: x509.Certificate, scratch: Path) -> str:
    """``openssl verify -purpose sslclient`` of ``certificate`` against the root, with the issuing CA untrusted."""
    path = scratch / f"verify-{certificate.serial_number:x}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return openssl("verify", "-purpose", "sslclient", "-CAfile", str(home / "ca.pem"), "-untrusted",
                   str(home / "issuing" / "cert.pem"), str(path)).decode()


def shown_code(reply) -> str:
    """The approval code a 202 answer names ("... (code XXXX-XXXX) waits for approval ..."):
    eight characters of base32's alphabet."""
    match = re.search(r"\(code ([A-Z2-7]{4}-[A-Z2-7]{4})\)", reply.text)
    assert match, reply.text
    return match.group(1)


def token_of(home: Path, name: str, *args: str) -> str:
    """``pkictl enroll-node NAME --token``: the token is printed alone on line 2."""
    return pkictl(home, "enroll-node", name, "--token", *args).stdout.splitlines()[1].strip()


def crl_serials(text: str) -> set[int]:
    return {int(s, 16) for s in re.findall(r"Serial Number: ([0-9A-F]+)", text)}


# -- cacerts ---------------------------------------------------------------------------------------


def test_cacerts_is_a_pkcs7_of_the_root_and_the_issuing_ca(pki, est, tmp_path):
    """curl GET cacerts answers base64 DER PKCS#7 certs-only that openssl reads as exactly the root
    and the issuing CA; a client trusting a foreign CA gets no answer, a wrong path 404 and a POST
    405 with Allow."""
    service = est(pki.home)
    reply = curl(service.url + EST + "/cacerts", cacert=pki.home / "ca.pem")
    assert (reply.returncode, reply.status) == (0, 200), reply
    assert reply.headers["content-type"] == PKCS7
    certificates = certs_only(reply.body)
    on_disk = [x509.load_pem_x509_certificate((pki.home / p).read_bytes()) for p in ("root/cert.pem", "issuing/cert.pem")]
    assert sorted(c.fingerprint(hashes.SHA256()) for c in certificates) == sorted(c.fingerprint(hashes.SHA256()) for c in on_disk)
    assert {c.subject for c in certificates} == {pki.ca.root.subject, pki.ca.issuing.subject}

    # negative controls: a foreign trust anchor fails curl's verification of the server (curl 60);
    # an unknown path is 404; a POST is 405 and says which method is allowed (RFC 9110 15.5.6)
    foreign = tmp_path / "foreign.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    untrusted = curl(service.url + EST + "/cacerts", cacert=foreign)
    assert untrusted.returncode == 60 and untrusted.status == 0, untrusted
    assert curl(service.url + EST + "/cacert", cacert=pki.home / "ca.pem").status == 404
    post = curl(service.url + EST + "/cacerts", cacert=pki.home / "ca.pem", data=b"", content_type="application/pkcs10")
    assert post.status == 405 and "GET" in post.headers.get("allow", ""), post


# -- simpleenroll with a one-time token ------------------------------------------------------------


def test_token_enrollment_issues_once_for_the_named_node(fresh_home, est, tmp_path):
    """With the token of 'pkictl enroll-node TW --token' in HTTP Basic, simpleenroll certifies the
    CSR's key as spiffe://.../node/tw once; the spent token, a wrong token and another node's token get 401."""
    service = est(fresh_home)
    url, ca_pem = service.url + EST + "/simpleenroll", fresh_home / "ca.pem"
    token = token_of(fresh_home, "TW")
    other = token_of(fresh_home, "n2")
    csr, key = make_csr(tmp_path / "tw")
    body = est_body(csr)

    wrong_token = token[:-1] + ("A" if token[-1] != "A" else "B")  # one character off
    wrong = curl(url, "-u", f"TW:{wrong_token}", cacert=ca_pem, data=body, content_type="application/pkcs10")
    assert wrong.status == 401, wrong
    assert wrong.headers["www-authenticate"].startswith("Basic")
    another = curl(url, "-u", f"TW:{other}", cacert=ca_pem, data=body, content_type="application/pkcs10")
    assert another.status == 401, another
    before = serials(fresh_home)

    reply = curl(url, "-u", f"TW:{token}", cacert=ca_pem, data=body, content_type="application/pkcs10")
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == PKCS7
    certificate = only_certificate(reply.body)
    assert spki(certificate) == public_key_der(key)
    assert uris(certificate) == [TW_URI]
    assert "OK" in openssl_verify_client(fresh_home, certificate, tmp_path)
    assert serials(fresh_home) - before == {certificate.serial_number}

    again, _ = make_csr(tmp_path / "tw-again")
    spent = curl(url, "-u", f"TW:{token}", cacert=ca_pem, data=est_body(again), content_type="application/pkcs10")
    assert spent.status == 401, spent
    assert "wrong, expired or already used" in spent.text

    # negative control: n2's token, refused for TW above, was not spent and works for n2
    n2_csr, _ = make_csr(tmp_path / "n2", subject="/CN=n2")
    n2 = curl(url, "-u", f"n2:{other}", cacert=ca_pem, data=est_body(n2_csr), content_type="application/pkcs10")
    assert n2.status == 200, n2
    assert uris(only_certificate(n2.body)) == ["spiffe://pkictl.internal/node/n2"]


def test_expired_token_is_refused_and_a_current_one_accepted(fresh_home, est, tmp_path):
    """A token that expired (made by a CA whose clock stood an hour back, valid 10 minutes) gets
    401; the same request with a token made now gets 200."""
    now = dt.datetime.now(dt.timezone.utc)
    tokens = {}
    for label, clock in (("expired", FixedClock(now - dt.timedelta(hours=1))), ("current", FixedClock(now))):
        ca = CertificateAuthority.load(fresh_home, clock=clock)
        tokens[label], _ = ca.create_token("n3", ttl=dt.timedelta(minutes=10))
        ca.close()
    service = est(fresh_home)
    url, ca_pem = service.url + EST + "/simpleenroll", fresh_home / "ca.pem"
    body = est_body(make_csr(tmp_path, subject="/CN=n3")[0])

    expired = curl(url, "-u", f"n3:{tokens['expired']}", cacert=ca_pem, data=body, content_type="application/pkcs10")
    assert expired.status == 401, expired
    current = curl(url, "-u", f"n3:{tokens['current']}", cacert=ca_pem, data=body, content_type="application/pkcs10")
    assert current.status == 200, current


# -- simpleenroll with the operator's approval -----------------------------------------------------


def test_approval_flow_pending_approve_lost_answer_and_deny(fresh_home, est, tmp_path):
    """Without credentials simpleenroll answers 202 + Retry-After naming the key's code; 'pkictl
    requests' lists it; the code names the key (the same on every poll, another for another key of
    TW); a wrong code does not approve; the right one makes the next poll 200 and a repeated poll
    returns the same certificate; 'pkictl deny' makes another node's next poll 403.

    Mutation: ``approval_code`` returning one code for every key (``return "ABCD-EFGH"``) fails
    the check that TW's second key gets another code."""
    service = est(fresh_home, retry_after=7)
    url, ca_pem = service.url + EST + "/simpleenroll", fresh_home / "ca.pem"
    csr, key = make_csr(tmp_path / "tw")
    body = est_body(csr)

    def poll(data: bytes):
        return curl(url, cacert=ca_pem, data=data, content_type="application/pkcs10")

    pending = poll(body)
    assert pending.status == 202, pending
    assert pending.headers["retry-after"] == "7"
    code = shown_code(pending)
    assert "TW" in pending.text
    assert shown_code(poll(body)) == code  # the same key, the same code
    other_key = est_body(make_csr(tmp_path / "tw-other")[0])
    other_code = shown_code(poll(other_key))
    assert other_code != code  # the code is the key's, not the name's
    listed = pkictl(fresh_home, "requests").stdout
    assert re.search(rf"^TW\s+{code}\s", listed, re.MULTILINE), listed
    assert re.search(rf"^TW\s+{other_code}\s", listed, re.MULTILINE), listed

    wrong = pkictl(fresh_home, "approve", "TW", "--code", "AAAA-AAAA", check=False)
    assert wrong.returncode == 1 and "no pending request" in wrong.stderr
    assert poll(body).status == 202  # still waiting: the wrong code approved nothing

    n2_body = est_body(make_csr(tmp_path / "n2", subject="/CN=n2")[0])
    assert poll(n2_body).status == 202
    pkictl(fresh_home, "deny", "n2")
    denied = poll(n2_body)
    assert denied.status == 403 and "denied" in denied.text, denied
    assert poll(body).status == 202  # denying n2 left TW's request pending

    before = serials(fresh_home)
    pkictl(fresh_home, "approve", "TW", "--code", code)
    issued = poll(body)
    assert issued.status == 200, issued
    certificate = only_certificate(issued.body)
    assert spki(certificate) == public_key_der(key)
    assert uris(certificate) == [TW_URI]
    repeated = only_certificate(poll(body).body)  # the answer was lost: the node polls again
    assert repeated.serial_number == certificate.serial_number
    assert serials(fresh_home) - before == {certificate.serial_number}
    assert poll(n2_body).status == 403


# -- simplereenroll --------------------------------------------------------------------------------


def reenroll(service: RunningService, home: Path, csr: Path, *tls: str, content_type: str = "application/pkcs10"):
    return curl(service.url + EST + "/simplereenroll", *tls, cacert=home / "ca.pem", data=est_body(csr), content_type=content_type)


def tw_credential(pki) -> tuple[list[str], x509.Certificate, Path]:
    """curl's client-certificate arguments for TW (leaf + issuing CA, key), its certificate and key."""
    files = live_files(pki.node)
    certificate = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    return ["--cert", str(files["fullchain"]), "--key", str(files["privkey"])], certificate, files["privkey"]


def test_simplereenroll_with_the_current_certificate_issues_a_successor(pki, est, tmp_path):
    """curl with TW's certificate chain and key, posting a CSR with a new key and the same subject
    and SAN, gets 200 and a new certificate for that key; without a client certificate it gets 401."""
    service = est(pki.home)
    tls, current, _ = tw_credential(pki)
    csr, key = make_csr(tmp_path, subject="/CN=TW", san=f"URI:{uris(current)[0]}")
    before = serials(pki.home)

    anonymous = reenroll(service, pki.home, csr)
    assert anonymous.status == 401, anonymous
    assert "www-authenticate" not in anonymous.headers  # a password would not help: only a certificate
    assert serials(pki.home) == before

    reply = reenroll(service, pki.home, csr, *tls)
    assert reply.status == 200, reply
    successor = only_certificate(reply.body)
    assert successor.serial_number != current.serial_number
    assert spki(successor) == public_key_der(key)
    assert successor.subject == current.subject and uris(successor) == uris(current) == [TW_URI]
    assert "OK" in openssl_verify_client(pki.home, successor, tmp_path)
    assert serials(pki.home) - before == {successor.serial_number}


def test_a_gateway_renews_over_est_with_its_own_certificate(pki, est, tmp_path):
    """curl with the gateway's certificate chain and key gets a successor with the same DNS and IP
    SANs (RFC 7030 4.2.2); a serverAuth-only certificate (the profile before gateways got
    clientAuth) is refused by OpenSSL at the TLS layer and nothing is issued."""
    service = est(pki.home)
    files = live_files(pki.gateway)
    current = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    csr, key = make_csr(tmp_path, subject="/CN=gw", san="IP:127.0.0.1")
    before = serials(pki.home)

    reply = reenroll(service, pki.home, csr, "--cert", str(files["fullchain"]), "--key", str(files["privkey"]))
    assert reply.status == 200, reply
    successor = only_certificate(reply.body)
    assert spki(successor) == public_key_der(key) and successor.subject == current.subject
    assert successor.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert serials(pki.home) - before == {successor.serial_number}

    # The old profile: serverAuth only, signed by our issuing CA.
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    old_key = generate_key()
    old = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(pki.ca.issuing.subject)
           .public_key(old_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(current.not_valid_before_utc).not_valid_after(current.not_valid_after_utc)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(old_key.public_key()), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.issuing.public_key()), critical=False)
           .sign(issuing_key, hashes.SHA256()))
    chain, keyfile = tmp_path / "old-chain.pem", tmp_path / "old-key.pem"
    chain.write_bytes(certificates_to_pem([old, *pki.ca.chain]))
    keyfile.write_bytes(private_key_to_pem(old_key))
    csr2, _ = make_csr(tmp_path, subject="/CN=gw", san="IP:127.0.0.1")
    refused = reenroll(service, pki.home, csr2, "--cert", str(chain), "--key", str(keyfile), "--tls-max", "1.2")
    assert refused.returncode == 35 and refused.status == 0, refused
    assert serials(pki.home) - before == {successor.serial_number}


def test_simplereenroll_refuses_a_foreign_client_certificate_at_tls(pki, est, tmp_path):
    """A client certificate from a foreign CA (trustme) with TW's name fails the TLS handshake
    under curl and nothing is issued; the same command with TW's real credential succeeds."""
    service = est(pki.home)
    tls, current, _ = tw_credential(pki)
    leaf = trustme.CA().issue_cert("tw.example.lan", common_name="TW")
    chain, key = tmp_path / "foreign-chain.pem", tmp_path / "foreign-key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    csr, _ = make_csr(tmp_path, subject="/CN=TW", san=f"URI:{uris(current)[0]}")
    before = serials(pki.home)

    # TLS 1.3: curl's handshake "succeeds" and the refusal shows on the first read (the server
    # closes without an alert: curl 52, or 56 on an alert); TLS 1.2: the handshake itself fails (35).
    foreign = reenroll(service, pki.home, csr, "--cert", str(chain), "--key", str(key))
    assert foreign.returncode in (35, 52, 56) and foreign.status == 0, foreign
    foreign12 = reenroll(service, pki.home, csr, "--cert", str(chain), "--key", str(key), "--tls-max", "1.2")
    assert foreign12.returncode == 35 and foreign12.status == 0, foreign12
    assert serials(pki.home) == before
    assert reenroll(service, pki.home, csr, *tls).status == 200  # negative control


def test_simplereenroll_refuses_the_same_key_and_a_changed_identity(pki, est, tmp_path):
    """With TW's valid certificate, a CSR reusing the current key, a CSR with another subject and
    one with another SAN each get 403 and issue nothing (RFC 7030 4.2.2)."""
    service = est(pki.home)
    tls, current, current_key = tw_credential(pki)
    san = f"URI:{uris(current)[0]}"
    before = serials(pki.home)

    same_key = reenroll(service, pki.home, make_csr(tmp_path, subject="/CN=TW", san=san, key=current_key)[0], *tls)
    assert same_key.status == 403 and "new key" in same_key.text, same_key
    subject = reenroll(service, pki.home, make_csr(tmp_path, subject="/CN=TW/O=elsewhere", san=san)[0], *tls)
    assert subject.status == 403 and "subject" in subject.text, subject
    other_san = reenroll(service, pki.home, make_csr(tmp_path, subject="/CN=TW", san="URI:spiffe://pkictl.internal/node/gw")[0], *tls)
    assert other_san.status == 403 and "alternative names" in other_san.text, other_san
    assert serials(pki.home) == before


def test_simplereenroll_refuses_a_revoked_certificate(pki, est, tmp_path):
    """The request that renewed TW gets 403 naming the revocation after 'pkictl revoke TW'."""
    service = est(pki.home)
    tls, current, _ = tw_credential(pki)
    san = f"URI:{uris(current)[0]}"
    assert reenroll(service, pki.home, make_csr(tmp_path, subject="/CN=TW", san=san)[0], *tls).status == 200

    pkictl(pki.home, "revoke", "TW")
    before = serials(pki.home)
    revoked = reenroll(service, pki.home, make_csr(tmp_path, subject="/CN=TW", san=san)[0], *tls)
    assert revoked.status == 403 and "revoked" in revoked.text, revoked
    assert serials(pki.home) == before


def test_simplereenroll_refuses_an_expired_certificate(pki, est, tmp_path):
    """A certificate of this CA that expired (issued by the CA with its clock 200 days back) cannot
    renew: curl's TLS connection is refused and nothing is issued; a current one renews (control)."""
    past = CertificateAuthority.load(pki.home, clock=FixedClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=200)))
    old = past.enroll("node", "old", out=tmp_path / "old").directory
    past.close()
    files = live_files(old)
    expired = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    assert expired.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    service = est(pki.home)
    csr, _ = make_csr(tmp_path, subject="/CN=old", san=f"URI:{uris(expired)[0]}")
    before = serials(pki.home)

    # why it is refused: openssl's own verification of the chain says "expired"
    verify = subprocess.run([OPENSSL, "verify", "-CAfile", str(pki.home / "ca.pem"), "-untrusted", str(files["chain"]), str(files["cert"])],
                            check=False, capture_output=True, text=True, timeout=DEADLINE)
    assert verify.returncode != 0 and "certificate has expired" in verify.stdout + verify.stderr

    tls = ["--cert", str(files["fullchain"]), "--key", str(files["privkey"])]
    refused = reenroll(service, pki.home, csr, *tls)
    assert refused.returncode in (35, 52, 56) and refused.status == 0, refused  # TLS 1.3: refused after the handshake
    refused12 = reenroll(service, pki.home, csr, *tls, "--tls-max", "1.2")
    assert refused12.returncode == 35 and refused12.status == 0, refused12  # TLS 1.2: the handshake fails
    assert serials(pki.home) == before
    tls, current, _ = tw_credential(pki)
    control = make_csr(tmp_path, subject="/CN=TW", san=f"URI:{uris(current)[0]}")[0]
    assert reenroll(service, pki.home, control, *tls).status == 200


# -- caps --------------------------------------------------------------------------------------------


def test_body_size_and_content_type_caps(fresh_home, est, tmp_path):
    """A body over 16 KiB gets 413 (16 KiB exactly is read and refused as no CSR, 400); Content-Type
    text/plain gets 400 where application/pkcs10 with the same CSR is accepted."""
    service = est(fresh_home)
    url, ca_pem = service.url + EST + "/simpleenroll", fresh_home / "ca.pem"

    too_big = curl(url, cacert=ca_pem, data=b"A" * (16 * 1024 + 1), content_type="application/pkcs10")
    assert too_big.status == 413, too_big
    at_cap = curl(url, cacert=ca_pem, data=b"A" * (16 * 1024), content_type="application/pkcs10")
    assert at_cap.status == 400 and "signing request" in at_cap.text, at_cap

    body = est_body(make_csr(tmp_path)[0])
    text = curl(url, cacert=ca_pem, data=body, content_type="text/plain")
    assert text.status == 400 and "application/pkcs10" in text.text, text
    assert curl(url, cacert=ca_pem, data=body, content_type="application/pkcs10").status == 202


def test_simplereenroll_answers_a_malformed_request_with_400(pki, est, tmp_path):
    """On simplereenroll a text/plain body and a body that is no CSR get 400 (a bad request, not a
    403 refusal of the certificate); the same CSR as application/pkcs10 renews."""
    service = est(pki.home)
    tls, current, _ = tw_credential(pki)
    csr, _ = make_csr(tmp_path, subject="/CN=TW", san=f"URI:{uris(current)[0]}")
    text = reenroll(service, pki.home, csr, *tls, content_type="text/plain")
    assert text.status == 400, text
    garbage = curl(service.url + EST + "/simplereenroll", *tls, cacert=pki.home / "ca.pem", data=b"bm90IGEgQ1NS",
                   content_type="application/pkcs10")
    assert garbage.status == 400, garbage
    assert reenroll(service, pki.home, csr, *tls).status == 200


def test_more_than_burst_requests_at_once_get_429_with_retry_after(fresh_home, est):
    """Six parallel curl requests from one address against burst 3 get three 200s and three 429s
    with Retry-After; at that moment a client from another loopback address is still served."""
    service = est(fresh_home, burst=3, rate=0.2)
    url = service.url + EST + "/cacerts"
    argv = ["--parallel", "--parallel-immediate", "--parallel-max", "6", "-w", "%{http_code} [%header{retry-after}]\n"]
    for _ in range(6):
        argv += ["-o", "/dev/null", url]
    result = subprocess.run([CURL, "-sS", "--max-time", str(int(DEADLINE)), "--cacert", str(fresh_home / "ca.pem"), *argv],
                            check=False, capture_output=True, text=True, timeout=DEADLINE + 5)
    lines = sorted(result.stdout.split("\n")[:-1])
    assert len(lines) == 6, result
    assert lines[:3] == ["200 []"] * 3, lines
    for line in lines[3:]:
        status, retry_after = re.fullmatch(r"(\d+) \[(\d*)\]", line).groups()
        assert status == "429" and retry_after and int(retry_after) >= 1, lines

    limited = curl(url, cacert=fresh_home / "ca.pem")
    assert limited.status == 429 and int(limited.headers["retry-after"]) >= 1, limited
    elsewhere = curl(url, "--interface", "127.0.0.2", cacert=fresh_home / "ca.pem")
    assert elsewhere.status == 200, elsewhere


# -- the CRL ---------------------------------------------------------------------------------------


def test_crl_is_der_that_openssl_parses_and_lists_a_revoked_serial(pki, est, tmp_path):
    """curl GET /crl answers application/pkix-crl that 'openssl crl -inform DER' parses and verifies
    against the issuing CA; TW's serial is absent, and listed after 'pkictl revoke TW'; /crl.pem is PEM."""
    service = est(pki.home)
    tw_serial = x509.load_pem_x509_certificate(live_files(pki.node)["cert"].read_bytes()).serial_number

    def fetch() -> str:
        reply = curl(service.url + "/crl", cacert=pki.home / "ca.pem")
        assert reply.status == 200 and reply.headers["content-type"] == "application/pkix-crl", reply
        der = tmp_path / "crl.der"
        der.write_bytes(reply.body)
        result = openssl("crl", "-inform", "DER", "-in", str(der), "-CAfile", str(pki.home / "issuing" / "cert.pem"), "-noout", "-text")
        assert pki.ca.issuing.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value in result.decode()
        return result.decode()

    assert tw_serial not in crl_serials(fetch())
    pkictl(pki.home, "revoke", "TW")
    assert tw_serial in crl_serials(fetch())
    pem = curl(service.url + "/crl.pem", cacert=pki.home / "ca.pem")
    assert pem.status == 200 and pem.body.startswith(b"-----BEGIN X509 CRL-----")


# -- the service's own certificate -----------------------------------------------------------------


def server_serial_openssl(port: int, ca_pem: Path) -> int:
    """The serial of the certificate the service shows to a fresh ``openssl s_client`` (verified)."""
    shown = openssl("s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_pem), "-verify_return_error",
                    "-verify_ip", "127.0.0.1", input=b"")
    serial = openssl("x509", "-noout", "-serial", input=shown).decode()
    return int(serial.strip().split("=", 1)[1], 16)


SERVICE_SERIAL = re.compile(r"service certificate serial ([0-9a-f]+)")


def logged_serials(serve: ServeProcess) -> list[int]:
    """Serials of the service certificates 'pkictl serve' logged so far, oldest first."""
    return [int(m.group(1), 16) for line in serve.log.text().splitlines() if (m := SERVICE_SERIAL.search(line))]


def test_service_renews_its_own_certificate_while_old_connections_keep_working(tmp_path):
    """'pkictl serve' with 6 s service certificates logs a new serial, which a fresh openssl
    connection then sees, while a keep-alive connection opened before still gets answers."""
    home = tmp_path / "ca"
    pkictl(home, "init-ca", "--gateway-lifetime", "6s")
    serve = ServeProcess(home, "--check-interval", "0.5")
    try:
        ctx = ssl.create_default_context(cafile=str(home / "ca.pem"))
        old = http.client.HTTPSConnection("127.0.0.1", serve.port, context=ctx, timeout=DEADLINE)
        old.request("GET", EST + "/cacerts")
        first = old.getresponse()
        assert first.status == 200 and first.read()
        sock = old.sock
        old_serial = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
        assert old_serial in logged_serials(serve)
        assert server_serial_openssl(serve.port, home / "ca.pem") in logged_serials(serve)

        line = next(i for i, text in enumerate(serve.log.lines) if f"serial {old_serial:x}" in text)
        serve.log.wait_for(rf"service certificate serial (?!{old_serial:x}\b)[0-9a-f]+", start=line + 1)
        fresh = server_serial_openssl(serve.port, home / "ca.pem")
        assert fresh != old_serial and fresh in logged_serials(serve)

        old.request("GET", EST + "/cacerts")  # the keep-alive connection still works, on its old certificate
        response = old.getresponse()
        assert response.status == 200 and response.read()
        assert old.sock is sock
        assert x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number == old_serial
        old.close()
    finally:
        assert serve.stop() == 0
