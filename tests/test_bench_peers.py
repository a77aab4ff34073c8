"""The gateway benchmark's peer configurations (bench/peers.py) are accepted by the real nginx,
haproxy and stunnel, and make each of them an mTLS forwarder that refuses what ours refuses.

The peers must be installed (.ci/run installs them with apt); a missing one fails the test
rather than letting it pass on nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import DEADLINE, TLSClient, bundle_context, client_context, refused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # bench/ is not a package


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", sorted(peers.PEERS))
def test_peer_config_makes_an_mtls_forwarder(name, workers, pki, echo_server, tmp_path):
    """The peer accepts the generated config, forwards node TW's bytes to the upstream, and
    refuses a client without a certificate and a revoked node (so the bench measures mTLS); with
    2 workers too (the multi-core mode: nginx's worker_processes, haproxy's nbthread), when nginx
    runs a master and two worker processes."""
    peer = peers.PEERS[name]
    program = peer.find()
    assert program, f"{name} is required for the benchmark's config test: {peer.install} (.ci/run does)"
    revoked = pki.ca.enroll("node", "gone", out=tmp_path / "gone").directory
    pki.ca.revoke("gone")
    material = peers.make_material(pki.ca, pki.gateway, tmp_path / "material")
    port = peers.free_port()
    config = peer.configure(tmp_path, material, port, echo_server.port, workers)
    if peer.check is not None:
        checked = subprocess.run(peer.check(program, config), capture_output=True, text=True, timeout=DEADLINE)
        assert checked.returncode == 0, f"{name} refused its config:\n{checked.stdout}{checked.stderr}"
    log = (tmp_path / "peer.log").open("w")
    proc = subprocess.Popen(peer.argv(program, config), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        peers.wait_listening(port, proc, DEADLINE)
        client = TLSClient(port, bundle_context(pki.node))
        try:
            assert client.echo(b"through " + name.encode()) == b"through " + name.encode()
            assert client.server_serial() == pki.ca.record("gw", "gateway").serial
        finally:
            client.close()
        assert refused(port, client_context(pki.node / "ca.pem"))
        assert refused(port, bundle_context(revoked))
        if name == "nginx":
            assert len(peers.peer_processes(proc.pid)) == 1 + workers  # the master and its workers
    finally:
        peers.stop(proc)
        log.close()
