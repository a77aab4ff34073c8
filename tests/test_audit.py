"""The audit log: a valid chain from appends; edits, deletions, moves, forgeries and truncation
found with the line named; concurrent appends from two real processes keep one gapless chain."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pkictl.audit import GENESIS, AuditLog, VerifyResult, record_hash
from pkictl.clock import FixedClock
from pkictl.errors import AuditError

from support import DEADLINE

START = dt.datetime(2025, 11, 21, 14, 9, tzinfo=dt.timezone.utc)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture
def log(tmp_path: Path, clock: FixedClock) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", clock=clock)


def _fill(log: AuditLog, clock: FixedClock, count: int) -> list[dict]:
    records = []
    for i in range(count):
        records.append(log.append("issued", name=f"node{i}", kind="node", serial=0xABC000 + i))
        clock.advance(1)
    return records


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _rewrite(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def test_appends_build_a_valid_chain(log, clock):
    """Each record carries seq 1..n, the clock's time, its fields, the previous hash and its own."""
    records = _fill(log, clock, 5)
    result = log.verify()
    assert result == VerifyResult(ok=True, records=5)
    parsed = [json.loads(line) for line in _lines(log)]
    assert parsed == records
    assert [r["seq"] for r in parsed] == [1, 2, 3, 4, 5]
    assert parsed[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(parsed))
    assert all(record_hash(r) == r["hash"] for r in parsed)
    assert parsed[0]["time"] == "2025-11-21T14:09:00.000000Z"
    assert parsed[4]["time"] == "2025-11-21T14:09:04.000000Z"
    assert list(parsed[0]) == ["seq", "time", "event", "name", "kind", "serial", "prev", "hash"]
    assert log.head() == (5, parsed[4]["hash"])


def test_fields_are_converted_for_json(log):
    """An int serial becomes lower-case hex, datetimes become ISO-8601 UTC, tuples become lists."""
    later = dt.datetime(2026, 2, 19, 14, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    record = log.append("revoked", serial=0xDEADBEEF, serials=(0xA, 0xB), not_after=later, sans=("DNS:gw.lan",))
    assert record["serial"] == "deadbeef"
    assert record["serials"] == ["a", "b"]
    assert record["not_after"] == "2026-02-19T12:09:00.000000Z"
    assert record["sans"] == ["DNS:gw.lan"]
    assert log.verify().ok


def test_bad_fields_are_refused_before_anything_is_written(log):
    """Reserved names, malformed events, unserialisable values, NaN and naive datetimes raise."""
    with pytest.raises(ValueError, match="reserved"):
        log.append("issued", hash="x")
    with pytest.raises(ValueError, match="event"):
        log.append("Issued Now")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        log.append("issued", key=object())
    with pytest.raises(ValueError):
        log.append("issued", ratio=float("nan"))
    with pytest.raises(ValueError, match="naive"):
        log.append("issued", at=dt.datetime(2025, 1, 1))  # noqa: DTZ001 - the naive time under test
    assert not log.path.exists() or log.path.read_bytes() == b""
    assert log.verify() == VerifyResult(ok=True, records=0)


def test_empty_and_missing_logs_verify_with_zero_records(log):
    """A log that does not exist, and an empty one, are intact with 0 records."""
    assert log.verify() == VerifyResult(ok=True, records=0)
    log.path.write_bytes(b"")
    assert log.verify() == VerifyResult(ok=True, records=0)


def test_log_and_head_are_created_0600(log, clock):
    """The log and its head are born mode 0600 (they hold names and serial numbers)."""
    old = os.umask(0o022)
    try:
        _fill(log, clock, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.head_path.stat().st_mode) == 0o600


def test_edited_field_in_a_middle_line_is_found(log, clock):
    """Changing a name in line 4 of 7 is reported at line 4 as a hash mismatch."""
    _fill(log, clock, 7)
    lines = _lines(log)
    lines[3] = lines[3].replace(b'"name":"node3"', b'"name":"evil3"')
    _rewrite(log, lines)
    result = log.verify()
    assert not result.ok and result.records == 3
    assert result.problem == "line 4: hash does not match its content (edited?)"


def test_edited_line_with_recomputed_hash_breaks_the_next_link(log, clock):
    """An edit whose hash is recomputed is found at the following line, whose prev no longer matches."""
    _fill(log, clock, 7)
    lines = _lines(log)
    record = json.loads(lines[3])
    record["name"] = "evil3"
    record["hash"] = record_hash(record)
    lines[3] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    _rewrite(log, lines)
    result = log.verify()
    assert not result.ok
    assert result.problem.startswith("line 5: prev does not match the hash of line 4")


def test_whitespace_edit_is_found(log, clock):
    """A line changed only in layout (same JSON value) is still reported as edited."""
    _fill(log, clock, 3)
    lines = _lines(log)
    lines[1] = lines[1].replace(b'"event":', b'"event": ')
    _rewrite(log, lines)
    assert log.verify().problem == "line 2: not byte-for-byte as pkictl writes it (edited?)"


def test_deleted_middle_line_is_found(log, clock):
    """Removing line 3 of 6 is reported at line 3, where seq jumps."""
    _fill(log, clock, 6)
    lines = _lines(log)
    del lines[2]
    _rewrite(log, lines)
    result = log.verify()
    assert not result.ok and result.records == 2
    assert result.problem.startswith("line 3: seq is 4, expected 3")


def test_truncated_last_line_is_found_through_the_head(log, clock):
    """Cutting the last whole line leaves a valid chain, but the head says one more record."""
    _fill(log, clock, 5)
    _rewrite(log, _lines(log)[:-1])
    result = log.verify()
    assert not result.ok and result.records == 4
    assert result.problem == "log ends at seq 4 but the head says 5 (truncated)"


def test_line_cut_mid_record_is_found(log, clock):
    """A log cut inside its last line is reported as an incomplete record on that line."""
    _fill(log, clock, 5)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-20])
    result = log.verify()
    assert not result.ok and result.records == 4
    assert result.problem.startswith("line 5: incomplete record")


