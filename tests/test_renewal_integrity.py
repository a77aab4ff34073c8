"""One identity, one live certificate: a renewal supersedes its predecessor atomically, only the
current certificate renews, concurrent renewals of one certificate fork nothing, a retried
request gets the same successor, and the predecessor is revoked as superseded after a grace.

Real ``pkictl serve`` processes (with signing workers) and curl as the clients; the CA's own
calls with an injected clock where time matters."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from pki_agent.rotation.rotate import RENEWAL_KEY, rotate
from pkictl.authority import CertificateAuthority
from pkictl.clock import FixedClock
from pkictl.errors import CertificateUnusable
from pkictl.inventory import Inventory
from pkictl.settings import CASettings
from pkictl.store import Credential, CredentialStore

from est_support import EST, ServeProcess, certs_only, curl, est_body, make_csr, pkictl
from support import DEADLINE, command, live_files

URI = "URI:spiffe://pkictl.internal/node/tw"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "ca"
    ca = CertificateAuthority.init(home, CASettings())
    ca.enroll("node", "TW", out=tmp_path / "TW")
    ca.close()
    return home


def reenroll(url: str, home: Path, csr: Path, fullchain: Path, key: Path):
    return curl(url + EST + "/simplereenroll", "--cert", str(fullchain), "--key", str(key), cacert=home / "ca.pem",
                data=est_body(csr), content_type="application/pkcs10")


def tw_rows(home: Path) -> list:
    inventory = Inventory(home / "inventory.sqlite3")
    try:
        return [r for r in inventory.records(latest_only=False) if r.name == "TW"]
    finally:
        inventory.close()


def test_only_the_current_certificate_renews_and_a_retry_gets_the_same_successor(home, tmp_path):
    """After TW renews, its previous certificate is refused (403, Pkictl-Refusal: superseded,
    naming the current serial), also once the current one is revoked as key-compromised; the
    very same request again (its key is the successor's) gets that successor, not a new one."""
    files = live_files(tmp_path / "TW")
    first = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    serve = ServeProcess(home)
    try:
        csr, _ = make_csr(tmp_path / "a", subject="/CN=TW", san=URI)
        renewed = reenroll(serve.url, home, csr, files["fullchain"], files["privkey"])
        assert renewed.status == 200, renewed
        (successor,) = certs_only(renewed.body)

        again = reenroll(serve.url, home, csr, files["fullchain"], files["privkey"])  # the answer was lost: ask again
        assert again.status == 200 and certs_only(again.body)[0].serial_number == successor.serial_number, again

        other, _ = make_csr(tmp_path / "b", subject="/CN=TW", san=URI)  # a stolen old certificate, another key
        refused = reenroll(serve.url, home, other, files["fullchain"], files["privkey"])
        assert refused.status == 403 and refused.headers.get("pkictl-refusal") == "superseded", refused
        assert f"certificate serial {first.serial_number:x} is superseded by serial {successor.serial_number:x}" in refused.text
        serve.log.wait_for(r"refused peer=\S+ method=POST path=\S+simplereenroll' status=403 reason='superseded' node=TW")

        pkictl(home, "revoke", f"{successor.serial_number:x}", "--reason", "key-compromise")
        still = reenroll(serve.url, home, other, files["fullchain"], files["privkey"])
        assert still.status == 403 and still.headers.get("pkictl-refusal") == "superseded", still
    finally:
        serve.stop()
    assert {r.serial for r in tw_rows(home)} == {first.serial_number, successor.serial_number}


def test_parallel_renewals_of_one_certificate_yield_exactly_one_successor(home, tmp_path):
    """Eight curl processes renew TW's certificate at once, each with its own new key, against a
    pkictl serve with two signing workers: one gets 200, seven get 403 superseded naming that
    one's serial, the inventory holds one successor, and 'pkictl status' one live TW."""
    files = live_files(tmp_path / "TW")
    csrs = [make_csr(tmp_path / f"p{i}", subject="/CN=TW", san=URI)[0] for i in range(8)]
    serve = ServeProcess(home, "--workers", "2", "--burst", "50")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda csr: reenroll(serve.url, home, csr, files["fullchain"], files["privkey"]), csrs))
    finally:
        serve.stop()
    won = [r for r in replies if r.status == 200]
    assert len(won) == 1, [(r.status, r.text) for r in replies]
    winner = certs_only(won[0].body)[0].serial_number
    lost = [r for r in replies if r.status != 200]
    assert all(r.status == 403 and r.headers.get("pkictl-refusal") == "superseded" and f"{winner:x}" in r.text for r in lost), \
        [(r.status, r.text) for r in lost]
    assert len(tw_rows(home)) == 2
    status = subprocess.run([command("pkictl"), "--home", str(home), "status", "--json"], capture_output=True, text=True, timeout=DEADLINE)
    live = [row for row in json.loads(status.stdout) if row["name"] == "TW"]
    assert [row["serial"] for row in live] == [f"{winner:x}"], live


