"""Model-quality protocol: ST with default settings against every statetx baseline.

    python benchmarks/quality/run.py                       # kang, zhao, perturbench, all folds
    python benchmarks/quality/run.py --datasets kang --folds "B cells"

Folds (each a zero-shot hold-out of one context; its controls stay visible, as in the reference):
* kang — leave one of the five PBMC cell types out; predict its IFN-beta response;
* zhao — leave one of the five patients out; predict its panobinostat response;
* perturbench — leave one of the three glioblastoma lines out, on the nine perturbations shared by
  all lines (a noise-floor check: their effects are barely above noise).

For every fold and model: ``predict_split("test")`` → :func:`statetx.metrics.evaluate`
(pearson_delta, mse, mae, discrimination_score_l1 where there are several perturbations,
overlap_at_N) and the VCC score against the cell-mean baseline. Every model's prediction holds the
real control cells (ST: ``controls="real"``; the baselines return controls unchanged), so all
deltas are measured from the same controls. Writes ``results.csv`` (one row per fold × model),
``summary.md`` (mean ± sd over folds) and ``summary.png`` into ``--out``. Everything is seeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
METRICS = ["pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "vcc_score"]
GBM = ["A172", "T98G", "U87MG"]
#: each dataset's folds (held-out contexts), as ``load`` finds them in the shared files; used to
#: check ``--datasets`` / ``--folds`` before anything is loaded
CONTEXTS = {"kang": ["B cells", "CD14+ Monocytes", "CD4 T cells", "CD8 T cells",
                     "FCGR3A+ Monocytes"],
            "zhao": [f"glioblastoma_PW0{p}" for p in (30, 32, 34, 36, 40)],
            "perturbench": GBM}


def check_folds(parser: argparse.ArgumentParser, datasets: list[str],
                folds: list[str] | None) -> None:
    """``parser.error`` naming the valid choices for an unknown dataset or fold."""
    unknown = [d for d in datasets if d not in CONTEXTS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(map(repr, unknown))}; "
                     f"choose from {', '.join(CONTEXTS)}")
    valid = [c for d in datasets for c in CONTEXTS[d]]
    unknown = [f for f in folds or [] if f not in valid]
    if unknown:
        parser.error(f"unknown fold(s) {', '.join(map(repr, unknown))} for "
                     f"{', '.join(datasets)}; choose from "
                     + "; ".join(f"{d}: {', '.join(map(repr, CONTEXTS[d]))}" for d in datasets))


def load(name: str) -> tuple[ad.AnnData, dict]:
    """A dataset in log1p space and its column options."""
    import scanpy as sc

    if name == "perturbench":
        a = ad.read_h5ad(SHARED / "perturbench_devel_norman19_mcfaline23.h5ad")
        shared = set.intersection(*(set(a.obs.loc[a.obs.cell_type == c, "target_gene"])
                                    for c in GBM))
        a = a[a.obs.cell_type.isin(GBM) & a.obs.target_gene.isin(shared)].copy()
        cols = {"control_pert": "control", "contexts": GBM}
    else:
        fname = {"kang": "kang2018_pbmc_ifnb_muscat_counts.h5ad",
                 "zhao": "zhao2021_glioblastoma_panobinostat_lemur_counts.h5ad"}[name]
        a = ad.read_h5ad(SHARED / fname)
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        cols = {"control_pert": {"kang": "control", "zhao": "DMSO"}[name],
                "contexts": sorted(a.obs.cell_type.astype(str).unique())}
    a.X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32)
    for c in ("target_gene", "cell_type", "batch"):
        a.obs[c] = a.obs[c].astype(str)
    return a, cols


def models(control: str, seed: int) -> dict:
    from statetx import StateTransitionModel
    from statetx.baselines import (
        ContextMeanBaseline,
        ControlMeanBaseline,
        LinearBaseline,
        PerturbMeanBaseline,
    )

    cols = dict(pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
                control_pert=control, seed=seed)
    return {
        "ST": StateTransitionModel(progress=False, **cols),
        "control_mean": ControlMeanBaseline(**cols),
        "context_mean": ContextMeanBaseline(**cols),
        "perturb_mean": PerturbMeanBaseline(**cols),
        "linear": LinearBaseline(**cols),
    }


def score(pred: ad.AnnData, real: ad.AnnData, control: str,
          train: ad.AnnData | None = None) -> dict[str, float]:
    """Metrics of one prediction; the VCC score's cell-mean baseline comes from ``train``."""
    from statetx.metrics import evaluate, vcc_score

    n_perts = real.obs["target_gene"].nunique() - 1
    metrics = ["pearson_delta", "mse", "mae", "overlap_at_N"]
    if n_perts > 1:
        metrics.append("discrimination_score_l1")
    res, _ = evaluate(pred, real, "target_gene", control, profile="full", num_threads=1,
                      skip_metrics=[m for m in _all_metrics() if m not in metrics])
    out = {m: float(pd.to_numeric(res[m], errors="coerce").mean()) for m in metrics}
    vcc = vcc_score(pred, real, "target_gene", control, train=train, num_threads=1)
    out["vcc_score"] = float(vcc.loc[vcc["metric"] == "avg_score", "from_baseline"].iloc[0])
    return out


