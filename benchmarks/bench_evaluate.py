"""Benchmark ``statetx.metrics.evaluate(profile="minimal")`` (DE included) on seeded synthetic data.

Default size (metrics.md §12): 100 perturbations × 900 cells + 10,000 controls × 2,000 genes, for
both the real and the predicted file. Prints the data-generation time, the total wall time of one
``evaluate`` call (DE included; not split by phase) and peak RSS.

    python benchmarks/bench_evaluate.py [--perts 100] [--cells 900] [--ctrl 10000] [--genes 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings


def _peak_rss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / (1024**3 if sys.platform == "darwin" else 1024**2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perts", type=int, default=100)
    ap.add_argument("--cells", type=int, default=900)
    ap.add_argument("--ctrl", type=int, default=10_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--threads", type=int, default=None, help="DE threads (default: all CPUs)")
    ap.add_argument("--profile", default="minimal")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from statetx.metrics import evaluate
    from statetx.metrics._synthetic import synthetic_log1p

    t0 = time.perf_counter()
    real, eff = synthetic_log1p(args.perts, args.cells, args.ctrl, args.genes, seed=1)
    pred, _ = synthetic_log1p(args.perts, args.cells, args.ctrl, args.genes, seed=2, effects=eff)
    t_gen = time.perf_counter() - t0
    zeros = float((real.X == 0).mean())
    print(f"data: real {real.shape}, pred {pred.shape}, {zeros:.0%} zeros, "
          f"generated in {t_gen:.1f} s, RSS after generation {_peak_rss_gb():.2f} GB")

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, agg = evaluate(pred, real, "target_gene", "non-targeting", profile=args.profile,
                            num_threads=args.threads)
    wall = time.perf_counter() - t0
    mean = agg[agg["statistic"] == "mean"].iloc[0]
    print(f"evaluate(profile={args.profile!r}, threads={args.threads or os.cpu_count()}): "
          f"{wall:.1f} s wall, peak RSS {_peak_rss_gb():.2f} GB")
    print("means: " + ", ".join(f"{c}={mean[c]:.4g}" for c in res.columns[1:]))


if __name__ == "__main__":
    main()
