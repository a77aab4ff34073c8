"""Benchmark: `pkictl status` over 10,000 inventory rows against `pkictl --version`.

Goal (issue 3): status answers within 1.5x the time --version takes, i.e. within the CLI's own
start-up cost plus half of it. Both are run as real processes of the installed console script,
alternating, and the medians are compared.

Usage: python bench/status_speed.py [--rows 10000] [--runs 21]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pkictl.authority import CertificateAuthority


def fill(home: Path, rows: int) -> None:
    """Add ``rows`` node certificates to the inventory in one transaction.

    One real certificate is issued and its row copied with fresh serials and names: the rows have
    the size and shape of real ones, without spending minutes signing 10,000 certificates.
    """
    ca = CertificateAuthority.init(home)
    ca.enroll("node", "template", out=home / "template")
    ca.close()
    db = sqlite3.connect(home / "inventory.sqlite3")
    template = db.execute("SELECT * FROM certificates WHERE name = 'template'").fetchone()
    columns = [d[0] for d in db.execute("SELECT * FROM certificates LIMIT 0").description]
    serial_at, name_at, key_at = columns.index("serial"), columns.index("name"), columns.index("name_key")
    batch = []
    for i in range(rows):
        row = list(template)
        row[serial_at] = f"{0x4000_0000_0000_0000_0000 + i:x}"
        row[name_at] = row[key_at] = f"node-{i:05d}"
        batch.append(row)
    db.executemany(f"INSERT INTO certificates VALUES ({','.join('?' * len(columns))})", batch)
    db.commit()
    db.close()


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    pkictl = str(Path(sys.executable).parent / "pkictl")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "ca"
        fill(home, args.rows)
        commands = {
            "version": [pkictl, "--version"],
            "status": [pkictl, "--home", str(home), "status"],
            "status --json": [pkictl, "--home", str(home), "status", "--json"],
        }
        out = subprocess.run(commands["status --json"], capture_output=True, text=True)
        assert len(json.loads(out.stdout)) == args.rows + 4, "status did not list every row"
        for argv in commands.values():  # warm the page cache and the bytecode cache
            subprocess.run(argv, stdout=subprocess.DEVNULL)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():  # interleaved, so machine noise hits all alike
                samples[name].append(timed(argv))
    base = statistics.median(samples["version"])
    print(f"{args.rows} inventory rows, {args.runs} runs each, medians (ratio to pkictl --version):")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  pkictl {name:14} {median * 1000:7.1f} ms   {median / base:4.2f}x")
    ratio = statistics.median(samples["status"]) / base
    print(f"goal: status <= 1.50x --version: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
