"""Preprocessing: normalisation + HVGs, control templates and the CRISPRi knock-down filter.

Semantics: spec inference.md §5 (``preprocess_train``, D11), §6 (control template) and §7
(``filter_on_target_knockdown``, D12). Functions follow scanpy's conventions: ``copy=False``
modifies ``adata`` in place and returns ``None``; ``copy=True`` leaves the input untouched and
returns a new AnnData. ``filter_on_target_knockdown`` removes cells and therefore always returns
a new AnnData.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statetx._context import on_command_line
from statetx._utils import (
    LOG1P_MAX,
    all_integers,
    did_you_mean,
    looks_log1p,
    names_list,
    preview,
    repeated,
    sample_rows,
    say,
    to_dense_f32,
    warn,
    warn_view_becomes_copy,
)
from statetx.errors import ConfigError, DataError
from statetx.io import control_like, recorded_target_sum

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "preprocess_train",
    "make_control_template",
    "control_template",
    "filter_on_target_knockdown",
    "normalize_log1p",
]


Matrix = np.ndarray | sp.spmatrix
_HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3")


# ------------------------------------------------------------------------------------------------
# shared helpers


def _check_cells(adata: AnnData) -> None:
    """The data are in memory and hold cells."""
    if adata.isbacked:
        raise DataError(f"{adata.filename} is opened in backed mode; preprocessing needs the data "
                        "in memory: adata = adata.to_memory() (or read_h5ad without backed=).")
    if adata.n_obs == 0:
        raise DataError("the AnnData has no cells (n_obs = 0).")


def _source(adata: AnnData, layer: str | None, check: bool = True) -> tuple[Matrix, str]:
    """The matrix ``layers[layer]`` (or X) and a printable name for it, checked (unless
    ``check=False``): in memory, cells present, finite values."""
    _check_cells(adata)
    if layer is None:
        if adata.X is None:
            raise DataError("adata.X is empty. Pass layer=... naming the layer that holds counts.")
        m, name = adata.X, "X"
    elif layer not in adata.layers:
        raise DataError(
            f"layer '{layer}' not found "
            f"(available layers: {preview(adata.layers.keys()) or 'none'})."
            f"{did_you_mean(layer, adata.layers.keys())} Pass layer=None to use X."
        )
    else:
        m, name = adata.layers[layer], f"layers['{layer}']"
    bad = ~np.isfinite(_row_totals(m)) if check else np.zeros(0, dtype=bool)
    if bad.any():
        raise DataError(f"{int(bad.sum())} cell(s) have NaN or Inf values in {name}, e.g. "
                        f"{preview(adata.obs_names[bad], 5)}. Remove or repair them first.")
    return m, name


def _obs_labels(adata: AnnData, col: str, what: str) -> np.ndarray:
    """``obs[col]`` as an array of str; errors for a missing column or missing values."""
    if col not in adata.obs.columns:
        raise DataError(
            f"obs column '{col}' ({what}) not found (available: {preview(adata.obs.columns)})."
            f"{did_you_mean(col, adata.obs.columns)}"
        )
    s = adata.obs[col]
    n_na = int(s.isna().sum())
    if n_na:
        raise DataError(
            f"obs['{col}'] has {n_na} missing values. Remove those cells or fill in a label."
        )
    return s.astype(str).to_numpy()


def _check_control(labels: np.ndarray, col: str, control: str) -> np.ndarray:
    is_ctrl = labels == str(control)
    if not is_ctrl.any():
        uniq = pd.unique(labels)
        hints = control_like(uniq)
        hint = (
            f" Values that look like controls: {preview(hints, 5)}."
            if hints
            else did_you_mean(control, uniq)
        )
        raise DataError(
            f"control label '{control}' is not a value of obs['{col}'] "
            f"(values: {preview(uniq, 10)}).{hint}"
        )
    return is_ctrl


def _row_totals(m: Matrix) -> np.ndarray:
    """Per-row sums in float64 (same result for dense and sparse input)."""
    if sp.issparse(m):
        return np.asarray(m.sum(axis=1, dtype=np.float64)).ravel()
    return np.asarray(m).sum(axis=1, dtype=np.float64)  # (no float64 copy of the matrix)


def normalize_log1p(m: Matrix, target_sum: float | None = None) -> tuple[Matrix, float]:
    """Scale each row to ``target_sum`` (default: median of the non-zero row totals), then log1p.

    Parameters
    ----------
    m
        Counts, cells × genes: a numpy array or a scipy sparse matrix (not an AnnData; for
        an AnnData use :func:`preprocess_train`).
    target_sum
        Per-row target total; ``None`` = median of the non-zero row totals.

    Returns
    -------
    A new float32 matrix of the same kind (CSR for sparse input) and the target used. Rows with
    zero total stay zero. Dense and sparse input give identical values.
    """
    if hasattr(m, "obs") and hasattr(m, "X"):  # an AnnData
        raise TypeError("normalize_log1p takes a matrix (e.g. adata.X or adata.layers['counts'])"
                        " and returns (matrix, target_sum); for an AnnData use "
                        "statetx.pp.preprocess_train (normalise, log1p and HVGs) or "
                        "scanpy.pp.normalize_total + scanpy.pp.log1p.")
    totals = _row_totals(m)
    if not np.isfinite(totals).all():
        raise DataError(f"{int((~np.isfinite(totals)).sum())} row(s) of the matrix have NaN or "
                        "Inf values; remove or repair them before normalising.")
    if target_sum is None:
        pos = totals[totals > 0]
        target_sum = float(np.median(pos)) if pos.size else 1.0
    elif not np.isfinite(target_sum) or target_sum <= 0:
        raise ConfigError(f"target_sum={target_sum!r} is invalid; use a positive number or None.")
    scale = np.divide(
        totals, target_sum, out=np.ones_like(totals), where=totals > 0
    )  # counts / scale = normalised counts
    if sp.issparse(m):
        out = sp.csr_matrix(m, dtype=np.float64, copy=True)
        out.data = np.log1p(out.data / np.repeat(scale, np.diff(out.indptr))).astype(np.float32)
        return sp.csr_matrix(out, dtype=np.float32), float(target_sum)
    dense = np.asarray(m, dtype=np.float64) / scale[:, None]
    return np.log1p(dense).astype(np.float32), float(target_sum)


def _count_problem(m: Matrix) -> str | None:
    """Why ``m`` does not look like raw counts (or None when it does)."""
    s = sample_rows(m, 1000)
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        return None
    if finite.min() < 0:
        return "it contains negative values (scaled or centred data?)"
    if looks_log1p(m):
        return f"it looks log1p-transformed (non-integer values, maximum below {LOG1P_MAX:g})"
    if not all_integers(finite):
        return "it contains non-integer values (already normalised?)"
    return None


def _writable(adata: AnnData, copy: bool, what: str) -> AnnData:
    """The AnnData to modify: a copy with ``copy=True``; else ``adata`` itself, a view first made
    its own object (as scanpy does: anndata would write a view's new X into its parent), which
    is said as predict(inplace=True) says it (``what``: the function)."""
    _check_cells(adata)
    if copy:
        return adata.copy()
    if adata.is_view:
        warn_view_becomes_copy(
            f"{what} (in place, copy=False)", "result",
            " Keep the subset in a variable of its own first (sub = adata[...].copy()) and pass "
            "that, or pass copy=True and keep the AnnData returned.")
        adata._init_as_actual(adata.copy())
    return adata


def _set_log1p(adata: AnnData) -> None:
    adata.uns["log1p"] = {"base": None}


# ------------------------------------------------------------------------------------------------
# preprocess_train (spec §5, D11)


def _var_column_hint(adata: AnnData, absent: list[str]) -> str:
    """Where names that are not var names are: a var column that holds them (e.g. gene symbols
    beside Ensembl ids) and the var names to pass instead, else close var names."""
    for col in adata.var.columns:
        values = adata.var[col]
        if not (values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype)):
            continue
        hit = values.astype(str).isin(absent).to_numpy()
        if hit.any():
            ids = adata.var_names[hit]
            return (f" var['{col}'] holds {preview(sorted(set(values[hit].astype(str))))}: "
                    f"pass their var names ({preview(ids)}), e.g. "
                    f"list(adata.var_names[adata.var['{col}'].isin([...])]).")
    return did_you_mean(absent[0], adata.var_names)


def preprocess_train(
    adata: AnnData,
    n_top_genes: int = 2000,
    *,
    target_sum: float | None = None,
    flavor: Literal["seurat", "cell_ranger", "seurat_v3"] = "seurat",
    layer: str | None = None,
    already_normalized: bool = False,
    counts_layer: str | None = None,
    n_bins: int = 20,
    include_genes: Sequence[str] | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Normalise, log1p and select highly variable genes, as ``state tx preprocess_train``.

    Steps: scale each cell to ``target_sum`` (default: the median of the non-zero per-cell
    totals), natural ``log1p``, HVGs (scanpy, ``flavor="seurat"`` by default,
    ``n_top_genes``), then ``obsm["X_hvg"]`` = dense float32 HVG columns of X in var order. Writes
    ``var["highly_variable"]`` (+ scanpy's HVG statistics), ``uns["log1p"]``, ``uns["hvg"]``,
    ``uns["X_hvg_var_names"]`` (HVG names in ``X_hvg`` column order) and
    ``uns["statetx_preprocess"]``. All genes are kept. Dense and sparse X are accepted.

    Parameters
    ----------
    adata
        Raw counts in X (or in ``layers[layer]``).
    n_top_genes
        Number of HVGs (ties at the cut-off may add a few, as in scanpy).
    target_sum
        Per-cell target total; ``None`` = median of the non-zero per-cell totals.
    flavor
        scanpy HVG flavor; ``seurat_v3`` works on counts and needs ``scikit-misc``.
    layer
        Take the counts from this layer instead of X; the result is written to X.
    already_normalized
        X already holds log1p-normalised values: skip normalisation and log1p, select HVGs only.
    counts_layer
        Keep a copy of the raw counts in ``layers[counts_layer]`` before X is overwritten.
    n_bins
        Number of mean-expression bins of the dispersion-based flavors.
    include_genes
        Genes selected whether or not they are among the ``n_top_genes`` most variable (e.g.
        the perturbation targets or the readouts of interest); they are added to the HVGs.
    copy
        Return a modified copy instead of changing ``adata`` in place (the default, as scanpy).

    Raises
    ------
    DataError
        The input is already normalised / log-transformed (normalising twice corrupts the data)
        or otherwise not counts.
    """
    if not isinstance(n_top_genes, int | np.integer) or n_top_genes <= 0:
        raise ConfigError(f"n_top_genes={n_top_genes!r} is invalid; use a positive integer.")
    if flavor not in _HVG_FLAVORS:
        raise ConfigError(
            f"flavor={flavor!r} is invalid; expected one of {', '.join(_HVG_FLAVORS)}."
        )
    if flavor == "seurat_v3" and importlib.util.find_spec("skmisc") is None:
        raise ConfigError("flavor='seurat_v3' needs the scikit-misc package (scanpy's LOESS "
                          "fit): pip install scikit-misc, or use flavor='seurat' (default) or "
                          "'cell_ranger'.")
    if not adata.var_names.is_unique:  # training would refuse the result
        dup = repeated(adata.var_names)
        raise DataError(f"the input has duplicate gene names (var_names): {preview(dup)}; "
                        "models match genes by name. Call adata.var_names_make_unique() first "
                        "(or keep one column per gene).")
    include = names_list(include_genes or [])
    absent = sorted(set(include) - set(map(str, adata.var_names)))
    if absent:
        raise DataError(f"include_genes: {preview(absent)} are not var names of the input "
                        f"({adata.n_vars:,} genes).{_var_column_hint(adata, absent)}")
    _source(adata, layer)  # (checked before a view is made its own object)
    adata = _writable(adata, copy, "preprocess_train")

    src, src_name = _source(adata, layer, check=False)
    counts: Matrix | None = None
    if already_normalized:
        if layer is not None:
            say(f"already_normalized=True: HVGs are computed on X, not on {layer!r}")
        logx = adata.X
        if _count_problem(logx) is None and "log1p" not in adata.uns:
            raise DataError(
                "already_normalized=True, but X holds integer values that look like raw counts "
                "(not log1p-normalised expression): pass already_normalized=False to normalise "
                "and log-transform them"
                + (", or layer='counts'" if "counts" in adata.layers else "") + ".")
        used_target = recorded_target_sum(adata)  # (e.g. the knock-down filter's 1e4)
        if flavor == "seurat_v3":
            counts = adata.layers[layer] if layer is not None else None
    else:
        problem = _count_problem(src)
        if layer is None and "log1p" in adata.uns:
            problem = "uns['log1p'] is present, i.e. X was already log-transformed"
        if problem is not None:
            hint = ""
            if layer is None and "counts" in adata.layers:
                hint = " layers['counts'] exists: pass layer='counts' to start from those counts."
            raise DataError(
                f"preprocess_train expects raw counts in {src_name}, but {problem}. "
                "Normalising twice corrupts the data (this happens e.g. after "
                "filter_on_target_knockdown(preprocess=True)). Pass already_normalized=True to "
                f"skip normalisation and log1p and only select HVGs.{hint}"
            )
        counts = src
        logx, used_target = normalize_log1p(src, target_sum)

    base = (adata.uns.get("log1p") or {}).get("base") if already_normalized else None
    hvg = _select_hvgs(logx, counts, adata.var_names, n_top_genes, flavor, n_bins, base)
    if include:
        hvg["highly_variable"] = hvg["highly_variable"].to_numpy(bool) | adata.var_names.isin(
            include)
    mask = hvg["highly_variable"].to_numpy(dtype=bool)

    if counts_layer is not None and not already_normalized and counts_layer != layer:
        adata.layers[counts_layer] = src.copy()
    if not already_normalized:
        adata.X = logx
    if "log1p" not in adata.uns or not already_normalized:
        _set_log1p(adata)
    for col in hvg.columns:
        adata.var[col] = hvg[col].to_numpy()
    adata.uns["hvg"] = {"flavor": flavor}
    adata.obsm["X_hvg"] = to_dense_f32(logx[:, np.flatnonzero(mask)])
    adata.uns["X_hvg_var_names"] = np.asarray(adata.var_names[mask], dtype=str)
    adata.uns["statetx_preprocess"] = {
        "target_sum": float("nan") if used_target is None else used_target,
        "n_top_genes": int(n_top_genes),
        "n_hvg": int(mask.sum()),
        **({"include_genes": np.asarray(include, dtype=str)} if include else {}),
        "flavor": flavor,
        "source": src_name if not already_normalized else "X (already normalised)",
    }
    say(f"preprocess_train: {adata.n_obs} cells, {adata.n_vars} genes, {int(mask.sum())} HVGs "
        f"(flavor={flavor}, target_sum={used_target})")
    return adata if copy else None


def _select_hvgs(
    logx: Matrix,
    counts: Matrix | None,
    var_names: pd.Index,
    n_top_genes: int,
    flavor: str,
    n_bins: int,
    log_base: float | None = None,
) -> pd.DataFrame:
    """HVG table (scanpy's columns) computed on a canonical CSR copy, so dense == sparse
    (``log_base``: that of ``logx``, None = natural, as scanpy's ``uns['log1p']``)."""
    import anndata as ad
    import scanpy as sc

    n_vars = len(var_names)
    if n_top_genes > n_vars:
        warn(
            f"n_top_genes={n_top_genes} exceeds the number of genes ({n_vars}); all genes are "
            "highly variable.",
            UserWarning,
        )
        n_top_genes = n_vars
    if flavor == "seurat_v3":
        if counts is None:
            raise ConfigError(
                "flavor='seurat_v3' needs raw counts: pass layer='<counts layer>' together with "
                "already_normalized=True, or start from counts."
            )
        x = sp.csr_matrix(counts, dtype=np.float32)
    else:
        x = sp.csr_matrix(logx, dtype=np.float32)
    tmp = ad.AnnData(X=x, var=pd.DataFrame(index=pd.Index(np.arange(n_vars).astype(str))))
    tmp.uns["log1p"] = {"base": log_base}  # (scanpy reads the base of the log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            sc.pp.highly_variable_genes(
                tmp, n_top_genes=n_top_genes, flavor=flavor, n_bins=n_bins, subset=False
            )
        except (IndexError, ValueError, ZeroDivisionError) as e:
            raise DataError(
                f"HVG selection (scanpy, flavor={flavor!r}) failed on {tmp.n_obs} cells x "
                f"{n_vars} genes: {e}. This happens when no gene has a usable dispersion "
                "(too few cells or genes, or constant data); check the input or lower n_bins."
            ) from e
    out = tmp.var.copy()
    out.index = var_names
    return out


