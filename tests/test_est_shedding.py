"""Load shedding of the EST service: beyond the bound, simplereenroll is answered 503 at once with a
Retry-After spread with jitter (RFC 7030 4.2.3, RFC 9110 10.2.3) while the requests admitted are
answered 200; below the bound nothing is shed; the bound follows the measured rate; and the
agent's EST client waits out the Retry-After and renews, within its bound.

The service is real (a signing worker, real TLS, curl or the agent's client); to hold requests in
hand without a sleep, the test holds the inventory's SQLite write lock, which the worker's group
commit waits for. The shedder's clock and random source are injected."""

from __future__ import annotations

import concurrent.futures
import math
import random
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography import x509

from pki_agent.errors import ServiceBusy
from pki_agent.est_client import ESTClient
from pki_agent.rotation.rotate import build_reenroll_csr
from pkictl.est.wire import encode_csr
from pkictl.profile import generate_key
from pkictl.est.shedding import LoadShedder, SheddingPolicy
from pkictl.est.signers import SignerPool
from pkictl.store import CredentialStore

from est_support import ca_with_nodes, EST, RunningService, curl
from support import live_files, wait_until

NODES = [f"n{i}" for i in range(1, 7)]
SEED = 7
PRIOR = 1.0  # issuances/s the shedder assumes (nothing measured yet in these tests)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return ca_with_nodes(tmp_path, NODES)


@pytest.fixture
def served(home):
    """pkictl serve's service with one signing worker, at most two enrollments in hand."""
    service = RunningService(home, signers=SignerPool(home, passphrase=None, workers=1), burst=50,
                             shedding=SheddingPolicy(max_pending=2, prior_rate=PRIOR), shed_clock=Clock(),
                             shed_rng=random.Random(SEED)).start()
    yield service
    service.stop()


