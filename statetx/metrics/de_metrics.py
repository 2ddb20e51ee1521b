"""Metrics that compare the real and predicted DE tables (metrics.md §7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from statetx.errors import DataError

FDR_THRESHOLD = 0.05
TOP_K = (50, 100, 200, 500)
REQUIRED_DE_COLUMNS = ("target", "feature", "log2_fold_change", "p_value", "fdr")


@dataclass
class _DE:
    """One target's rows of a DE table."""

    features: np.ndarray
    lfc: np.ndarray
    fdr: np.ndarray
    sig: np.ndarray  # significant features sorted by |lfc| descending (table order for ties)
    is_sig: np.ndarray  # significance mask in table order

    @classmethod
    def build(cls, df: pd.DataFrame | None) -> _DE:
        if df is None or len(df) == 0:
            e = np.array([], dtype=object)
            return cls(e, np.array([]), np.array([]), e, np.array([], dtype=bool))
        feats = df["feature"].astype(str).to_numpy()
        lfc = df["log2_fold_change"].to_numpy(np.float64)
        fdr = df["fdr"].to_numpy(np.float64)
        is_sig = fdr.astype(np.float32) < np.float32(FDR_THRESHOLD)
        idx = np.flatnonzero(is_sig)
        mag = np.abs(lfc.astype(np.float32)[idx])
        order = idx[np.argsort(-mag, kind="stable")]
        return cls(feats, lfc, fdr, feats[order], is_sig)


def check_de_table(df: pd.DataFrame, which: str) -> pd.DataFrame:
    """Validate a supplied DE table; derive ``abs_log2_fold_change`` if absent."""
    missing = [c for c in REQUIRED_DE_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{which} DE table lacks column(s) {missing}; it needs "
                        f"{list(REQUIRED_DE_COLUMNS)} (cell-eval's DE CSV layout)")
    if "abs_log2_fold_change" not in df.columns:
        df = df.assign(abs_log2_fold_change=df["log2_fold_change"].abs())
    return df


def _split(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {str(t): g for t, g in df.groupby(df["target"].astype(str), sort=False)}


def _overlap(real: np.ndarray, pred: np.ndarray, k: int) -> float:
    if k <= 0:
        return 0.0
    return len(set(real[:k]) & set(pred[:k])) / k


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank; all NaN if ``x`` holds a NaN (as
    ``scipy.stats.rankdata``, whose import costs more than a second)."""
    x = np.asarray(x).ravel()
    if x.dtype.kind in "fc" and np.isnan(x).any():
        return np.full(x.size, np.nan)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]), x.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((bounds[:-1] + bounds[1:] + 1) / 2.0, np.diff(bounds))
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if np.all(ra == ra[0]) or np.all(rb == rb[0]):
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Σ (R_n − R_{n−1}) P_n over distinct score thresholds (scikit-learn's definition)."""
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    prec = tp / (tp + fp)
    rec = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney AUC, ties count one half)."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _take(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = np.full(pos.size, np.nan)
    ok = pos >= 0
    out[ok] = values[pos[ok]]
    return out


def de_metrics(
    real_de: pd.DataFrame, pred_de: pd.DataFrame, perturbations: Sequence[str]
) -> dict[str, list[float | None]]:
    """Every DE-based metric per perturbation (None = null), in cell-eval's full-profile order."""
    rt, pt = _split(real_de), _split(pred_de)
    R = {p: _DE.build(rt.get(p)) for p in perturbations}
    P = {p: _DE.build(pt.get(p)) for p in perturbations}
    any_real = any(R[p].sig.size for p in perturbations)
    any_pred = any(P[p].sig.size for p in perturbations)
    out: dict[str, list[float | None]] = {}

    def put(name: str, v: float | None) -> None:
        out.setdefault(name, []).append(v)

    for p in perturbations:
        r, q = R[p], P[p]
        nr, npred = r.sig.size, q.sig.size
        ok = any_real and any_pred
        put("overlap_at_N", _overlap(r.sig, q.sig, nr) if ok else 0.0)
        for k in TOP_K:
            put(f"overlap_at_{k}", _overlap(r.sig, q.sig, min(k, nr)) if ok else 0.0)
        put("precision_at_N", _overlap(r.sig, q.sig, npred) if ok else 0.0)
        for k in TOP_K:
            put(f"precision_at_{k}", _overlap(r.sig, q.sig, min(k, npred)) if ok else 0.0)
        if np.array_equal(q.features, r.features):  # usual case: same genes, same order
            q_lfc, q_fdr = q.lfc, q.fdr
        else:
            pos = pd.Index(q.features).get_indexer(r.features)
            q_lfc, q_fdr = _take(q.lfc, pos), _take(q.fdr, pos)
        if nr:
            lr = r.lfc[r.is_sig]
            lp = q_lfc[r.is_sig]
            put("de_direction_match", float(np.mean(np.sign(lr) == np.sign(lp))))
            put("de_spearman_lfc_sig", _spearman(lr, np.nan_to_num(lp, nan=0.0, posinf=np.inf,
                                                                    neginf=-np.inf)))
            put("de_sig_genes_recall", len(set(r.sig) & set(q.sig)) / nr)
        else:
            put("de_direction_match", None)
            put("de_spearman_lfc_sig", None)
            put("de_sig_genes_recall", None)
        put("de_nsig_counts_real", float(nr))
        put("de_nsig_counts_pred", float(npred))
        labels = r.fdr.astype(np.float32) < np.float32(FDR_THRESHOLD)
        fp = q_fdr
        scores = np.where(np.isnan(fp), 0.0, -np.log10(np.clip(fp, 1e-10, 1.0)))
        put("pr_auc", average_precision(labels, scores))
        put("roc_auc", roc_auc(labels, scores))
    nr_all = np.array([R[p].sig.size for p in perturbations], dtype=float)
    np_all = np.array([P[p].sig.size for p in perturbations], dtype=float)
    has = nr_all >= 1
    out["de_spearman_sig"] = [_spearman(nr_all[has], np_all[has]) if has.any() else 1.0] * len(
        perturbations)
    return out
