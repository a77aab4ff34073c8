"""What the listener forwards, byte for byte: bulk transfers each way while one side is slower
than the other (flow control), everything a node sent before it closed, everything the upstream
sent before it closed followed by a close_notify, and an upstream that is down or silent."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from support import DEADLINE, TLSClient, bundle_context, closed_record, wait_record

MIB = 1024 * 1024


class Upstream:
    """A one-connection TCP server on 127.0.0.1 run by ``serve(conn)`` in a thread. A smaller
    receive buffer and reads of 4 KiB make it the slow side, so the listener must hold data and
    stop reading the node (a buffer below loopback's 64 KiB segment would stall TCP itself)."""

    def __init__(self, serve, rcvbuf: int | None = None) -> None:
        self._listening = socket.create_server(("127.0.0.1", 0))
        self.port = self._listening.getsockname()[1]
        self.result: dict = {}
        self._rcvbuf = rcvbuf
        self._serve = serve
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._listening.settimeout(DEADLINE)
        conn, _ = self._listening.accept()
        with conn:
            if self._rcvbuf:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            conn.settimeout(DEADLINE)
            self._serve(conn, self.result)

    def join(self) -> dict:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the upstream did not finish in time"
        self._listening.close()
        return self.result


def _sink(conn: socket.socket, result: dict) -> None:
    """Read to EOF in small reads; keep the count and the digest."""
    digest, count = hashlib.sha256(), 0
    while data := conn.recv(4096):
        digest.update(data)
        count += len(data)
    result.update(count=count, sha256=digest.hexdigest())


def test_upload_is_delivered_whole_when_the_node_closes_right_after(pki, start_gateway_agent, caplog):
    """24 MiB sent as fast as TLS allows to an upstream that reads 4 KiB at a time, then the node
    closes at once: the upstream still gets every byte, and the closed line counts them."""
    payload = os.urandom(24 * MIB)
    upstream = Upstream(_sink, rcvbuf=256 * 1024)
    running = start_gateway_agent(upstream=f"127.0.0.1:{upstream.port}")
    client = TLSClient(running.port, bundle_context(pki.node))
    client.sock.sendall(payload)
    client.close()
    assert upstream.join() == {"count": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    closed = closed_record(caplog).pki_event
    assert (closed["bytes_in"], closed["reason"]) == (len(payload), "client closed")


def test_download_is_delivered_whole_then_closed_with_close_notify(pki, start_gateway_agent, caplog):
    """An upstream writes 24 MiB and closes; the node, reading slower, receives every byte and then
    a close_notify (not a bare TCP close: ragged EOFs are not suppressed here)."""
    payload = os.urandom(24 * MIB)

    def talk(conn: socket.socket, result: dict) -> None:
        assert conn.recv(2) == b"go"  # read, so that the close below is a FIN and not a reset
        conn.sendall(payload)

    upstream = Upstream(talk)
    running = start_gateway_agent(upstream=f"127.0.0.1:{upstream.port}")
    ctx = bundle_context(pki.node)
    raw = socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"go")
        digest, count = hashlib.sha256(), 0
        while data := tls.recv(16384):  # SSLEOFError here would mean no close_notify came
            digest.update(data)
            count += len(data)
    upstream.join()
    assert (count, digest.hexdigest()) == (len(payload), hashlib.sha256(payload).hexdigest())
    closed = closed_record(caplog).pki_event
    assert (closed["bytes_out"], closed["reason"]) == (len(payload), "upstream closed")


def test_both_directions_at_once_arrive_intact(pki, gateway_agent):
    """8 MiB echoed through the gateway in 256 KiB steps, each step read back before the next:
    what comes back is what went out."""
    payload = os.urandom(8 * MIB)
    client = TLSClient(gateway_agent.port, bundle_context(pki.node))
    back = bytearray()
    for start in range(0, len(payload), 256 * 1024):
        chunk = payload[start:start + 256 * 1024]
        back += client.echo(chunk)
    client.close()
    assert bytes(back) == payload


def test_upstream_down_closes_the_node_cleanly_and_says_why(pki, start_gateway_agent, caplog):
    """With nothing listening upstream the node's connection gets a close_notify right after its
    handshake, and the gateway logs 'upstream unreachable' with the node and the error."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        running = start_gateway_agent(upstream=f"127.0.0.1:{port}")
        ctx = bundle_context(pki.node)
        raw = socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
            assert tls.recv(10) == b""
    record = wait_record(caplog, lambda r: r.getMessage().startswith("upstream unreachable"), "the upstream unreachable line")
    assert "node=tw" in record.getMessage() and f"upstream=127.0.0.1:{port}" in record.getMessage()
    assert "refused" in record.getMessage().lower()


def test_upstream_that_never_answers_is_given_up_after_the_handshake_timeout(pki, start_gateway_agent, caplog):
    """An upstream whose accept queue is full drops the listener's SYNs; after the handshake
    timeout (2 s here) the node is closed and 'upstream unreachable' says no answer came."""
    with socket.socket() as full, socket.socket() as filler:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # room for one connection, taken below: later SYNs go unanswered
        filler.connect(full.getsockname())
        running = start_gateway_agent(upstream=f"127.0.0.1:{full.getsockname()[1]}")
        client = TLSClient(running.port, bundle_context(pki.node))
        assert client.sock.recv(10) == b""  # closed by the listener; the socket timeout bounds the wait
        client.close()
    record = wait_record(caplog, lambda r: r.getMessage().startswith("upstream unreachable"), "the upstream unreachable line")
    assert "error='no answer in 2 s'" in record.getMessage()


def test_upstream_given_by_name_is_resolved_and_reached(pki, start_gateway_agent, echo_server):
    """``upstream: localhost:PORT`` (a name, resolved per connection) reaches the upstream."""
    running = start_gateway_agent(upstream=f"localhost:{echo_server.port}")
    client = TLSClient(running.port, bundle_context(pki.node))
    assert client.echo(b"by name") == b"by name"
    client.close()
