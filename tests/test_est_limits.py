"""pkictl serve under slow and crowding clients, run as the installed command: a request header
that trickles is cut at --header-timeout, a body that trickles gets 408 at --body-timeout, one
address holds at most --max-connections-per-peer, and when the slots without a client
certificate are full the oldest gives way while certificate holders keep theirs.

The crowding "host" is 127.0.0.2 (every 127/8 address is this host's on Linux)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from est_support import EST, ServeProcess, curl
from support import DEADLINE, live_files

CROWD = "127.0.0.2"
HEAD = b"GET " + EST.encode() + b"/cacerts HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def _tls(port: int, ca_pem, *, source: str = "127.0.0.1", cert=None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    if cert is not None:
        ctx.load_cert_chain(str(cert["fullchain"]), str(cert["privkey"]))
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _answer(sock: ssl.SSLSocket) -> bytes:
    """Read one HTTP answer (status line and headers, then Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _closed(sock: socket.socket, timeout: float = DEADLINE) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


@pytest.fixture
def serve(pki):
    started = []

    def start(*args: str) -> ServeProcess:
        process = ServeProcess(pki.home, "--workers", "0", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_a_trickling_header_is_cut_and_a_prompt_client_keeps_its_connection(pki, serve):
    """With --header-timeout 1, a header that stops half-way is closed after about a second and
    logged ('header timeout', the bytes it sent); a client asking promptly gets 200 twice on one
    keep-alive connection, the clock starting again after each answer."""
    service = serve("--header-timeout", "1")
    slow = _tls(service.port, pki.home / "ca.pem")
    slow.sendall(HEAD)
    started = time.monotonic()
    assert _closed(slow, 8.0)  # not aiohttp's own keep-alive timeout (15 s) closing it
    assert time.monotonic() - started >= 0.9
    line = service.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ reason='header timeout' detail='(\d+) bytes and no complete request header")
    assert int(line.group(1)) == len(HEAD)
    prompt = _tls(service.port, pki.home / "ca.pem")
    for _ in range(2):
        prompt.sendall(HEAD + b"\r\n")
        assert _answer(prompt).startswith(b"HTTP/1.1 200")
    prompt.close()
    slow.close()


def test_a_trickling_body_gets_408(pki, serve):
    """With --body-timeout 1, a simpleenroll whose body stops at 10 of 500 bytes gets 408 saying
    the body did not arrive in time, and the line says 'body timeout'."""
    service = serve("--body-timeout", "1")
    sock = _tls(service.port, pki.home / "ca.pem")
    sock.sendall(b"POST " + EST.encode() + b"/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/pkcs10\r\nContent-Length: 500\r\n\r\n" + b"MIIBIjANBg")
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    service.log.wait_for(r"refused peer=127\.0\.0\.1:\d+ method=POST .* status=408 reason='body timeout'")
    sock.close()


def test_one_address_holds_at_most_its_share(pki, serve):
    """With --max-connections 64 --max-connections-per-peer 8, 20 idle connections from one
    address leave 8 open and 12 closed at once ('peer connection limit'), while curl from
    another address gets the CA certificates."""
    service = serve("--max-connections", "64", "--max-connections-per-peer", "8", "--header-timeout", "60",
                    "--handshake-timeout", "60")
    crowd = [socket.create_connection(("127.0.0.1", service.port), timeout=DEADLINE, source_address=(CROWD, 0)) for _ in range(20)]
    try:
        assert sum(_closed(s, 1.0) for s in crowd[8:]) == 12
        assert not any(_closed(s, 0.05) for s in crowd[:8])
        service.log.wait_for(r"refused peer=127\.0\.0\.2:\d+ reason='peer connection limit' detail='8 connections open from 127\.0\.0\.2'")
        assert curl(service.url + EST + "/cacerts", cacert=pki.home / "ca.pem").status == 200
    finally:
        for sock in crowd:
            sock.close()


def test_certificate_holders_keep_their_slots_when_the_rest_is_full(pki, serve):
    """With --max-connections 8 (2 kept for certificate holders), two TLS connections with TW's
    certificate stay usable through 20 idle connections from one address; the crowd's oldest
    give way ('evicted'), and a client without a certificate still gets through."""
    service = serve("--max-connections", "8", "--max-connections-per-peer", "8", "--header-timeout", "60",
                    "--handshake-timeout", "60")
    holders = [_tls(service.port, pki.home / "ca.pem", cert=live_files(pki.node)) for _ in range(2)]
    for sock in holders:
        sock.sendall(HEAD + b"\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 200")
    crowd = [socket.create_connection(("127.0.0.1", service.port), timeout=DEADLINE, source_address=(CROWD, 0)) for _ in range(20)]
    try:
        assert sum(_closed(s, 1.0) for s in crowd[:14]) == 14
        assert not any(_closed(s, 0.05) for s in crowd[14:])
        service.log.wait_for(r"refused peer=127\.0\.0\.2:\d+ reason='evicted' detail='6 connections without a client certificate")
        assert curl(service.url + EST + "/cacerts", cacert=pki.home / "ca.pem").status == 200
        for sock in holders:
            sock.sendall(HEAD + b"\r\n")
            assert _answer(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in [*crowd, *holders]:
            sock.close()


def test_contradictory_caps_are_refused_before_anything_starts(pki):
    """--max-connections-per-peer above --max-connections is a usage error naming both."""
    from est_support import pkictl

    result = pkictl(pki.home, "serve", "--listen", "127.0.0.1:0", "--max-connections", "8", "--max-connections-per-peer", "9", check=False)
    assert result.returncode == 2 and "want at most --max-connections (8)" in result.stderr
