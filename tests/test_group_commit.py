"""Group commit on the CA's write path: the issuances of one group share one SQLite transaction
and one audit-log write, none is visible or answered before both are done, a refusal inside a
group rolls back only itself, and every guarantee of one issuance at a time holds (unique
serial numbers, one live certificate per identity, a verifiable audit chain), through a real
``pkictl serve`` with concurrent curl clients too."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
from pathlib import Path

import pytest
from cryptography import x509

from pki_agent.rotation.rotate import build_reenroll_csr
from pkictl.authority import CertificateAuthority
from pkictl.errors import CertificateUnusable
from pkictl.est.group_commit import MAX_GROUP, run_group
from pkictl.inventory import Inventory
from pkictl.profile import generate_key
from pkictl.est.signers import _calls
from pkictl.store import CredentialStore

from est_support import ca_with_nodes, EST, ServeProcess, certs_only, curl, est_body, make_csr, pkictl
from support import live_files

NODES = ("n1", "n2", "n3", "n4")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return ca_with_nodes(tmp_path, NODES)


def _current(tmp_path: Path, name: str) -> x509.Certificate:
    return CredentialStore(tmp_path / name).load().certificate


def _renewal(ca: CertificateAuthority, current: x509.Certificate):
    return functools.partial(ca.simple_reenroll, build_reenroll_csr(current, generate_key()), current)


def _audit(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def _issued_rows(home: Path) -> dict[int, str]:
    """``{serial: status}`` read through a connection of its own (what another process sees)."""
    inventory = Inventory(home / "inventory.sqlite3")
    try:
        return {r.serial: r.status for r in inventory.records(latest_only=False)}
    finally:
        inventory.close()


def test_a_group_is_one_transaction_and_one_audit_write(home, tmp_path):
    """Four renewals in one group: while the last runs, another connection sees none of the
    first three's successors (nothing is committed before the group ends); afterwards all four
    are there, their four audit records were written together (one time stamp, consecutive
    seq) and the chain verifies."""
    ca = CertificateAuthority.load(home)
    try:
        seen_during: list[dict[int, str]] = []
        calls = [_renewal(ca, _current(tmp_path, name)) for name in NODES]

        def last() -> x509.Certificate:
            seen_during.append(_issued_rows(home))
            return calls[-1]()

        before = set(_issued_rows(home))
        outcomes = run_group(ca, [*calls[:-1], last])
    finally:
        ca.close()
    assert [status for status, _ in outcomes] == ["ok"] * 4, outcomes
    successors = {value.serial_number for _, value in outcomes}
    assert len(successors) == 4  # four distinct serial numbers
    assert set(seen_during[0]) == before, "a renewal of the group was committed before the group ended"
    assert {s for s, status in _issued_rows(home).items() if status == "issued"} >= successors
    issued = [r for r in _audit(home) if r["event"] == "issued" and r.get("renewal")]
    assert {int(r["serial"], 16) for r in issued} == successors
    assert len({r["time"] for r in issued}) == 1 and [r["seq"] for r in issued] == list(range(issued[0]["seq"], issued[0]["seq"] + 4))
    assert "audit log ok" in pkictl(home, "audit", "verify").stdout


def test_a_refusal_inside_a_group_rolls_back_only_itself(home, tmp_path):
    """A group renewing n1 twice (two keys) and n2: n1's first renewal and n2's are issued, n1's
    second is refused as superseded (one live certificate per identity), its refusal is in the
    audit log, n1 has exactly one successor, and the chain verifies."""
    ca = CertificateAuthority.load(home)
    try:
        n1, n2 = _current(tmp_path, "n1"), _current(tmp_path, "n2")
        outcomes = run_group(ca, [_renewal(ca, n1), _renewal(ca, n1), _renewal(ca, n2)])
        n1_rows = [r for r in ca.inventory.records(latest_only=False) if r.name == "n1"]
    finally:
        ca.close()
    (first, won), (second, refused), (third, _) = outcomes
    assert (first, second, third) == ("ok", "error", "ok"), outcomes
    assert isinstance(refused, CertificateUnusable) and refused.reason == "superseded", refused
    assert sorted(r.serial for r in n1_rows) == sorted([n1.serial_number, won.serial_number])
    assert [r for r in _audit(home) if r["event"] == "refused" and r["error"] == "CertificateUnusable"]
    assert "audit log ok" in pkictl(home, "audit", "verify").stdout


def test_a_step_that_fails_after_writing_rolls_back_to_its_savepoint(home, tmp_path):
    """In one group: a renewal of n1 whose signing fails after its row and its successor claim
    were written leaves neither (n1 may still renew), while n2's renewal before it in the same
    group commits."""
    ca = CertificateAuthority.load(home)
    try:
        n1, n2 = _current(tmp_path, "n1"), _current(tmp_path, "n2")

        def fails_to_sign() -> None:
            def sign():
                raise OSError("the HSM went away")
            ca.inventory.record_signed(serial=0xABC, name="n1", kind="node", sans=[], now=ca.clock.now(), exclusive=False,
                                       issuer=ca.issuing.serial_number, sign=sign, predecessor=n1.serial_number)

        outcomes = run_group(ca, [_renewal(ca, n2), fails_to_sign])
        assert [status for status, _ in outcomes] == ["ok", "error"], outcomes
        assert ca.inventory.get(0xABC) is None
        assert ca.inventory.get(n1.serial_number).successor is None
        assert ca.inventory.get(outcomes[0][1].serial_number).status == "issued"
        assert run_group(ca, [_renewal(ca, n1)])[0][0] == "ok"  # its claim was rolled back
    finally:
        ca.close()


def test_a_failed_audit_write_fails_the_whole_group(home, tmp_path):
    """With the audit log unwritable (a symlink, which pkictl refuses to append to), no renewal
    of the group is answered with a certificate: every outcome is the audit error."""
    log = home / "audit.log"
    log.rename(home / "audit.real")
    log.symlink_to(home / "audit.real")
    ca = CertificateAuthority.load(home)
    try:
        outcomes = run_group(ca, [_renewal(ca, _current(tmp_path, name)) for name in ("n1", "n2")])
    finally:
        ca.close()
    assert [status for status, _ in outcomes] == ["error", "error"], outcomes
    assert all("symlink" in str(value) for _, value in outcomes), outcomes


def test_a_worker_takes_every_call_queued_up_to_the_group_size():
    """A worker's pipe with MAX_GROUP + 3 calls queued: with group commit it takes MAX_GROUP at
    once, then the 3 left; without, one at a time; at EOF, None."""
    ours, theirs = multiprocessing.Pipe()
    try:
        for i in range(MAX_GROUP + 3):
            ours.send(("simple_reenroll", (i,)))
        assert len(_calls(theirs, True) or []) == MAX_GROUP
        assert len(_calls(theirs, False) or []) == 1
        assert len(_calls(theirs, True) or []) == 2
        ours.close()
        assert _calls(theirs, True) is None
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("mode", ["--group-commit", "--no-group-commit"])
def test_concurrent_renewals_through_the_service_keep_every_guarantee(home, tmp_path, mode):
    """Twelve curl clients at once against pkictl serve (one worker): each of the four nodes
    renewed by three clients with three keys gets exactly one successor (200 for one, 403
    superseded for the others), every successor is durable when its client has it (in the
    inventory and the audit log, read by another process), its renewal address is recorded,
    and 'pkictl audit verify' passes; with and without group commit alike."""
    jobs = []
    for name in NODES:
        files = live_files(tmp_path / name)
        current = x509.load_pem_x509_certificate(files["cert"].read_bytes())
        uri = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)[0]
        for i in range(3):
            csr, _ = make_csr(tmp_path / f"{name}-{i}", subject=f"/CN={name}", san=f"URI:{uri}")
            jobs.append((name, files, est_body(csr)))
    serve = ServeProcess(home, mode, "--burst", "50")

    def renew(job):
        name, files, body = job
        reply = curl(serve.url + EST + "/simplereenroll", "--cert", str(files["fullchain"]), "--key", str(files["privkey"]),
                     cacert=home / "ca.pem", data=body, content_type="application/pkcs10")
        durable = None
        if reply.status == 200:
            serial = certs_only(reply.body)[0].serial_number
            durable = _issued_rows(home).get(serial) == "issued" and any(
                r["event"] == "issued" and r["serial"] == f"{serial:x}" for r in _audit(home))
        return name, reply, durable

    try:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(renew, jobs))
    finally:
        serve.stop()
    winners = {}
    for name, reply, durable in results:
        if reply.status == 200:
            assert name not in winners, f"{name} got two successors"
            assert durable, f"{name}'s successor was answered before it was in the inventory and the audit log"
            winners[name] = certs_only(reply.body)[0].serial_number
        else:
            assert reply.status == 403 and reply.headers.get("pkictl-refusal") == "superseded", reply
    assert set(winners) == set(NODES)
    inventory = Inventory(home / "inventory.sqlite3")
    try:
        peers = inventory.issuance_peers()
        assert len({r.serial for r in inventory.records(latest_only=False)}) == len(inventory.records(latest_only=False))
    finally:
        inventory.close()
    assert all(peers.get(serial) == "127.0.0.1" for serial in winners.values()), peers
    assert "audit log ok" in pkictl(home, "audit", "verify").stdout
