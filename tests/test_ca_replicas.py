"""Two `pkictl serve` replicas of one CA on one real PostgreSQL server keep the guarantees one
host keeps: a pairing request approved through one is issued by the other, a token works once,
one identity has one live certificate, a revocation through one is in the other's CRL within the
follow interval, CRL numbers only grow, and killing a replica in a renewal flood loses nothing
and issues nothing twice.

Each replica is a real subprocess with its own CA home (`pkictl db replica`), its own service
certificate (`--replica`) and its own port; the clients are curl and openssl. The PostgreSQL
server comes from tests/pg.py (run as its unprivileged user when the tests run as root).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import re
import select
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import yaml
from cryptography import x509

from est_support import EST, ServeProcess, certs_only, curl, est_body, make_csr, pkictl
from support import DEADLINE, command, free_port
from pkictl.store import CredentialStore
from pkictl.crl import crl_number
from pkictl.storage.database import POOL_WAIT

# A short follow interval keeps the test quick; the bound asserted is the interval plus the time a
# loaded 2-core machine may take to run the job and answer (docs/design.md, "CA replicas").
FOLLOW = 0.5
CRL_BOUND = FOLLOW + 5.0
_names = itertools.count(1)


def _serve(home: Path, name: str, check_interval: float = 3600) -> ServeProcess:
    return ServeProcess(home, "--replica", name, "--follow-interval", str(FOLLOW), "--rate", "1000", "--burst", "1000",
                        "--check-interval", str(check_interval))


class Replicas:
    """A CA made with ``init-ca --db`` in ``a``, its replica home ``b`` (``pkictl db replica``),
    and a `pkictl serve` on each."""

    def __init__(self, root: Path, url: str) -> None:
        self.url = url
        self.a, self.b = root / "a", root / "b"
        pkictl(self.a, "init-ca", "--db", url)
        pkictl(self.a, "db", "replica", str(self.b))
        assert not (self.b / "root" / "key.pem").exists()
        self.ca_pem = self.a / "ca.pem"
        self.serve = {"a": _serve(self.a, "a"), "b": _serve(self.b, "b")}

    def restart(self, which: str) -> None:
        self.serve[which].stop()
        self.serve[which] = _serve(self.a if which == "a" else self.b, which)

    def close(self) -> None:
        for process in self.serve.values():
            process.stop()

    def enroll(self, prefix: str, count: int = 1) -> list[tuple[str, Path]]:
        """``count`` new nodes enrolled through replica a's home (the CA library, in this process,
        on the shared database): their names and bundle directories."""
        from pkictl.authority import CertificateAuthority

        ca = CertificateAuthority.load(self.a)
        try:
            names = [f"{prefix}{next(_names)}" for _ in range(count)]
            return [(name, ca.enroll("node", name, out=self.a / "bundles" / name).directory) for name in names]
        finally:
            ca.close()

    def tokens(self, names: list[str]) -> list[str]:
        """A one-time token for each of ``names`` (as `pkictl enroll-node NAME --token` makes them), in this process."""
        from pkictl.authority import CertificateAuthority

        ca = CertificateAuthority.load(self.a)
        try:
            return [ca.create_token(name)[0] for name in names]
        finally:
            ca.close()

    def query(self, sql: str, *params) -> list[tuple]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def replicas(postgres_cluster, tmp_path_factory):
    pair = Replicas(tmp_path_factory.mktemp("replicas"), postgres_cluster.create_database("replicas"))
    try:
        yield pair
    finally:
        pair.close()


def _enroll_url(replicas: Replicas, which: str) -> str:
    return replicas.serve[which].url + EST + "/simpleenroll"


def _reenroll(replicas: Replicas, which: str, bundle: Path, csr: Path):
    return curl(replicas.serve[which].url + EST + "/simplereenroll", "--cert", str(bundle / "fullchain.pem"),
                "--key", str(bundle / "privkey.pem"), cacert=replicas.ca_pem, data=est_body(csr), content_type="application/pkcs10")


def _certificate(body: bytes) -> x509.Certificate:
    return certs_only(body)[0]


def _renewal_csr(bundle: Path, directory: Path) -> Path:
    """A CSR for a new key with the subject and SAN of the bundle's certificate (RFC 7030 4.2.2)."""
    current = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
    uri = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)[0]
    cn = current.subject.rfc4514_string().removeprefix("CN=")
    return make_csr(directory, subject=f"/CN={cn}", san=f"URI:{uri}")[0]


