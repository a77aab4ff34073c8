"""bench/renewal_herd.py keeps working: a small herd is absorbed with no failure and the integrity
checks pass, a herd beyond a low shedding bound is answered 503 with Retry-After and still fully
renewed, and a herd whose requests all time out is reported as failed (exit status 1)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "renewal_herd.py"


def herd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--nodes", "50", "--clients", "1", "--connections", "50", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_small_herd_is_absorbed_with_no_failure():
    """50 nodes: exit 0, 50 renewed, 0 failed, every answer 200, latency and the prediction printed."""
    run = herd()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "herd of 50: 50 renewed, 0 failed" in run.stdout, run.stdout
    assert "answers: {200: 50}" in run.stdout and "p99" in run.stdout and "predicts 100,000 nodes" in run.stdout, run.stdout
    assert "INTEGRITY" not in run.stdout


def test_a_herd_beyond_the_bound_is_shed_and_still_renewed():
    """With --max-pending 5, some of the 50 get 503 and a Retry-After; they come back and every
    node is renewed (exit 0, 0 failed), and the spread of Retry-After is reported."""
    run = herd("--serve-arg=--max-pending=5")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "herd of 50: 50 renewed, 0 failed" in run.stdout, run.stdout
    shed = re.search(r"503 answers: (\d+); Retry-After min (\d+) s", run.stdout)
    assert shed and int(shed.group(1)) > 0 and int(shed.group(2)) >= 1, run.stdout


def test_failed_renewals_are_reported_and_fail_the_run():
    """Negative control: a per-request timeout no answer can meet fails all 50 renewals: exit 1,
    '0 renewed, 50 failed', and the failures named."""
    run = herd("--timeout", "0.001")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "herd of 50: 0 renewed, 50 failed" in run.stdout and "failure: herd-" in run.stdout, run.stdout
