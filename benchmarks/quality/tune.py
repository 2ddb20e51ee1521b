"""Choose ST's small-data defaults on *validation* folds (nested leave-one-context-out).

    python benchmarks/quality/tune.py --out tune_out --workers 2            # CPU
    python benchmarks/quality/tune.py --out tune_out --workers 12 --device cuda

For kang (5 cell types) and zhao (5 patients) every *pair* of contexts {a, b} is held out together
and ST is trained on the other three; the fit is scored on a and on b. For the outer test fold c
(the protocol of ``run.py``), a configuration's validation score is the mean over the four pair
fits {c, v} scored on v: the test context c is never trained on nor scored in its own validation
score. A configuration is chosen per outer fold by its validation score; when the same one wins for
every outer fold it can be the global default without touching any test fold. Scores: the Pearson
correlation of the predicted and real mean shift (the protocol's pearson_delta, real controls) and
the mse of the perturbed pseudobulk; the perturb-mean baseline is scored on the same pairs.
Writes ``tune.csv`` (one row per fit × scored context) and prints the selection table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(os.environ.get("STATETX_SHARED_DATA",
                             Path(__file__).resolve().parents[3] / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # statetx without installing
FILES = {"kang": ("kang2018_pbmc_ifnb_muscat_counts.h5ad", "control"),
         "zhao": ("zhao2021_glioblastoma_panobinostat_lemur_counts.h5ad", "DMSO")}

#: the candidates evaluated (name -> StateTransitionModel kwargs on top of the defaults). Every
#: configuration but the "avg" family ran before weight averaging existed and pins
#: weight_averaging="none" so that its name still means what ran; "mean_affine" is the small
#: preset with the mean-response skip, "no_skip" the default before that.
_NONE = {"pert_skip": "none"}
_MA = {"pert_skip": "mean_affine"}
_SHIFT = {"pert_skip": "shift"}
_LAST = {"weight_averaging": "none"}
CONFIGS: dict[str, dict] = {
    "avg": {},  # the defaults: the running mean of the weights from the first step
    "avg_half": {"averaging_start": 0.5},
    "avg_lr3e-4": {"lr": 3e-4},
    "avg_x2": {"passes": 200},
    "avg_fixed": {"train_pert_skip": False},
    "mean_affine": _LAST,
    "no_skip": {"model_kwargs": _NONE, **_LAST},
    "hidden_res": {"model_kwargs": {**_NONE, "residual_space": "hidden"}, **_LAST},
    "hidden_res_do": {"model_kwargs": {**_NONE, "residual_space": "hidden", "dropout": 0.1},
                      **_LAST},
    "hidden_res_x3": {"model_kwargs": {**_NONE, "residual_space": "hidden"}, "passes": 300,
                      **_LAST},
    "state_sm_ref": {"preset": "state_sm", "cell_set_len": 64, "batch_size": 8,
                     "max_steps": 1200, "lr": 1e-4},
    "shift": {"model_kwargs": _SHIFT, **_LAST},
    "shift_x0.3": {"model_kwargs": _SHIFT, "passes": 30, **_LAST},
    "shift_do": {"model_kwargs": {**_SHIFT, "dropout": 0.1}, **_LAST},
    "shift_lr3e-4": {"model_kwargs": _SHIFT, "lr": 3e-4, **_LAST},
    "shift_wd": {"model_kwargs": _SHIFT, "optimizer": "adamw", "weight_decay": 0.1, **_LAST},
    "mean_affine_untrained": {"model_kwargs": _MA, "max_steps": 1, "lr": 1e-12, **_LAST},
    "mean_affine_x0.3": {"model_kwargs": _MA, "passes": 30, **_LAST},
    "mean_affine_lr3e-4": {"model_kwargs": _MA, "lr": 3e-4, **_LAST},
    "mean_affine_fixed": {"model_kwargs": _MA, "train_pert_skip": False, **_LAST},
}


def load(name: str):
    """log1p(normalize_total 1e4) of the counts, dense float32 (no scanpy needed)."""
    import anndata as ad
    import scipy.sparse as sp

    fname, control = FILES[name]
    a = ad.read_h5ad(SHARED / fname)
    c = a.layers["counts"]
    c = np.asarray(c.toarray() if sp.issparse(c) else c, dtype=np.float64)
    a.X = np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    for col in ("target_gene", "cell_type", "batch"):
        a.obs[col] = a.obs[col].astype(str)
    return a, control


def pseudobulks(pred, real, control: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Per held-out context: (real control mean, real perturbed mean, predicted perturbed mean)."""
    out = {}
    is_c = (real.obs["target_gene"] == control).to_numpy()
    for ctx in sorted(set(real.obs["cell_type"])):
        m = (real.obs["cell_type"] == ctx).to_numpy()
        out[ctx] = tuple(np.asarray(x[sel]).mean(0, dtype=np.float64) for x, sel in
                         ((real.X, m & is_c), (real.X, m & ~is_c), (pred.X, m & ~is_c)))
    return out


def _scores(pred, real, control: str) -> dict[str, dict[str, float]]:
    """Per held-out context: pearson of mean shifts (real controls) and mse of pseudobulks."""
    return {ctx: {"pearson_delta": float(np.corrcoef(pr - ctrl, rl - ctrl)[0, 1]),
                  "mse": float(((pr - rl) ** 2).mean())}
            for ctx, (ctrl, rl, pr) in pseudobulks(pred, real, control).items()}


