"""The data ceiling (cell-eval 0.8.2 ``--ceiling``, spec metrics.md §9).

Each perturbation's (and the control's) real cells are split at random into two disjoint halves
of ⌊n/2⌋ cells and the metrics are computed half against half: how well a perfect model could
score given the data's own noise. ``ceiling_results.csv`` holds the per-perturbation values;
``agg_ceiling_results.csv`` one row (per cell type): for the correlation-type (reliability)
metrics, the mean over perturbations r mapped by Spearman–Brown 2r / (1 + r) (r > 0; NaN
otherwise), since each half has half the cells; NaN for the other metrics.

This module holds the parts (halves, Spearman–Brown, files, fraction of the ceiling);
:func:`statetx.metrics.ceiling`, which evaluates the halves, lives with ``evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from statetx._utils import atomic_write, preview, warn
from statetx.errors import ConfigError
from statetx.metrics._inputs import check_obs_col
from statetx.metrics._table import file_prefix

# metrics whose value is a correlation, to which Spearman–Brown applies
RELIABILITY_METRICS = ("pearson_delta", "de_spearman_sig", "de_spearman_lfc_sig",
                       "pearson_edistance")


def split_halves(real: ad.AnnData, pert_col: str, celltype_col: str | None = None,
                 seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Two disjoint random halves (⌊n/2⌋ cells each) of every (cell type,) perturbation group."""
    check_obs_col(real, pert_col, "real data", "perturbation")
    keys = real.obs[pert_col].astype(str)
    if celltype_col is not None:
        check_obs_col(real, celltype_col, "real data", "cell type")
        keys = real.obs[celltype_col].astype(str) + "\x00" + keys
    rng = np.random.default_rng(int(seed))
    first, second, single = [], [], []
    groups = pd.Series(np.arange(real.n_obs)).groupby(keys.to_numpy()).groups
    for key, rows in sorted(groups.items()):
        if len(rows) < 2:
            single.append(str(key).replace("\x00", " / "))
        rows = rng.permutation(np.asarray(rows))
        half = len(rows) // 2
        first.append(rows[:half])
        second.append(rows[half:2 * half])
    if single:
        warn(f"ceiling: {len(single)} group(s) have a single cell and cannot be split "
             f"in halves; they are left out of the ceiling: {preview(single)}.", UserWarning)
    a, b = np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
    return real[a].copy(), real[b].copy()


def ceiling_files(results: pd.DataFrame, agg: pd.DataFrame, by_celltype: bool
                  ) -> list[tuple[str, pd.DataFrame]]:
    """``(file name, table)`` of ``ceiling_results.csv`` and ``agg_ceiling_results.csv``: one
    pair per cell type (prefixed as evaluate's files) when ``by_celltype``."""
    parts = ([(None, results, agg)] if not by_celltype else
             [(ct, results[results["celltype"] == ct].drop(columns="celltype"),
               agg[agg["celltype"] == ct].drop(columns="celltype"))
              for ct in agg["celltype"]])
    return [(f"{file_prefix(ct)}{name}", frame) for ct, res, ag in parts
            for name, frame in (("ceiling_results.csv", res), ("agg_ceiling_results.csv", ag))]


def write_ceiling_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write one ceiling table as cell-eval does (NaN spelled out), atomically."""
    atomic_write(path, lambda p: frame.to_csv(p, index=False, na_rep="NaN"))


def spearman_brown(results: pd.DataFrame, by_celltype: bool) -> pd.DataFrame:
    """The ceiling's agg table: per (cell type,) correlation metric, the mean r over the
    perturbations of the halves mapped to the whole data by 2r / (1 + r) (NaN unless r > 0)."""
    metrics = [c for c in results.columns if c not in ("celltype", "perturbation")]
    groups = results.groupby("celltype", sort=True) if by_celltype else [(None, results)]
    rows = []
    for ct, part in groups:
        row: dict[str, Any] = {} if ct is None else {"celltype": ct}
        for m in metrics:
            r = float(pd.to_numeric(part[m], errors="coerce").mean())
            row[m] = 2 * r / (1 + r) if m in RELIABILITY_METRICS and r > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def fraction_of_ceiling(agg: pd.DataFrame, ceiling_agg: pd.DataFrame) -> pd.DataFrame:
    """A model's mean scores (its ``agg`` table from :func:`~statetx.metrics.evaluate`) as a
    fraction of the ceiling ``ceiling_agg`` (the agg table of :func:`~statetx.metrics.ceiling`),
    for the correlation-type metrics (per cell type when both have one)."""
    means = agg[agg["statistic"] == "mean"].drop(columns="statistic")
    if ("celltype" in means.columns) != ("celltype" in ceiling_agg.columns):
        raise ConfigError("fraction_of_ceiling: the model's results and the ceiling must both be "
                          "per cell type (celltype_col=...) or both pooled.")
    key = ["celltype"] if "celltype" in means.columns else []
    cols = [m for m in RELIABILITY_METRICS if m in means.columns and m in ceiling_agg.columns]
    if not cols:
        raise ConfigError(
            "fraction_of_ceiling: no metric has both a score and a ceiling; the ceiling exists "
            f"for {', '.join(RELIABILITY_METRICS)} (the model's table has "
            f"{preview(means.columns.drop(key, errors='ignore'), 8)}). Evaluate with a profile "
            "that computes them, e.g. profile='full' or 'anndata'.")
    if key:
        merged = means[key + cols].merge(ceiling_agg[key + cols], on=key, suffixes=("", "_c"))
    else:
        merged = pd.concat([means[cols].reset_index(drop=True),
                            ceiling_agg[cols].add_suffix("_c").reset_index(drop=True)], axis=1)
    out = merged[key].copy() if key else pd.DataFrame(index=merged.index)
    for m in cols:
        out[m] = merged[m].astype(float) / merged[f"{m}_c"].astype(float)
    return out