def _all_metrics() -> list[str]:
    from statetx.metrics.evaluate import PROFILES

    return PROFILES["full"]


def run(datasets: list[str], folds: list[str] | None, seed: int, out: Path) -> pd.DataFrame:
    rows = []
    for name in datasets:
        adata, cols = load(name)
        for held in cols["contexts"]:
            if folds and held not in folds:
                continue
            spec = {"training": {name: "train"}, "zeroshot": {f"{name}.{held}": "test"}}
            train = adata[(adata.obs["cell_type"] != held).to_numpy()].copy()
            for model_name, model in models(cols["control_pert"], seed).items():
                t0 = time.perf_counter()
                model.fit(adata, spec)
                pred, real = (model.predict_split("test", controls="real") if model_name == "ST"
                              else model.predict_split("test"))
                metrics = score(pred, real, cols["control_pert"], train)
                rows.append({"dataset": name, "fold": held, "model": model_name,
                             "seconds": time.perf_counter() - t0, **metrics})
                print(f"{name:12s} {held:22s} {model_name:13s} " + " ".join(
                    f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    return table


def summarize(table: pd.DataFrame, out: Path) -> str:
    lines = []
    for name, df in table.groupby("dataset", sort=False):
        metrics = [m for m in METRICS if m in df]  # a run without perturbench has no l1 score
        agg = df.groupby("model", sort=False)[metrics].agg(["mean", "std"])
        lines.append(f"\n### {name} ({df['fold'].nunique()} folds)\n")
        lines.append("| model | " + " | ".join(metrics) + " | fit+predict s |")
        lines.append("|---" * (len(metrics) + 2) + "|")
        secs = df.groupby("model", sort=False)["seconds"].mean()
        for model in agg.index:
            cells = [f"{agg.loc[model, (m, 'mean')]:.3f} ± {agg.loc[model, (m, 'std')]:.3f}"
                     for m in metrics]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {secs[model]:.0f} |")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = ["pearson_delta", "mse"]
        fig, axes = plt.subplots(len(shown), table["dataset"].nunique(), squeeze=False,
                                 figsize=(5 * table["dataset"].nunique(), 3.6 * len(shown)))
        for col, (name, df) in enumerate(table.groupby("dataset", sort=False)):
            for row, metric in enumerate(shown):
                ax = axes[row, col]
                means = df.groupby("model", sort=False)[metric].agg(["mean", "std"])
                ax.bar(means.index, means["mean"], yerr=means["std"],
                       color=["tab:orange" if m == "ST" else "tab:blue" for m in means.index])
                ax.set_title(f"{name}: {metric} (mean ± sd over folds)")
                ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "summary.png", dpi=120)
    except Exception as exc:  # noqa: BLE001 - the plot is a convenience
        print(f"(plot skipped: {exc})")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="kang,zhao,perturbench")
    p.add_argument("--folds", default=None, help="comma-separated held-out contexts to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("quality_out"))
    args = p.parse_args(argv)
    datasets = args.datasets.split(",")
    folds = args.folds.split(",") if args.folds else None
    check_folds(p, datasets, folds)
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this protocol needs the shared datasets next to the repo.")
    t0 = time.perf_counter()
    table = run(datasets, folds, args.seed, args.out)
    print(summarize(table, args.out))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
