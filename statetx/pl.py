"""Plots for evaluation results: predicted vs real pseudobulk deltas, and metric bars per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from statetx.errors import ConfigError, DataError
from statetx.metrics._inputs import align_pair
from statetx.metrics.de import group_means

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _deltas(a: ad.AnnData, pert_col: str, control: str, perts: list[str]) -> np.ndarray:
    # -1 for cells of other perturbations (ignored)
    codes = pd.Index([control, *perts]).get_indexer(a.obs[pert_col].astype(str))
    m = group_means(a.X, codes, len(perts) + 1, float64=True).astype(np.float32)
    return (m[1:] - m[0]).astype(np.float64)


def delta_scatter(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    perts: Sequence[str] | None = None,
    ax: Axes | None = None,
    *,
    max_perts: int = 10,
    s: float = 6.0,
) -> Axes:
    """Scatter predicted vs real pseudobulk deltas (mean log1p − own control mean), one colour per
    perturbation, with the identity line and each perturbation's Pearson r in the legend.

    ``perts`` defaults to the first ``max_perts`` sorted perturbations. Returns the Axes."""
    pred, real = align_pair(adata_pred, adata_real, pert_col=pert_col, control_pert=control_pert,
                            shared_only=True)
    avail = sorted(set(real.obs[pert_col].astype(str)) - {control_pert})
    if perts is None:
        perts = avail[:max_perts]
    missing = [p for p in perts if p not in avail]
    if missing:
        raise DataError(f"perturbation(s) {missing} not found in obs[{pert_col!r}] of both files; "
                        f"available: {avail[:20]}")
    perts = list(perts)
    dp = _deltas(pred, pert_col, control_pert, perts)
    dr = _deltas(real, pert_col, control_pert, perts)
    ax = _axes(ax, (5.0, 5.0))
    for i, p in enumerate(perts):
        r = np.corrcoef(dr[i], dp[i])[0, 1] if dr[i].std() > 0 and dp[i].std() > 0 else np.nan
        ax.scatter(dr[i], dp[i], s=s, alpha=0.6, label=f"{p} (r={r:.2f})")
    lim = float(np.nanmax(np.abs(np.concatenate([dr.ravel(), dp.ravel()])))) if dr.size else 1.0
    lim = lim * 1.05 if lim > 0 else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="lightgrey", lw=0.5)
    ax.axvline(0, color="lightgrey", lw=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("real Δ (mean log1p − control)")
    ax.set_ylabel("predicted Δ")
    ax.set_title("Pseudobulk deltas: predicted vs real")
    ax.legend(fontsize="small", markerscale=2, frameon=False)
    return ax


def _long(tables: Mapping[str, pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """Long table with columns model, metric, value, from either input form."""
    if isinstance(tables, pd.DataFrame):
        need = {"model", "metric", "value"}
        if not need <= set(tables.columns):
            raise DataError(f"a long table needs columns {sorted(need)}, got "
                            f"{list(tables.columns)};"
                            " or pass a dict {model: results or agg table}")
        return tables[["model", "metric", "value"]]
    parts = []
    for model, df in tables.items():
        if "statistic" in df.columns:  # an agg table: use its mean row
            row = df[df["statistic"] == "mean"].drop(columns=["statistic", "celltype"],
                                                     errors="ignore")
            vals = row.mean(numeric_only=True)
        else:
            vals = df.drop(columns=["perturbation", "celltype"], errors="ignore").mean(
                numeric_only=True)
        parts.append(pd.DataFrame({"model": model, "metric": vals.index, "value": vals.values}))
    if not parts:
        raise DataError("metric_bars needs at least one table")
    return pd.concat(parts, ignore_index=True)


def metric_bars(
    tables: Mapping[str, pd.DataFrame] | pd.DataFrame,
    metrics: Sequence[str] = ("pearson_delta", "discrimination_score_l1", "overlap_at_N", "mae"),
    ax: Axes | None = None,
) -> Axes:
    """Grouped bars of the mean of each metric, one bar per model.

    ``tables``: ``{model: results or agg_results frame}`` (per-perturbation rows are averaged, agg
    tables contribute their ``mean`` row) or a long frame with columns model, metric, value."""
    long = _long(tables)
    metrics = list(metrics)
    absent = [m for m in metrics if m not in set(long["metric"])]
    if absent:
        raise ConfigError(f"metric(s) {absent} not found in the tables; available: "
                          f"{sorted(set(long['metric']))}")
    models = list(dict.fromkeys(long["model"]))
    piv = long.pivot_table(index="metric", columns="model", values="value", aggfunc="mean",
                           dropna=False).reindex(index=metrics, columns=models)
    ax = _axes(ax, (max(4.0, 1.2 * len(metrics) * max(1, len(models)) / 2), 4.0))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for j, m in enumerate(models):
        ax.bar(x + (j - (len(models) - 1) / 2) * width, piv[m].to_numpy(float), width, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=30, ha="right")
    ax.set_ylabel("mean over perturbations")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(frameon=False, fontsize="small")
    return ax
