"""Differential expression: two-sided Wilcoxon rank-sum (Mann–Whitney U) test of every perturbation
against the control group, vectorised over genes and perturbations (metrics.md §6).

Ranking trick: for a block of genes, every non-zero entry becomes one 64-bit key
``gene | order-preserving float bits | group label``. One sort of these keys yields, per gene, the
pooled tie blocks of all groups at once (the control label sorts first inside a tie block); the
control count below and inside each block gives the rank sum of every perturbation without sorting
the control again per perturbation. Zeros (usually the majority) are handled analytically as one tie
block when the data are non-negative. Key building and the scan over the sorted keys run in small
numba kernels when numba is importable (it comes with scanpy), else in NumPy; gene blocks run on
``num_threads`` threads."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import ndtr

from statetx._utils import available_cpus
from statetx.errors import ConfigError, DataError

DE_MODES = ("pdex-0.3", "vcc-2025")
DE_COLUMNS = [
    "target", "feature", "target_mean", "ref_mean", "target_membership", "ref_membership",
    "log2_fold_change", "percent_change", "p_value", "statistic", "fdr",
]
_MAX_GROUPS = 1 << 16
_LABEL_MASK = np.uint64(0xFFFF)
USE_NUMBA = True  # set False to force the pure-NumPy path


@dataclass
class RankSums:
    """Per (perturbation, gene) Mann–Whitney ingredients; arrays are (n_perts, n_genes)."""

    u1: np.ndarray  # U statistic of the perturbed group
    tie_sum: np.ndarray  # Σ(t³ − t) over the pooled tie groups
    n1: np.ndarray  # (n_perts,) perturbed cell counts
    n2: int  # control cell count


def _ordered_bits(v: np.ndarray) -> np.ndarray:
    """Map float32 values to uint64 whose unsigned order equals the float order."""
    b = (v + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # + 0.0 turns -0.0 into 0.0
    neg = (b >> np.uint64(31)) == 1
    return np.where(neg, np.uint64(0xFFFFFFFF) - b, b | np.uint64(0x80000000))


def _block_stats_numpy(
    block: np.ndarray, codes: np.ndarray, counts: np.ndarray, skip_zeros: bool
) -> tuple[np.ndarray, np.ndarray]:
    """U1 and tie sums for one gene block. ``block`` is (cells, genes) float32, ``codes`` the group
    code of every cell (0 = control), ``counts`` the cells per code. Returns two (groups, genes)."""
    n_cells, gb = block.shape
    ng = counts.size
    t = np.ascontiguousarray(block.T)
    flat = t.ravel()
    if skip_zeros:
        pos = np.flatnonzero(flat)
    else:
        pos = np.arange(flat.size)
    gene = (pos // n_cells).astype(np.uint64)
    cell = pos % n_cells
    key = (gene << np.uint64(48)) | (_ordered_bits(flat[pos]) << np.uint64(16))
    key |= codes[cell].astype(np.uint64)
    del pos, cell, gene
    key.sort()

    u1 = np.zeros((gb, ng))
    tie = np.zeros((gb, ng))
    nnz = np.zeros((gb, ng))
    ctrl_ties = np.zeros(gb)
    if key.size:
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        lens = np.diff(np.append(starts, key.size)).astype(np.float64)
        rkey = key[starts]
        del key
        rlab = (rkey & _LABEL_MASK).astype(np.int64)
        rblock = rkey >> np.uint64(16)
        rgene = (rkey >> np.uint64(48)).astype(np.int64)
        new_block = np.concatenate(([True], rblock[1:] != rblock[:-1]))
        bid = np.cumsum(new_block) - 1
        tc_run = np.where(rlab == 0, lens, 0.0)
        tc = np.bincount(bid, tc_run)[bid]
        excl = np.cumsum(tc_run) - tc_run  # control cells in earlier runs (all genes)
        block_first = np.flatnonzero(new_block)
        new_gene = np.concatenate(([True], rgene[1:] != rgene[:-1]))
        gene_first = np.flatnonzero(new_gene)
        gene_idx = np.cumsum(new_gene) - 1
        below = excl[block_first][bid] - excl[gene_first][gene_idx]
        flat_idx = rgene * ng + rlab
        nnz = np.bincount(flat_idx, lens, minlength=gb * ng).reshape(gb, ng)
        ctrl_ties = np.bincount(rgene, np.where(rlab == 0, lens**3 - lens, 0.0), minlength=gb)
        if skip_zeros:  # every non-zero value is > 0, so the zero block lies below it
            zc_all = counts[0] - nnz[:, 0]
            below = below + zc_all[rgene]
        pert = rlab > 0
        s = tc + lens
        w_u = np.where(pert, lens * (below + 0.5 * tc), 0.0)
        w_t = np.where(pert, s**3 - s - (tc**3 - tc), 0.0)
        u1 = np.bincount(flat_idx, w_u, minlength=gb * ng).reshape(gb, ng)
        tie = np.bincount(flat_idx, w_t, minlength=gb * ng).reshape(gb, ng)
    if skip_zeros:
        zeros = counts[None, :] - nnz  # (genes, groups) zero counts
        zc = zeros[:, :1]
        s = zc + zeros
        u1 = u1 + zeros * 0.5 * zc
        tie = tie + (s**3 - s - (zc**3 - zc))
        ctrl_ties = ctrl_ties + (zc[:, 0] ** 3 - zc[:, 0])
    tie = tie + ctrl_ties[:, None]
    return u1[:, 1:].T, tie[:, 1:].T


def _numba_kernels():  # pragma: no cover - compiled code is exercised through _block_stats
    """Compile (once, cached on disk) the numba kernels, or return None without numba."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS or None
    try:
        import numba
    except ImportError:
        _KERNELS = False
        return None

    @numba.njit(cache=True, nogil=True)
    def build_keys(bits, codes, skip_zeros):
        n, gb = bits.shape
        sign = np.uint32(0x80000000)
        m = 0
        for i in range(n):
            for j in range(gb):
                if not skip_zeros or (bits[i, j] & ~sign) != 0:
                    m += 1
        keys = np.empty(m, dtype=np.uint64)
        k = 0
        for i in range(n):
            c = np.uint64(codes[i])
            for j in range(gb):
                b = bits[i, j]
                if (b & ~sign) == 0:  # ±0.0
                    if skip_zeros:
                        continue
                    b = np.uint32(0)
                if skip_zeros:
                    o = np.uint64(b)
                elif b & sign:
                    o = np.uint64(~b)
                else:
                    o = np.uint64(b | sign)
                keys[k] = (np.uint64(j) << np.uint64(48)) | (o << np.uint64(16)) | c
                k += 1
        return keys

    @numba.njit(cache=True, nogil=True)
    def scan(key, u1, tie, nnz, ctrl_ties):
        n = key.size
        mask = np.uint64(0xFFFF)
        i = 0
        while i < n:
            g = np.int64(key[i] >> np.uint64(48))
            below = 0.0
            while i < n and np.int64(key[i] >> np.uint64(48)) == g:
                vb = key[i] >> np.uint64(16)
                e = i
                while e < n and (key[e] >> np.uint64(16)) == vb:
                    e += 1
                k = i
                tc = 0.0
                while k < e and (key[k] & mask) == 0:
                    k += 1
                tc = float(k - i)
                ctrl_ties[g] += tc * tc * tc - tc
                nnz[g, 0] += tc
                while k < e:
                    lab = np.int64(key[k] & mask)
                    s = k
                    while k < e and np.int64(key[k] & mask) == lab:
                        k += 1
                    ln = float(k - s)
                    u1[g, lab] += ln * (below + 0.5 * tc)
                    t = tc + ln
                    tie[g, lab] += t * t * t - t - (tc * tc * tc - tc)
                    nnz[g, lab] += ln
                below += tc
                i = e

    _KERNELS = (build_keys, scan)
    return _KERNELS


