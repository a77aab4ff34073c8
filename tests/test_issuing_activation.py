"""rotate-issuing without a refused node and without restarting pkictl serve: the new issuing CA
is published at once (its CRL in crl.pem, its certificate in /cacerts) and issues only from its
activation time; whoever uses the CA then promotes it, exactly once; a running pkictl serve and
its signing workers follow."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import shutil
import signal
import threading
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509

from pkictl.authority import CertificateAuthority
from pkictl.cli import cli
from pkictl.clock import FixedClock
from pkictl.pem import certificates_to_pem
from pkictl.revocation import load_crls

from est_support import EST, ServeProcess, certs_only, curl, est_body, make_csr, serials
from support import DEADLINE, TLSClient, bundle_context, refusal_record, refused, wait_until

DELAY = dt.timedelta(minutes=10)


def audit_events(home: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (home / "audit.log").read_text().splitlines()) if r["event"] == event]


def test_a_new_issuing_ca_is_published_at_once_and_issues_from_its_activation_time(pki, tmp_path):
    """With a FixedClock: right after rotate-issuing the new CA's CRL is in crl.pem and the old CA
    still signs, also one second before the activation time and in another process's view; at
    the activation time the same CA object issues from the new CA, promoted once and audited."""
    start = dt.datetime.now(dt.timezone.utc)
    clock = FixedClock(start)
    ca = CertificateAuthority.load(pki.home, clock=clock)
    try:
        old = ca.issuing
        new = ca.rotate_issuing(activate_in=DELAY)
        assert ca.issuing.serial_number == old.serial_number and ca.pending.certificate.serial_number == new.serial_number
        assert ca.pending.activate_at == start + DELAY
        assert {c.issuer for c in load_crls(ca.crl_path)} == {old.subject, new.subject, ca.root.subject}
        assert [r["serial"] for r in audit_events(pki.home, "issuing-created")] == [f"{new.serial_number:x}"]

        clock.set(start + DELAY - dt.timedelta(seconds=1))
        before = ca.enroll("node", "before", out=tmp_path / "before").certificate
        assert before.issuer == old.subject
        other = CertificateAuthority.load(pki.home, clock=clock)  # another process, just before the time
        assert other.issuing.serial_number == old.serial_number and other.pending is not None
        other.close()
        assert not (pki.home / "retired").exists() and audit_events(pki.home, "issuing-activated") == []

        clock.set(start + DELAY)
        after = ca.enroll("node", "after", out=tmp_path / "after").certificate
        assert after.issuer == new.subject and ca.issuing.serial_number == new.serial_number and ca.pending is None
        assert (pki.home / "retired" / f"{old.serial_number:x}" / "cert.pem").exists()
        assert not (pki.home / "pending-issuing").exists()
        assert len(audit_events(pki.home, "issuing-activated")) == 1
        assert {c.issuer for c in load_crls(ca.crl_path)} == {old.subject, new.subject, ca.root.subject}  # both still published
        assert CliRunner().invoke(cli, ["--home", str(pki.home), "audit", "verify"]).exit_code == 0
    finally:
        ca.close()


def test_cli_rotate_issuing_defaults_to_the_delay_of_ca_yaml_and_refuses_a_second_rotation(pki):
    """pkictl rotate-issuing without --activate-in publishes the new CA for issuing_activation_delay
    (10m) and says until when the current one issues; a second one while it waits is refused
    naming its activation time; --activate-in 0s after that time would have nothing to wait for."""
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", str(pki.home), "rotate-issuing"])
    assert result.exit_code == 0, result.output
    pending = x509.load_pem_x509_certificate((pki.home / "pending-issuing" / "cert.pem").read_bytes())
    assert f"serial {pending.serial_number:x}" in result.output and "keeps issuing" in result.output
    activate_at = dt.datetime.fromisoformat((pki.home / "pending-issuing" / "activate-at").read_text().strip())
    assert dt.timedelta(minutes=9) < activate_at - dt.datetime.now(dt.timezone.utc) <= DELAY
    assert x509.load_pem_x509_certificate((pki.home / "issuing" / "cert.pem").read_bytes()).serial_number == pki.ca.issuing.serial_number

    again = runner.invoke(cli, ["--home", str(pki.home), "rotate-issuing", "--activate-in", "0s"])
    assert again.exit_code == 1 and "already waits" in again.output and activate_at.isoformat() in again.output, again.output
    bad = runner.invoke(cli, ["--home", str(pki.home), "rotate-issuing", "--activate-in", "soon"])
    assert bad.exit_code == 2 and "--activate-in" in bad.output


def _promote(home: str, when: str, barrier, results) -> None:
    """In its own process: wait for the others, then load the CA with a clock past the activation."""
    barrier.wait(30)
    try:
        ca = CertificateAuthority.load(Path(home), clock=FixedClock(dt.datetime.fromisoformat(when)))
        results.put(("ok", ca.issuing.serial_number))
        ca.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))


def test_processes_loading_the_ca_at_once_after_the_activation_time_promote_it_once(pki):
    """Four processes load the CA at the same moment after the activation time: each ends up with
    the new issuing CA, the old one is retired once, and one 'issuing-activated' record is written."""
    old, new = pki.ca.issuing, pki.ca.rotate_issuing(activate_in=DELAY)
    when = (dt.datetime.now(dt.timezone.utc) + DELAY + dt.timedelta(seconds=1)).isoformat()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_promote, args=(str(pki.home), when, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    assert outcomes == [("ok", new.serial_number)] * 4, outcomes
    assert len(audit_events(pki.home, "issuing-activated")) == 1
    assert [d.name for d in (pki.home / "retired").iterdir()] == [f"{old.serial_number:x}"]
    assert CertificateAuthority.load(pki.home).issuing.serial_number == new.serial_number


def _lock_waiters(lock: Path) -> int:
    """How many flock requests wait for ``lock`` now (Linux /proc/locks marks them '->')."""
    inode = f":{os.stat(lock).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and "FLOCK" in line and inode in line)


def test_a_promotion_waits_for_the_lock_and_then_finds_it_done(pki):
    """A promotion that finds the issuing lock held waits for it (its flock request shows in
    /proc/locks), and once the holder has promoted meanwhile it promotes nothing a second time."""
    from pkictl.activation import issuing_lock, promote_due

    old, new = pki.ca.issuing, pki.ca.rotate_issuing(activate_in=DELAY)
    after = dt.datetime.now(dt.timezone.utc) + DELAY
    outcome = []
    with issuing_lock(pki.home, exclusive=True):
        waiter = threading.Thread(target=lambda: outcome.append(promote_due(pki.home, after, audit=pki.ca.audit)))
        waiter.start()
        wait_until(lambda: _lock_waiters(pki.home / ".issuing.lock") == 1, what="the promotion waiting for the lock")
        assert outcome == []
        (pki.home / "retired").mkdir()  # meanwhile the holder promotes
        (pki.home / "issuing").rename(pki.home / "retired" / f"{old.serial_number:x}")
        (pki.home / "pending-issuing").rename(pki.home / "issuing")
    waiter.join(DEADLINE)
    assert outcome == [False]
    assert [d.name for d in (pki.home / "retired").iterdir()] == [f"{old.serial_number:x}"]
    assert CertificateAuthority.load(pki.home).issuing.serial_number == new.serial_number


_CURRENT: dict[Path, tuple[Path, Path]] = {}  # bundle -> (fullchain, key) of its current certificate


def _renew(serve: ServeProcess, home: Path, bundle: Path, name: str, scratch: Path):
    """Renew ``bundle``'s current certificate over EST with curl; the successor (with its chain
    from /cacerts) becomes the current one, as an agent would install it: only the current
    certificate may renew."""
    from support import live_files

    files = live_files(bundle)
    fullchain, key = _CURRENT.get(bundle, (files["fullchain"], files["privkey"]))
    csr, new_key = make_csr(scratch, subject=f"/CN={name}", san=f"URI:spiffe://pkictl.internal/node/{name.lower()}")
    reply = curl(serve.url + EST + "/simplereenroll", "--cert", str(fullchain), "--key", str(key),
                 cacert=home / "ca.pem", data=est_body(csr), content_type="application/pkcs10")
    assert reply.status == 200, reply
    (certificate,) = certs_only(reply.body)
    issuers = [c for c in certs_only(curl(serve.url + EST + "/cacerts", cacert=home / "ca.pem").body) if c.subject == certificate.issuer]
    chain = scratch / "fullchain.pem"
    chain.write_bytes(certificates_to_pem([certificate, *issuers]))
    _CURRENT[bundle] = (chain, new_key)
    return certificate


def test_a_running_serve_renews_from_the_new_issuing_ca_after_its_activation_without_a_restart(pki, tmp_path):
    """A real 'pkictl serve' (one signing worker): after rotate-issuing it serves the pending CA in
    /cacerts and its CRL in /crl.pem while renewals still come from the old CA; once another
    process activated the new CA, the same service, not restarted, renews a certificate of the new
    CA and renews TW from it; every renewal on the way is answered 200 and issued exactly once."""
    delay = dt.timedelta(minutes=2)  # less than the 5 minutes certificates are backdated: valid for the real clock
    serve = ServeProcess(pki.home, "--check-interval", "0.2")
    try:
        old = pki.ca.issuing
        renewed = [_renew(serve, pki.home, pki.node, "TW", tmp_path / "r0")]
        new = pki.ca.rotate_issuing(activate_in=delay)
        serve.log.wait_for(rf"next issuing CA serial {new.serial_number:x} activates at")
        cacerts = certs_only(curl(serve.url + EST + "/cacerts", cacert=pki.home / "ca.pem").body)
        assert {c.serial_number for c in cacerts} == {pki.ca.root.serial_number, old.serial_number, new.serial_number}
        published = tmp_path / "published-crl.pem"
        published.write_bytes(curl(serve.url + "/crl.pem", cacert=pki.home / "ca.pem").body)
        assert {c.issuer for c in load_crls(published)} == {old.subject, new.subject, pki.ca.root.subject}
        renewed.append(_renew(serve, pki.home, pki.node, "TW", tmp_path / "r1"))
        assert [c.issuer for c in renewed] == [old.subject, old.subject]

        start = serve.log.mark()
        later = CertificateAuthority.load(pki.home, clock=FixedClock(dt.datetime.now(dt.timezone.utc) + delay))  # e.g. a pkictl command
        assert later.issuing.serial_number == new.serial_number
        n7 = later.enroll("node", "n7", out=tmp_path / "n7")  # a certificate of the new issuing CA
        later.close()
        before = serials(pki.home)
        first = _renew(serve, pki.home, n7.directory, "n7", tmp_path / "n7-renewal")  # the worker must know the new CA
        renewed += [_renew(serve, pki.home, pki.node, "TW", tmp_path / f"r{i}") for i in range(2, 5)]
        assert [c.issuer for c in [first, *renewed[2:]]] == [new.subject] * 4
        assert serials(pki.home) - before == {c.serial_number for c in [first, *renewed[2:]]}  # each issued once
        serve.log.wait_for(rf"INFO pkictl\.serve: issuing CA serial {new.serial_number:x}$", start=start)
        der = curl(serve.url + "/crl", cacert=pki.home / "ca.pem").body
        assert x509.load_der_x509_crl(der).issuer == new.subject  # /crl: the current issuing CA's
        assert serve.proc.poll() is None and "Traceback" not in serve.log.text()
    finally:
        assert serve.stop() == 0


def test_a_gateway_that_fetched_crl_pem_after_the_rotation_admits_the_new_cas_nodes(pki, start_gateway_agent, tmp_path, caplog):
    """A gateway checking CRLs (pki-agent's listener) that holds only the crl.pem from before
    rotate-issuing refuses a node certificate of the new CA ('CRL unavailable') and still admits
    TW; given the crl.pem published right after the rotation, before the activation, it admits it."""
    gateway_crl = tmp_path / "gateway-crl.pem"  # the gateway host's own copy, as fetched over EST
    shutil.copy(pki.ca.crl_path, gateway_crl)
    gateway = start_gateway_agent(crl=gateway_crl)
    delay = dt.timedelta(minutes=2)  # less than the 5 minutes certificates are backdated: valid for the real clock
    new = pki.ca.rotate_issuing(activate_in=delay)
    published = tmp_path / "published-during-the-delay.pem"
    shutil.copy(pki.ca.crl_path, published)

    pki.ca.clock = FixedClock(dt.datetime.now(dt.timezone.utc) + delay)  # the activation time has come
    node = pki.ca.enroll("node", "n9", out=tmp_path / "n9")
    assert node.certificate.issuer == new.subject
    refused(gateway.port, bundle_context(node.directory))  # no CRL of its issuer yet
    assert refusal_record(caplog, "CRL unavailable")
    client = TLSClient(gateway.port, bundle_context(pki.node))  # TW, of the old issuing CA, still gets in
    assert client.echo(b"old issuing CA") == b"old issuing CA"
    client.close()

    shutil.copy(published, gateway_crl)  # the fetch during the delay
    gateway.call(gateway.agent.maintain())
    client = TLSClient(gateway.port, bundle_context(node.directory))
    assert client.echo(b"new issuing CA") == b"new issuing CA"
    client.close()


def test_a_promotion_cut_between_its_two_renames_is_finished_by_the_next_load(pki):
    """If a promotion stopped after moving issuing/ to retired/, the next load installs the
    pending CA as the issuing CA; while nothing was cut, a load before the time changes nothing."""
    old, new = pki.ca.issuing, pki.ca.rotate_issuing(activate_in=DELAY)
    assert CertificateAuthority.load(pki.home).issuing.serial_number == old.serial_number  # not due: untouched
    (pki.home / "retired").mkdir()
    (pki.home / "issuing").rename(pki.home / "retired" / f"{old.serial_number:x}")  # the first rename, then a crash
    assert CertificateAuthority.load(pki.home).issuing.serial_number == new.serial_number
    assert not (pki.home / "pending-issuing").exists()


def test_sighup_makes_serve_pick_up_a_new_issuing_ca_at_once(pki):
    """With maintenance an hour away and no request, 'pkictl serve' learns of a rotate-issuing only
    on SIGHUP: it then logs the pending CA and its activation time, and keeps serving."""
    serve = ServeProcess(pki.home, "--check-interval", "3600", "--workers", "0")
    try:
        new = pki.ca.rotate_issuing(activate_in=DELAY)
        start = serve.log.mark()
        assert f"next issuing CA serial {new.serial_number:x}" not in serve.log.text()  # nothing noticed it yet
        serve.proc.send_signal(signal.SIGHUP)
        serve.log.wait_for(rf"next issuing CA serial {new.serial_number:x} activates at ", start=start)
        serve.log.wait_for(r"reloaded \(SIGHUP\)", start=start)
        assert curl(serve.url + EST + "/cacerts", cacert=pki.home / "ca.pem").status == 200
    finally:
        assert serve.stop() == 0


def test_a_malformed_activation_time_is_never_promoted_and_the_doctor_says_so(pki, tmp_path):
    """A pending CA whose activate-at is not a time keeps the current CA issuing, even far past
    any activation, and pkictl doctor reports it as an error naming the file; a well-formed one
    is no problem for the doctor (control)."""
    from pkictl.diagnosis.doctor import diagnose_ca

    from doctor_support import problems

    old = pki.ca.issuing
    pki.ca.rotate_issuing(activate_in=DELAY)
    assert problems(diagnose_ca(pki.home, clock=pki.ca.clock)) == []
    (pki.home / "pending-issuing" / "activate-at").write_text("tomorrow\n")
    later = CertificateAuthority.load(pki.home, clock=FixedClock(dt.datetime.now(dt.timezone.utc) + 100 * DELAY))
    try:
        assert later.issuing.serial_number == old.serial_number and later.pending is None
        assert later.enroll("node", "n8", out=tmp_path / "n8").certificate.issuer == old.subject
    finally:
        later.close()
    findings = [f for f in diagnose_ca(pki.home, clock=pki.ca.clock) if f.severity.name == "ERROR"]
    assert [f.subject for f in findings] == [str(pki.home / "pending-issuing" / "activate-at")], findings
    assert "never activated" in findings[0].problem
