"""CA replicas on hosts of their own (network namespaces, tests/netns.py): PostgreSQL on host
``db``, `pkictl serve --replica` on hosts ``ca1`` and ``ca2``, node TW on host ``tw``.

The node enrolls through ca1 with a token, then ca1's replica is lost (SIGKILL); TW's agent,
which lists ca2 in ``renewal.fallback_ca_urls``, renews through ca2 across the bridge, and the
renewal is in the one shared inventory and audit chain, read on ca2. A revocation made on ca2
reaches ca2's CRL, and TW's agent, asked again, learns it is revoked and files a pairing
request (its renew-now says so, with the code to approve).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import yaml
from cryptography import x509

import netns
from pg import PostgresCluster
from support import DEADLINE
from pkictl.store import CredentialStore

HOSTS = {"db": ["db.internal"], "ca1": ["ca1.internal"], "ca2": ["ca2.internal"], "tw": ["tw.internal"]}
HOME = "/var/lib/pkictl"
NODE_DIR = "/var/lib/pki-agent/TW"


def _serve(host: netns.Host, home: Path, name: str) -> netns.Process:
    serve = host.start(f"serve-{name}", ["pkictl", "--home", str(home), "serve", "--replica", name, "--listen", f"{host.address}:8443",
                                         "--dns", f"{host.name}.internal", "--follow-interval", "0.5"])
    serve.wait_for(rf"ready: EST on https://{host.name}\.internal:8443/")
    return serve


def _serial(directory: Path) -> int:
    return CredentialStore(directory).load().certificate.serial_number


def test_a_node_renews_through_the_other_replica_when_its_replica_host_is_lost(tmp_path):
    netns.require()
    with netns.Fleet(tmp_path, HOSTS) as fleet, \
            PostgresCluster(netns=fleet["db"].ns, address=fleet["db"].address) as cluster:
        ca1, ca2, tw = fleet["ca1"], fleet["ca2"], fleet["tw"]
        url = cluster.create_database("pkictl")
        home1, home2 = ca1.path(HOME), ca2.path(HOME)
        ca1.run(["pkictl", "--home", str(home1), "init-ca", "--db", url])
        staged = tmp_path / "replica-home"
        ca1.run(["pkictl", "--home", str(home1), "db", "replica", str(staged)])
        home2.parent.mkdir(parents=True)
        shutil.copytree(staged, home2, symlinks=True)  # what cp -a to the replica host does
        assert not (home2 / "root" / "key.pem").exists()
        serve1, serve2 = _serve(ca1, home1, "ca1"), _serve(ca2, home2, "ca2")

        printed = ca1.run(["pkictl", "--home", str(home1), "enroll-node", "TW", "--token"]).stdout
        token = re.search(r"^\s+(\S+)\s*$", printed, re.M).group(1)
        fingerprint = re.search(r"sha256:[0-9a-f]{64}", printed).group(0)
        directory = tw.path(NODE_DIR)
        tw.run(["pki-agent", "enroll", "--name", "TW", "--ca-url", "https://ca1.internal:8443", "--fingerprint", fingerprint,
                "--token", token, "--dir", str(directory)])
        config = directory / "agent.yaml"
        document = yaml.safe_load(config.read_text())
        first = _serial(directory)

        # ca1's replica is lost. Without a fallback, TW cannot renew (the negative control).
        os.killpg(serve1.popen.pid, signal.SIGKILL)  # the replica and its signing workers, as a host lost
        serve1.popen.wait(DEADLINE)
        alone = tw.run(["pki-agent", "renew-now", "--config", str(config)], check=False)
        assert alone.returncode == 1 and "cannot reach the EST server https://ca1.internal:8443" in alone.stdout, alone
        assert _serial(directory) == first

        document["renewal"]["fallback_ca_urls"] = ["https://ca2.internal:8443"]
        config.write_text(yaml.safe_dump(document))
        renewed = tw.run(["pki-agent", "renew-now", "--config", str(config)])
        assert "trying the next replica, https://ca2.internal:8443" in renewed.stderr, renewed.stderr
        second = _serial(directory)
        assert second != first

        # ca2 reads the one shared inventory and audit chain: the renewal is there, once.
        listed = ca2.run(["pkictl", "--home", str(home2), "status", "--all"]).stdout
        for serial in (first, second):
            assert re.search(rf"^TW\s+node\s+{f'{serial:x}'[:16]}", listed, re.M), listed
        ca2.run(["pkictl", "--home", str(home2), "audit", "verify"])

        # A revocation on ca2 is in ca2's CRL, and TW, asked again, is refused as revoked.
        ca2.run(["pkictl", "--home", str(home2), "revoke", "TW"])
        crl = tw.run(["curl", "-sS", "--fail", "--cacert", str(directory / "ca.pem"), "https://ca2.internal:8443/crl.pem"]).stdout
        assert x509.load_pem_x509_crl(crl.encode()).get_revoked_certificate_by_serial_number(second) is not None, crl
        again = tw.run(["pki-agent", "renew-now", "--config", str(config)], check=False)
        assert again.returncode == 1 and "the certificate cannot renew (revoked" in again.stdout, again
        assert re.search(r"pairing request code \S+ waits for approval: on the CA host run 'pkictl approve TW --code", again.stdout), again
        serve2.stop()
