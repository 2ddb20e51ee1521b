"""Input loading and checks for evaluation (metrics.md §2): scale rule, gene and label pairing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from statetx._utils import (
    LOG1P_MAX,
    all_integers,
    did_you_mean,
    log1p_depth,
    preview,
    repeated,
    say,
    warn,
)
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


def warn_untrained(pred: ad.AnnData) -> None:
    """Say which perturbations statetx predicted without training cells
    (``uns["statetx"]["untrained_perturbations"]``): their metrics measure no learned effect."""
    names = [str(n) for n in np.atleast_1d(recorded(pred).get("untrained_perturbations", []))]
    if names:
        warn(
            f"pred records {len(names)} perturbation(s) predicted without training cells: "
            f"{preview(names)}. Their effects are not learned from data (one-hot: predicted as "
            "the control, or from an untrained embedding; features: from a zero vector), so "
            "their metrics measure no model; compare them with the context_mean baseline, or "
            "train with perturbation features (pert_features=).", UserWarning)


def load(obj: ad.AnnData | str | Path, which: str) -> ad.AnnData:
    """Return an AnnData for ``obj`` (an AnnData or an h5ad path); float16 X becomes float32."""
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.exists():
            raise DataError(f"{which} file {str(path)!r} does not exist; pass an existing h5ad")
        try:
            obj = ad.read_h5ad(path)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py, anndata (IORegistryError), OS errors
            raise DataError(f"{which} file {str(path)!r} could not be read as an AnnData "
                            f"(.h5ad): {exc}") from None
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
    return any(not all_integers(c) for c in _chunks(adata.X))


def check_scale(adata: ad.AnnData, which: str, allow_discrete: bool = False,
                target: float | None = None,
                target_is: str = "the counts per cell the other file's log1p values stand for"
                ) -> ad.AnnData:
    """Apply the reference scale rule; return ``adata`` or a log1p-converted copy.

    No entry with a fractional part > 1e-3 means integer counts: they are normalised (to
    ``target`` counts per cell, default the median cell total, as cell-eval) and log1p-transformed
    with a warning, unless ``allow_discrete``. Otherwise a negative minimum, or a maximum ≥ 15
    (unless ``allow_discrete``), is an error."""
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
            has_frac = not all_integers(c)
    if sp.issparse(adata.X) and adata.X.nnz < np.prod(adata.X.shape):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not has_frac:
        if allow_discrete:
            return adata
        total = target if target is not None else median_total(adata.X)
        warn(
            f"{which} X holds integer values only (max {hi:g}): treating it as raw counts and "
            f"converting it to log1p(normalize_total(target_sum={total:g})), "
            + (f"{target_is}. " if target is not None
               else "its median cell total, as cell-eval does. ")
            + ("The truth then takes its scale from pred: a prediction on another scale would "
               "not show in the metrics. " if which == "real" and target is not None
               and "both files" not in target_is else "")
            + "Pass log1p-normalised data, or allow_discrete=True to use the values as they are.",
            UserWarning,
        )
        return _normalised_log1p(adata, adata.X.astype(np.float32), total)
    if lo < 0:
        raise DataError(
            f"{which} X has negative values (min {lo:g}); expected log1p-normalised expression "
            "(non-negative). Pass the log1p matrix, not scaled/centred data; a model's small "
            "negative outputs can be clipped first: adata.X = np.clip(adata.X, 0, None)"
        )
    if hi >= LOG1P_MAX and not allow_discrete:
        raise DataError(
            f"{which} X has a maximum of {hi:g} (>= {LOG1P_MAX:g}): it looks like normalised "
            "counts, not log1p. Apply sc.pp.log1p first, or pass allow_discrete=True to "
            "evaluate it as is"
        )
    return adata


def median_total(x: np.ndarray | sp.spmatrix) -> float:
    """The median of the non-zero cell totals (1 when every cell is empty)."""
    totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    return float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0


def count_targets(pred: ad.AnnData, real: ad.AnnData, allow_discrete: bool
                  ) -> tuple[float | None, float | None]:
    """Normalisation totals for integer-count inputs (see :func:`check_scale`): a count side
    paired with a log1p side is brought to the total the log1p side stands for, two count sides
    both to the real cells' median total (each file to its own median, cell-eval's rule, puts
    them on different scales)."""
    if allow_discrete:
        return None, None
    counts_p, counts_r = not has_fraction(pred), not has_fraction(real)
    if counts_p and counts_r:
        t = median_total(real.X)
        return t, t
    return (log1p_depth(real.X) if counts_p else None), (log1p_depth(pred.X) if counts_r else None)


def is_count_scale(adata: ad.AnnData) -> bool:
    """Whether statetx recorded ``adata`` as count-scale expression (``uns["statetx"]["scale"]``:
    predictions of a model trained on counts, and their real cells), and it has not been
    log-transformed since (scanpy's ``uns["log1p"]`` mark)."""
    info = adata.uns.get("statetx")
    return isinstance(info, dict) and info.get("scale") == "counts" and "log1p" not in adata.uns


def counts_to_log1p(pred: ad.AnnData, real: ad.AnnData, own_median: bool = False,
                    plots: bool = False) -> tuple[ad.AnnData, ad.AnnData]:
    """Count-scale predictions and real cells, both normalised to the real cells' median total
    (``own_median``: each to its own median total) and log1p-transformed: the scale the metrics
    expect, by the same transform on both sides (the reference rule would convert the integer
    real cells alone). ``plots``: said for :mod:`statetx.pl`, not evaluate."""
    target = None if own_median else median_total(real.X)
    say("count-scale prediction: predictions and real cells are normalised to "
        + ("their own median totals" if own_median else f"{target:g} counts per cell")
        + " and log1p-transformed for the " + ("plot" if plots else "metrics"),
        who="statetx.pl" if plots else "statetx.evaluate")
    out = []
    for a in (pred, real):
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        x = np.clip(x.astype(np.float32), 0.0, None)
        a = _normalised_log1p(a, x, median_total(x) if own_median else target)
        a.uns["statetx"] = {**a.uns.get("statetx", {}), "scale": "log1p"}
        out.append(a)
    return out[0], out[1]


def scale_plan(p: ad.AnnData, r: ad.AnnData, allow_discrete: bool, counts_target: str, *,
               plots: bool = False
               ) -> tuple[list[tuple[str, ad.AnnData, float | None]], dict[str, str]]:
    """What :func:`check_scale` is to check: ``([(which, adata, target)], note)``, a log1p side
    before a count side is brought to its ``target`` total (``note``: what that total is).
    Count-scale predictions and their real cells are converted to log1p first. The one rule of
    :func:`statetx.evaluate` and the plots of :mod:`statetx.pl` (``plots``: said as theirs;
    they take no ``allow_discrete``)."""
    if is_count_scale(p) and not allow_discrete:
        if not (is_count_scale(r) or not has_fraction(r)):
            raise DataError("pred holds count-scale predictions (uns['statetx']['scale'] is "
                            "'counts': a model trained on counts), but real is not on the count "
                            "scale: pass the real counts"
                            + ("." if plots else ", or allow_discrete=True to compare the "
                               "values as they are."))
        p, r = counts_to_log1p(p, r, own_median=counts_target == "own_median", plots=plots)
    tp, tr = (count_targets(p, r, allow_discrete) if counts_target == "shared"
              else (None, None))  # (None: each count file to its own median total)
    note = ({"target_is": "the real cells' median total (both files hold counts)"}
            if tp is not None and tr is not None else {})
    checks = sorted([("pred", p, tp), ("real", r, tr)], key=lambda c: c[2] is not None)
    return checks, note


def on_log1p_scale(p: ad.AnnData, r: ad.AnnData, *, allow_discrete: bool = False,
                   counts_target: str = "shared", plots: bool = False
                   ) -> tuple[ad.AnnData, ad.AnnData]:
    """``(pred, real)`` on the log1p scale by :func:`scale_plan`'s rule (each checked by
    :func:`check_scale`, a count side converted with a warning)."""
    checks, note = scale_plan(p, r, allow_discrete, counts_target, plots=plots)
    done = {}
    for which, a, target in checks:
        done[which] = check_scale(a, which, allow_discrete, target, **note)
    return done["pred"], done["real"]


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


def check_obs_col(adata: ad.AnnData, col: str, which: str, what: str,
                  other: str | None = None) -> None:
    """Error unless ``col`` is an obs column of ``adata`` with a label for every cell (``other``:
    the name of the paired file, which has the column)."""
    if col not in adata.obs.columns:
        fix = (f" evaluate reads one column name from both files and {other} has it: rename "
               f"{which}'s, e.g. {which}.obs[{col!r}] = {which}.obs['<its column>']." if other
               else " Pass the right column name ({}= in Python, --{} on the command line).".format(
                   *{"perturbation": ("pert_col", "pert-col")}.get(
                       what, ("celltype_col", "celltype-col"))))
        raise DataError(
            f"{what} column {col!r} not found in {which} obs "
            f"(columns: {preview(adata.obs.columns)})."
            f"{did_you_mean(col, adata.obs.columns)}{fix}"
        )
    missing = adata.obs[col].isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{which} obs[{col!r}] has {int(missing.sum())} cell(s) without a {what} label (NaN), "
            f"e.g. {preview(adata.obs_names[missing], 3)} (they are not a group called 'nan'). "
            f"Label them, or drop them: adata[adata.obs[{col!r}].notna()].copy()."
        )