def _crl(replicas: Replicas, which: str) -> x509.CertificateRevocationList:
    reply = curl(replicas.serve[which].url + "/crl", cacert=replicas.ca_pem)
    assert reply.status == 200, reply
    return x509.load_der_x509_crl(reply.body)


def _at_once(calls):
    """Run the callables on threads of their own, started together; their results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=DEADLINE * 2) for f in futures]


def test_each_replica_has_its_own_service_certificate_and_neither_has_the_root_key(replicas):
    """Both replicas serve /cacerts from the same CA, each with a service certificate of its own
    name in the shared inventory, so that neither supersedes (and revokes) the other's."""
    rows = replicas.query("SELECT name FROM certificates WHERE kind = 'service' AND status = 'issued' AND superseded = 0 ORDER BY name")
    assert [r[0] for r in rows] == ["est-a", "est-b"]
    assert (replicas.a / "root" / "key.pem").exists() and not (replicas.b / "root" / "key.pem").exists()
    for which in ("a", "b"):
        assert curl(replicas.serve[which].url + EST + "/cacerts", cacert=replicas.ca_pem).status == 200


def test_a_request_approved_through_one_replica_is_issued_by_the_other(replicas, tmp_path):
    """A node's first poll of replica a waits (202) with a code; replica b knows the same request
    (same code) before approval; `pkictl approve` on b's host lets the node's next poll of b get
    its certificate, and a poll of a returns that same certificate."""
    name = f"pair{next(_names)}"
    csr, _ = make_csr(tmp_path, subject=f"/CN={name}")
    body = est_body(csr)

    def poll(which: str):
        return curl(_enroll_url(replicas, which), cacert=replicas.ca_pem, data=body, content_type="application/pkcs10")

    first = poll("a")
    assert first.status == 202, first
    code = re.search(r"\(code ([A-Z2-7]{4}-[A-Z2-7]{4})\)", first.text).group(1)
    waiting = poll("b")
    assert waiting.status == 202 and f"(code {code})" in waiting.text, waiting  # negative control: not yet
    pkictl(replicas.b, "approve", name, "--code", code)
    issued = poll("b")
    assert issued.status == 200, issued
    again = poll("a")
    assert again.status == 200 and _certificate(again.body).serial_number == _certificate(issued.body).serial_number


def test_a_token_works_once_across_replicas(replicas, tmp_path):
    """Six enrollments with one token, three at each replica at once, each with its own key:
    exactly one certificate; the other five are refused and nothing else is recorded."""
    name = f"tok{next(_names)}"
    token = pkictl(replicas.a, "enroll-node", name, "--token").stdout.splitlines()[1].strip()
    bodies = [est_body(make_csr(tmp_path / str(i), subject=f"/CN={name}")[0]) for i in range(6)]
    replies = _at_once([
        (lambda which=which, body=body: curl(_enroll_url(replicas, which), "-u", f"{name}:{token}", cacert=replicas.ca_pem,
                                             data=body, content_type="application/pkcs10"))
        for which, body in zip("ababab", bodies, strict=True)])
    statuses = sorted(r.status for r in replies)
    assert statuses.count(200) == 1, [(r.status, r.text[:120]) for r in replies]
    assert all(s in (401, 409) for s in statuses if s != 200), statuses
    rows = replicas.query("SELECT serial FROM certificates WHERE kind = 'node' AND name_key = %s AND status = 'issued'", name.lower())
    assert len(rows) == 1


