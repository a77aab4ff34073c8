"""Fuzz test of the gateway listener's first bytes: a running listener (in-process, on asyncio and
on uvloop) fed random first bytes over raw TCP (random bytes, TLS-record-like headers with random
lengths, truncated or mutated ClientHellos, plain HTTP, nothing at all). It stays up and serves a
real node right after each, nothing reaches the upstream from an unauthenticated client, and no
ERROR with a traceback is logged."""

from __future__ import annotations

import logging
import socket
import ssl

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import fuzz_settings
from support import DEADLINE, TLSClient, bundle_context


def _client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl, TLS 1.2 and 1.3 offered)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


CLIENT_HELLO = _client_hello()


def _record(content_type: int, version: bytes, length: int, payload: bytes) -> bytes:
    return bytes([content_type]) + version + length.to_bytes(2, "big") + payload


@st.composite
def mutated_hello(draw) -> bytes:
    data = bytearray(CLIENT_HELLO[:draw(st.integers(0, len(CLIENT_HELLO)))])
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


first_bytes = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(_record, st.one_of(st.sampled_from([0x16, 0x17, 0x15, 0x14]), st.integers(0, 255)),
              st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00", b"\x03\x04", b"\xff\xff", b"\x00\x00"]),
              st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 16384, 16385, 18432, 65535])), st.binary(max_size=100)),
    mutated_hello(),
    st.sampled_from([b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x80\x2e\x01\x00\x02",
                     b"SSH-2.0-OpenSSH_9.6\r\n", b"\r\n", b"\x16\x03\x01\x00\x00", CLIENT_HELLO + CLIENT_HELLO]),
)


def _feed(port: int, data: bytes) -> None:
    """Connect, send ``data``, end the sending side and read until the listener closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except ConnectionError:  # reset by the listener: an answer too
            pass


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def test_random_first_bytes_never_reach_the_upstream_and_the_listener_stays_up(start_gateway_agent, echo_server, pki, caplog) -> None:
    """Random first bytes over raw TCP: refused, the upstream sees nothing, a real node is served after each."""
    agent = start_gateway_agent()
    node = bundle_context(pki.node)
    served = 0

    @fuzz_settings(60)
    @given(data=first_bytes)
    @example(data=CLIENT_HELLO[:5])
    @example(data=_record(0x16, b"\x03\x01", 65535, b""))
    def fuzz(data: bytes) -> None:
        nonlocal served
        _feed(agent.port, data)
        client = TLSClient(agent.port, node)
        try:
            assert client.echo(b"after-fuzz") == b"after-fuzz", "the listener no longer serves a real node"
        finally:
            client.close()
        served += 1
        assert echo_server.connections == served, f"{echo_server.connections - served} unauthenticated connection(s) reached the upstream"
        assert not _tracebacks(caplog), _tracebacks(caplog)

    fuzz()
    assert agent.error is None and agent._thread.is_alive(), "the agent stopped"