def test_emptied_or_deleted_log_is_found_through_the_head(log, clock):
    """An emptied log, or a deleted one, under a head is reported as truncated or deleted."""
    _fill(log, clock, 3)
    log.path.write_bytes(b"")
    assert log.verify().problem == "log is empty but the head says 3 (truncated or deleted)"
    log.path.unlink()
    assert log.verify().problem == "log is missing but the head says 3 (truncated or deleted)"


def test_missing_head_under_a_longer_log_is_found(log, clock):
    """A log of several records whose head file was removed does not verify."""
    _fill(log, clock, 3)
    log.head_path.unlink()
    result = log.verify()
    assert not result.ok
    assert "head file audit.log.head is missing" in result.problem


def test_reordered_lines_are_found(log, clock):
    """Swapping lines 3 and 4 is reported at line 3."""
    _fill(log, clock, 6)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(log, lines)
    result = log.verify()
    assert not result.ok
    assert result.problem.startswith("line 3: seq is 4, expected 3")


def test_forged_line_with_wrong_prev_is_found(log, clock):
    """An appended record with the next seq and a self-consistent hash but a wrong prev is found."""
    _fill(log, clock, 4)
    forged = {"seq": 5, "time": "2025-11-21T15:00:00.000000Z", "event": "issued", "name": "mallory",
              "serial": "abc", "prev": "1" * 64}
    forged["hash"] = record_hash(forged)
    with log.path.open("ab") as f:
        f.write(json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    result = log.verify()
    assert not result.ok and result.records == 4
    assert result.problem.startswith("line 5: prev does not match the hash of line 4")


def test_forged_line_continuing_the_chain_is_found_through_the_head(log, clock):
    """A record appended by hand with a correct prev and hash, but no head update, is found."""
    records = _fill(log, clock, 4)
    forged = {"seq": 5, "time": "2025-11-21T15:00:00.000000Z", "event": "issued", "name": "mallory",
              "prev": records[3]["hash"]}
    forged["hash"] = record_hash(forged)
    forged2 = {"seq": 6, "time": "2025-11-21T15:00:01.000000Z", "event": "issued", "name": "mallory2",
               "prev": forged["hash"]}
    forged2["hash"] = record_hash(forged2)
    with log.path.open("ab") as f:
        for record in (forged, forged2):
            f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
    result = log.verify()
    assert not result.ok
    assert result.problem.startswith("log ends at seq 6 but the head says 4")


def test_append_refuses_to_hide_a_truncation(log, clock):
    """After the last line is cut, append raises instead of writing a new record over the gap."""
    _fill(log, clock, 3)
    _rewrite(log, _lines(log)[:-1])
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match="ends at seq 2 but audit.log.head says seq 3"):
        log.append("issued", name="late")
    assert log.path.read_bytes() == before


def test_a_truncated_audit_log_stops_a_command_with_a_message_not_a_traceback(tmp_path):
    """'pkictl enroll-node' on a CA home whose audit.log lost its last line exits 1 with one line
    naming the gap, no traceback, and leaves the log as it was.

    Mutation: ``class AuditError(Exception)`` (no longer a PKIError, which the CLI turns into a
    message) makes the command end in a traceback, and this test fails."""
    from click.testing import CliRunner

    from pkictl.cli import cli

    home = tmp_path / "ca"
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "init-ca"], env={"PKICTL_HOME": None}).exit_code == 0
    audit = home / "audit.log"
    lines = audit.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2
    audit.write_bytes(b"".join(lines[:-1]))
    before = audit.read_bytes()
    result = runner.invoke(cli, ["--home", str(home), "enroll-node", "N2"], env={"PKICTL_HOME": None})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output and "audit.log.head says seq" in result.output, result.output
    assert audit.read_bytes() == before


