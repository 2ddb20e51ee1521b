"""Training and prediction throughput, peak memory, per preset and set size (statetx's full loop).

    python benchmarks/bench_train.py                                  # state_sm, S=64, B=8
    python benchmarks/bench_train.py --presets tiny,small,state_sm --set-lens 64,128

Each (preset, set length) runs in its own process (so its peak RSS is its own): it fits
``StateTransitionModel`` on a seeded synthetic log1p dataset (sampling, loss, optimiser, logging:
the whole loop) and predicts ``--predict-cells`` cells with ``model.predict``. The table shows the
steady-state training rate (the loop's own last 10-step log window), the overall rate (first steps
and start-up included), prediction cells/s at the default full fp32 and with
``matmul_precision="medium"`` (best of two alternated runs each), the parameter count and the
process's peak RSS.
Absolute numbers depend on the machine; compare rows measured in one invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
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


def measure(preset: str, set_len: int, args: argparse.Namespace) -> dict:
    """Fit and predict once in this process; the numbers of one table row."""
    from statetx import StateTransitionModel

    # log every 10 steps so that short runs still have a steady-state window
    orig = StateTransitionModel._train_config
    StateTransitionModel._train_config = (  # type: ignore[method-assign]
        lambda self, s: dataclasses.replace(orig(self, s), log_every_n_steps=10))
    adata = synthetic(args.cells, args.genes, 50, 4)
    model = StateTransitionModel(
        preset, pert_col="gene", cell_type_key="cell_type", control_pert="non-targeting",
        cell_set_len=set_len, batch_size=args.batch_size, max_steps=args.steps,
        val_freq=10**9, progress=False, matmul_precision=args.precision, device=args.device,
    )
    t0 = time.perf_counter()
    model.fit(adata)
    wall = time.perf_counter() - t0
    steady = model.history_["cells_per_s"].dropna()
    query = adata[: args.predict_cells].copy()  # at most --cells: the rate divides by what ran
    n_pred = query.n_obs
    pred_s = {"highest": [], "medium": []}  # full fp32 (the default) and bf16 / TF32 products
    for mp in pred_s:
        model.predict(query[:64].copy(), matmul_precision=mp)  # warm-up
    for _ in range(2):  # alternated, best of two
        for mp, times in pred_s.items():
            t0 = time.perf_counter()
            model.predict(query, matmul_precision=mp)
            times.append(time.perf_counter() - t0)
    return {
        "preset": preset, "S": set_len, "B": args.batch_size, "device": str(model.device_),
        "params_M": sum(p.numel() for p in model.network_.parameters()) / 1e6,
        "train_cells_s": float(steady.iloc[-1]) if len(steady) else float("nan"),
        "overall_cells_s": args.steps * set_len * args.batch_size / wall,
        "predict_cells_s": n_pred / min(pred_s["highest"]),
        "predict_medium_cells_s": n_pred / min(pred_s["medium"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="state_sm", help="comma-separated presets")
    p.add_argument("--set-lens", default="64", help="comma-separated cell_set_len values")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--predict-cells", type=int, default=4000)
    p.add_argument("--precision", default="medium", choices=["highest", "high", "medium"])
    p.add_argument("--device", default="auto")
    p.add_argument("--child", nargs=2, metavar=("PRESET", "SET_LEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child[0], int(args.child[1]), args)))
        return

    passthrough = list(argv or [])
    print(f"{args.genes} genes, {args.cells} cells, batch {args.batch_size} sets, "
          f"{args.steps} steps, matmul_precision {args.precision}, predicting "
          f"{min(args.predict_cells, args.cells)} cells; one process per row", flush=True)
    header = (f"{'preset':10s} {'S':>5s} {'params M':>9s} {'train cells/s':>14s} "
              f"{'overall':>8s} {'predict cells/s':>16s} {'(medium)':>9s} {'peak RSS MB':>12s} "
              "device")
    print(header, flush=True)
    for preset in args.presets.split(","):
        for set_len in (int(s) for s in args.set_lens.split(",")):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", preset,
                                  str(set_len)], capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{preset:10s} {set_len:5d} failed:\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            print(f"{preset:10s} {set_len:5d} {r['params_M']:9.1f} {r['train_cells_s']:14.0f} "
                  f"{r['overall_cells_s']:8.0f} {r['predict_cells_s']:16.0f} "
                  f"{r['predict_medium_cells_s']:9.0f} {r['peak_rss_mb']:12.0f} {r['device']}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