# ------------------------------------------------------------------------------------------------
# control template (spec §6)


def make_control_template(
    adata: AnnData,
    pert_col: str,
    control_pert: str,
    cell_type_key: str | None,
    *,
    seed: int = 42,
    batch_col: str | None = None,
    embed_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Replace each perturbed cell's expression by that of a random control of its cell type.

    The fixed ``state tx preprocess_infer`` (0.9.12): perturbation labels stay, expression comes
    from a control cell of the **same cell type** (and the same ``batch_col`` value when given),
    drawn with replacement. Control cells are unchanged. ``obs["template_ctrl_barcode"]``
    records the control used (a control's own barcode for control cells), and
    ``uns["statetx_control_template"]`` the settings.

    Parameters
    ----------
    adata
        The cells (in memory).
    pert_col, control_pert
        The obs column of the perturbation labels and the control label.
    cell_type_key, batch_col
        obs columns whose values a cell and its control share. ``cell_type_key=None`` (without
        ``batch_col``) draws from the global control pool (the reference behaviour).
    seed
        Seeds the ``numpy.random.Generator`` of the draws (default 42, as
        ``tx preprocess_infer``).
    embed_key
        Replace only this matrix: ``"X"``, an obsm key or a layer. By default the same control
        row replaces X, every layer and every per-cell ``obsm`` matrix.
    copy
        Return a modified copy instead of changing ``adata`` in place (the default, as scanpy).

    Returns
    -------
    AnnData or None
        The modified copy with ``copy=True``, else None.

    Raises
    ------
    DataError
        Some cell type (and batch) has perturbed cells but no controls; the message names every
        such group.
    """
    adata = _writable(adata, copy, "make_control_template")
    labels = _obs_labels(adata, pert_col, "perturbation")
    is_ctrl = _check_control(labels, pert_col, control_pert)
    n = adata.n_obs
    parts: list[np.ndarray] = []
    names: list[str] = []
    if cell_type_key is not None:
        parts.append(_obs_labels(adata, cell_type_key, "cell type"))
        names.append(f"cell type (obs['{cell_type_key}'])")
    if batch_col is not None:
        parts.append(_obs_labels(adata, batch_col, "batch"))
        names.append(f"batch (obs['{batch_col}'])")
    if parts:
        group_df = pd.DataFrame({i: p for i, p in enumerate(parts)})
        group = pd.MultiIndex.from_frame(group_df) if len(parts) > 1 else pd.Index(parts[0])
        codes, uniques = pd.factorize(group, sort=True)
    else:
        codes, uniques = np.zeros(n, dtype=np.int64), pd.Index(["all cells"])

    rng = np.random.default_rng(seed)
    src = np.arange(n)
    missing: list[str] = []
    for g in range(len(uniques)):
        in_g = codes == g
        pert_idx = np.flatnonzero(in_g & ~is_ctrl)
        if pert_idx.size == 0:
            continue
        ctrl_idx = np.flatnonzero(in_g & is_ctrl)
        if ctrl_idx.size == 0:
            key = uniques[g]
            key = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
            missing.append(f"'{key}' ({pert_idx.size} perturbed cells)")
            continue
        src[pert_idx] = ctrl_idx[rng.integers(0, ctrl_idx.size, size=pert_idx.size)]
    if missing:
        raise DataError(
            f"no control cells (obs['{pert_col}'] == '{control_pert}') in "
            f"{' and '.join(names) or 'the data'} {preview(missing, 10)}, so no control template "
            "can be drawn for them. Remove those cells, add controls, or use a coarser grouping "
            "(batch_col=None, or cell_type_key=None for the global control pool)."
        )

    replaced = _apply_rows(adata, src, embed_key)
    if not adata.obs_names.is_unique:
        warn(
            "obs_names are not unique, so obs['template_ctrl_barcode'] is ambiguous; call "
            "adata.obs_names_make_unique() first.",
            UserWarning,
        )
    adata.obs["template_ctrl_barcode"] = np.asarray(adata.obs_names)[src]
    adata.uns["statetx_control_template"] = {
        "seed": int(seed),
        "pert_col": pert_col,
        "control_pert": str(control_pert),
        "cell_type_key": cell_type_key or "",
        "batch_col": batch_col or "",
        "replaced": np.asarray(replaced, dtype=str),
        "n_replaced_cells": int((~is_ctrl).sum()),
    }
    say(f"control template: {int((~is_ctrl).sum())} perturbed cells got control expression in "
        f"{', '.join(replaced)}")
    return adata if copy else None


control_template = make_control_template


def _apply_rows(adata: AnnData, src: np.ndarray, embed_key: str | None) -> list[str]:
    """Set every selected per-cell matrix to its rows ``src``; returns the names replaced."""

    def take(m: Any) -> Any:
        if isinstance(m, pd.DataFrame):
            out = m.iloc[src].copy()
            out.index = m.index
            return out
        if sp.issparse(m):
            return sp.csr_matrix(m)[src]
        return np.asarray(m)[src]

    done: list[str] = []
    if embed_key is not None:
        if embed_key == "X":
            adata.X = take(adata.X)
        elif embed_key in adata.obsm:
            adata.obsm[embed_key] = take(adata.obsm[embed_key])
        elif embed_key in adata.layers:
            adata.layers[embed_key] = take(adata.layers[embed_key])
        else:
            avail = ["X", *adata.obsm.keys(), *adata.layers.keys()]
            raise DataError(
                f"embed_key '{embed_key}' is neither 'X' nor an obsm key or layer "
                f"(available: {preview(avail)}).{did_you_mean(embed_key, avail)}"
            )
        return [embed_key]
    if adata.X is not None:
        adata.X = take(adata.X)
        done.append("X")
    for k in list(adata.layers.keys()):
        adata.layers[k] = take(adata.layers[k])
        done.append(f"layers['{k}']")
    for k in list(adata.obsm.keys()):
        adata.obsm[k] = take(adata.obsm[k])
        done.append(f"obsm['{k}']")
    return done


# ------------------------------------------------------------------------------------------------
# filter_on_target_knockdown (spec §7, D12)

_STAGES = (
    (0, "target matching", "label matches no gene name"),
    (1, "control expression", "target gene not expressed in controls (control mean ~ 0)"),
    (2, "perturbation level", "mean residual expression >= residual_expression"),
    (3, "cell level", "cell residual expression >= cell_residual_expression"),
    (4, "minimum cells", "fewer than min_cells knocked-down cells left"),
)


def filter_on_target_knockdown(
    adata: AnnData,
    pert_col: str = "gene",
    control_pert: str = "non-targeting",
    residual_expression: float = 0.30,
    cell_residual_expression: float = 0.50,
    min_cells: int = 30,
    layer: str | None = None,
    var_gene_name: str | None = "auto",
    *,
    on_unmatched: Literal["drop", "keep", "error"] = "drop",
    preprocess: bool = False,
    verbose: bool = False,
    return_report: bool = False,
    perturbation_column: str | None = None,
    control_label: str | None = None,
) -> AnnData | tuple[AnnData, pd.DataFrame]:
    """Keep perturbations (and cells) whose target gene is knocked down, as cell-load's filter.

    A perturbation's target is its label, matched exactly against the gene names (duplicated
    names resolve to their first occurrence, with a warning). On ``layers[layer]`` or X, on
    whatever scale it is:

    1. ``ctrl_mean`` = mean target expression over control cells; a target with
       ``ctrl_mean ~ 0`` (|x| <= 1e-8) fails;
    2. a perturbation passes iff mean(target in its cells) / ctrl_mean < ``residual_expression``;
    3. within passing perturbations a cell is kept iff target / ctrl_mean <
       ``cell_residual_expression``;
    4. perturbations with fewer than ``min_cells`` kept cells are removed (exactly
       ``min_cells`` stay).

    Control cells are always kept.

    Parameters
    ----------
    adata
        The cells (in memory); left unchanged.
    pert_col, control_pert
        The obs column of the perturbation labels and the control label.
    residual_expression, cell_residual_expression, min_cells
        The thresholds of steps 2, 3 and 4.
    layer
        Filter ``layers[layer]`` (e.g. ``"counts"``) instead of X. Values that look
        log-transformed are used as they are, with a warning (ratios of log values overstate
        residual expression).
    var_gene_name
        var column holding the gene names the labels are matched against; None: ``var_names``;
        ``"auto"`` (default): ``var["gene_name"]`` when var has it (the reference's default),
        else ``var_names`` (said).
    on_unmatched
        Labels matching no gene are dropped (``"drop"``, reported), kept unfiltered (``"keep"``)
        or an error (``"error"``); no label matching at all is an error.
    preprocess
        Then apply ``normalize_total(target_sum=1e4)`` + ``log1p`` to the filtered counts
        (which must be counts; written to X, and without ``layer`` the raw counts kept in
        ``layers["counts"]`` if absent) and set ``uns["log1p"]`` so that
        :func:`preprocess_train` does not normalise twice.
    verbose
        Print a summary of the cells and perturbations each stage removed.
    return_report
        Return the per-perturbation table as well.
    perturbation_column, control_label
        cell-load's names for ``pert_col`` / ``control_pert``, accepted instead.

    Returns
    -------
    AnnData or tuple
        A new AnnData whose var index is the gene names (as str, made unique with ``-1``,
        ``-2`` suffixes) and whose ``uns["statetx_knockdown_filter"]`` holds the thresholds,
        the scale, a per-stage summary (``stages``) and a per-perturbation table
        (``perturbations``: ratio, cell counts, status, reason); with ``return_report=True``,
        ``(adata, table)``.
    """
    pert_col, control_pert = _knockdown_options(
        pert_col, control_pert, perturbation_column, control_label, on_unmatched,
        residual_expression, cell_residual_expression, min_cells)
    m, src_name = _source(adata, layer)
    scale = "log1p" if (looks_log1p(m) or (layer is None and "log1p" in adata.uns)) else "linear"
    if scale == "log1p":
        warn(
            f"{src_name} looks log-transformed: knock-down ratios are computed on log values, "
            "which overstates residual expression. Filter on raw counts (layer='counts') if "
            "available.",
            UserWarning,
        )
    labels = _obs_labels(adata, pert_col, "perturbation")
    is_ctrl = _check_control(labels, pert_col, control_pert)

    genes, gene_src, var_gene_name, first = _gene_names(adata, var_gene_name)
    report, matched, pert_cells = _match_targets(labels, control_pert, first)
    _check_matches(report, matched, genes, gene_src, pert_col, on_unmatched)
    values, ctrl_mean_of = _target_expression(m, report, matched, pert_cells, is_ctrl)
    keep = _judge_perturbations(report, matched, pert_cells, values, ctrl_mean_of, is_ctrl,
                                on_unmatched, residual_expression, cell_residual_expression,
                                min_cells)

    stages = _stage_summary(report)
    out = _knockdown_output(adata, keep, genes, layer, preprocess)
    out.uns["statetx_knockdown_filter"] = {
        "pert_col": pert_col,
        "control_pert": str(control_pert),
        "residual_expression": float(residual_expression),
        "cell_residual_expression": float(cell_residual_expression),
        "min_cells": int(min_cells),
        "layer": layer or "X",
        "var_gene_name": var_gene_name or "var_names",
        "scale": scale,
        "on_unmatched": on_unmatched,
        "preprocessed": bool(preprocess),
        "n_cells_in": int(adata.n_obs),
        "n_cells_out": int(out.n_obs),
        "stages": stages,
        "perturbations": report,
    }
    _log_summary(report, stages, adata.n_obs, out.n_obs, verbose)
    return (out, report) if return_report else out


def _knockdown_options(
    pert_col: str,
    control_pert: str,
    perturbation_column: str | None,
    control_label: str | None,
    on_unmatched: str,
    residual_expression: float,
    cell_residual_expression: float,
    min_cells: int,
) -> tuple[str, str]:
    """``(pert_col, control_pert)`` with cell-load's names taken in; errors for invalid options."""
    for mine, default, theirs, value in (("pert_col", "gene", "perturbation_column",
                                          perturbation_column),
                                         ("control_pert", "non-targeting", "control_label",
                                          control_label)):
        given = pert_col if mine == "pert_col" else control_pert
        if value is not None and given not in (default, value):
            raise ConfigError(f"{mine}={given!r} and {theirs}={value!r} name the same option; "
                              "pass one of them.")
    pert_col = perturbation_column or pert_col
    control_pert = control_label or control_pert
    if on_unmatched not in ("drop", "keep", "error"):
        raise ConfigError(
            f"on_unmatched={on_unmatched!r} is invalid; expected 'drop', 'keep' or 'error'."
        )
    for name, val in (
        ("residual_expression", residual_expression),
        ("cell_residual_expression", cell_residual_expression),
    ):
        if not np.isfinite(val) or val <= 0:
            raise ConfigError(f"{name}={val!r} is invalid; use a positive fraction such as 0.3.")
    if int(min_cells) != min_cells or min_cells < 0:
        raise ConfigError(f"min_cells={min_cells!r} is invalid; use a non-negative integer.")
    return pert_col, control_pert


def _gene_names(
    adata: AnnData, var_gene_name: str | None
) -> tuple[np.ndarray, str, str | None, dict[str, int]]:
    """The gene names targets are matched against (D12): ``(names, printable source, the var
    column used or None, name -> first column holding it)``; ``"auto"`` resolved (said)."""
    if var_gene_name == "auto":
        var_gene_name = "gene_name" if "gene_name" in adata.var.columns else None
        if var_gene_name is None:
            say("var has no column 'gene_name': matching perturbation labels against var_names "
                "(var_gene_name, --var-gene-name on the command line, names another column).")
    if var_gene_name is None:
        genes = np.asarray(adata.var_names, dtype=str)
        gene_src = "var_names"
    else:
        if var_gene_name not in adata.var.columns:
            raise DataError(
                f"var column '{var_gene_name}' (var_gene_name) not found (available: "
                f"{preview(adata.var.columns) or 'none'})."
                f"{did_you_mean(var_gene_name, adata.var.columns)}"
                + (" Omit --var-gene-name to match against var_names (or var['gene_name'] "
                   "when var has that column)." if on_command_line() else
                   " Pass var_gene_name=None to match against var_names.")
            )
        genes = adata.var[var_gene_name].astype(str).to_numpy()
        gene_src = f"var['{var_gene_name}']"
    first: dict[str, int] = {}
    for j, g in enumerate(genes):
        first.setdefault(g, j)
    return genes, gene_src, var_gene_name, first


def _match_targets(
    labels: np.ndarray, control_pert: str, first: dict[str, int]
) -> tuple[pd.DataFrame, np.ndarray, list[np.ndarray]]:
    """The per-perturbation table (label, target gene, its column or -1, cells; controls left
    out), which of its rows matched a gene, and the cells of each row."""
    perts, pert_codes = np.unique(labels, return_inverse=True)
    pert_codes = pert_codes.ravel()
    counts_per = np.bincount(pert_codes, minlength=len(perts))
    rows = []
    for k, p in enumerate(perts):
        if p == str(control_pert):
            continue
        rows.append({
            "perturbation": p,
            "target_gene": p if p in first else "",
            "gene_index": first.get(p, -1),
            "n_cells": int(counts_per[k]),
        })
    report = pd.DataFrame(rows, columns=["perturbation", "target_gene", "gene_index", "n_cells"])
    matched = report["gene_index"].to_numpy() >= 0 if len(report) else np.zeros(0, bool)

    order = np.argsort(pert_codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts_per)])
    pert_index = {p: k for k, p in enumerate(perts)}
    cells_of = [order[starts[k] : starts[k + 1]] for k in range(len(perts))]
    pert_cells = [cells_of[pert_index[p]] for p in report["perturbation"]]
    return report, matched, pert_cells


