"""Input loading and checks for evaluation (metrics.md §2): scale rule, gene and label pairing."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from statetx._utils import did_you_mean, preview
from statetx.errors import DataError
from statetx.io import control_like

_ROW_CHUNK = 4096


def recorded(adata: ad.AnnData) -> Mapping:
    """What statetx recorded about ``adata`` in ``uns["statetx"]`` (columns, control, scale)."""
    info = adata.uns.get("statetx")
    return info if isinstance(info, Mapping) else {}


def recorded_labels(pred: ad.AnnData, pert_col: str | None, control_pert: object
                    ) -> tuple[str, str]:
    """The perturbation column and control label: as given, else those statetx recorded in
    ``pred.uns["statetx"]`` (predict, predict_split), else cell-eval's defaults."""
    info = recorded(pred)
    return (pert_col or str(info.get("pert_col") or "target_gene"),
            str(control_pert if control_pert is not None
                else info.get("control_pert") or "non-targeting"))


def load(obj: ad.AnnData | str | Path, which: str) -> ad.AnnData:
    """Return an AnnData for ``obj`` (an AnnData or an h5ad path); float16 X becomes float32."""
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.exists():
            raise DataError(f"{which} file {str(path)!r} does not exist; pass an existing h5ad")
        obj = ad.read_h5ad(path)
    elif not isinstance(obj, ad.AnnData):
        raise DataError(f"{which} must be an AnnData or a path to an .h5ad file, got {type(obj)!r}")
    elif obj.isbacked:  # a backed (on-disk) X is read once, whole
        obj = obj.to_memory()
    if obj.X is None:
        raise DataError(f"{which} AnnData has no X matrix; store the log1p expression in .X")
    if obj.n_obs == 0:
        raise DataError(f"{which} AnnData has no cells (n_obs = 0)")
    if obj.X.dtype == np.float16:
        obj = obj.copy()
        obj.X = obj.X.astype(np.float32)
    return obj


def _chunks(x: np.ndarray | sp.spmatrix):
    if sp.issparse(x):
        yield np.asarray(x.data)
        return
    x = np.asarray(x)
    for r in range(0, x.shape[0], _ROW_CHUNK):
        yield x[r:r + _ROW_CHUNK]


def has_fraction(adata: ad.AnnData) -> bool:
    """Whether some entry of X has a fractional part > 1e-3 (else X holds integer counts)."""
    return any(bool(np.any(np.abs(c - np.round(c)) > 1e-3)) for c in _chunks(adata.X))


def check_scale(adata: ad.AnnData, which: str, allow_discrete: bool = False) -> ad.AnnData:
    """Apply the reference scale rule; return ``adata`` or a log1p-converted copy.

    No entry with a fractional part > 1e-3 means integer counts: they are normalised (target =
    median cell total) and log1p-transformed with a printed notice, unless ``allow_discrete``.
    Otherwise a negative minimum, or a maximum ≥ 15 (unless ``allow_discrete``), is an error."""
    has_frac = False
    lo, hi = np.inf, -np.inf
    for c in _chunks(adata.X):
        if c.size == 0:
            continue
        if not np.all(np.isfinite(c)):
            raise DataError(f"{which} X contains NaN or infinite values; remove or impute them")
        lo = min(lo, float(c.min()))
        hi = max(hi, float(c.max()))
        if not has_frac:
            has_frac = bool(np.any(np.abs(c - np.round(c)) > 1e-3))
    if sp.issparse(adata.X) and adata.X.nnz < np.prod(adata.X.shape):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not has_frac:
        if allow_discrete:
            return adata
        warnings.warn(
            f"{which} X holds integer values only (max {hi:g}): treating it as raw counts and "
            "converting it to log1p(normalize_total(median total)) as cell-eval does. Pass "
            "log1p-normalised data, or allow_discrete=True to use the values as they are.",
            UserWarning, stacklevel=3,
        )
        return _normalised_log1p(adata, adata.X.astype(np.float32))
    if lo < 0:
        raise DataError(
            f"{which} X has negative values (min {lo:g}); expected log1p-normalised expression "
            "(non-negative). Pass the log1p matrix, not scaled/centred data"
        )
    if hi >= 15 and not allow_discrete:
        raise DataError(
            f"{which} X has a maximum of {hi:g} (>= 15): it looks like normalised counts, not "
            "log1p. "
            "Apply sc.pp.log1p first, or pass allow_discrete=True to evaluate it as is"
        )
    return adata


def is_count_scale(adata: ad.AnnData) -> bool:
    """Whether statetx recorded ``adata`` as count-scale expression (``uns["statetx"]["scale"]``:
    predictions of a model trained on counts, and their real cells), and it has not been
    log-transformed since (scanpy's ``uns["log1p"]`` mark)."""
    info = adata.uns.get("statetx")
    return isinstance(info, dict) and info.get("scale") == "counts" and "log1p" not in adata.uns


