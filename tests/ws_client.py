"""An unmodified WebSocket client for the multi-host tests: it dials a plain ``ws://`` URL (a node's
loopback tunnel) and prints one JSON line per event, so that a test can count messages sent,
echoed and lost, and connections tried and failed.

    python tests/ws_client.py --url ws://127.0.0.1:18789 --name TW long --interval 0.1
    python tests/ws_client.py --url ws://127.0.0.1:18789 --name TW probe --every 1
    python tests/ws_client.py --url ws://127.0.0.1:18789 --name TW once

Modes:
    long   one connection; a message every --interval s, each echo matched by its sequence
           number; ends when the connection closes (exit 3) or on SIGTERM (exit 0)
    probe  a new connection every --every s: open, one message, its echo, close; each attempt
           bounded by --timeout s; until SIGTERM
    once   one such attempt; exit 0 if the echo came back, 1 if not

Lines (``t`` = time.time()):
    {"event": "ready", "name": "TW-long"}
    {"event": "open", "t": ...}                                   long
    {"event": "sent", "seq": 5, "t": ...}                         long
    {"event": "echo", "seq": 5, "rtt_ms": 1.9, "t": ...}          long
    {"event": "closed", "code": 1006, "reason": "...", "t": ...}  long: the connection ended
    {"event": "probe", "n": 3, "ok": true, "ms": 12.5, "t": ...}  probe, once
    {"event": "probe", "n": 4, "ok": false, "error": "...", "t": ...}
    {"event": "summary", "sent": 120, "echoed": 120, "lost": [], "max_gap_ms": 140.2}    long, at the end
    {"event": "summary", "tried": 30, "failed": 0}                                       probe, at the end

Every mode stops by itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def say(**record) -> None:
    record.setdefault("t", round(time.time(), 3))
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def attempt(url: str, name: str, n: int, timeout: float) -> bool:
    """Open a connection, send one message, wait for its echo, close; print the outcome."""
    started = time.monotonic()
    payload = json.dumps({"from": name, "seq": n, "t": time.time()})
    try:
        async with asyncio.timeout(timeout):
            async with connect(url, open_timeout=timeout, close_timeout=1, ping_interval=None) as websocket:
                await websocket.send(payload)
                answer = await websocket.recv()
        if answer != payload:
            raise ValueError(f"echo differs: {str(answer)[:80]!r}")
    except Exception as exc:  # noqa: BLE001 - every failure is a counted, printed outcome
        say(event="probe", n=n, ok=False, error=f"{type(exc).__name__}: {exc}", ms=round((time.monotonic() - started) * 1000, 1))
        return False
    say(event="probe", n=n, ok=True, ms=round((time.monotonic() - started) * 1000, 1))
    return True


async def probe(args, stop: asyncio.Event) -> int:
    tried = failed = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        tried += 1
        if not await attempt(args.url, args.name, tried, args.timeout):
            failed += 1
        next_at = max(next_at + args.every, loop.time())
        try:
            await asyncio.wait_for(stop.wait(), next_at - loop.time())
        except asyncio.TimeoutError:
            pass
    say(event="summary", tried=tried, failed=failed)
    return 0


async def long(args, stop: asyncio.Event) -> int:
    pending: dict[int, float] = {}
    sent = echoed = 0
    last_echo = None
    max_gap = 0.0
    loop = asyncio.get_running_loop()
    try:
        websocket = await connect(args.url, open_timeout=args.timeout, close_timeout=1, ping_interval=None)
    except Exception as exc:  # noqa: BLE001
        say(event="closed", code=None, reason=f"cannot open: {type(exc).__name__}: {exc}")
        return 3
    say(event="open")

    async def receive() -> None:
        nonlocal echoed, last_echo, max_gap
        async for message in websocket:
            seq = json.loads(message)["seq"]
            sent_at = pending.pop(seq, None)
            now = time.monotonic()
            if sent_at is None:
                say(event="error", error=f"echo of unknown or repeated seq {seq}")
                continue
            echoed += 1
            if last_echo is not None:
                max_gap = max(max_gap, now - last_echo)
            last_echo = now
            say(event="echo", seq=seq, rtt_ms=round((now - sent_at) * 1000, 1))

    receiver = asyncio.create_task(receive())
    ended = None
    next_at = loop.time()
    try:
        while not stop.is_set() and not receiver.done():
            sent += 1
            pending[sent] = time.monotonic()
            await websocket.send(json.dumps({"from": args.name, "seq": sent, "t": time.time()}))
            say(event="sent", seq=sent)
            next_at += args.interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            except asyncio.TimeoutError:
                pass
        if stop.is_set():  # give the last echoes their round trip before counting
            deadline = loop.time() + 2.0
            while pending and not receiver.done() and loop.time() < deadline:  # noqa: ASYNC110 - no event says the last echo is in
                await asyncio.sleep(0.02)
    except ConnectionClosed:
        pass
    if receiver.done():
        ended = receiver.exception() if not receiver.cancelled() else None
    receiver.cancel()
    closed = websocket.close_code is not None and not stop.is_set()
    if closed or ended is not None:
        say(event="closed", code=websocket.close_code, reason=str(websocket.close_reason or ended or ""))
    await websocket.close()
    say(event="summary", sent=sent, echoed=echoed, lost=sorted(pending), max_gap_ms=round(max_gap * 1000, 1))
    return 3 if closed or ended is not None else 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True, help="put in every message, so that the gateway's log says whose it is")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for opening a connection / one probe")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("long").add_argument("--interval", type=float, default=0.1)
    modes.add_parser("probe").add_argument("--every", type=float, default=1.0)
    modes.add_parser("once")
    args = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    say(event="ready", name=args.name)
    if args.mode == "once":
        return 0 if await attempt(args.url, args.name, 1, args.timeout) else 1
    return await (long if args.mode == "long" else probe)(args, stop)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