_KERNELS = None


def _block_stats(
    block: np.ndarray, codes: np.ndarray, counts: np.ndarray, skip_zeros: bool
) -> tuple[np.ndarray, np.ndarray]:
    """U1 and tie sums for one gene block. ``block`` is (cells, genes) float32, ``codes`` the group
    code of every cell (0 = control), ``counts`` the cells per code. Returns two (groups, genes).
    Uses numba kernels around NumPy's sort when numba is importable, else pure NumPy."""
    kernels = _numba_kernels() if USE_NUMBA else None
    if kernels is None:
        return _block_stats_numpy(block, codes, counts, skip_zeros)
    build_keys, scan = kernels
    gb = block.shape[1]
    ng = counts.size
    key = build_keys(block.view(np.uint32), codes, skip_zeros)
    key.sort()
    u1 = np.zeros((gb, ng))
    tie = np.zeros((gb, ng))
    nnz = np.zeros((gb, ng))
    ctrl_ties = np.zeros(gb)
    scan(key, u1, tie, nnz, ctrl_ties)
    if skip_zeros:  # the zero block lies below every (positive) stored value
        zeros = counts[None, :] - nnz
        zc = zeros[:, :1]
        u1 = u1 + nnz * zc + zeros * 0.5 * zc
        s = zc + zeros
        tie = tie + (s**3 - s - (zc**3 - zc))
        ctrl_ties = ctrl_ties + (zc[:, 0] ** 3 - zc[:, 0])
    tie = tie + ctrl_ties[:, None]
    return u1[:, 1:].T, tie[:, 1:].T


