"""arc-state 0.11.1's own recipe on the quality protocol's folds, scored like statetx.

    python benchmarks/quality/arc_state_folds.py --dataset zhao       # ~10 min per fold, 2 cores
    python benchmarks/quality/arc_state_folds.py --dataset kang --folds "B cells"

Not part of CI. For every fold (one held-out context, as in ``run.py``) this writes the dataset
in log1p(normalize_total 1e4) space with ``obsm["X_hvg"] = X`` and a cell-load TOML, trains
``state tx train`` from the arc-state virtualenv (created by ``bench_vs_arc_state.ensure_venv``)
with the recipe the issue quotes (``model=state_sm``, ``cell_set_len=64``, ``batch_size=8``,
``lr=1e-4``, ``--steps`` steps), predicts the held-out context with ``state tx predict``, and
scores arc-state's ``adata_pred.h5ad`` the way ``run.py`` scores ST: pearson of the predicted and
real mean shift from the *real* controls of the held-out context, and the mse of the perturbed
pseudobulk. cell-eval's own ``pearson_delta`` (arc-state's predicted controls) is printed too.
Run directories are kept under ``--workdir``; a fold whose prediction exists is only re-scored.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench_vs_arc_state
sys.path.insert(0, str(HERE))  # run.py (load, SHARED)


def write_fold(adata, name: str, held: str, workdir: Path) -> Path:
    """The h5ad (once) and the fold's TOML; returns the TOML path."""
    h5 = workdir / "data" / name / f"{name}.h5ad"  # cell-load reads every file of the folder
    if not h5.exists():
        h5.parent.mkdir(parents=True, exist_ok=True)
        a = adata.copy()
        a.var = pd.DataFrame(index=[str(g) for g in a.var_names])  # cell-load reads var/_index
        a.obsm["X_hvg"] = a.X.copy()
        a.write_h5ad(h5)
    toml = workdir / f"{name}_{_slug(held)}.toml"
    toml.write_text(f'[datasets]\n{name} = "{h5.parent}"\n\n[training]\n{name} = "train"\n\n'
                    f'[zeroshot]\n"{name}.{held}" = "test"\n')
    return toml


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def score(pred_file: Path, adata, held: str, control: str) -> dict[str, float]:
    import anndata as ad

    real_in = (adata.obs["cell_type"] == held).to_numpy()
    is_c = (adata.obs["target_gene"] == control).to_numpy()
    ctrl = adata.X[real_in & is_c].mean(0, dtype=np.float64)
    real = adata.X[real_in & ~is_c].mean(0, dtype=np.float64)
    pred_ad = ad.read_h5ad(pred_file)
    x = np.asarray(pred_ad.X.toarray() if hasattr(pred_ad.X, "toarray") else pred_ad.X)
    pert = (pred_ad.obs["target_gene"].astype(str) != control).to_numpy()
    pred = x[pert].mean(0, dtype=np.float64)
    out = {"pearson_delta": float(np.corrcoef(pred - ctrl, real - ctrl)[0, 1]),
           "mse": float(((pred - real) ** 2).mean())}
    agg = list(pred_file.parent.glob("*_agg_results.csv"))
    if agg:
        table = pd.read_csv(agg[0]).set_index("statistic")
        out["cell_eval_pearson_delta"] = float(table.loc["mean", "pearson_delta"])
    return out


def main(argv: list[str] | None = None) -> None:
    from bench_vs_arc_state import ensure_venv
    from run import check_folds, load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="zhao", choices=["kang", "zhao"])
    p.add_argument("--folds", default=None, help="comma-separated held-out contexts")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--venv", type=Path, default=Path(os.environ.get("ARCBENCH_VENV",
                                                                      "/tmp/arcbench_venv")))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/arc_quality"))
    args = p.parse_args(argv)
    check_folds(p, [args.dataset], args.folds.split(",") if args.folds else None)
    adata, cols = load(args.dataset)
    control = cols["control_pert"]
    state = ensure_venv(args.venv, "2.13.0", "0.11.1")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    rows = []
    for held in cols["contexts"]:
        if args.folds and held not in args.folds.split(","):
            continue
        toml = write_fold(adata, args.dataset, held, args.workdir)
        run = args.workdir / "runs" / _slug(held)
        pred = run / "eval_final.ckpt" / "adata_pred.h5ad"
        if not pred.exists():
            train = [str(state), "tx", "train", f"data.kwargs.toml_config_path={toml}",
                     "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
                     "data.kwargs.pert_col=target_gene", "data.kwargs.cell_type_key=cell_type",
                     "data.kwargs.batch_col=batch", f"data.kwargs.control_pert={control}",
                     "model=state_sm", "model.kwargs.cell_set_len=64", "training.batch_size=8",
                     f"training.max_steps={args.steps}", "training.lr=1e-4",
                     "training.val_freq=1000000", "training.ckpt_every_n_steps=1000000",
                     f"output_dir={run.parent}", f"name={run.name}", "use_wandb=false"]
            predict = [str(state), "tx", "predict", "--output-dir", str(run),
                       "--checkpoint", "final.ckpt", "--profile", "anndata"]
            for cmd, log in ((train, "train.log"), (predict, "predict.log")):
                run.parent.mkdir(parents=True, exist_ok=True)
                with (run.parent / f"{run.name}_{log}").open("w") as fh:
                    if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode:
                        sys.exit(f"arc-state failed on {held}: see {fh.name}")
        rows.append({"fold": held, **score(pred, adata, held, control)})
        print(f"{held:22s} " + " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items()
                                         if k != "fold"), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.workdir / f"arc_state_{args.dataset}.csv", index=False)
    print(table.drop(columns="fold").agg(["mean", "std"]).round(3).to_string())


if __name__ == "__main__":
    main(sys.argv[1:])