def _check_matches(
    report: pd.DataFrame,
    matched: np.ndarray,
    genes: np.ndarray,
    gene_src: str,
    pert_col: str,
    on_unmatched: str,
) -> None:
    """Warn of targets with duplicated names and of dropped labels; no label matching a gene
    (or, with ``on_unmatched="error"``, any label matching none) is an error."""
    dup = repeated(genes)
    dup_targets = sorted(set(dup) & set(report["target_gene"][matched]))
    if dup_targets:
        warn(
            f"{gene_src} has duplicated names; these targets resolve to their first occurrence: "
            f"{preview(dup_targets)}.",
            UserWarning,
        )
    unmatched = report.loc[~matched, ["perturbation", "n_cells"]]
    if not matched.any():
        raise DataError(
            f"none of the {len(report)} perturbation labels in obs['{pert_col}'] matches a gene in "
            f"{gene_src} (labels: {preview(report['perturbation'], 10)}; genes: "
            f"{preview(genes[:10], 10)}). Targets are matched exactly: check var_gene_name "
            "(symbols vs Ensembl IDs) and the label format (combinations such as 'A_B' never "
            "match)."
        )
    if len(unmatched) and on_unmatched == "drop":
        desc = [f"{r.perturbation} ({r.n_cells})" for r in unmatched.itertuples()]
        warn(
            f"{len(unmatched)} perturbation labels ({int(unmatched['n_cells'].sum())} cells) "
            f"match no gene in {gene_src} and are dropped: {preview(desc)}. Pass "
            "on_unmatched='keep' (command line: --on-unmatched keep) to keep them unfiltered.",
            UserWarning,
        )
    if len(unmatched) and on_unmatched == "error":
        raise DataError(
            f"{len(unmatched)} perturbation labels in obs['{pert_col}'] match no gene in "
            f"{gene_src}: {preview(unmatched['perturbation'])}. Pass on_unmatched='drop' to remove "
            "them or 'keep' to keep them unfiltered."
        )


