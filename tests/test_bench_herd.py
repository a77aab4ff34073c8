"""bench/renewal_herd.py keeps working: a small herd is absorbed with no failure and the integrity
checks pass, a herd beyond a low shedding bound is answered 503 with Retry-After and still fully
renewed, a herd whose requests all time out is reported as failed (exit status 1), and on
PostgreSQL a herd spread over two replicas is absorbed with the integrity checks reading the
shared database (which catch a missing successor and a changed audit record)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "renewal_herd.py"


def herd(*args: str, nodes: int = 50) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--nodes", str(nodes), "--clients", "1", "--connections", "50", *args],
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


def test_a_postgresql_herd_is_spread_over_two_replicas_and_absorbed(postgres_bindir):
    """30 nodes against two `pkictl serve` replicas on a throwaway PostgreSQL server: exit 0, every
    node renewed once, both replicas answered renewals by their own log lines (15 each: the nodes
    go round-robin), the integrity checks on the shared database pass, and the server's directory
    and processes are gone afterwards.

    Mutation: renewal_herd.spread sending every node to replica 0 fails it (r2 answers none)."""
    run = herd("--engine", "postgresql", "--replicas", "2", nodes=30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "herd of 30: 30 renewed, 0 failed" in run.stdout and "answers: {200: 30}" in run.stdout, run.stdout
    answered = re.search(r"answered 200 by each \(its own log\): r1 (\d+), r2 (\d+)", run.stdout)
    assert answered and [int(n) for n in answered.groups()] == [15, 15], run.stdout
    assert "INTEGRITY" not in run.stdout
    cluster = re.search(r"PostgreSQL \S+ .* on 127\.0\.0\.1:\d+ in (\S+) \(fsync on, synchronous_commit on\)", run.stdout)
    assert cluster, run.stdout
    assert not Path(cluster.group(1)).exists()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, cluster.group(1))]


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_the_integrity_check_reads_the_shared_database_and_catches_what_is_wrong(pg_url, tmp_path):
    """Negative controls of renewal_herd.check_inventory on a CA in PostgreSQL (its home's
    database.yaml): nodes with one certificate only are reported; with two each it passes; an
    audit record changed in the database is reported by `pkictl audit verify`."""
    import psycopg

    sys.path.insert(0, str(BENCH.parent))
    import renewal_herd
    from pkictl.storage.database import close_pools

    home = tmp_path / "ca"
    subprocess.run([str(Path(sys.executable).parent / "pkictl"), "--home", str(home), "init-ca", "--db", pg_url],
                   check=True, capture_output=True, timeout=120)
    try:
        renewal_herd.make_fleet(home, tmp_path / "first", 3)
        problem = renewal_herd.check_inventory(home, 3)
        assert problem and "with other than 2 certificates: [('herd-000000', 1)" in problem, problem
        renewal_herd.make_fleet(home, tmp_path / "second", 3)  # a second certificate for each name
        assert renewal_herd.check_inventory(home, 3) is None
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE audit_records SET line = replace(line, '\"event\":', '\"event\" :') WHERE seq = 1")
        problem = renewal_herd.check_inventory(home, 3)
        assert problem and problem.startswith("pkictl audit verify"), problem
    finally:
        close_pools()