def test_the_predecessor_is_revoked_as_superseded_after_the_grace(home, tmp_path):
    """With a FixedClock: one second before superseded_grace has passed since the renewal the
    predecessor is not revoked; one second after it, refresh_crl revokes it with reason
    superseded and the CRL lists it, while the successor stays valid and alone in status."""
    start = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    clock = FixedClock(start)
    ca = CertificateAuthority.load(home, clock=clock)
    try:
        store = CredentialStore(tmp_path / "TW")
        current = store.load()
        renewed = ca.simple_reenroll(*_request(current), current.certificate)
        grace = ca.settings.superseded_grace
        clock.set(start + grace - dt.timedelta(seconds=1))
        assert ca.revoke_superseded() == []
        assert ca.inventory.get(current.certificate.serial_number).status == "issued"
        clock.set(start + grace + dt.timedelta(seconds=1))
        assert ca.refresh_crl()
        old = ca.inventory.get(current.certificate.serial_number)
        assert (old.status, old.revocation_reason) == ("revoked", "superseded")
        assert ca.inventory.get(renewed.serial_number).status == "issued"
        crls = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part) for part in
                ca.crl_path.read_bytes().split(b"-----BEGIN X509 CRL-----")[1:]]
        entry = next(e for c in crls if (e := c.get_revoked_certificate_by_serial_number(current.certificate.serial_number)))
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded
        assert ca.revoke_superseded() == []  # once
    finally:
        ca.close()


def test_an_agent_whose_answer_was_lost_gets_the_same_successor_on_retry(home, tmp_path):
    """The agent's rotate keeps its request's key on disk until it installs: when the CA's answer
    is lost after the CA recorded the successor, the next rotation asks with the same key and
    installs that very successor (no refusal, no second certificate); the key file is gone after."""
    ca = CertificateAuthority.load(home)
    store = CredentialStore(tmp_path / "TW")
    issued: list[x509.Certificate] = []

    class LosesTheFirstAnswer:
        def simple_reenroll(self, csr, current: Credential):
            certificate = ca.simple_reenroll(csr, current.certificate)
            issued.append(certificate)
            if len(issued) == 1:
                raise OSError("connection reset before the answer arrived")
            return certificate, ca.chain

    try:
        current = store.load()
        with pytest.raises(OSError):
            rotate(store, current, LosesTheFirstAnswer(), ca.clock)
        assert (store.directory / RENEWAL_KEY).exists() and store.load().certificate == current.certificate
        installed = rotate(store, current, LosesTheFirstAnswer(), ca.clock)
        assert issued[0].serial_number == issued[1].serial_number == installed.certificate.serial_number
        assert not (store.directory / RENEWAL_KEY).exists()
        assert len(tw_rows(home)) == 2
        with pytest.raises(CertificateUnusable, match="superseded"):  # and the old one cannot renew again
            ca.simple_reenroll(_request(current)[0], current.certificate)
    finally:
        ca.close()


def _request(current: Credential) -> tuple[x509.CertificateSigningRequest]:
    from pki_agent.rotation.rotate import build_reenroll_csr
    from pkictl.profile import generate_key

    return (build_reenroll_csr(current.certificate, generate_key()),)
