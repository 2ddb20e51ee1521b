"""Virtual Cell Challenge scoring (metrics.md §10): cell-mean baseline, normalised scores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from statetx._utils import did_you_mean
from statetx.errors import DataError
from statetx.metrics._inputs import check_obs_col, check_scale, load
from statetx.metrics._table import atomic_write_text
from statetx.metrics.de import group_means

BEST_ZERO = ("mse", "mae", "mse_delta", "mae_delta")
NO_BEST = ("de_nsig_counts_real", "de_nsig_counts_pred")


def cell_mean_baseline(
    adata: ad.AnnData,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    n_cells: Mapping[str, int] | pd.Series | None = None,
    controls: ad.AnnData | None = None,
) -> ad.AnnData:
    """The VCC cell-mean baseline: b = unweighted mean of all group pseudobulks of ``adata``
    (control group included); every perturbation gets ``n_cells[p]`` identical rows b (default: its
    cell count in ``adata``), followed by the control cells of ``controls`` (default ``adata``)."""
    check_obs_col(adata, pert_col, "baseline input", "perturbation")
    labels = adata.obs[pert_col].astype(str).to_numpy()
    groups = sorted(set(labels))
    if control_pert not in groups:
        raise DataError(f"control label {control_pert!r} not found in obs[{pert_col!r}] of the "
                        "baseline input; name the control label (control_pert= in Python, "
                        "--control-pert on the command line)."
                        f"{did_you_mean(str(control_pert), groups)}")
    codes = pd.Categorical(labels, categories=groups).codes.astype(np.int64)
    b = group_means(adata.X, codes, len(groups), float64=True).mean(axis=0).astype(np.float32)
    if n_cells is None:
        counts = pd.Series(labels).value_counts()
        n_cells = {p: int(counts[p]) for p in groups if p != control_pert}
    n_cells = {str(k): int(v) for k, v in dict(n_cells).items() if str(k) != control_pert}
    ctrl_src = controls if controls is not None else adata
    c_lab = ctrl_src.obs[pert_col].astype(str).to_numpy()
    ctrl = ctrl_src[c_lab == control_pert]
    cx = ctrl.X.toarray() if hasattr(ctrl.X, "toarray") else np.asarray(ctrl.X)
    perts = sorted(n_cells)
    rows = [np.broadcast_to(b, (n_cells[p], b.size)) for p in perts]
    X = np.vstack([*rows, np.asarray(cx, dtype=np.float32)]).astype(np.float32)
    lab = [p for p in perts for _ in range(n_cells[p])] + [control_pert] * ctrl.n_obs
    obs = pd.DataFrame({pert_col: pd.Categorical(lab)},
                       index=[f"baseline_{i}" for i in range(len(lab))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))


def _means(agg: pd.DataFrame | str | Path) -> pd.Series:
    if not isinstance(agg, pd.DataFrame):
        agg = pd.read_csv(agg)
    if "statistic" not in agg.columns:
        raise DataError("agg table lacks the 'statistic' column; pass agg_results.csv as written "
                        "by evaluate")
    rows = agg[agg["statistic"] == "mean"]
    if "celltype" in rows.columns:
        rows = rows.drop(columns="celltype").mean(numeric_only=True).to_frame().T
    return rows.drop(columns="statistic", errors="ignore").iloc[0].astype(float)


def score_agg(user_agg: pd.DataFrame | str | Path, base_agg: pd.DataFrame | str | Path
              ) -> pd.DataFrame:
    """``cell-eval score``: normalise the user's mean metrics by the baseline's.

    best 0: 1 − u/b; best 1: (u − b)/(1 − b); NaN → 0; clipped below at 0; then ``avg_score``."""
    u, b = _means(user_agg), _means(base_agg)
    if list(u.index) != list(b.index):
        raise DataError(f"user and baseline agg tables have different metric columns: "
                        f"{list(u.index)} vs {list(b.index)}")
    cols = [c for c in u.index if c not in NO_BEST]
    order = [c for c in cols if c in BEST_ZERO] + [c for c in cols if c not in BEST_ZERO]
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in order:
            s = 1.0 - u[c] / b[c] if c in BEST_ZERO else (u[c] - b[c]) / (1.0 - b[c])
            s = 0.0 if not np.isfinite(s) else max(float(s), 0.0)
            scores.append(s)
    out = pd.DataFrame({"metric": order, "from_baseline": scores})
    avg = float(np.mean(scores)) if scores else float("nan")
    return pd.concat([out, pd.DataFrame({"metric": ["avg_score"], "from_baseline": [avg]})],
                     ignore_index=True)


def vcc_score(
    adata_pred: ad.AnnData | str | Path,
    adata_real: ad.AnnData | str | Path,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    *,
    train: ad.AnnData | str | Path | None = None,
    profile: str = "vcc",
    outdir: str | Path | None = None,
    **evaluate_kwargs,
) -> pd.DataFrame:
    """VCC score of a prediction: evaluate it and the cell-mean baseline (built from ``train``, or
    from the real data when absent, with the real cell counts and control cells), then normalise
    with :func:`score_agg`. Returns the score table (``metric``, ``from_baseline``); with ``outdir``
    writes ``user/``, ``baseline/`` evaluation folders and ``score.csv``."""
    from statetx.metrics.evaluate import evaluate

    real = check_scale(load(adata_real, "real"), "real", evaluate_kwargs.get("allow_discrete",
                                                                             False))
    src = real if train is None else check_scale(load(train, "train"), "train", False)
    counts = real.obs[pert_col].astype(str).value_counts()
    n_cells = {p: int(n) for p, n in counts.items() if p != control_pert}
    base = cell_mean_baseline(src, pert_col, control_pert, n_cells=n_cells, controls=real)
    out = Path(outdir) if outdir is not None else None
    _, u_agg = evaluate(adata_pred, real, pert_col, control_pert, profile=profile,
                        outdir=out / "user" if out else None, **evaluate_kwargs)
    _, b_agg = evaluate(base, real, pert_col, control_pert, profile=profile,
                        outdir=out / "baseline" if out else None, **evaluate_kwargs)
    score = score_agg(u_agg, b_agg)
    if out is not None:
        atomic_write_text(out / "score.csv", score.to_csv(index=False))
    return score