def counts_to_log1p(pred: ad.AnnData, real: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Count-scale predictions and real cells, both normalised to the real cells' median total
    and log1p-transformed: the scale the metrics expect, by the same transform on both sides
    (the reference rule would convert the integer real cells alone)."""
    totals = np.asarray(real.X.sum(axis=1)).ravel()
    target = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    print(f"statetx.evaluate: count-scale prediction: predictions and real cells are normalised "
          f"to {target:g} counts per cell and log1p-transformed for the metrics")
    out = []
    for a in (pred, real):
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        a = _normalised_log1p(a, np.clip(x.astype(np.float32), 0.0, None), target)
        a.uns["statetx"] = {**a.uns.get("statetx", {}), "scale": "log1p"}
        out.append(a)
    return out[0], out[1]


def _normalised_log1p(adata: ad.AnnData, x: np.ndarray | sp.spmatrix,
                      target: float | None = None) -> ad.AnnData:
    """A copy of ``adata`` with X = log1p(normalize_total(x, target)) (target None: the median
    cell total)."""
    import scanpy as sc

    adata = adata.copy()
    adata.X = x
    adata.uns.pop("log1p", None)  # (a stale mark would make scanpy say X is logged already)
    sc.pp.normalize_total(adata, target_sum=target)
    sc.pp.log1p(adata)
    return adata


def check_obs_col(adata: ad.AnnData, col: str, which: str, what: str) -> None:
    """Error unless ``col`` is an obs column of ``adata`` with a label for every cell."""
    if col not in adata.obs.columns:
        raise DataError(
            f"{what} column {col!r} not found in {which} obs "
            f"(columns: {preview(adata.obs.columns)})."
            f"{did_you_mean(col, adata.obs.columns)} Pass the right column name"
        )
    missing = adata.obs[col].isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{which} obs[{col!r}] has {int(missing.sum())} cell(s) without a {what} label (NaN), "
            f"e.g. {preview(adata.obs_names[missing], 3)} (they are not a group called 'nan'). "
            f"Label them, or drop them: adata[adata.obs[{col!r}].notna()].copy()."
        )


def align_pair(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    pert_col: str,
    control_pert: str,
    celltype_col: str | None = None,
    embed_key: str | None = None,
    align_genes: bool = False,
    shared_only: bool = False,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Pair checks of metrics.md §2.3 (genes, labels, control, cell types); may reorder/subset."""
    for a, which in ((pred, "pred"), (real, "real")):
        check_obs_col(a, pert_col, which, "perturbation")
        if celltype_col is not None:
            check_obs_col(a, celltype_col, which, "cell-type")
        if embed_key is not None and embed_key not in a.obsm:
            raise DataError(f"embedding {embed_key!r} not found in {which} obsm "
                            f"(keys: {preview(a.obsm.keys())}); pass an existing embed_key")
    pg, rg = pred.var_names.astype(str), real.var_names.astype(str)
    if not (len(pg) == len(rg) and np.array_equal(pg.to_numpy(), rg.to_numpy())):
        if align_genes and set(pg) == set(rg) and len(pg) == len(rg) and pg.is_unique:
            pred = pred[:, list(rg)]
        else:
            raise DataError(_gene_mismatch(pg, rg, align_genes))
    pl = set(pred.obs[pert_col].astype(str))
    rl = set(real.obs[pert_col].astype(str))
    for labels, which in ((pl, "pred"), (rl, "real")):
        if control_pert not in labels:
            raise DataError(
                f"control label {control_pert!r} not found in {which} obs[{pert_col!r}]."
                f"{did_you_mean(control_pert, labels)}"
                + (f" Labels that look like controls: {preview(hint)}."
                   if (hint := control_like(labels)) else "")
                + " Name the label of the control cells "
                "(control_pert= in Python, --control-pert on the command line); the prediction "
                "must contain control cells too."
            )
    if pl != rl:
        if shared_only:
            keep = pl & rl
            pred = pred[pred.obs[pert_col].astype(str).isin(keep).to_numpy()]
            real = real[real.obs[pert_col].astype(str).isin(keep).to_numpy()]
        else:
            raise DataError(
                f"perturbation labels differ between pred and real (column {pert_col!r}): only in "
                f"pred: [{preview(sorted(pl - rl))}]; only in real: [{preview(sorted(rl - pl))}]. "
                "Predict every perturbation, or pass shared_only=True to evaluate the shared ones"
            )
    if celltype_col is not None:
        pc = set(pred.obs[celltype_col].astype(str))
        rc = set(real.obs[celltype_col].astype(str))
        if pc != rc:
            raise DataError(
                f"cell types differ between pred and real (column {celltype_col!r}): only in pred: "
                f"[{preview(sorted(pc - rc))}]; only in real: [{preview(sorted(rc - pc))}]"
            )
    return pred, real


def _gene_mismatch(pg, rg, align_genes: bool) -> str:
    if len(pg) != len(rg) or set(pg) != set(rg):
        only_p = sorted(set(pg) - set(rg))
        only_r = sorted(set(rg) - set(pg))
        return (f"genes differ between pred ({len(pg)} genes) and real ({len(rg)} genes): only in "
                f"pred: [{preview(only_p, 10)}]; only in real: [{preview(only_r, 10)}]. "
                "Subset both "
                "files to the same genes")
    diff = np.flatnonzero(pg.to_numpy() != rg.to_numpy())[:5]
    pos = "; ".join(f"position {i}: pred {pg[i]!r} vs real {rg[i]!r}" for i in diff)
    hint = "" if align_genes else " Pass align_genes=True to reorder pred to the real gene order"
    return f"pred and real have the same genes in a different order ({pos}).{hint}"