def test_first_enrollments_of_one_name_at_both_replicas_get_one_certificate(replicas, tmp_path):
    """Six tokens for one name, each spent at once (three at each replica) with its own key:
    exactly one certificate for the name; the others are refused as already enrolled. And one key
    sent as six names' at once: certified for one of them only.

    Mutation: PostgresDatabase.begin without the writers' advisory lock lets two through (the
    name check and the insert are no longer one step across replicas)."""
    name = f"first{next(_names)}"
    tokens = replicas.tokens([name] * 6)
    bodies = [est_body(make_csr(tmp_path / str(i), subject=f"/CN={name}")[0]) for i in range(6)]
    replies = _at_once([
        (lambda which=which, token=token, body=body: curl(_enroll_url(replicas, which), "-u", f"{name}:{token}",
                                                          cacert=replicas.ca_pem, data=body, content_type="application/pkcs10"))
        for which, token, body in zip("ababab", tokens, bodies, strict=True)])
    assert [r.status for r in replies].count(200) == 1, [(r.status, r.text[:120]) for r in replies]
    assert all("already enrolled" in r.text or "being enrolled" in r.text for r in replies if r.status != 200), \
        [(r.status, r.text[:160]) for r in replies]
    rows = replicas.query("SELECT serial FROM certificates WHERE kind = 'node' AND name_key = %s AND status = 'issued'", name.lower())
    assert len(rows) == 1

    names = [f"key{next(_names)}" for _ in range(6)]
    key = make_csr(tmp_path / "shared", subject="/CN=x")[1]
    shared = [(n, token, est_body(make_csr(tmp_path / n, subject=f"/CN={n}", key=key)[0]))
              for n, token in zip(names, replicas.tokens(names), strict=True)]
    replies = _at_once([
        (lambda which=which, n=n, token=token, body=body: curl(_enroll_url(replicas, which), "-u", f"{n}:{token}",
                                                               cacert=replicas.ca_pem, data=body, content_type="application/pkcs10"))
        for which, (n, token, body) in zip("ababab", shared, strict=True)])
    assert [r.status for r in replies].count(200) == 1, [(r.status, r.text[:120]) for r in replies]
    assert all("key" in r.text for r in replies if r.status != 200), [(r.status, r.text[:160]) for r in replies]


def test_renewals_of_one_certificate_at_both_replicas_get_one_successor(replicas, tmp_path):
    """Eight renewals of the same certificate with eight new keys, four at each replica at once:
    exactly one successor is issued and recorded; the others are refused as superseded."""
    ((name, bundle),) = replicas.enroll("dup")
    current = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
    csrs = [_renewal_csr(bundle, tmp_path / str(i)) for i in range(8)]
    replies = _at_once([(lambda which=which, csr=csr: _reenroll(replicas, which, bundle, csr)) for which, csr in zip("abababab", csrs, strict=True)])
    winners = [r for r in replies if r.status == 200]
    assert len(winners) == 1, [(r.status, r.text[:160]) for r in replies]
    refused = [r for r in replies if r.status != 200]
    assert {r.status for r in refused} <= {403, 409} and all("superseded" in r.text for r in refused), [(r.status, r.text[:160]) for r in refused]
    successor = _certificate(winners[0].body)
    rows = replicas.query("SELECT successor FROM certificates WHERE serial = %s", f"{current.serial_number:x}")
    assert rows == [(f"{successor.serial_number:x}",)]
    live = replicas.query("SELECT serial FROM certificates WHERE kind = 'node' AND name_key = %s AND status = 'issued' "
                          "AND superseded = 0", name.lower())
    assert live == [(f"{successor.serial_number:x}",)]


def test_a_revocation_through_one_replica_is_in_the_other_replicas_crl_within_the_bound(replicas):
    """`pkictl revoke` on replica a's host: replica b publishes the CRL from the shared database
    within the follow interval (its log says so), its /crl lists the serial, and both replicas
    then serve the same CRL with a higher number than before."""
    ((name, bundle),) = replicas.enroll("rev")
    serial = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes()).serial_number
    before = _crl(replicas, "b")
    assert serial not in {entry.serial_number for entry in before}  # negative control
    mark = replicas.serve["b"].log.mark()
    pkictl(replicas.a, "revoke", name)
    revoked_at = time.monotonic()
    log = replicas.serve["b"].log
    log.wait_for(r"CRL from the shared database published", timeout=CRL_BOUND, start=mark)
    delay = log.stamps[log.last_index] - revoked_at
    assert delay <= CRL_BOUND, delay
    print(f"revocation through a reached b's CRL in {delay:.2f} s (bound {CRL_BOUND:g} s)")
    after_b, after_a = _crl(replicas, "b"), _crl(replicas, "a")
    assert serial in {entry.serial_number for entry in after_b}
    assert crl_number(after_b) > crl_number(before)
    assert after_a.public_bytes(serialization_der()) == after_b.public_bytes(serialization_der())