def _target_expression(
    m: Matrix,
    report: pd.DataFrame,
    matched: np.ndarray,
    pert_cells: list[np.ndarray],
    is_ctrl: np.ndarray,
) -> tuple[np.ndarray, dict[int, float]]:
    """The target's expression in each cell of a matched perturbation (NaN elsewhere) and the
    control mean of each target column."""
    gene_idx = report["gene_index"].to_numpy(dtype=np.int64)
    hit = np.flatnonzero(matched)
    sel_rows = np.concatenate([pert_cells[i] for i in hit])
    sel_cols = np.concatenate([np.full(pert_cells[i].size, gene_idx[i]) for i in hit])
    values = np.full(m.shape[0], np.nan)
    values[sel_rows] = _elements(m, sel_rows, sel_cols)
    ucols = np.unique(gene_idx[matched])
    ctrl_rows = np.flatnonzero(is_ctrl)
    if sp.issparse(m):
        csub = sp.csr_matrix(m)[ctrl_rows][:, ucols]
        cmeans = np.asarray(csub.mean(axis=0, dtype=np.float64)).ravel()
    else:
        cmeans = np.asarray(m)[np.ix_(ctrl_rows, ucols)].mean(axis=0, dtype=np.float64)
    return values, dict(zip(ucols.tolist(), cmeans.tolist()))


