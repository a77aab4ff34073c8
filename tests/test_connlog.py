"""The listener's batched connection lines: the same text as records would give, in both
formats, each with the time of its event, and written within the batch's delay."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import logging

import pytest

from pki_agent.listener.authz import PeerIdentity
from pki_agent.listener.connlog import BatchingStreamHandler, EventBatch, JSONFormatter, TextFormatter, log_accepted, log_closed, log_refused

NODE = PeerIdentity("tw", 0x7A3F00C1, dt.datetime(2027, 3, 1, tzinfo=dt.timezone.utc), b"issuer")
EVENT_TIME = 1_796_000_000.25  # 2026-11-30T00:53:20.250Z


@contextlib.contextmanager
def root_handlers(*handlers: logging.Handler):
    """Only ``handlers`` on the root logger (pytest's capture handler set aside), INFO enabled."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = list(handlers)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def _lines(formatter: logging.Formatter, *, alone: bool, records: list | None = None) -> list[str]:
    """Log an accepted and a closed line through a batch and return what the handler wrote;
    ``alone=False`` adds a second handler, which sends the lines through records instead.
    ``records`` collects the LogRecords made meanwhile."""
    made = [] if records is None else records
    factory = logging.getLogRecordFactory()

    def counting(*args, **kwargs):
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(counting)
    try:
        return _log_two(formatter, alone)
    finally:
        logging.setLogRecordFactory(factory)


def _log_two(formatter: logging.Formatter, alone: bool) -> list[str]:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(formatter)
    loop = asyncio.new_event_loop()
    try:
        with root_handlers(handler, *(() if alone else (logging.NullHandler(),))):
            batch = EventBatch(loop, clock=lambda: EVENT_TIME)
            log_accepted("127.0.0.1:50514", NODE, "TLSv1.3", batch=batch)
            log_closed("127.0.0.1:50514", NODE, bytes_in=5, bytes_out=7, duration=1.25, reason="client closed", batch=batch)
            assert stream.getvalue() == ""  # held until the flush
            batch.flush()
            handler.flush()
    finally:
        loop.close()
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("formatter", [TextFormatter, JSONFormatter], ids=["text", "json"])
def test_lines_written_directly_read_as_records_would(formatter):
    no_records, records = [], []
    direct = _lines(formatter(), alone=True, records=no_records)
    through_records = _lines(formatter(), alone=False, records=records)
    assert (len(no_records), len(records)) == (0, 2)  # each path was the one named
    assert len(direct) == 2 and direct == through_records


def test_each_line_keeps_the_time_of_its_event():
    accepted, closed = (json.loads(line) for line in _lines(JSONFormatter(), alone=True))
    assert accepted["time"] == closed["time"] == "2026-11-30T00:53:20.250+00:00"
    assert (accepted["event"], closed["event"], closed["bytes_in"], closed["bytes_out"]) == ("accepted", "closed", 5, 7)


def test_text_line_names_time_level_logger_and_the_event():
    _, closed = _lines(TextFormatter(), alone=True)
    local = dt.datetime.fromtimestamp(EVENT_TIME).strftime("%Y-%m-%d %H:%M:%S")  # noqa: DTZ006 - local time, as logging's
    assert closed == (f"{local},250 INFO pki_agent.listener: closed peer=127.0.0.1:50514 node=tw serial=7a3f00c1 "
                      "bytes_in=5 bytes_out=7 duration=1.250s reason='client closed'")


def test_batch_is_written_within_its_delay_by_the_loop():
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(TextFormatter())

    async def scenario() -> list[str]:
        batch = EventBatch(asyncio.get_running_loop(), delay=0)
        log_accepted("127.0.0.1:50514", NODE, "TLSv1.3", batch=batch)
        assert stream.getvalue() == ""
        for _ in range(10):  # the batch's call_later(0), then the handler's call_soon: bounded
            await asyncio.sleep(0)
            if stream.getvalue():
                break
        return stream.getvalue().splitlines()

    with root_handlers(handler):
        lines = asyncio.run(scenario())
    assert len(lines) == 1 and "accepted peer=127.0.0.1:50514 node=tw serial=7a3f00c1 tls=TLSv1.3" in lines[0]


def test_nothing_is_held_when_info_is_off():
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream)
    loop = asyncio.new_event_loop()
    try:
        with root_handlers(handler):
            logging.getLogger().setLevel(logging.WARNING)
            batch = EventBatch(loop)
            log_accepted("127.0.0.1:50514", NODE, "TLSv1.3", batch=batch)
            batch.flush()
            handler.flush()
    finally:
        loop.close()
    assert stream.getvalue() == ""


def test_a_refusal_line_escapes_what_the_peer_supplied(caplog):
    """A claimed node name and a detail with a newline are escaped on the refusal line, which stays one line."""
    caplog.set_level(logging.WARNING, logger="pki_agent.listener")
    log_refused("192.0.2.1:5000", "not allowed", "detail\nrefused peer=forged", node="ex\n2026 INFO forged", serial=0x3a)
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and "node='ex\\n2026 INFO forged'" in line and "serial=3a" in line