def serialization_der():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER


def test_crl_numbers_strictly_increase_under_revocations_through_both_replicas(replicas):
    """Six revocations at once, three through each replica's home: six CRL numbers taken, each
    once, and both replicas end up serving the highest with every serial on it."""
    nodes = replicas.enroll("many", 6)
    serials = {x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes()).serial_number for _, bundle in nodes}
    start = crl_number(_crl(replicas, "a"))
    marks = {w: replicas.serve[w].log.mark() for w in "ab"}
    _at_once([(lambda home=home, name=name: pkictl(home, "revoke", name))
              for home, (name, _) in zip([replicas.a, replicas.b] * 3, nodes, strict=True)])
    batches = [r[0] for r in replicas.query(
        "SELECT line::json->'serials' FROM audit_records WHERE line::json->>'event' = 'revoked' ORDER BY seq DESC LIMIT 6")]
    assert sorted(s for batch in batches for s in batch) == sorted(f"{s:x}" for s in serials)
    (number,) = replicas.query("SELECT number FROM crls c WHERE EXISTS (SELECT 1 FROM certificates WHERE serial = c.issuer "
                               "AND kind = 'issuing')")[0]
    assert number >= start + 6  # each revocation signed its own CRL number
    for which in "ab":
        log = replicas.serve[which].log
        deadline = time.monotonic() + CRL_BOUND
        crl = _crl(replicas, which)
        while crl_number(crl) != number:  # b catches up on its next follow (a wrote its own crl.pem)
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"replica {which} serves CRL {crl_number(crl)}, the database holds {number}"
            log.wait_for(r"CRL from the shared database published", timeout=remaining, start=marks[which])
            marks[which] = log.last_index + 1
            crl = _crl(replicas, which)
        assert serials <= {entry.serial_number for entry in crl}


def test_killing_a_replica_in_a_renewal_flood_loses_nothing_and_issues_nothing_twice(replicas, tmp_path):
    """Twenty nodes renew through replica a at once; a is killed (SIGKILL) once the first answers
    are out; every node without an answer asks replica b again with the same CSR. Then: every node
    has exactly one successor, the one it was answered; every answered serial is in the audit
    chain, which verifies; and a restarted replica a serves again."""
    nodes = replicas.enroll("flood", 20)
    csrs = {name: _renewal_csr(bundle, tmp_path / name) for name, bundle in nodes}
    killed = concurrent.futures.Future()

    def renew(name: str, bundle: Path):
        reply = _reenroll(replicas, "a", bundle, csrs[name])
        if reply.status == 200 and not killed.done():
            killed.set_result(True)
            replicas.serve["a"].proc.send_signal(signal.SIGKILL)
        return reply

    replies = _at_once([(lambda name=name, bundle=bundle: renew(name, bundle)) for name, bundle in nodes])
    assert killed.done(), [(r.status, r.stderr[:80]) for r in replies]
    replicas.serve["a"].proc.wait(DEADLINE)
    answered: dict[str, int] = {}
    retried = 0
    for (name, bundle), reply in zip(nodes, replies, strict=True):
        if reply.status != 200:
            retried += 1
            reply = _reenroll(replicas, "b", bundle, csrs[name])
        assert reply.status == 200, (name, reply.status, reply.text[:200])
        answered[name] = _certificate(reply.body).serial_number
    for (name, bundle) in nodes:
        current = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
        (successor,) = replicas.query("SELECT successor FROM certificates WHERE serial = %s", f"{current.serial_number:x}")[0]
        assert successor == f"{answered[name]:x}", name
        live = replicas.query("SELECT serial FROM certificates WHERE kind = 'node' AND name_key = %s AND status = 'issued' "
                              "AND superseded = 0", name.lower())
        assert live == [(f"{answered[name]:x}",)], (name, live)
    audited = {r[0] for r in replicas.query("SELECT line::json->>'serial' FROM audit_records WHERE line::json->>'event' = 'issued'")}
    missing = {f"{s:x}" for s in answered.values()} - audited
    assert not missing, f"answered but not in the audit chain: {missing}"
    assert "audit log ok" in pkictl(replicas.b, "audit", "verify").stdout
    print(f"killed replica a with {len(nodes) - retried} of {len(nodes)} renewals answered; {retried} retried at b")
    replicas.restart("a")
    assert curl(replicas.serve["a"].url + EST + "/cacerts", cacert=replicas.ca_pem).status == 200