def _judge_perturbations(
    report: pd.DataFrame,
    matched: np.ndarray,
    pert_cells: list[np.ndarray],
    values: np.ndarray,
    ctrl_mean_of: dict[int, float],
    is_ctrl: np.ndarray,
    on_unmatched: str,
    residual_expression: float,
    cell_residual_expression: float,
    min_cells: int,
) -> np.ndarray:
    """Stages 0-4 for each perturbation: adds the report's verdict columns (``ctrl_mean`` ...
    ``reason``) in place and returns the mask of the cells kept (controls always)."""
    gene_idx = report["gene_index"].to_numpy(dtype=np.int64)
    keep = is_ctrl.copy()
    ctrl_mean = np.full(len(report), np.nan)
    mean_expr = np.full(len(report), np.nan)
    ratio = np.full(len(report), np.nan)
    n_kd = np.zeros(len(report), dtype=np.int64)
    n_kept = np.zeros(len(report), dtype=np.int64)
    stage = np.full(len(report), -1, dtype=np.int64)
    status = np.empty(len(report), dtype=object)
    reason = np.empty(len(report), dtype=object)
    for i in range(len(report)):
        cells = pert_cells[i]
        if not matched[i]:
            if on_unmatched == "keep":
                keep[cells] = True
                n_kept[i] = cells.size
                status[i], reason[i] = "kept_unfiltered", "label matches no gene; kept unfiltered"
            else:
                stage[i], status[i], reason[i] = 0, "removed", _STAGES[0][2]
            continue
        v = values[cells]
        cm = ctrl_mean_of[int(gene_idx[i])]
        ctrl_mean[i] = cm
        mean_expr[i] = v.mean()
        if np.isclose(cm, 0.0, rtol=0.0, atol=1e-8):
            stage[i], status[i], reason[i] = 1, "removed", _STAGES[1][2]
            continue
        ratio[i] = mean_expr[i] / cm
        cell_ok = v / cm < cell_residual_expression
        n_kd[i] = int(cell_ok.sum())
        if not ratio[i] < residual_expression:
            stage[i], status[i] = 2, "removed"
            reason[i] = f"mean residual expression {ratio[i]:.3f} >= {residual_expression}"
            continue
        if n_kd[i] < min_cells:
            stage[i], status[i] = 4, "removed"
            reason[i] = f"only {n_kd[i]} knocked-down cells (< min_cells={min_cells})"
            continue
        keep[cells[cell_ok]] = True
        n_kept[i] = n_kd[i]
        status[i] = "kept"
        reason[i] = (
            f"residual {ratio[i]:.3f} < {residual_expression}; {cells.size - n_kd[i]} cells "
            f"with residual >= {cell_residual_expression} removed"
        )
    report["ctrl_mean"] = ctrl_mean
    report["mean_expression"] = mean_expr
    report["ratio"] = ratio
    report["n_cells_knocked_down"] = n_kd
    report["n_cells_kept"] = n_kept
    report["stage_removed"] = stage
    report["status"] = status.astype(str) if len(report) else []
    report["reason"] = reason.astype(str) if len(report) else []
    return keep


