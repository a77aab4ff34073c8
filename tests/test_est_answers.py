"""Every 4xx of a real 'pkictl serve' says what was wrong and what was expected: one table of real
HTTPS requests (curl, and Python http.client for what curl will not send), each with its status,
the words its body must hold, and the same checks on every body: one line, nothing from the peer
unescaped or unbounded, and every pkictl command it names a real one."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.client
import re
import shlex
import ssl
from pathlib import Path
from typing import Callable

import pytest

from pkictl.authority import CertificateAuthority
from pkictl.profile import node_identity

from est_support import EST, Reply, ServeProcess, curl, est_body, make_csr, pkictl
from support import DEADLINE, live_files
from test_docs_commands import check_invocation

PKCS10 = "application/pkcs10"


@pytest.fixture
def serve(pki):
    process = ServeProcess(pki.home, "--workers", "0")
    yield process
    assert process.stop() == 0


@dataclasses.dataclass
class Env:
    """What a case needs: the server, the CA home, a scratch directory and TW's credential."""

    serve: ServeProcess
    home: Path
    tmp: Path

    @property
    def ca_pem(self) -> Path:
        return self.home / "ca.pem"

    def get(self, path: str, *args: str) -> Reply:
        return curl(self.serve.url + path, *args, cacert=self.ca_pem)

    def post(self, path: str, data: bytes, *args: str, content_type: str | None = PKCS10) -> Reply:
        return curl(self.serve.url + path, *args, cacert=self.ca_pem, data=data, content_type=content_type)

    def csr(self, subject: str = "/CN=n3", san: str | None = None) -> bytes:
        return est_body(make_csr(self.tmp, subject=subject, san=san)[0])

    def tw_tls(self) -> list[str]:
        files = live_files(self.home.parent / "TW")
        return ["--cert", str(files["fullchain"]), "--key", str(files["privkey"])]

    def raw(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Reply:
        """One request by http.client over real TLS, for header values curl would not send."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        connection = http.client.HTTPSConnection("127.0.0.1", self.serve.port, context=ctx, timeout=DEADLINE)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Reply(0, response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), "")
        finally:
            connection.close()


TW_SAN = f"URI:{node_identity('pkictl.internal', 'tw')}"
SERVED = [f"GET {EST}/cacerts", f"GET {EST}/csrattrs", f"POST {EST}/simpleenroll", f"POST {EST}/simplereenroll", "GET /crl"]
BASIC = ["HTTP Basic", "user = the node name", "password = the one-time token", "pkictl enroll-node NAME --token"]
CSR = ["base64 of a DER PKCS#10 CSR", "at most 16384 bytes", "spiffe://<trust domain>/node/<name>", f"GET {EST}/csrattrs"]


def _token(env: Env, name: str) -> str:
    return pkictl(env.home, "enroll-node", name, "--token").stdout.splitlines()[1].strip()


def _denied(env: Env) -> Reply:
    body = env.csr("/CN=n4")
    assert env.post(f"{EST}/simpleenroll", body).status == 202
    pkictl(env.home, "deny", "n4")
    return env.post(f"{EST}/simpleenroll", body)


# case -> (the request, status, words the body must hold)
CASES: dict[str, tuple[Callable[[Env], Reply], int, list[str]]] = {
    "unknown path": (lambda e: e.get(f"{EST}/cacert"), 404, ["no resource at '/.well-known/est/cacert'", *SERVED]),
    "an EST operation not offered": (lambda e: e.post(f"{EST}/serverkeygen", b""), 404, ["not offered", "where it is used", *SERVED]),
    "a CA label in the path": (lambda e: e.get(f"{EST}/ca1/cacerts"), 404, ["no CA label", *SERVED]),
    "GET on simpleenroll": (lambda e: e.get(f"{EST}/simpleenroll"), 405, ["method 'GET'", "want POST", *CSR]),
    "POST on cacerts": (lambda e: e.post(f"{EST}/cacerts", b""), 405, ["method 'POST'", "want GET"]),
    "wrong Content-Type": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(), content_type="text/plain"), 400,
                           ["Content-Type 'text/plain'", "want application/pkcs10", *CSR]),
    "body not base64": (lambda e: e.post(f"{EST}/simpleenroll", b"A"), 400, ["not base64", *CSR]),
    "body not a CSR": (lambda e: e.post(f"{EST}/simpleenroll", b"bm90IGEgQ1NS"), 400, ["not a PKCS#10", *CSR]),
    "body too large": (lambda e: e.post(f"{EST}/simpleenroll", b"A" * (16 * 1024 + 1)), 413,
                       ["over 16384 bytes", "at most 16384 bytes", "application/pkcs10"]),
    "Authorization not Basic": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(), "-H", "Authorization: Bearer abc"), 401,
                                ["not HTTP Basic", *BASIC]),
    "a wrong token": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(), "-u", "n3:not-the-token"), 401,
                      ["the enrollment token for n3 is wrong, expired or already used", "pkictl enroll-node n3 --token", *BASIC]),
    "another node's token": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(), "-u", f"n3:{_token(e, 'n5')}"), 401,
                             ["the enrollment token for n3 is wrong", *BASIC]),
    "a Basic user that is no node name": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(), "-u", "n 3!:x"), 400,
                                          ["HTTP Basic user 'n 3!' is no node name", "DNS label", *BASIC]),
    "a CSR naming another node than the user": (lambda e: e.post(f"{EST}/simpleenroll", e.csr("/CN=n9"), "-u", f"n3:{_token(e, 'n3')}"),
                                                400, ["CSR subject 'CN=n9'", "want CN=n3 or an empty subject"]),
    "a CSR with a foreign SAN": (lambda e: e.post(f"{EST}/simpleenroll", e.csr(san="URI:spiffe://other/node/n3"), "-u", "n3:x"), 400,
                                 ["spiffe://other/node/n3", "want none or exactly ['spiffe://pkictl.internal/node/n3']"]),
    "the token of an enrolled node": (lambda e: e.post(f"{EST}/simpleenroll", e.csr("/CN=TW"), "-u", f"TW:{_token_replace_free(e)}"),
                                      403, ["already", "pkictl enroll-node TW --token --replace"]),
    "a denied request": (_denied, 403, ["denied the request of n4", "a request with a new key waits for approval"]),
    "simplereenroll without a client certificate": (lambda e: e.post(f"{EST}/simplereenroll", e.csr("/CN=TW", TW_SAN)), 401,
                                                    ["no TLS client certificate", "--cert fullchain.pem --key privkey.pem", "simpleenroll"]),
    "simplereenroll changing the SAN": (lambda e: e.post(f"{EST}/simplereenroll", e.csr("/CN=TW", "URI:spiffe://pkictl.internal/node/x"),
                                                         *e.tw_tls()), 403,
                                        ["alternative names differ", "got ['spiffe://pkictl.internal/node/x']",
                                         "want exactly ['spiffe://pkictl.internal/node/tw']"]),
    "simplereenroll with a body not a CSR": (lambda e: e.post(f"{EST}/simplereenroll", b"bm90IGEgQ1NS", *e.tw_tls()), 400,
                                             ["not a PKCS#10", *CSR]),
}


def _token_replace_free(env: Env) -> str:
    """A token for TW, which holds a current certificate: made by the library (the CLI refuses it
    without --replace, as the CA would), so that simpleenroll's own 403 is what is tested."""
    ca = CertificateAuthority.load(env.home)
    try:
        now = ca.clock.now()
        ca.inventory.add_token("TW", hashlib.sha256(b"tw-token").hexdigest(), now=now, expires_at=now + dt.timedelta(minutes=5))
    finally:
        ca.close()
    return "tw-token"


def _named_commands(text: str) -> list[list[str]]:
    """The pkictl commands a body names with options: 'pkictl SUBCOMMAND NAME --OPTION ...'."""
    found = []
    for match in re.finditer(r"\bpkictl ([a-z][a-z-]+ [A-Za-z0-9]+(?: --[a-z-]+)+)", text):
        found.append(["pkictl", *shlex.split(match.group(1))])
    return found


def test_every_4xx_says_what_was_wrong_and_what_was_expected(pki, serve, tmp_path):
    """Each case of the table gets its status and a one-line body holding the words listed; the
    pkictl commands a body names exist; 401s carry WWW-Authenticate on simpleenroll only."""
    env = Env(serve, pki.home, tmp_path)
    failures = []
    for case, (request, status, words) in CASES.items():
        reply = request(env)
        body = reply.text
        missing = [w for w in words if w not in body]
        if reply.status != status or missing or body.count("\n") != 1:
            failures.append(f"{case}: got {reply.status} {body!r}; want {status} with {missing}")
            continue
        for command in _named_commands(body):
            check_invocation(command)
        if status == 401:  # a token helps a first enrollment only; a renewal needs a certificate
            assert ("www-authenticate" in reply.headers) == ("simplereenroll" not in case), (case, reply.headers)
    assert not failures, "\n".join(failures)


def test_what_the_peer_sent_is_escaped_and_cut_short_in_the_answer(pki, serve, tmp_path):
    """A path of 5000 characters and a Content-Type of 3000 come back cut to about 100 with '...',
    a %0A in the path comes back escaped, and every answer stays one line; the short, plain path
    of the control comes back whole."""
    env = Env(serve, pki.home, tmp_path)
    long = env.get("/" + "x" * 5000)
    assert long.status == 404 and "x" * 99 in long.text and "x" * 200 not in long.text and "'..." in long.text, long
    assert len(long.text) < 1000, len(long.text)

    newline = env.get("/a%0Aforged")
    assert newline.status == 404 and "'/a\\nforged'" in newline.text and newline.text.count("\n") == 1, newline

    # aiohttp refuses control characters in a header itself; a long Content-Type reaches us
    wordy = env.raw("POST", f"{EST}/simpleenroll", {"Content-Type": "text/" + "y" * 3000}, env.csr())
    assert wordy.status == 400 and "y" * 90 in wordy.text and "y" * 200 not in wordy.text and "want application/pkcs10" in wordy.text, wordy

    plain = env.get("/nothing-here")  # control: a short path is quoted whole
    assert plain.status == 404 and "no resource at '/nothing-here':" in plain.text, plain


def test_the_how_to_of_a_401_is_in_the_answer_not_on_the_log_line(pki, serve, tmp_path):
    """The 401 hint (how to send a token) is in the answer, not repeated on the log line, which
    keeps the CA's own words (control: the log line of the same refusal)."""
    env = Env(serve, pki.home, tmp_path)
    start = serve.log.mark()
    reply = env.post(f"{EST}/simpleenroll", env.csr(), "-u", "n3:wrong")
    assert reply.status == 401 and "user = the node name" in reply.text, reply
    line = serve.log.wait_for(rf"refused peer=127\.0\.0\.1:{reply.local_port} .*", start=start).group(0)
    assert "reason='bad token'" in line and "user = the node name" not in line, line
