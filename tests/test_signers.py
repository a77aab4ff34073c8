"""pkictl serve's signing workers: issuance in worker processes answers as the CA itself would,
refusals keep their kind, a killed worker is replaced, and a worker that cannot load the CA stops
the service from starting."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import subprocess
import time

import pytest

from pkictl.authority import CertificateAuthority
from pkictl.errors import LintError, PendingApproval, PKIError
from pkictl.lint import Finding
from pkictl.settings import CASettings
from pkictl.est.signers import SignerPool

from est_support import EST, RunningService, curl, est_body, make_csr, pkictl, serials
from support import DEADLINE, command, wait_until
from test_est_server import only_certificate, reenroll, tw_credential, uris


@pytest.fixture
def served(pki):
    """The EST service on ``pki``'s CA with one signing worker."""
    service = RunningService(pki.home, signers=SignerPool(pki.home, passphrase=None, workers=1)).start()
    yield service
    service.stop()


def _worker_pids(service: RunningService) -> set[int]:
    return {w.process.pid for w in service.service.signers._workers}


def test_renewal_and_refusals_through_a_worker(pki, served, tmp_path):
    """curl renews TW through the worker (200, the new key certified, recorded in the inventory);
    the same certificate after 'pkictl revoke' gets the CA's 403 and reason; a request without
    credentials gets 202 from an approval wait raised in the worker."""
    tls, current, _ = tw_credential(pki)
    san = f"URI:{uris(current)[0]}"
    before = serials(pki.home)
    reply = reenroll(served, pki.home, make_csr(tmp_path / "a", subject="/CN=TW", san=san)[0], *tls)
    assert reply.status == 200, reply
    successor = only_certificate(reply.body)
    assert serials(pki.home) - before == {successor.serial_number}

    pkictl(pki.home, "revoke", f"{current.serial_number:x}")
    revoked = reenroll(served, pki.home, make_csr(tmp_path / "b", subject="/CN=TW", san=san)[0], *tls)
    assert revoked.status == 403 and "revoked" in revoked.text, revoked

    pending = curl(served.url + EST + "/simpleenroll", cacert=pki.home / "ca.pem",
                   data=est_body(make_csr(tmp_path / "n2", subject="/CN=n2")[0]), content_type="application/pkcs10")
    assert pending.status == 202 and "pkictl approve n2" in pending.text, pending


def test_a_killed_worker_is_replaced_and_issuance_goes_on(pki, served, tmp_path):
    """After SIGKILL of the only worker, requests get 503 with Retry-After or are served, and
    within the deadline a new worker (another PID) renews TW."""
    tls, current, _ = tw_credential(pki)
    san = f"URI:{uris(current)[0]}"
    (killed,) = _worker_pids(served)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    attempt = 0
    while True:
        attempt += 1
        reply = reenroll(served, pki.home, make_csr(tmp_path / str(attempt), subject="/CN=TW", san=san)[0], *tls)
        if reply.status == 200:
            break
        assert reply.status == 503 and "retry-after" in reply.headers, reply
        assert time.monotonic() < deadline, f"no worker answered within {DEADLINE} s"
    assert _worker_pids(served) and killed not in _worker_pids(served)
    assert only_certificate(reply.body).serial_number != current.serial_number


def test_a_worker_that_cannot_load_the_ca_stops_the_start(tmp_path):
    """With the wrong passphrase for an encrypted CA, start() raises a PKIError naming the cause."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, CASettings(), passphrase=b"correct horse battery staple").close()
    pool = SignerPool(home, passphrase=b"wrong horse battery staple!", workers=1)
    with pytest.raises(PKIError, match="could not load the CA") as caught:
        asyncio.run(pool.start())
    assert "passphrase" in str(caught.value).lower()


@pytest.mark.parametrize("workers", [1, 0])
@pytest.mark.parametrize("problem", ["invalid --dns", "port in use"])
def test_a_start_up_error_exits_at_once_with_one_line(pki, workers, problem):
    """The installed pkictl serve, with signing workers and without, exits non-zero within the
    bound on an invalid --dns and on a listen port in use, prints one line naming the cause (no
    traceback), and leaves no process behind (a worker ignores SIGTERM and once kept it alive)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    args = ["--listen", "127.0.0.1:0", "--dns", "bad..name"] if problem == "invalid --dns" else ["--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen([command("pkictl"), "--home", str(pki.home), "serve", "--workers", str(workers), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"pkictl serve --workers {workers} with {problem} did not exit within {DEADLINE:g} s")
    finally:
        holder.close()
    assert process.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    expected = "'bad..name': want a DNS name" if problem == "invalid --dns" else f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert expected in errors[0]
    wait_until(lambda: not _group_alive(process.pid), what="every process of pkictl serve's group to end")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_errors_with_extra_fields_survive_the_trip_from_a_worker():
    """PendingApproval and LintError come back from pickling with their message and fields."""
    pending = pickle.loads(pickle.dumps(PendingApproval("TW", "ABCD-EFGH")))
    assert (pending.name, pending.code, str(pending)) == ("TW", "ABCD-EFGH", str(PendingApproval("TW", "ABCD-EFGH")))
    finding = Finding("pkix.x", "ERROR", "bad", "certificate.tbsCertificate", "XValidator")
    lint = pickle.loads(pickle.dumps(LintError("refused", [finding])))
    assert (str(lint), lint.findings) == ("refused", (finding,))