def _knockdown_output(
    adata: AnnData, keep: np.ndarray, genes: np.ndarray, layer: str | None, preprocess: bool
) -> AnnData:
    """The cells kept, as a new AnnData indexed by the gene names (unused categories dropped);
    with ``preprocess``, normalised + log1p (the counts kept in ``layers["counts"]``)."""
    import anndata as ad

    out = adata[keep].copy()
    for c in out.obs.columns:
        if isinstance(out.obs[c].dtype, pd.CategoricalDtype):
            out.obs[c] = out.obs[c].cat.remove_unused_categories()
    out.var_names = ad.utils.make_index_unique(pd.Index(genes, dtype=str), join="-")
    out.var.index.name = None

    if preprocess:
        fm, fname = _source(out, layer, check=False)
        problem = _count_problem(fm)
        if problem is not None:
            raise DataError(
                f"preprocess=True normalises {fname}, but {problem}. Filter and normalise raw "
                "counts (layer='counts'), or normalise separately."
            )
        if layer is None and "counts" not in out.layers:
            out.layers["counts"] = fm.copy()
        out.X, target = normalize_log1p(fm, 1e4)
        _set_log1p(out)
        out.uns["statetx_preprocess"] = {"target_sum": target,
                                         "source": "filter_on_target_knockdown(preprocess=True)"}
    return out


