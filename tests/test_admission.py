"""Connection admission: one address flooding the gateway listener holds at most its per-peer
share while nodes from other addresses are served; when the slots without a checked certificate
are full, the oldest of the busiest address makes room; connected nodes are never evicted.

The flooding "host" is 127.0.0.2 (every 127/8 address is this host's on Linux); the nodes
connect from 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from pkictl.admission import Admission, AdmissionLimits, peer_host

from support import DEADLINE, TLSClient, bundle_context, refusal_record, wait_until

FLOODER = "127.0.0.2"


def _idle_from(address: str, port: int, count: int) -> list[socket.socket]:
    """``count`` plain TCP connections from ``address`` that never send a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(address, 0))
        sockets.append(sock)
    return sockets


def _closed_by_server(sock: socket.socket, timeout: float = DEADLINE) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_one_address_holds_at_most_its_share_while_nodes_are_served(pki, start_gateway_agent, caplog):
    """With max_connections 64 and max_connections_per_peer 16, 40 idle connections from one
    address leave 16 open and 24 closed at once ('peer connection limit'), and TW from another
    address is served five times over while they stay open."""
    running = start_gateway_agent(max_connections=64, max_connections_per_peer=16, handshake_timeout=60)
    flood = _idle_from(FLOODER, running.port, 40)
    try:
        wait_until(lambda: running.call(lambda: running.agent.listener.active_connections) == 16,
                   what="the listener to hold 16 of the flooder's connections")
        assert sum(_closed_by_server(s, 0.5) for s in flood[16:]) == 24
        assert not any(_closed_by_server(s, 0.05) for s in flood[:16])
        record = refusal_record(caplog, "peer connection limit")
        assert FLOODER in record.getMessage() and "listener.max_connections_per_peer" in record.getMessage()
        for n in range(5):
            client = TLSClient(running.port, bundle_context(pki.node))
            assert client.echo(b"hello %d" % n) == b"hello %d" % n
            client.close()
    finally:
        for sock in flood:
            sock.close()


def test_a_full_listener_evicts_the_oldest_unchecked_connection_and_never_a_node(pki, start_gateway_agent, caplog):
    """With max_connections 8 (2 kept for nodes), two TW connections stay up through a flood of
    20 idle connections from one address; each new flood connection pushes out the flooder's
    oldest ('evicted'), and a third TW connection is served in the middle of it."""
    running = start_gateway_agent(max_connections=8, max_connections_per_peer=8, handshake_timeout=60)
    nodes = [TLSClient(running.port, bundle_context(pki.node)) for _ in range(2)]
    for client in nodes:
        assert client.echo(b"up") == b"up"
    flood = _idle_from(FLOODER, running.port, 20)
    try:
        wait_until(lambda: running.call(lambda: running.agent.listener.admission.unproved) == 6,
                   what="six unchecked connections held (8 less the 2 kept for nodes)")
        assert sum(_closed_by_server(s, 0.5) for s in flood[:14]) == 14  # the oldest made room
        assert not any(_closed_by_server(s, 0.05) for s in flood[14:])
        assert "made room for" in refusal_record(caplog, "evicted").getMessage()
        third = TLSClient(running.port, bundle_context(pki.node))
        assert third.echo(b"third") == b"third"
        third.close()
        for client in nodes:
            assert client.echo(b"still") == b"still"
    finally:
        for sock in flood:
            sock.close()
        for client in nodes:
            client.close()


def test_admission_counts_by_address_and_releases_every_way_out():
    """Admission in isolation: the per-peer cap refuses, the total full of proved connections
    refuses, the busiest address's oldest unproved ticket is evicted, and release is idempotent."""
    admission = Admission(AdmissionLimits(total=4, per_peer=3, reserved=1))
    assert all(admission.admit(("a", n), f"10.0.0.1:{n}").admitted for n in range(3))
    refused = admission.admit(("a", 3), "10.0.0.1:3")
    assert (refused.admitted, refused.reason) == (False, "peer connection limit")
    decision = admission.admit("b", "[2001:db8::1]:443")  # 3 unproved = total - reserved: room is made
    assert decision.admitted and decision.evict == ("a", 0)
    admission.proved("b")
    assert (admission.open, admission.unproved) == (3, 2)
    assert admission.admit("c", "10.0.0.9:1").evict is None  # 4 open, 3 unproved
    admission.proved("c")
    admission.proved(("a", 1))
    admission.proved(("a", 2))
    full = admission.admit("d", "10.0.0.7:1")
    assert (full.admitted, full.reason) == (False, "connection limit")
    admission.release("b")
    admission.release("b")
    assert admission.open == 3 and admission.admit("d", "10.0.0.7:1").admitted
    assert peer_host("[2001:db8::1]:443") == "2001:db8::1" and peer_host("10.0.0.1:5") == "10.0.0.1"


@pytest.mark.parametrize("limits", [dict(total=0), dict(total=4, per_peer=5), dict(total=4, reserved=4)])
def test_contradictory_limits_are_refused(limits):
    """A total below 1, a per-peer cap above the total, or every slot reserved is a ValueError saying what is wanted."""
    with pytest.raises(ValueError, match="want"):
        AdmissionLimits(**{"per_peer": 1, **limits})