class WriteLock:
    """The inventory's SQLite write lock, held by the test: the worker's group commit waits for it."""

    def __init__(self, home: Path) -> None:
        self.db = sqlite3.connect(home / "inventory.sqlite3", isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.db.execute("COMMIT")
            self.db.close()


def renew_with_curl(service: RunningService, home: Path, tmp_path: Path, name: str):
    """curl's simplereenroll of node ``name`` with a new key."""
    files = live_files(tmp_path / name)
    current = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    body = encode_csr(build_reenroll_csr(current, generate_key()))
    return curl(service.url + EST + "/simplereenroll", "--cert", str(files["fullchain"]), "--key", str(files["privkey"]),
                cacert=home / "ca.pem", data=body, content_type="application/pkcs10")


def expected_retry_afters(pending: int, count: int, rate: float = PRIOR, jitter: float = 0.1) -> list[int]:
    """The Retry-After values the shedder gives ``count`` clients in a row (clock standing still)."""
    rng = random.Random(SEED)
    return [max(1, math.ceil((pending + i) / rate * rng.uniform(1.0 - jitter, 1.0 + jitter))) for i in range(count)]


def test_beyond_the_bound_real_clients_get_503_with_retry_after_spread(served, home, tmp_path):
    """Two renewals held in hand (the bound) are answered 200 once the write lock goes; four more
    clients at once meanwhile, accepted one at a time (paced), get 503 each with the Retry-After the shedder derives
    (requests ahead / rate, times a jitter factor in [0.9, 1.1]), spread over several values; no
    certificate is issued to them and no refusal is audited for them."""
    lock = WriteLock(home)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        try:
            held = [pool.submit(renew_with_curl, served, home, tmp_path, name) for name in NODES[:2]]
            wait_until(lambda: served.service.shedder.pending == 2, what="two renewals in hand")
            shed = list(pool.map(lambda name: renew_with_curl(served, home, tmp_path, name), NODES[2:]))
        finally:
            lock.release()
        answered = [f.result() for f in held]
    assert [r.status for r in answered] == [200, 200], answered
    assert [r.status for r in shed] == [503] * 4, shed
    values = sorted(int(r.headers["retry-after"]) for r in shed)
    assert values == sorted(expected_retry_afters(2, 4)), values
    assert len(set(values)) >= 3, f"want the Retry-After spread, got {values}"
    assert all("retry in" in r.text for r in shed), shed
    assert served.service.front.paced > 0  # at the bound, connections were accepted one at a time
    audit = (home / "audit.log").read_text()
    assert audit.count('"event":"issued"') == len(NODES) + 1 + 2  # the enrollments, the service's own, the two renewals
    assert '"error":"Overloaded"' not in audit


def test_up_to_the_bound_nothing_is_shed(served, home, tmp_path):
    """Negative control: with two requests allowed in hand, two concurrent renewals held there
    and then two more after them (back under the bound) are all answered 200, none 503, and no
    accept was paced."""
    lock = WriteLock(home)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            held = [pool.submit(renew_with_curl, served, home, tmp_path, name) for name in NODES[:2]]
            wait_until(lambda: served.service.shedder.pending == 2, what="two renewals in hand")
        finally:
            lock.release()
        first = [f.result() for f in held]
        later = list(pool.map(lambda name: renew_with_curl(served, home, tmp_path, name), NODES[2:4]))
    assert [r.status for r in first + later] == [200] * 4, first + later
    assert served.service.shedder.shed == 0 and served.service.front.paced == 0


def test_the_bound_follows_the_peak_measured_rate():
    """Before min_pending completions over a second the bound is prior_rate x max_delay; after
    80 completions in two seconds (40/s) it is that rate x max_delay; when the pace then drops
    to 5/s without shedding (little demand) the peak stays, also past peak_memory; while it
    sheds and the peak is older than peak_memory, a lower rate replaces it, but not below
    prior_rate (10/s); a fixed
    max_pending overrides it all; requests under the bound are admitted (None), the one at the
    bound is shed with a Retry-After."""
    clock = Clock()
    shedder = LoadShedder(SheddingPolicy(max_delay=2.0, min_pending=4, prior_rate=10.0, window=5.0, peak_memory=30.0),
                          clock=clock, rng=random.Random(SEED))
    assert shedder.bound() == 20
    assert [shedder.admit() for _ in range(20)] == [None] * 20
    assert isinstance(shedder.admit(), int)
    for _ in range(20):
        shedder.done(completed=False)
    for _ in range(80):
        clock.now += 1 / 40
        shedder.pending += 1  # admitted and answered
        shedder.done()
    assert shedder.rate() == pytest.approx(80 / (79 / 40), rel=0.01)  # 80 completions over their span
    peak = shedder.rate()
    assert shedder.bound() == math.floor(peak * 2.0)

    def slow(seconds: float, *, shedding: bool) -> None:
        for _ in range(int(seconds * 5)):  # 5/s
            clock.now += 0.2
            shedder.pending += 1
            shedder.done()
            if shedding:
                shedder.pending = shedder.bound()
                assert isinstance(shedder.admit(), int)
                shedder.pending = 0
            shedder.rate()

    slow(40, shedding=False)
    assert shedder.rate() == peak  # demand fell, not capacity
    slow(10, shedding=True)
    assert shedder.rate() == 10.0  # lowered, to the prior: 5/s measured
    assert LoadShedder(SheddingPolicy(max_pending=3), clock=clock).bound() == 3


def test_accepts_are_paced_only_at_the_bound():
    """Below the bound the front accepts as many as there is room for (the bound less the
    requests in hand and the connections handshaking) without a pause; at it, one connection per
    four issuances at the measured rate, at most 0.25 s apart."""
    shedder = LoadShedder(SheddingPolicy(max_pending=200, prior_rate=40.0), clock=Clock())
    assert shedder.accept_budget(0) == (0.0, 128)
    assert shedder.accept_budget(150) == (0.0, 50)
    shedder.admit()
    assert shedder.accept_budget(150) == (0.0, 49)
    assert shedder.accept_budget(199) == (pytest.approx(4 / 40), 1)
    slow = LoadShedder(SheddingPolicy(max_pending=1, prior_rate=1.0), clock=Clock())
    assert slow.admit() is None
    assert slow.accept_budget(0) == (pytest.approx(0.25), 1)


def test_retry_after_spreads_a_herd_at_the_measured_rate():
    """100 clients shed in a row with no jitter are told to come back one rate-step after
    another (ceil((pending + i) / rate)); with jitter 0.5 each lies in [0.5, 1.5] x that; once
    the clock passes their return times, they no longer count ahead of a newcomer."""
    clock = Clock()
    flat = LoadShedder(SheddingPolicy(max_pending=10, prior_rate=20.0, jitter=0.0), clock=clock)
    for _ in range(10):
        flat.admit()
    told = [flat.admit() for _ in range(100)]
    assert told == [max(1, math.ceil((10 + i) / 20.0)) for i in range(100)]
    clock.now += 1000
    assert flat.admit() == 1  # only the ten in hand ahead: 10 / 20 s, at least 1

    spread = LoadShedder(SheddingPolicy(max_pending=10, prior_rate=20.0, jitter=0.5), clock=Clock(), rng=random.Random(SEED))
    for _ in range(10):
        spread.admit()
    values = [spread.admit() for _ in range(100)]
    assert all(max(1, math.ceil((10 + i) / 20.0 * 0.5)) <= v <= math.ceil((10 + i) / 20.0 * 1.5) for i, v in enumerate(values)), values
    assert len(set(values)) > 5


def test_the_agent_waits_out_retry_after_and_renews(served, home, tmp_path):
    """With the two renewals the bound allows in hand, the agent's client gets 503, sleeps
    exactly the Retry-After it was given (an injected sleep, which lets the held renewals
    finish), asks again and gets a certificate for its new key."""
    lock = WriteLock(home)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        lock.release()
        wait_until(lambda: served.service.shedder.pending == 0, what="the held renewals answered")

    store = CredentialStore(tmp_path / "n6")
    current = store.load()
    key = generate_key()
    client = ESTClient(served.url, anchors_path=home / "ca.pem", store=store, sleep=sleep)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            held = [pool.submit(renew_with_curl, served, home, tmp_path, name) for name in NODES[:2]]
            wait_until(lambda: served.service.shedder.pending == 2, what="two renewals in hand")
            certificate, _ = client.simple_reenroll(build_reenroll_csr(current.certificate, key), current)
        finally:
            lock.release()
        assert [f.result().status for f in held] == [200, 200]
    assert slept == [expected_retry_afters(2, 1)[0]]
    assert certificate.public_key() == key.public_key()


def test_the_agent_gives_up_after_its_bound(served, home, tmp_path):
    """Negative twins: while the CA stays busy, a client allowed two attempts sleeps once and
    raises ServiceBusy with the last Retry-After; one whose wait budget is below the Retry-After
    raises at once without sleeping; one whose wait is cut short (a stopping agent) raises after
    its first answer. Its credential is untouched either way."""
    lock = WriteLock(home)
    store = CredentialStore(tmp_path / "n6")
    current = store.load()
    slept: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            held = [pool.submit(renew_with_curl, served, home, tmp_path, name) for name in NODES[:2]]
            wait_until(lambda: served.service.shedder.pending == 2, what="two renewals in hand")
            twice = ESTClient(served.url, anchors_path=home / "ca.pem", store=store, busy_attempts=2, sleep=slept.append)
            with pytest.raises(ServiceBusy, match=r"busy \(HTTP 503\) after 2 attempt") as busy:
                twice.simple_reenroll(build_reenroll_csr(current.certificate, generate_key()), current)
            assert len(slept) == 1 and busy.value.retry_after is not None and busy.value.retry_after >= 1
            impatient = ESTClient(served.url, anchors_path=home / "ca.pem", store=store, busy_wait_max=0.5, sleep=slept.append)
            with pytest.raises(ServiceBusy, match="after 1 attempt"):
                impatient.simple_reenroll(build_reenroll_csr(current.certificate, generate_key()), current)
            assert len(slept) == 1
            stopping = threading.Event()
            stopping.set()  # the agent's stop() while its rotation waits out a Retry-After
            stopped = ESTClient(served.url, anchors_path=home / "ca.pem", store=store, sleep=stopping.wait)
            with pytest.raises(ServiceBusy, match="is stopping: not retried"):
                stopped.simple_reenroll(build_reenroll_csr(current.certificate, generate_key()), current)
        finally:
            lock.release()
        assert [f.result().status for f in held] == [200, 200]
    assert store.load().certificate == current.certificate
