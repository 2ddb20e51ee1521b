"""Benchmark: the work around the network at genome-wide scale (many perturbations).

Times, on seeded synthetic data with ``--perts`` perturbations (``--cells-per-pert`` cells each,
``--controls`` controls per cell type, ``--batches`` batches), the parts whose cost grows with the
number of perturbations, groups or controls rather than with the network: ``fit`` start-up (data
preparation, vocabulary, samplers, the ``small`` preset's mean-response start; 2 steps of a
``--preset`` network), ``predict`` of every cell with controls pooled per cell type and per
(cell type, batch), and ``metrics.evaluate(profile="minimal")`` of that prediction. Peak RSS is
the process's so far (``ru_maxrss``), so read it as a running maximum.

Usage::

    python benchmarks/bench_scale.py [--perts 4000] [--cells-per-pert 10] [--controls 20000]
        [--cell-types 1] [--batches 4] [--genes 200] [--preset small]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd


def synthetic(n_perts: int, per_pert: int, n_controls: int, n_cell_types: int, n_batches: int,
              n_genes: int, seed: int = 0) -> ad.AnnData:
    """log1p(Poisson) cells: every perturbation in every cell type, controls per cell type."""
    rng = np.random.default_rng(seed)
    perts = [f"G{i:05d}" for i in range(n_perts)]
    labels, types = [], []
    for c in range(n_cell_types):
        labels += list(np.repeat(perts, per_pert)) + ["non-targeting"] * n_controls
        types += [f"ct{c}"] * (n_perts * per_pert + n_controls)
    n = len(labels)
    obs = pd.DataFrame({"gene": pd.Categorical(labels), "cell_type": pd.Categorical(types),
                        "gem_group": pd.Categorical(rng.integers(0, n_batches, n).astype(str))},
                       index=[f"c{i}" for i in range(n)])
    x = np.log1p(rng.poisson(0.8, size=(n, n_genes))).astype(np.float32)
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)]))


def _timed(rows: list, what: str, fn):
    t = time.perf_counter()
    out = fn()
    rows.append((what, time.perf_counter() - t,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perts", type=int, default=4000)
    ap.add_argument("--cells-per-pert", type=int, default=10)
    ap.add_argument("--controls", type=int, default=20000)
    ap.add_argument("--cell-types", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()

    from statetx import StateTransitionModel
    from statetx.metrics import evaluate

    warnings.filterwarnings("ignore")
    a = synthetic(args.perts, args.cells_per_pert, args.controls, args.cell_types,
                  args.batches, args.genes)
    rows: list = []
    model = StateTransitionModel(args.preset, pert_col="gene", cell_type_key="cell_type",
                                 batch_col="gem_group", basal_mapping_strategy="random",
                                 control_pert="non-targeting", max_steps=2, val_freq=10**6,
                                 progress=False, device="cpu")
    _timed(rows, f"fit ({args.preset}, 2 steps)", lambda: model.fit(a))
    for pool in ("cell_type", "batch"):
        pred = _timed(rows, f"predict, basal_pool={pool}",
                      lambda p=pool: model.predict(a, basal_pool=p))
    _timed(rows, "evaluate (minimal)", lambda: evaluate(pred, a, "gene", "non-targeting",
                                                         profile="minimal"))
    print(f"{a.n_obs:,} cells x {a.n_vars} genes, {args.perts:,} perturbations, "
          f"{args.cell_types} cell type(s), {args.batches} batches, "
          f"{args.controls:,} controls per cell type")
    print(f"| {'step':<30} | seconds | peak RSS so far |")
    print(f"|{'-' * 32}|---------|-----------------|")
    for what, sec, rss in rows:
        print(f"| {what:<30} | {sec:7.2f} | {rss:12,.0f} MB |")


if __name__ == "__main__":
    main()