def test_a_database_outage_is_answered_503_and_the_service_recovers(tmp_path):
    """The database server stops under a running replica: a renewal is answered 503 with a
    Retry-After naming the database (not a 500, and no signing worker lost), /crl and /cacerts
    still answer from what the replica holds, SIGTERM still stops it in time; once the server is
    back the same renewal succeeds. A server of its own: it is stopped mid-test."""
    from pg import PostgresCluster

    with PostgresCluster() as cluster:
        home = tmp_path / "a"
        pkictl(home, "init-ca", "--db", cluster.create_database("outage"))
        ((_, bundle),) = _enroll_in(home, "out")
        csr = _renewal_csr(bundle, tmp_path / "csr")
        service = _serve(home, "a", check_interval=0.5)  # its maintenance runs through the outage
        try:
            def renew():
                return curl(service.url + EST + "/simplereenroll", "--cert", str(bundle / "fullchain.pem"),
                            "--key", str(bundle / "privkey.pem"), cacert=home / "ca.pem", data=est_body(csr),
                            content_type="application/pkcs10")

            gateway = _enroll_gateway(home, tmp_path / "gw")
            cluster.stop()
            # A gateway's report needs the database too. Sent first, it must not hold up what
            # the replica can answer without the database: its write waits on another thread
            # (with the write on the event loop, /cacerts and /crl waited RECORD_WAIT behind it).
            with _report_sent(service, home, gateway) as report, concurrent.futures.ThreadPoolExecutor(1) as background:
                renewal = background.submit(renew)  # waits as long, meanwhile (in the signing worker)
                # Its handler starts a few milliseconds later; five answers in a row while it still
                # waits show the loop was free (with the write on the loop, at most the first one).
                for _ in range(5):
                    assert curl(service.url + EST + "/cacerts", cacert=home / "ca.pem").status == 200
                assert curl(service.url + "/crl", cacert=home / "ca.pem").status == 200
                assert not _answered(report), "the report was answered before /cacerts and /crl were"
                answer = _answer(report)
                refused = renewal.result()
            assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After:" in answer and b"is unavailable" in answer, answer
            # Maintenance (which renews and re-signs through the database on the event loop)
            # found the database away on a records thread and skipped its round.
            service.log.wait_for(r"maintenance skipped until the CA database is back: .*unavailable")
            assert refused.status == 503 and refused.headers.get("retry-after"), refused
            assert "database" in refused.text and "unavailable" in refused.text, refused.text
            assert curl(service.url + "/crl", cacert=home / "ca.pem").status == 200
            assert curl(service.url + EST + "/cacerts", cacert=home / "ca.pem").status == 200
            assert not re.search(r"signing worker \d+: it ended", "\n".join(service.log.lines))  # answered, not crashed
            cluster.start()
            deadline = time.monotonic() + DEADLINE
            reply = renew()
            attempts = 1
            while reply.status == 503 and time.monotonic() < deadline:  # the pool reconnects with a back-off
                reply, attempts = renew(), attempts + 1
            assert reply.status == 200, reply
            print(f"renewed {attempts} request(s) after the database came back")

            # SIGTERM while the database is away again and a report waits for it: the report is
            # still answered (503, within RECORD_WAIT) and the process ends, not after POOL_WAIT.
            cluster.stop()
            with _report_sent(service, home, gateway) as report:
                for _ in range(5):  # as above: the report's handler has started by now
                    assert curl(service.url + EST + "/cacerts", cacert=home / "ca.pem").status == 200
                assert not _answered(report)
                started = time.monotonic()
                service.proc.terminate()
                answer = _answer(report)
                returncode = service.proc.wait(POOL_WAIT + DEADLINE)
                took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 503") and b"no connection within 2 s" in answer, answer
            assert returncode == 0 and took < POOL_WAIT / 2, (returncode, f"{took:.1f} s", "\n".join(service.log.lines[-20:]))
        finally:
            service.stop()