def rank_sums(
    X: np.ndarray | sp.spmatrix,
    codes: np.ndarray,
    n_groups: int,
    *,
    num_threads: int | None = None,
    block_genes: int | None = None,
) -> RankSums:
    """Rank-sum statistics of every group code 1..n_groups-1 against code 0, for every gene.

    ``codes`` holds one integer per row of ``X`` (-1 = ignore the cell)."""
    if n_groups > _MAX_GROUPS:
        raise ConfigError(f"DE supports at most {_MAX_GROUPS - 1} perturbations, got "
                          f"{n_groups - 1}; split the evaluation")
    codes = np.asarray(codes, dtype=np.int64)
    keep = codes >= 0
    if not keep.all():
        X = X[keep]
        codes = codes[keep]
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    n_cells, n_genes = X.shape
    if block_genes is None:  # keep one block's keys around 8-16 M entries
        block_genes = int(max(1, min(n_genes, 8_000_000 // max(n_cells, 1))))
    if sp.issparse(X):
        X = X.tocsc()
        skip_zeros = bool(X.data.size == 0 or X.data.min() >= 0)
    else:
        X = np.asarray(X)
        skip_zeros = bool(X.size == 0 or X.min() >= 0)
    bounds = [(g, min(g + block_genes, n_genes)) for g in range(0, n_genes, block_genes)]
    if USE_NUMBA:
        _numba_kernels()  # compile (or load) once, before any worker thread needs the kernels

    def work(b: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        sub = X[:, b[0]:b[1]]
        sub = sub.toarray() if sp.issparse(sub) else sub
        return _block_stats(np.asarray(sub, dtype=np.float32), codes, counts, skip_zeros)

    threads = num_threads or 1
    if threads < 0:
        threads = available_cpus()
    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(threads) as ex:
            parts = list(ex.map(work, bounds))
    else:
        parts = [work(b) for b in bounds]
    u1 = np.concatenate([p[0] for p in parts], axis=1) if parts else np.zeros((n_groups - 1, 0))
    tie = np.concatenate([p[1] for p in parts], axis=1) if parts else np.zeros((n_groups - 1, 0))
    return RankSums(u1=u1, tie_sum=tie, n1=counts[1:], n2=int(counts[0]))


def mwu_pvalues(rs: RankSums) -> np.ndarray:
    """Two-sided asymptotic p-values with tie and continuity correction (SciPy's ``asymptotic``)."""
    n1 = rs.n1[:, None]
    n2 = float(rs.n2)
    n = n1 + n2
    prod = n1 * n2
    u = np.maximum(rs.u1, prod - rs.u1)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = prod / 12.0 * ((n + 1) - rs.tie_sum / (n * (n - 1)))
        sd = np.sqrt(np.maximum(var, 0.0))
        z = (u - prod / 2.0 - 0.5) / sd
        p = 2.0 * ndtr(-z)
    p = np.where(sd > 0, p, 1.0)
    return np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def _exact_small_groups(pvals: np.ndarray, X, codes: np.ndarray, rs: RankSums) -> None:
    """SciPy's ``method="auto"``: exact two-sided p-values when a group has at most 8 cells and
    the gene has no ties (in place; rare in single-cell data, where zeros tie)."""
    small = np.flatnonzero((rs.n1 <= 8) | (rs.n2 <= 8))
    if not len(small):
        return
    from scipy.stats import mannwhitneyu

    ctrl = np.asarray(X[codes == 0].todense() if sp.issparse(X) else X[codes == 0])
    for t in small:
        cells = np.asarray(X[codes == t + 1].todense() if sp.issparse(X) else X[codes == t + 1])
        for g in range(pvals.shape[1]):
            x, y = cells[:, g], ctrl[:, g]
            if len(np.unique(np.concatenate([x, y]))) == len(x) + len(y):
                pvals[t, g] = mannwhitneyu(x, y, alternative="two-sided", method="exact").pvalue


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values along the last axis (each row separately)."""
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    m = p.shape[1]
    if m == 0:
        return p.copy()
    order = np.argsort(p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1) * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[:, ::-1], axis=1)[:, ::-1]
    out = np.empty_like(p)
    np.put_along_axis(out, order, np.minimum(ranked, 1.0), axis=1)
    return out


def group_means(
    X: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int, *, float64: bool = False
) -> np.ndarray:
    """(n_groups, genes) means of the rows of each code (-1 = ignored), returned as float64.

    By default the sums run in X's own dtype, row after row (NumPy's ``mean(axis=0)``), which is how
    the reference computes DE means for float32 input; ``float64=True`` accumulates in float64."""
    codes = np.asarray(codes, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    out = np.full((n_groups, X.shape[1]), np.nan)
    for g in range(n_groups):
        rows = order[bounds[g]:bounds[g + 1]]
        if rows.size == 0:
            continue
        sub = X[rows]
        if sp.issparse(sub):
            out[g] = np.asarray(sub.astype(np.float64).mean(axis=0)).ravel()
        elif float64:
            out[g] = np.asarray(sub, dtype=np.float64).mean(axis=0)
        else:
            out[g] = np.asarray(sub).mean(axis=0)
    return out


def _log_expm1(m: np.ndarray) -> np.ndarray:
    """log(expm1(m)) without overflow for large means m (-inf at 0, NaN below)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(m > 0, m + np.log(-np.expm1(-np.maximum(m, 1e-300))),
                        np.log(np.expm1(m)))


def _log_fold_changes(mt: np.ndarray, mr: np.ndarray, epsilon: float, mode: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """log2 fold change and percent change of expm1(mt) against expm1(mr) (pseudocount
    ``epsilon``) computed from the logs in float64: finite where expm1 of a mean overflows
    float32 (or float64). Broadcasts ``mt`` (targets × genes) against ``mr`` (1 × genes)."""
    lt, lr = _log_expm1(mt), _log_expm1(mr)
    le = np.log(epsilon) if epsilon > 0 else -np.inf
    lt_e, lr_e = np.logaddexp(lt, le), np.logaddexp(lr, le)
    with np.errstate(over="ignore", invalid="ignore"):
        lfc = (lt_e - lr_e) / np.log(2.0)
        pc = np.exp(lt - lr_e) - np.where(np.isneginf(lr), 0.0, np.exp(lr - lr_e))
    if mode == "vcc-2025":  # clipped: a zero mean on one side counts as 20x
        lfc = np.where(np.isneginf(lr), np.log2(20.0),
                       np.where(np.isneginf(lt), -np.log2(20.0), (lt - lr) / np.log(2.0)))
    return lfc, pc


def wilcoxon_de(
    X: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    control: str,
    genes: Sequence[str] | None = None,
    *,
    epsilon: float = 0.0,
    num_threads: int | None = None,
    means: np.ndarray | None = None,
    mode: str = "pdex-0.3",
) -> pd.DataFrame:
    """DE table of every non-control label against ``control`` (pdex 0.3.0 semantics).

    ``X`` is log1p expression (cells × genes); ``labels`` the perturbation of every cell. Targets
    are sorted, rows within a target follow the gene order. ``means`` may pass precomputed group
    means in the order ``[control] + sorted(targets)``. Columns: :data:`DE_COLUMNS`.
    ``mode="vcc-2025"`` reproduces cell-eval ≤ 0.6.7 (the Virtual Cell Challenge 2025, spec
    metrics.md §11): SciPy's ``method="auto"`` (exact p-values when a group has at most 8
    cells and the gene no ties), Benjamini–Hochberg over all (perturbation, gene) rows at
    once, and fold changes clipped (reference mean 0 → 20, target mean 0 → 1/20, both 0 → 1).
    ``epsilon`` is the pseudocount of the fold changes (default 0, cell-eval's).
    ``num_threads``: threads over blocks of genes; None (default) or 0 means 1 thread here
    (while :func:`~statetx.metrics.evaluate` with ``num_threads=None`` uses every CPU), -1 every
    CPU available to the process.
    """
    if mode not in DE_MODES:
        raise ConfigError(f"de_mode {mode!r} is not supported; use one of {list(DE_MODES)}")
    labels = np.asarray(labels).astype(str)
    if labels.shape[0] != X.shape[0]:
        raise DataError(f"labels has {labels.shape[0]} entries but X has {X.shape[0]} rows")
    uniq = np.unique(labels)
    if control not in uniq:
        raise DataError(f"control label {control!r} not found among the labels; pass the label "
                        f"of the control cells (found: {', '.join(uniq[:10])})")
    targets = sorted(str(u) for u in uniq if u != control)
    order = [control] + targets
    codes = pd.Categorical(labels, categories=order).codes.astype(np.int64)
    n_genes = X.shape[1]
    genes = np.asarray(genes if genes is not None else [str(i) for i in range(n_genes)]).astype(str)
    if not targets:
        return pd.DataFrame({c: [] for c in DE_COLUMNS})
    rs = rank_sums(X, codes, len(order), num_threads=num_threads)
    pvals = mwu_pvalues(rs)
    if mode == "vcc-2025":
        _exact_small_groups(pvals, X, codes, rs)
        fdr = bh_fdr(pvals.reshape(1, -1)).reshape(pvals.shape)  # one family: every row
    else:
        fdr = bh_fdr(pvals)
    if means is None:
        means = group_means(X, codes, len(order))
    m64 = np.asarray(means, dtype=np.float64)
    with np.errstate(over="ignore"):
        e64 = np.expm1(m64)
        expm = e64.astype(np.float32)
    tm = expm[1:]
    rm = np.broadcast_to(expm[:1], tm.shape)
    t64 = tm.astype(np.float64)
    r64 = rm.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2((t64 + epsilon) / (r64 + epsilon))
        pc = (t64 - r64) / (r64 + epsilon)
        lfc = np.where((t64 + epsilon == 0) & (r64 + epsilon == 0), 0.0, lfc)
        pc = np.where((t64 - r64 == 0) & (r64 + epsilon == 0), 0.0, pc)
    if mode == "vcc-2025":  # the clipped fold change of cell-eval <= 0.6.7
        with np.errstate(divide="ignore", invalid="ignore"):
            fc = np.where(r64 == 0, np.where(t64 == 0, 1.0, 20.0),
                          np.where(t64 == 0, 1.0 / 20.0, t64 / r64))
            lfc = np.nan_to_num(np.log2(fc), nan=0.0)
    over = np.isinf(expm) & np.isfinite(m64)  # expm1 of a mean above ~88.7 overflows float32
    if over.any():  # (counts scored with allow_discrete): their fold changes via logs (the
        # means stay float32, inf where they overflow, as the reference writes them)
        hit = over[1:] | over[:1]
        lfc_o, pc_o = _log_fold_changes(m64[1:], m64[:1], epsilon, mode)
        lfc, pc = np.where(hit, lfc_o, lfc), np.where(hit, pc_o, pc)
    n_t = len(targets)
    return pd.DataFrame({
        "target": np.repeat(np.asarray(targets, dtype=object), n_genes),
        "feature": np.tile(genes.astype(object), n_t),
        "target_mean": tm.ravel(),
        "ref_mean": np.ascontiguousarray(rm).ravel(),
        "target_membership": np.repeat(rs.n1.astype(np.int64), n_genes),
        "ref_membership": np.full(n_t * n_genes, rs.n2, dtype=np.int64),
        "log2_fold_change": lfc.ravel(),
        "percent_change": pc.ravel(),
        "p_value": pvals.ravel(),
        "statistic": rs.u1.ravel(),
        "fdr": fdr.ravel(),
    })