def test_a_torn_line_after_the_heads_record_is_dropped_and_recorded(log, clock):
    """An append killed in its write() leaves a partial line after the record the head names:
    verify accepts it with a note, and the next append cuts it off, records its length and
    SHA-256 (event torn-record-dropped) and then appends; the chain verifies."""
    import hashlib

    _fill(log, clock, 2)
    torn = b'{"seq":3,"ti'
    with log.path.open("ab") as f:
        f.write(torn)
    checked = log.verify()
    assert checked.ok and "incomplete record after the head's" in checked.note
    record = log.append("issued", name="late")
    lines = _lines(log)
    dropped = json.loads(lines[2])
    assert (dropped["seq"], dropped["event"], dropped["bytes"], dropped["sha256"]) == (3, "torn-record-dropped", len(torn),
                                                                                      hashlib.sha256(torn).hexdigest())
    assert record["seq"] == 4 and len(lines) == 4 and log.verify().ok and log.head() == (4, record["hash"])


def test_append_refuses_after_a_torn_line_the_head_does_not_lead_to(log, clock):
    """Negative twin: a partial line after a record the head does not name (records removed, or
    a line cut by hand) makes append raise AuditError and leaves the bytes as they were."""
    _fill(log, clock, 3)
    lines = _lines(log)
    _rewrite(log, [*lines[:2], lines[2][:20]])  # record 3 cut: the head still says 3
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match="ends at seq 2 but audit.log.head says seq 3"):
        log.append("issued", name="late")
    assert log.path.read_bytes() == before
    assert not log.verify().ok


def test_head_one_behind_after_an_interrupted_append_is_accepted_and_repaired(log, clock):
    """A head left one record behind (crash after the record's fsync) verifies with a note, and
    the next append brings the head up to date."""
    _fill(log, clock, 3)
    old_head = log.head_path.read_bytes()
    log.append("issued", name="node3")
    log.head_path.write_bytes(old_head)  # the state a crash before the head update leaves
    result = log.verify()
    assert result.ok and result.records == 4 and "one record behind" in result.note
    record = log.append("issued", name="node4")
    assert record["seq"] == 5
    assert log.verify() == VerifyResult(ok=True, records=5)


def test_one_hand_appended_record_is_only_a_note(log, clock):
    """A single correctly chained record added without a head update cannot be told from an
    interrupted append: ok, with a note naming the line."""
    records = _fill(log, clock, 2)
    forged = {"seq": 3, "time": "2025-11-21T15:00:00.000000Z", "event": "issued", "name": "mallory",
              "prev": records[1]["hash"]}
    forged["hash"] = record_hash(forged)
    with log.path.open("ab") as f:
        f.write(json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    result = log.verify()
    assert result.ok and result.records == 3
    assert "line 3 was not written by pkictl" in result.note


def test_anchor_kept_elsewhere_catches_a_consistent_rewrite(log, clock):
    """Rewriting log and head consistently passes the plain check but not one against an anchor."""
    _fill(log, clock, 3)
    anchor = log.head()
    assert log.verify(anchor=anchor).ok
    # A writer of both files drops record 3 and its head, then appends a record of its own.
    _rewrite(log, _lines(log)[:-1])
    last = json.loads(_lines(log)[-1])
    log.head_path.write_text(json.dumps({"seq": 2, "hash": last["hash"]}))
    log.append("issued", name="mallory")
    assert log.verify().ok
    result = log.verify(anchor=anchor)
    assert not result.ok
    assert result.problem == "line 3: hash differs from the anchor's (the log was rewritten up to here)"
    _rewrite(log, _lines(log)[:-1])
    log.head_path.write_text(json.dumps({"seq": 2, "hash": last["hash"]}))
    assert log.verify(anchor=anchor).problem == "log ends at seq 2 but the anchor says 3 (truncated)"


def test_append_into_a_missing_directory_raises_audit_error(tmp_path, clock):
    """The log's directory is not created: a missing one is an AuditError naming it."""
    log = AuditLog(tmp_path / "nowhere" / "audit.log", clock=clock)
    with pytest.raises(AuditError, match="does not exist"):
        log.append("issued", name="x")


def test_symlinked_log_is_refused(tmp_path, clock):
    """A log path that is a symlink is not followed."""
    (tmp_path / "elsewhere.log").write_bytes(b"")
    (tmp_path / "audit.log").symlink_to(tmp_path / "elsewhere.log")
    with pytest.raises(AuditError, match="symlink"):
        AuditLog(tmp_path / "audit.log", clock=clock).append("issued", name="x")


APPENDER = textwrap.dedent("""
    import datetime as dt, sys
    from pathlib import Path
    from pkictl.audit import AuditLog
    from pkictl.clock import FixedClock
    path, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    log = AuditLog(path, clock=FixedClock(dt.datetime(2025, 11, 21, tzinfo=dt.timezone.utc)))
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        log.append("issued", name=f"{tag}{i}", serial=i)
    print("done", flush=True)
""")


def test_two_processes_appending_at_once_keep_one_chain(tmp_path):
    """Two processes released together append 200 records each: 400 records, seq 1..400, intact."""
    path = tmp_path / "audit.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), tag, "200"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for tag in ("a", "b")
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # release both before waiting on either
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, _ = proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0 and out.strip() == "done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = AuditLog(path, clock=FixedClock(START))
    assert log.verify() == VerifyResult(ok=True, records=400)
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 401))
    for tag in ("a", "b"):
        assert [r["name"] for r in records if r["name"].startswith(tag)] == [f"{tag}{i}" for i in range(200)]
