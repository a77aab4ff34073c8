"""A real WebSocket gateway for the multi-host tests: echoes every message back on the connection
it came on, and prints one JSON line per event so that a test can count what arrived.

    python tests/ws_echo_server.py --listen 127.0.0.1:18789 [--max-seconds 300]

Lines (one JSON object each, ``t`` = time.time()):
    {"event": "ready", "listen": "127.0.0.1:18789"}
    {"event": "open", "conn": 3, "peer": "127.0.0.1:40112"}
    {"event": "recv", "conn": 3, "from": "TW-long", "seq": 17}    (then the same text is sent back)
    {"event": "close", "conn": 3, "code": 1000, "received": 42}
    {"event": "error", "error": "..."}

It stops on SIGTERM or SIGINT, and by itself after --max-seconds, so that nothing outlives a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def say(**record) -> None:
    record.setdefault("t", round(time.time(), 3))
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:18789", help="HOST:PORT")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    numbers = itertools.count(1)

    async def echo(websocket) -> None:
        conn = next(numbers)
        peer = websocket.remote_address
        say(event="open", conn=conn, peer=f"{peer[0]}:{peer[1]}" if peer else "?")
        received = 0
        try:
            async for message in websocket:
                received += 1
                try:
                    fields = json.loads(message)
                    say(event="recv", conn=conn, **{"from": fields.get("from"), "seq": fields.get("seq")})
                except (ValueError, AttributeError):
                    say(event="recv", conn=conn, text=str(message)[:80])
                await websocket.send(message)
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - a test counts these
            say(event="error", conn=conn, error=repr(exc))
        say(event="close", conn=conn, code=websocket.close_code, received=received)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(echo, host, int(port), ping_interval=None):
        say(event="ready", listen=args.listen)
        try:
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        except asyncio.TimeoutError:
            say(event="error", error=f"stopping after --max-seconds {args.max_seconds:g}")
    say(event="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