def nonfinite_cells(emb: object, which: str, key: str) -> int:
    """The number of cells (rows) of the embedding ``emb`` with a NaN or infinite value."""
    try:
        if sp.issparse(emb):
            m = sp.csr_matrix(emb)
            rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
            return int(np.unique(rows[~np.isfinite(m.data.astype(np.float64))]).size)
        x = np.asarray(emb, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{which} obsm[{key!r}] is not a numeric embedding; pass the key of "
                        "one (cells × dimensions numbers)") from None
    return int((~np.isfinite(x.reshape(x.shape[0], -1))).any(axis=1).sum()) if x.size else 0


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
    for a, b, which, name in ((pred, real, "pred", "real"), (real, pred, "real", "pred")):
        for col, what in ((pert_col, "perturbation"), (celltype_col, "cell-type")):
            if col is not None:
                check_obs_col(a, col, which, what, name if col in b.obs.columns else None)
        if embed_key is not None and embed_key not in a.obsm:
            raise DataError(f"embedding {embed_key!r} not found in {which} obsm "
                            f"(keys: {preview(a.obsm.keys())}); pass an existing embed_key")
        if embed_key is not None and (bad := nonfinite_cells(a.obsm[embed_key], which,
                                                             embed_key)):
            # (a NaN distance compares False: it would rank as a perfect discrimination score)
            raise DataError(f"{which} obsm[{embed_key!r}] contains NaN or infinite values in "
                            f"{bad} of {a.n_obs} cell(s); remove or impute them")
    pg, rg = pred.var_names.astype(str), real.var_names.astype(str)
    for names, which in ((pg, "pred"), (rg, "real")):
        if names.has_duplicates:  # DE lists and gene exclusions compare genes by name
            dup = repeated(names)
            raise DataError(
                f"{which} var_names hold duplicated genes: [{preview(dup, 10)}] "
                f"({int(names.duplicated().sum())} extra column(s)); the DE metrics compare "
                "genes by name, so repeated names would be counted once. Give every gene one "
                f"name: {which}.var_names_make_unique() (on both files alike), or drop the "
                "duplicates.")
    if not (len(pg) == len(rg) and np.array_equal(pg.to_numpy(), rg.to_numpy())):
        if align_genes and set(pg) == set(rg) and len(pg) == len(rg) and pg.is_unique:
            pred = pred[:, list(rg)]
        else:
            raise DataError(_gene_mismatch(pg, rg, align_genes))
    pl = set(pred.obs[pert_col].astype(str))
    rl = set(real.obs[pert_col].astype(str))
    for labels, other, which in ((pl, rl, "pred"), (rl, pl, "real")):
        if control_pert not in labels:
            hint = control_like(labels)
            if control_pert in other and hint:  # named otherwise on this side
                fix = (f" control_pert names the controls of both files: relabel {which}'s, e.g. "
                       f"{which}.obs[{pert_col!r}] = {which}.obs[{pert_col!r}].astype(str)"
                       f".replace({{{hint[0]!r}: {control_pert!r}}}).")
            elif control_pert in other and which == "pred":  # a prediction without controls
                fix = (" pred needs control cells too: copy the real control cells into it "
                       "(what predict_split(controls='real') and the baselines do).")
            elif control_pert in other:
                fix = (" The real data need their own control cells: each file's deltas are "
                       "taken against its controls. Evaluate against data that hold them.")
            else:
                fix = (" Name the label of the control cells (control_pert= in Python, "
                       "--control-pert on the command line).")
            raise DataError(
                f"control label {control_pert!r} not found in {which} obs[{pert_col!r}]."
                f"{did_you_mean(control_pert, labels)}"
                + (f" Labels that look like controls: {preview(hint)}." if hint else "") + fix
            )
    if pl != rl:
        if shared_only:
            keep = pl & rl
            pred = pred[pred.obs[pert_col].astype(str).isin(keep).to_numpy()]
            real = real[real.obs[pert_col].astype(str).isin(keep).to_numpy()]
            warn(
                f"shared_only: {len(pl | rl) - len(keep)} perturbation(s) are not in both files "
                f"and are left out of the evaluation: only in pred: [{preview(sorted(pl - rl))}];"
                f" only in real: [{preview(sorted(rl - pl))}].", UserWarning)
        else:
            lower = {str(x).lower(): x for x in pl - rl}
            case = [(lower[x.lower()], x) for x in sorted(rl - pl) if x.lower() in lower]
            raise DataError(
                f"perturbation labels differ between pred and real (column {pert_col!r}): only in "
                f"pred: [{preview(sorted(pl - rl))}]; only in real: [{preview(sorted(rl - pl))}]. "
                + (f"{len(case)} differ only in case (e.g. pred {case[0][0]!r} vs real "
                   f"{case[0][1]!r}): relabel one side. " if case else "")
                + "Predict every perturbation, or pass shared_only=True to evaluate the shared ones"
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
    hint = "" if align_genes else (" Pass align_genes=True (statetx evaluate run: "
                                   "--align-genes) to reorder pred to the real gene order")
    return f"pred and real have the same genes in a different order ({pos}).{hint}"
