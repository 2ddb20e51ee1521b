"""Expression-space ("anndata") metrics on pseudobulks and cells (metrics.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float(np.clip((a * b).sum() / den, -1.0, 1.0)) if den > 0 else float("nan")


def pearson_delta(d_pred: np.ndarray, d_real: np.ndarray) -> np.ndarray:
    """Per-row Pearson r between predicted and real deltas (NaN where either row is constant)."""
    return np.array([_pearson(p, r) for p, r in zip(d_pred, d_real)])


def pearson_delta_centroid(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per-perturbation Pearson r of the deviations from the mean of all perturbation
    centroids (each side its own), instead of from the control: a shift shared by every
    perturbation (perturbed vs control) earns nothing (statetx extra, metrics.md §12)."""
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(real, dtype=np.float64)
    return pearson_delta(p - p.mean(axis=0), r - r.mean(axis=0))


def centroid_accuracy(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """1.0 where a perturbation's predicted pseudobulk is closer (Euclidean) to its own real
    centroid than to any other perturbation's, else 0.0 (statetx extra, metrics.md §12)."""
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(real, dtype=np.float64)
    d = ((p * p).sum(1)[:, None] - 2.0 * p @ r.T + (r * r).sum(1)[None, :])
    return (np.argmin(d, axis=1) == np.arange(len(p))).astype(np.float64)


def mean_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row mean squared difference."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return (d * d).mean(axis=1)


def mean_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row mean absolute difference."""
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean(axis=1)


def _dist(r: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    if metric == "l1":
        return np.abs(r - q).sum(axis=1)
    if metric == "l2":
        return np.sqrt(((r - q) ** 2).sum(axis=1))
    if metric == "cosine":
        rn = np.linalg.norm(r, axis=1)
        qn = np.linalg.norm(q)
        with np.errstate(invalid="ignore", divide="ignore"):
            sim = (r @ q) / (rn * qn)
        sim = np.where((rn > 0) & (qn > 0), sim, 0.0)
        return 1.0 - sim
    raise ValueError(f"unknown distance {metric!r}; use 'l1', 'l2' or 'cosine'")


def discrimination_score(
    d_real: np.ndarray,
    d_pred: np.ndarray,
    perturbations: Sequence[str],
    genes: Sequence[str] | None,
    metric: str = "l1",
) -> np.ndarray:
    """1 − rank/n of each prediction's own real delta among all real deltas (metrics.md §5.1).

    ``genes``: feature names; the gene named like the perturbation is left out for that query (pass
    None for an embedding). Ties are broken in index order."""
    r_all = np.asarray(d_real, dtype=np.float64)
    q_all = np.asarray(d_pred, dtype=np.float64)
    n = r_all.shape[0]
    names = np.asarray(genes, dtype=str) if genes is not None else None
    out = np.empty(n)
    for i, p in enumerate(perturbations):
        r, q = r_all, q_all[i]
        keep = None if names is None else names != str(p)  # (every column of that name)
        if keep is not None and not keep.all():
            r, q = r[:, keep], q[keep]
        d = _dist(r, q, metric)
        rank = int(np.sum(d < d[i]) + np.sum(d[:i] == d[i]))
        out[i] = 1.0 - rank / n
    return out


def _dense64(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _mean_pair_dist(a: np.ndarray, b: np.ndarray | None, block: int = 2048) -> float:
    """Mean Euclidean distance over all pairs of rows (a, b); b=None: a with itself, diagonal 0."""
    same = b is None
    b = a if b is None else b
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    an = (a * a).sum(axis=1)
    bn = (b * b).sum(axis=1)
    total = 0.0
    for s in range(0, a.shape[0], block):
        d2 = an[s:s + block, None] + bn[None, :] - 2.0 * (a[s:s + block] @ b.T)
        np.maximum(d2, 0.0, out=d2)
        if same:
            idx = np.arange(s, min(s + block, a.shape[0]))
            d2[idx - s, idx] = 0.0
        total += float(np.sqrt(d2).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distances(
    X: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int
) -> np.ndarray:
    """Full energy distance (V-statistic) of each group code ≥ 1 vs code 0 (metrics.md §5.2)."""
    codes = np.asarray(codes)
    ctrl = _dense64(X[np.flatnonzero(codes == 0)])
    cc = _mean_pair_dist(ctrl, None)
    out = np.full(n_groups - 1, np.nan)
    for g in range(1, n_groups):
        x = _dense64(X[np.flatnonzero(codes == g)])
        out[g - 1] = 2.0 * _mean_pair_dist(x, ctrl) - _mean_pair_dist(x, None) - cc
    return out
