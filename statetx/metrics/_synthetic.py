"""Seeded synthetic log1p data for tests and benchmarks of the metrics (not a biological model)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def synthetic_log1p(
    n_perts: int = 5,
    cells_per_pert: int = 40,
    n_ctrl: int = 80,
    n_genes: int = 50,
    *,
    seed: int = 0,
    effects: np.ndarray | None = None,
    gene_names_from_perts: bool = True,
    control: str = "non-targeting",
    target_sum: float = 1e4,
    block_rows: int = 8192,
) -> tuple[ad.AnnData, np.ndarray]:
    """Poisson counts around per-gene means, perturbation effects as multiplicative factors on a
    few genes, library-size normalised and log1p'd (float32, dense). Returns (adata, effects) where
    ``effects`` is the (n_perts, n_genes) log-fold-change matrix used; pass it back to draw a
    second sample (e.g. a "prediction") of the same biology with another seed."""
    rng = np.random.default_rng(seed)
    perts = [f"G{i:03d}" for i in range(n_perts)]
    if effects is None:
        er = np.random.default_rng(12345 + n_perts * 7 + n_genes)
        effects = np.zeros((n_perts, n_genes), dtype=np.float32)
        for i in range(n_perts):
            hit = er.choice(n_genes, size=max(3, n_genes // 10), replace=False)
            effects[i, hit] = er.normal(0, 1.5, hit.size)
            if gene_names_from_perts and i < n_genes:
                effects[i, i] = -2.0  # knock-down of the target gene
    base = np.random.default_rng(777 + n_genes).lognormal(-1.0, 1.3, n_genes).astype(np.float32)
    labels = np.repeat([control, *perts], [n_ctrl] + [cells_per_pert] * n_perts)
    n = labels.size
    X = np.empty((n, n_genes), dtype=np.float32)
    fac = np.vstack([np.zeros((1, n_genes), np.float32), effects]).astype(np.float32)
    code = np.repeat(np.arange(n_perts + 1), [n_ctrl] + [cells_per_pert] * n_perts)
    for r in range(0, n, block_rows):
        c = code[r:r + block_rows]
        lib = rng.lognormal(0.0, 0.3, (c.size, 1)).astype(np.float32)
        mu = base[None, :] * np.exp(fac[c]) * lib
        counts = rng.poisson(mu).astype(np.float32)
        tot = counts.sum(axis=1, keepdims=True)
        tot[tot == 0] = 1.0
        X[r:r + block_rows] = np.log1p(counts / tot * np.float32(target_sum))
    names = [f"G{i:03d}" for i in range(n_genes)] if gene_names_from_perts else [
        f"gene{i}" for i in range(n_genes)]
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)},
                       index=[f"c{seed}_{i}" for i in range(n)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names)), effects