def _elements(m: Matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``m[rows[i], cols[i]]`` for all i, as float64, without densifying ``m``."""
    if sp.issparse(m):
        if not isinstance(m, sp.csr_matrix | sp.csr_array):
            m = sp.csr_matrix(m)
        return np.asarray(m[rows, cols], dtype=np.float64).ravel()
    return np.asarray(np.asarray(m)[rows, cols], dtype=np.float64)


def _stage_summary(report: pd.DataFrame) -> pd.DataFrame:
    """Perturbations and cells removed at each stage.

    Stage 3 removes cells (not perturbations) of every perturbation that passed stage 2; stage 4
    then removes the knocked-down cells of perturbations left with too few of them.
    """
    st = report["stage_removed"].to_numpy()
    n = report["n_cells"].to_numpy()
    kd = report["n_cells_knocked_down"].to_numpy()
    passed2 = (report["ctrl_mean"].notna() & (report["status"] != "kept_unfiltered")).to_numpy()
    passed2 = passed2 & ((st == -1) | (st == 4))  # not in place: pandas >= 3 arrays are read-only
    rows = []
    for s, name, why in _STAGES:
        if s == 3:
            n_perts, n_cells = 0, int((n - kd)[passed2].sum())
        elif s == 4:
            n_perts, n_cells = int((st == 4).sum()), int(kd[st == 4].sum())
        else:
            n_perts, n_cells = int((st == s).sum()), int(n[st == s].sum())
        rows.append({
            "stage": s, "name": name, "removes": why,
            "perturbations_removed": n_perts, "cells_removed": n_cells,
        })
    return pd.DataFrame(rows)


def _log_summary(
    report: pd.DataFrame, stages: pd.DataFrame, n_in: int, n_out: int, verbose: bool
) -> None:
    lines = [
        f"filter_on_target_knockdown: {n_in} -> {n_out} cells; "
        f"{int((report['status'] == 'kept').sum())} of {len(report)} perturbations kept"
    ]
    for r in stages.itertuples():
        lines.append(
            f"  stage {r.stage} ({r.name}): {r.perturbations_removed} perturbations, "
            f"{r.cells_removed} cells removed"
        )
    unmatched = report.loc[report["stage_removed"] == 0, "perturbation"]
    if len(unmatched):
        lines.append(f"  unmatched labels dropped: {preview(unmatched)}")
    if verbose:
        say("\n".join(lines))
