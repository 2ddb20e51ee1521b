"""Held-out quality along the training trajectory (the evidence for weight averaging).

    python benchmarks/quality/probe_steps.py --out probe_out --workers 2
    python benchmarks/quality/probe_steps.py --out probe_out --workers 12 --device cuda

For kang and zhao, every ordered pair (test c, validation v) of contexts is held out and ST (the
current defaults, without weight averaging) is trained on the other three with ``v`` as the
validation split; every outer fold c is also trained on the other four with no validation split.
Every ``--every`` steps (and at step 0, the untrained mean-response skip) the weights are
snapshotted; afterwards each snapshot predicts the held-out contexts (real controls, a fixed seed)
and their perturbed pseudobulks are saved. The learning rate is constant, so a snapshot at step s
equals a fit stopped at s. Writes ``bulks.npz`` (per fit and context: control, real and, per step,
predicted perturbed pseudobulks) and ``trajectories.csv`` (pearson_delta, mse, val_loss per fit ×
step × context; ``probe_trajectories.csv`` is the H200 run of the defaults) for offline analysis
of stopping and averaging rules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune import load, pseudobulks  # noqa: E402  (also puts the repository on sys.path)

CONTEXTS = {"kang": ["B cells", "CD14+ Monocytes", "CD4 T cells", "CD8 T cells",
                     "FCGR3A+ Monocytes"],
            "zhao": [f"glioblastoma_PW0{p}" for p in (30, 32, 34, 36, 40)]}
_CACHE: dict = {}


def run_fit(job: tuple) -> dict:
    name, test, val, every, device, extra = job
    import torch

    torch.set_num_threads(1)
    from statetx import StateTransitionModel
    from statetx.train import Trainer

    adata, control = _CACHE.get(name) or _CACHE.setdefault(name, load(name))
    spec = {"training": {name: "train"}, "zeroshot": {f"{name}.{test}": "test"}}
    if val is not None:
        spec["zeroshot"][f"{name}.{val}"] = "val"
    # raw weights at every step: validation must score them too, not the running average
    kw = {"weight_averaging": "none"}
    if device == "cuda":
        kw.update(precision="32", matmul_precision="high")
    kw.update(extra)
    snaps: dict[int, dict] = {}
    val0: dict[int, float] = {}
    orig_fit, orig_after = Trainer.fit, Trainer._after_step

    def snap(tr):
        snaps[tr.state.step] = {k: v.detach().cpu().clone() for k, v in tr.net.state_dict().items()}

    def fit(self, *a, **k):
        snap(self)
        if self.val_sampler is not None:
            with torch.no_grad():
                val0[0] = self.evaluate(self.val_sampler)
        return orig_fit(self, *a, **k)

    def after(self):
        stop = orig_after(self)
        if self.state.step % every == 0 or self.state.step == self.cfg.max_steps:
            snap(self)
        return stop

    Trainer.fit, Trainer._after_step = fit, after
    t0 = time.perf_counter()
    try:
        model = StateTransitionModel(progress=False, device=device, pert_col="target_gene",
                                     cell_type_key="cell_type", batch_col="batch",
                                     control_pert=control, seed=0, val_freq=every, **kw)
        model.fit(adata, spec)
    finally:
        Trainer.fit, Trainer._after_step = orig_fit, orig_after
    fit_s = time.perf_counter() - t0
    hist = model.history_
    val_loss = ({} if "val_loss" not in hist else
                dict(zip(hist.dropna(subset=["val_loss"])["step"].astype(int),
                         hist.dropna(subset=["val_loss"])["val_loss"])))
    val_loss.update(val0)
    rows, bulks = [], {}
    for step, state in sorted(snaps.items()):
        model.network_.load_state_dict(state)
        for split in ["test"] + (["val"] if val is not None else []):
            pred, real = model.predict_split(split, controls="real")
            for ctx, (c, r, p) in pseudobulks(pred, real, control).items():
                bulks[f"ctrl|{ctx}"], bulks[f"real|{ctx}"] = c, r
                bulks.setdefault(f"pred|{ctx}", []).append(p)
                rows.append({"dataset": name, "test": test, "val": val or "", "step": step,
                             "context": ctx, "role": split,
                             "pearson_delta": float(np.corrcoef(p - c, r - c)[0, 1]),
                             "mse": float(((p - r) ** 2).mean()),
                             "val_loss": val_loss.get(step, np.nan),
                             "max_steps": model.train_settings_["max_steps"], "fit_s": fit_s})
    bulks = {k: np.asarray(v, dtype=np.float32) for k, v in bulks.items()}
    bulks["steps"] = np.array(sorted(snaps))
    return {"rows": rows, "bulks": bulks, "key": (name, test, val or "")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="kang,zhao")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", type=json.loads, default={},
                   help='estimator settings on top of the defaults, e.g. \'{"lr": 3e-4}\'')
    p.add_argument("--limit", type=int, default=None, help="first N fits only (smoke test)")
    p.add_argument("--out", type=Path, default=Path("probe_out"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = []
    for name in args.datasets.split(","):  # in priority order: a time limit cuts the tail
        jobs += [(name, c, None, args.every, args.device, args.config) for c in CONTEXTS[name]]
        jobs += [(name, c, v, args.every, args.device, args.config)
                 for c, v in itertools.permutations(CONTEXTS[name], 2)]
    jobs = jobs[:args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    import multiprocessing as mp

    t0, rows, bulks = time.perf_counter(), [], {}
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=10) as pool:
        for res in pool.imap_unordered(run_fit, jobs):
            rows += res["rows"]
            bulks.update({"|".join([*res["key"], k]): v for k, v in res["bulks"].items()})
            pd.DataFrame(rows).to_csv(args.out / "trajectories.csv", index=False)
            print(f"{time.perf_counter() - t0:6.0f}s {res['key']} fit "
                  f"{res['rows'][0]['fit_s']:.0f}s", flush=True)
    np.savez_compressed(args.out / "bulks.npz", **bulks)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