def _enroll_gateway(home: Path, out: Path) -> Path:
    from pkictl.authority import CertificateAuthority

    ca = CertificateAuthority.load(home)
    try:
        return ca.enroll("gateway", "gw", out=out, ip_addresses=["127.0.0.1"]).directory
    finally:
        ca.close()


@contextlib.contextmanager
def _report_sent(service: ServeProcess, home: Path, gateway: Path) -> Iterator[ssl.SSLSocket]:
    """A TLS connection with the gateway's certificate over which a whole report request has
    been written (in the kernel's buffers when this yields), its answer not read yet."""
    context = ssl.create_default_context(cafile=str(home / "ca.pem"))
    context.load_cert_chain(gateway / "fullchain.pem", gateway / "privkey.pem")
    body = json.dumps({"version": 1, "interval": 1.0, "generated_at": "2026-12-02T21:00:00+00:00", "nodes": []}).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=DEADLINE) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /pkictl/v1/gateway-report HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        yield tls


def _answered(tls: ssl.SSLSocket) -> bool:
    return tls.pending() > 0 or bool(select.select([tls], [], [], 0)[0])


def _answer(tls: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket's DEADLINE timeout)."""
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _enroll_in(home: Path, prefix: str) -> list[tuple[str, Path]]:
    from pkictl.authority import CertificateAuthority

    ca = CertificateAuthority.load(home)
    try:
        name = f"{prefix}{next(_names)}"
        return [(name, ca.enroll("node", name, out=home / "bundles" / name).directory)]
    finally:
        ca.close()


def _agent_config(bundle: Path, ca_url: str, *fallbacks: str) -> Path:
    config = bundle / "agent.yaml"
    renewal: dict = {"ca_url": ca_url, "check_interval": "1h"}
    if fallbacks:
        renewal["fallback_ca_urls"] = list(fallbacks)
    config.write_text(yaml.safe_dump({"name": bundle.name, "kind": "node", "credential_dir": ".", "renewal": renewal}))
    return config


def _agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([command("pki-agent"), *args], capture_output=True, text=True, timeout=DEADLINE + 10)


def test_an_agent_whose_replica_is_gone_renews_through_the_next_one(replicas):
    """A node's agent lists replica b after a replica host that is gone (nothing listens on its
    port): `pki-agent renew-now` renews through b and says which replica it left. Without the
    fallback it fails naming the unreachable server, and the certificate stays; a fallback without
    ca_url, or one given twice, is refused as a configuration error."""
    ((name, bundle),) = _enroll_in(replicas.a, "fo")
    gone = f"https://127.0.0.1:{free_port()}"
    before = CredentialStore(bundle).load().certificate.serial_number

    alone = _agent("renew-now", "--config", str(_agent_config(bundle, gone)))
    assert alone.returncode == 1 and f"cannot reach the EST server {gone}" in alone.stdout + alone.stderr, alone
    assert CredentialStore(bundle).load().certificate.serial_number == before

    renewed = _agent("renew-now", "--config", str(_agent_config(bundle, gone, replicas.serve["b"].url)))
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert f"cannot reach the EST server {gone}" in renewed.stderr and f"trying the next replica, {replicas.serve['b'].url}" in renewed.stderr
    after = CredentialStore(bundle).load().certificate.serial_number
    assert after != before and _issued_by_replica(replicas, after)

    for renewal, wanted in (({"fallback_ca_urls": [gone]}, "give ca_url too"),
                            ({"ca_url": gone, "fallback_ca_urls": [gone + "/"]}, "repeats a URL")):
        (bundle / "agent.yaml").write_text(yaml.safe_dump({"name": name, "kind": "node", "credential_dir": ".", "renewal": renewal}))
        refused = _agent("renew-now", "--config", str(bundle / "agent.yaml"))
        assert refused.returncode != 0 and wanted in refused.stdout + refused.stderr, refused


def _issued_by_replica(replicas: Replicas, serial: int) -> bool:
    """Whether the shared inventory holds ``serial`` as issued (read through replica a's home)."""
    from pkictl.inventory import Inventory

    inventory = Inventory.open(replicas.a)
    try:
        record = inventory.get(serial)
        return record is not None and record.status == "issued"
    finally:
        inventory.close()
