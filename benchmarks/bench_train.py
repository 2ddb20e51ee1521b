"""Training throughput and peak memory of the full statetx loop (data, loss, optimiser, logging).

    python benchmarks/bench_train.py                      # state_sm, S=64, B=8, 2,000 genes
    python benchmarks/bench_train.py --preset tiny --steps 50 --precision medium

Runs ``StateTransitionModel.fit`` on a seeded synthetic log1p dataset and prints cells/s (steady
state, from the loop's own log) and the peak resident memory of the process. Absolute numbers
depend on the machine; compare ratios measured side by side.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd


def synthetic(n_cells: int, n_genes: int, n_perts: int, n_cell_types: int,
              seed: int = 0) -> ad.AnnData:
    """Seeded log1p-like data: controls plus ``n_perts`` perturbations in each cell type."""
    rng = np.random.default_rng(seed)
    labels = np.array(["non-targeting"] + [f"P{i}" for i in range(n_perts)])
    pert = labels[rng.integers(0, len(labels), n_cells)]
    pert[: n_cells // 5] = "non-targeting"
    ct = np.array([f"CT{i}" for i in range(n_cell_types)])[rng.integers(0, n_cell_types, n_cells)]
    x = np.log1p(rng.poisson(0.8, size=(n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame({"gene": pert, "cell_type": ct},
                       index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(X=x, obs=obs)


def main(argv: list[str] | None = None) -> None:
    from statetx import StateTransitionModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="state_sm")
    p.add_argument("--set-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--precision", default="medium", choices=["highest", "high", "medium"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    adata = synthetic(args.cells, args.genes, 50, 4)
    model = StateTransitionModel(
        args.preset, pert_col="gene", cell_type_key="cell_type", control_pert="non-targeting",
        cell_set_len=args.set_len, batch_size=args.batch_size, max_steps=args.steps,
        val_freq=10**9, progress=False, matmul_precision=args.precision, device=args.device,
    )
    model.set_params(max_steps=args.steps)
    t0 = time.perf_counter()
    model.fit(adata)
    wall = time.perf_counter() - t0
    cells = args.steps * args.set_len * args.batch_size
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"preset={args.preset} S={args.set_len} B={args.batch_size} genes={args.genes} "
          f"steps={args.steps} matmul_precision={args.precision} device={model.device_}")
    print(f"  wall (incl. first steps) {wall:.1f} s, {cells / wall:.0f} cells/s overall")
    steady = model.history_.get("cells_per_s")
    if steady is not None and steady.notna().any():
        print(f"  steady-state (last log window) {steady.dropna().iloc[-1]:.0f} cells/s")
    print(f"  peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
