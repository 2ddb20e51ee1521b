"""Import and command-line start-up time of statetx, next to ``import torch`` alone.

    python benchmarks/bench_import.py [--repeats 5]

Each statement runs ``--repeats`` times in a fresh interpreter; the table shows the median wall
time, then the slowest imports behind the estimator (``python -X importtime``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python (empty)": "pass",
    "import torch": "import torch",
    "import statetx": "import statetx",
    "from statetx import StateTransitionModel": "from statetx import StateTransitionModel",
    "import statetx.pp, .metrics, .pl": "import statetx.pp, statetx.metrics, statetx.pl",
}


def wall(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{'what':45s} {'median s':>9s}")
    for label, stmt in STATEMENTS.items():
        print(f"{label:45s} {wall([sys.executable, '-c', stmt], args.repeats):9.2f}", flush=True)
    cli = [sys.executable, "-m", "statetx", "--help"]
    print(f"{'statetx --help (CLI start-up)':45s} {wall(cli, args.repeats):9.2f}", flush=True)
    stmt = STATEMENTS["from statetx import StateTransitionModel"]
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt],
                         capture_output=True, text=True).stderr
    rows = []
    for line in out.splitlines():  # "import time: self | cumulative | <indent>name"
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(3)) <= 2:  # top-level imports and their direct children
            rows.append((int(m.group(2)) / 1e6, m.group(4)))
    print(f"\nslowest imports under '{stmt}' (cumulative s, one run):")
    for sec, name in sorted(rows, reverse=True)[:10]:
        print(f"  {name:40s} {sec:6.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
