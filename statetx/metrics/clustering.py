"""clustering_agreement (metrics.md §5.3): Leiden-style clustering of perturbation centroids.

The reference uses scanpy's UMAP neighbour graph and igraph's Leiden. Here the graph comes from
scanpy as well, and communities come from a small deterministic modularity optimiser (local moving
plus aggregation; the second iteration starts from the first's communities), so values are close
to, not identical with, the reference.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

PRED_RESOLUTIONS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0)


def knn_graph(centroids: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """UMAP fuzzy-simplicial-set connectivities of the rows (scanpy's default neighbour graph).

    Exact Euclidean k nearest neighbours (the point itself included, as in scanpy), smooth kNN
    distances by bisection (target log2 k) and the fuzzy union W + Wᵀ − W∘Wᵀ."""
    x = np.asarray(centroids, dtype=np.float64)
    n = x.shape[0]
    k = min(n_neighbors, n)
    sq = (x * x).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
    np.fill_diagonal(d, 0.0)
    order = np.argsort(d, axis=1, kind="stable")
    order = np.concatenate([np.arange(n)[:, None], order[order != np.arange(n)[:, None]]
                            .reshape(n, n - 1)], axis=1)[:, :k]
    dist = np.take_along_axis(d, order, axis=1)
    target = np.log2(k)
    mean_all = dist.mean()
    w = np.zeros((n, n))
    for i in range(n):
        nz = dist[i][dist[i] > 0]
        rho = nz[0] if nz.size else 0.0
        lo, hi, mid = 0.0, np.inf, 1.0
        for _ in range(64):
            dd = dist[i, 1:] - rho
            psum = float(np.sum(np.where(dd > 0, np.exp(-np.maximum(dd, 0.0) / mid), 1.0)))
            if abs(psum - target) < 1e-5:
                break
            if psum > target:
                hi = mid
                mid = (lo + hi) / 2.0
            else:
                lo = mid
                mid = mid * 2 if hi == np.inf else (lo + hi) / 2.0
        floor = 1e-3 * (dist[i].mean() if rho > 0 else mean_all)
        sigma = max(mid, floor)
        for j in range(1, k):
            dd = dist[i, j] - rho
            w[i, order[i, j]] = 1.0 if dd <= 0 or sigma == 0 else np.exp(-dd / sigma)
    return sp.csr_matrix(w + w.T - w * w.T)


def _local_moving(w: np.ndarray, labels: np.ndarray, gamma: float) -> np.ndarray:
    """Move nodes one at a time to the neighbouring community of largest modularity gain until
    no move gains; ``labels`` is the start (and is updated)."""
    k = w.sum(axis=1)
    m2 = k.sum()
    tot = np.bincount(labels, k, minlength=w.shape[0]).astype(float)
    improved = True
    while improved:
        improved = False
        for i in range(w.shape[0]):
            ci = labels[i]
            tot[ci] -= k[i]
            links = np.bincount(labels, w[i], minlength=w.shape[0])
            links[ci] -= w[i, i]
            gain = links - gamma * k[i] * tot / m2
            cand = np.unique(np.r_[labels[w[i] > 0], ci])
            best = cand[np.argmax(gain[cand])]
            if gain[best] > gain[ci] + 1e-12:
                labels[i] = best
                improved = True
            tot[labels[i]] += k[i]
    return labels


def leiden_like(adj: sp.spmatrix | np.ndarray, resolution: float = 1.0, n_iterations: int = 2
                ) -> np.ndarray:
    """Modularity communities (resolution γ) by local moving + aggregation; labels 0..c-1.

    Each iteration starts from the previous one's communities (the first from singletons), as
    igraph's Leiden does, so a further iteration never lowers the modularity."""
    w = adj.toarray() if sp.issparse(adj) else np.asarray(adj, dtype=float)
    w = (w + w.T) / 2.0
    n = w.shape[0]
    labels = np.arange(n)
    if n == 0 or w.sum() == 0:
        return labels
    for _ in range(n_iterations):
        node_of, cur_w, start = np.arange(n), w, labels.copy()
        while True:
            _, part = np.unique(_local_moving(cur_w, start, resolution), return_inverse=True)
            node_of = part[node_of]
            n_comm = part.max() + 1
            if n_comm == cur_w.shape[0]:  # every node its own community: nothing to merge
                break
            agg = np.zeros((n_comm, n_comm))
            np.add.at(agg, (part[:, None], part[None, :]), cur_w)
            cur_w, start = agg, np.arange(n_comm)
        labels = node_of
    return np.unique(labels, return_inverse=True)[1]


def clustering_agreement(real_centroids: np.ndarray, pred_centroids: np.ndarray) -> float:
    """Max adjusted mutual information between the real clustering (γ = 1) and pred clusterings."""
    from sklearn.metrics import adjusted_mutual_info_score

    n = real_centroids.shape[0]
    if n < 3:
        return float("nan")
    k = min(15, n - 1)
    real_lab = leiden_like(knn_graph(real_centroids, k), 1.0)
    g_pred = knn_graph(pred_centroids, k)
    return float(max(0.0, *(adjusted_mutual_info_score(real_lab, leiden_like(g_pred, r))
                            for r in PRED_RESOLUTIONS)))  # (as cell-eval: the best, from 0)