def run_job(job: tuple) -> list[dict]:
    kind, name, held, config, seed, device, baseline_with = job
    import torch

    torch.set_num_threads(1)
    from statetx import StateTransitionModel
    from statetx import model as model_mod
    from statetx.baselines import PerturbMeanBaseline

    adata, control = _CACHE.get(name) or _CACHE.setdefault(name, load(name))
    spec = {"training": {name: "train"},
            "zeroshot": {f"{name}.{h}": "test" for h in held}}
    kw = dict(CONFIGS[config])
    passes = kw.pop("passes", None)
    cols = dict(pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
                control_pert=control, seed=seed)
    if device == "cuda":
        kw.setdefault("precision", "32")
        kw.setdefault("matmul_precision", "high")
    saved = {k: dict(v) for k, v in model_mod.TRAINING_DEFAULTS.items()}
    if passes is not None:
        model_mod.TRAINING_DEFAULTS["small"]["passes"] = passes
    t0 = time.perf_counter()
    try:
        model = StateTransitionModel(progress=False, device=device, **cols, **kw).fit(adata, spec)
    finally:
        model_mod.TRAINING_DEFAULTS.clear()
        model_mod.TRAINING_DEFAULTS.update(saved)
    pred, real = model.predict_split("test", controls="real")
    secs = time.perf_counter() - t0
    rows = [{"kind": kind, "dataset": name, "held": "+".join(held), "context": ctx,
             "config": config, "seed": seed, "seconds": secs,
             "steps": model.train_settings_["max_steps"], **s}
            for ctx, s in _scores(pred, real, control).items()]
    if config == baseline_with and seed == 0:  # the baseline on the same split, once
        pm = PerturbMeanBaseline(**{k: v for k, v in cols.items() if k != "seed"}).fit(adata, spec)
        bp, br = pm.predict_split("test")
        rows += [{"kind": kind, "dataset": name, "held": "+".join(held), "context": ctx,
                  "config": "perturb_mean", "seed": 0, "seconds": 0.0, "steps": 0, **s}
                 for ctx, s in _scores(bp, br, control).items()]
    return rows


_CACHE: dict = {}


def jobs(configs: list[str], seeds: list[int], device: str, kinds: list[str],
         datasets: list[str]) -> list[tuple]:
    """(kind, dataset, held-out contexts, config, seed, device, config that also scores PM)."""
    out = []
    contexts = {"kang": ["B cells", "CD14+ Monocytes", "CD4 T cells", "CD8 T cells",
                         "FCGR3A+ Monocytes"],
                "zhao": [f"glioblastoma_PW0{p}" for p in (30, 32, 34, 36, 40)]}
    for config in configs:  # in priority order: a deadline cuts the tail
        for seed in seeds:
            for name, ctxs in contexts.items():
                if name not in datasets:
                    continue
                if "inner" in kinds:
                    out += [("inner", name, pair, config, seed, device, configs[0])
                            for pair in itertools.combinations(ctxs, 2)]
                if "outer" in kinds:
                    out += [("outer", name, (c,), config, seed, device, configs[0])
                            for c in ctxs]
    return out


def select(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, outer fold and config: the mean validation score over its four pair fits."""
    cols = ["dataset", "outer_fold", "config", "n_val", "val_pearson", "val_mse"]
    if table.empty:  # e.g. the deadline passed before any job finished
        return pd.DataFrame(columns=cols)
    inner = table[table["kind"] == "inner"]
    rows = []
    for (name, config), df in inner.groupby(["dataset", "config"]):
        for c in sorted(set(df["context"])):
            v = df[df["held"].str.contains(c, regex=False) & (df["context"] != c)]
            rows.append({"dataset": name, "outer_fold": c, "config": config,
                         "n_val": len(v), "val_pearson": v["pearson_delta"].mean(),
                         "val_mse": v["mse"].mean()})
    return pd.DataFrame(rows, columns=cols)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kinds", default="inner",
                   help="inner (validation pairs), outer (the protocol's test folds), or both")
    p.add_argument("--datasets", default="kang,zhao")
    p.add_argument("--deadline", type=float, default=1e9, help="stop submitting after N s")
    p.add_argument("--out", type=Path, default=Path("tune_out"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    todo = jobs(args.configs.split(","), [int(s) for s in args.seeds.split(",")], args.device,
                args.kinds.split(","), args.datasets.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=20) as pool:
        pending = [pool.apply_async(run_job, (j,)) for j in todo]
        for i, (j, r) in enumerate(zip(todo, pending)):
            left = args.deadline - (time.perf_counter() - t0)
            try:
                got = r.get(timeout=max(left, 1.0))
            except mp.TimeoutError:  # jobs are collected in order: job i and those after it
                unfinished = sum(not q.ready() for q in pending[i:])
                print(f"deadline: {len(todo) - i} of {len(todo)} jobs not collected "
                      f"({unfinished} not finished), their results dropped", flush=True)
                pool.terminate()
                break
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"FAILED {j}: {exc!r}", flush=True)
                continue
            rows += got
            pd.DataFrame(rows).to_csv(args.out / "tune.csv", index=False)
            st = [r for r in got if r["config"] != "perturb_mean"]
            pm = [r for r in got if r["config"] == "perturb_mean"]
            print(f"{time.perf_counter() - t0:6.0f}s {j[0]} {j[1]} {'+'.join(j[2]):45s} "
                  f"{j[3]:16s} " + " ".join(f"{r['context'][:10]}={r['pearson_delta']:.3f}"
                                            for r in st)
                  + (" | perturb_mean: " + " ".join(
                      f"{r['context'][:10]}={r['pearson_delta']:.3f}" for r in pm) if pm else ""),
                  flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "tune.csv", index=False)
    sel = select(table)
    sel.to_csv(args.out / "select.csv", index=False)
    if len(sel):
        piv = sel.pivot_table(index="config", columns="dataset", values=["val_pearson", "val_mse"])
        print(piv.round(3).to_string())
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
