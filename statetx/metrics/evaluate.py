"""``evaluate``: cell-eval 0.8.2-compatible evaluation of a prediction against real data."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statetx._utils import (
    as_count,
    atomic_write_text,
    available_cpus,
    cell_type_option,
    check_folder,
    did_you_mean,
    preview,
    say,
    warn,
)
from statetx.errors import ConfigError, DataError
from statetx.metrics import expression as ex
from statetx.metrics._inputs import (
    align_pair,
    load,
    on_log1p_scale,
    recorded_labels,
    warn_untrained,
)
from statetx.metrics._table import MetricTable, file_prefix, write_agg, write_de_csv
from statetx.metrics.ceiling import (
    RELIABILITY_METRICS,
    ceiling_files,
    fraction_of_ceiling,
    spearman_brown,
    split_halves,
    write_ceiling_csv,
)
from statetx.metrics.de import DE_MODES, group_means, wilcoxon_de
from statetx.metrics.de_metrics import check_de_table, de_metrics

DE_METRICS = [
    "overlap_at_N", "overlap_at_50", "overlap_at_100", "overlap_at_200", "overlap_at_500",
    "precision_at_N", "precision_at_50", "precision_at_100", "precision_at_200",
    "precision_at_500", "de_spearman_sig", "de_direction_match", "de_spearman_lfc_sig",
    "de_sig_genes_recall", "de_nsig_counts", "pr_auc", "roc_auc",
]
ANNDATA_METRICS = [
    "pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "discrimination_score_l1",
    "discrimination_score_l2", "discrimination_score_cosine", "pearson_edistance",
    "clustering_agreement",
]
# de_nsig_counts' two columns, which skip_metrics may name one by one
NSIG_PARTS = ["de_nsig_counts_real", "de_nsig_counts_pred"]
# metrics that need the cells, not only the (cell type, perturbation) pseudobulks
CELL_LEVEL_METRICS = [*DE_METRICS, *NSIG_PARTS, "pearson_edistance", "clustering_agreement"]
# uns flag of the outputs of predict_split(pseudobulk=True): rows are group means, not cells
PSEUDOBULK_FLAG = "statetx_pseudobulk"
# below this many perturbations the discrimination scores (ranks among them) are said to be coarse
FEW_PERTURBATIONS = 5
# DE groups of fewer cells get unreliable p-values (said; the values are cell-eval's)
FEW_CELLS = 3
# how integer counts are normalised before log1p: "shared" brings a count file to the scale of the
# other (a log1p file's counts per cell, or, two count files, the real cells' median total);
# "own_median" normalises each count file to its own median cell total (cell-eval's rule)
COUNTS_TARGETS = ("shared", "own_median")
# statetx extras (not in cell-eval, metrics.md §12): only in the "extended" profile
EXTRA_METRICS = ["pearson_delta_centroid", "centroid_accuracy"]
PROFILES: dict[str, list[str]] = {
    "full": DE_METRICS + ANNDATA_METRICS,
    "extended": DE_METRICS + ANNDATA_METRICS + EXTRA_METRICS,
    "minimal": ["overlap_at_N", "precision_at_N", "de_nsig_counts", "pearson_delta", "mse", "mae",
                "discrimination_score_l1"],
    "vcc": ["overlap_at_N", "mae", "discrimination_score_l1"],
    "pds": ["discrimination_score_l1"],
    "de": list(DE_METRICS),
    "anndata": list(ANNDATA_METRICS),
}


@dataclass
class EvalOutput:
    """Everything one (cell-type) evaluation produced."""

    table: MetricTable
    real_de: pd.DataFrame | None
    pred_de: pd.DataFrame | None
    skipped: dict[str, str] = field(default_factory=dict)
    # groups (control included) whose predicted cells are all one row, when pred DE was computed
    constant: list[str] = field(default_factory=list)
    # per side ("real", "pred") whose DE was computed here: (group, cells) of the groups of
    # fewer than FEW_CELLS cells (control included)
    few_cells: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def _metric_list(profile: str, skip: Iterable[str]) -> list[str]:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}."
                          f"{did_you_mean(profile, PROFILES)}")
    skip = list(skip)
    known = set(PROFILES["extended"]) | set(NSIG_PARTS)
    for s in skip:
        if s not in known:
            raise ConfigError(f"skip_metrics: unknown metric {s!r}.{did_you_mean(s, known)}")
    out = []
    for m in PROFILES[profile]:
        if m == "de_nsig_counts" and m not in skip and set(NSIG_PARTS) & set(skip):
            out += [p for p in NSIG_PARTS if p not in skip]  # one of its columns skipped
        elif m not in skip:
            out.append(m)
    return out


def _codes(labels: np.ndarray, order: list[str]) -> np.ndarray:
    """Position of each label in ``order`` (-1 for labels not in it)."""
    return pd.Index(order).get_indexer(labels).astype(np.int64)


def constant_groups(x: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int,
                    chunk_elems: int = 1 << 22) -> np.ndarray:
    """The codes of the groups of at least two rows whose rows are all identical (no spread).

    Each row is compared with its group's first row, ``chunk_elems`` values at a time (sparse X
    stays sparse). The second rows of all groups are compared first, so a group that varies is
    settled after one row and a prediction with spread costs about one row per group."""
    codes = np.asarray(codes, dtype=np.int64)
    valid = np.flatnonzero(codes >= 0)
    counts = np.bincount(codes[valid], minlength=n_groups)
    order = valid[np.argsort(codes[valid], kind="stable")]  # rows grouped, in row order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(order.size) - starts[codes[order]]  # position of a row in its group
    first = np.zeros(n_groups, dtype=np.int64)
    first[counts > 0] = order[starts[counts > 0]]
    rows = order[rank > 0][np.argsort(rank[rank > 0], kind="stable")]  # 2nd rows, 3rd rows, ...
    varying = counts < 2
    step = max(1, chunk_elems // max(1, x.shape[1]))
    for pos in range(0, rows.size, step):
        if varying.all():
            break
        r = rows[pos:pos + step]
        r = r[~varying[codes[r]]]
        if not r.size:
            continue
        g = codes[r]
        if sp.issparse(x):
            d = sp.csr_matrix(x[r] - x[first[g]])
            d.eliminate_zeros()
            differs = d.getnnz(axis=1) > 0
        else:
            differs = np.any(np.asarray(x[r]) != np.asarray(x[first[g]]), axis=1)
        varying[g[differs]] = True
    return np.flatnonzero(~varying)


def _evaluate_one(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    pert_col: str,
    control_pert: str,
    metrics: list[str],
    embed_key: str | None,
    de_pred: pd.DataFrame | None,
    de_real: pd.DataFrame | None,
    num_threads: int | None,
    epsilon: float,
    de_mode: str = "pdex-0.3",
    de_tables: bool = False,
) -> EvalOutput:
    pl = pred.obs[pert_col].astype(str).to_numpy()
    rl = real.obs[pert_col].astype(str).to_numpy()
    perts = sorted(set(rl) - {control_pert})
    if not perts:
        raise DataError(f"no perturbation other than the control {control_pert!r} in "
                        f"obs[{pert_col!r}]; nothing to evaluate")
    order = [control_pert, *perts]
    genes = real.var_names.astype(str).to_numpy()
    pc, rc = _codes(pl, order), _codes(rl, order)
    Xp, Xr = pred.X, real.X
    mp = group_means(Xp, pc, len(order))
    mr = group_means(Xr, rc, len(order))
    table = MetricTable(perts)
    skipped: dict[str, str] = {}
    needs_de = any(m in DE_METRICS or m in NSIG_PARTS for m in metrics)
    real_de, pred_de = de_real, de_pred
    constant = []  # a prediction without spread: its DE metrics are said to be meaningless
    if needs_de and de_pred is None:
        constant = [order[g] for g in constant_groups(Xp, pc, len(order))]
    few: dict[str, list[tuple[str, int]]] = {}
    if needs_de or de_tables:
        if real_de is None:
            real_de = wilcoxon_de(Xr, rl, control_pert, genes, epsilon=epsilon,
                                  num_threads=num_threads, means=mr, mode=de_mode)
            few["real"] = _few_cells(rc, order)
        if pred_de is None:
            pred_de = wilcoxon_de(Xp, pl, control_pert, genes, epsilon=epsilon,
                                  num_threads=num_threads, means=mp, mode=de_mode)
            few["pred"] = _few_cells(pc, order)
    if needs_de:
        de_vals = de_metrics(real_de, pred_de, perts)
        n_sig = np.asarray(de_vals["de_nsig_counts_real"], dtype=float)
        if len(n_sig) and not np.any(n_sig > 0):
            warn(f"none of the {len(perts)} perturbation(s) has a significant real DE "
                 "gene (FDR < 0.05): overlap_at_N and precision_at_N are 0 for any "
                 "prediction here; compare pearson_delta and mse (or gather more cells "
                 "per perturbation).", UserWarning)
        for m in metrics:
            if m == "de_nsig_counts":
                table.add("de_nsig_counts_real", de_vals["de_nsig_counts_real"])
                table.add("de_nsig_counts_pred", de_vals["de_nsig_counts_pred"])
            elif m in de_vals:
                table.add(m, de_vals[m])
    # pseudobulks in float32, deltas against each file's own control (metrics.md §3)
    bp = group_means(Xp, pc, len(order), float64=True).astype(np.float32)
    br = group_means(Xr, rc, len(order), float64=True).astype(np.float32)
    dp, dr = bp[1:] - bp[0], br[1:] - br[0]
    emb = None
    if embed_key is not None and any(m in metrics for m in ("discrimination_score_l2",
                                                            "discrimination_score_cosine")):
        ep = group_means(_embedding(pred, embed_key), pc, len(order), float64=True)
        er = group_means(_embedding(real, embed_key), rc, len(order), float64=True)
        emb = (er[1:] - er[0], ep[1:] - ep[0])
    for m in metrics:
        if m in DE_METRICS or m in NSIG_PARTS:
            continue
        try:
            if m == "pearson_delta":
                v = ex.pearson_delta(dp, dr)
            elif m == "pearson_delta_centroid":
                v = ex.pearson_delta_centroid(bp[1:], br[1:])
            elif m == "centroid_accuracy":
                v = ex.centroid_accuracy(bp[1:], br[1:])
            elif m == "mse":
                v = ex.mean_sq(bp[1:], br[1:])
            elif m == "mae":
                v = ex.mean_abs(bp[1:], br[1:])
            elif m == "mse_delta":
                v = ex.mean_sq(dp, dr)
            elif m == "mae_delta":
                v = ex.mean_abs(dp, dr)
            elif m.startswith("discrimination_score_"):
                kind = m.rsplit("_", 1)[1]
                if emb is not None and kind != "l1":
                    v = ex.discrimination_score(emb[0], emb[1], perts, None, kind)
                else:
                    v = ex.discrimination_score(dr, dp, perts, genes, kind)
            elif m == "pearson_edistance":
                if len(perts) < 2:  # (cell-eval's Pearson raises: the column is omitted)
                    raise ValueError("a correlation over perturbations needs at least two")
                er_ = ex.energy_distances(Xr, rc, len(order))
                ep_ = ex.energy_distances(Xp, pc, len(order))
                v = ex._pearson(er_, ep_)
            elif m == "clustering_agreement":
                from statetx.metrics.clustering import clustering_agreement

                v = clustering_agreement(mr[1:], mp[1:])
            else:  # pragma: no cover - guarded by _metric_list
                raise ConfigError(f"unknown metric {m!r}")
            table.add(m, v if np.ndim(v) else float(v))
        except (ConfigError, DataError):
            raise
        except Exception as err:  # noqa: BLE001 - a failing metric is reported and omitted
            skipped[m] = f"{type(err).__name__}: {err}"  # (said once, by evaluate)
    return EvalOutput(table, real_de, pred_de, skipped, constant, few)


def _few_cells(codes: np.ndarray, order: list[str]) -> list[tuple[str, int]]:
    """(group, cells) of the groups of ``order`` with fewer than :data:`FEW_CELLS` cells."""
    n = np.bincount(codes[codes >= 0], minlength=len(order))
    return [(order[g], int(n[g])) for g in np.flatnonzero((n > 0) & (n < FEW_CELLS))]


def _read_de(obj: pd.DataFrame | str | Path | None, which: str) -> pd.DataFrame | None:
    if obj is None:
        return None
    if not isinstance(obj, pd.DataFrame):
        if not Path(obj).exists():
            raise DataError(f"{which} DE table {str(obj)!r} does not exist")
        # labels as text: a perturbation or gene called "NA", "None" or "nan" is no missing value
        obj = pd.read_csv(obj, converters={"target": str, "feature": str})
    return check_de_table(obj, which)


def _say_control_only(cell_types: list[tuple[str, int, int]], celltype_col: str, pert_col: str,
                      control_pert: str, others: bool) -> None:
    """The cell types holding control cells only (``(name, pred cells, real cells)``) are left
    out with a warning; an error when no ``others`` are left to evaluate."""
    if not cell_types:
        return
    named = preview([f"{ct!r} ({n_p} pred / {n_r} real cells)" for ct, n_p, n_r in cell_types],
                    10)
    what = (f"{len(cell_types)} cell type(s) of obs[{celltype_col!r}] hold only control cells "
            f"({control_pert!r} in obs[{pert_col!r}]), no perturbation to evaluate: {named}")
    if not others:
        raise DataError(f"{what}; no cell type is left to evaluate. Check pert_col, "
                        "control_pert and celltype_col.")
    warn(f"{what}. They are left out of the results.", UserWarning)


def _say_pooled(real: ad.AnnData) -> None:
    """Without ``celltype_col`` every cell is one group: said when obs has a cell-type column with
    several values."""
    for col in ("cell_type", "celltype", "cell_line", "cell_type_key"):
        if col in real.obs.columns and (n := real.obs[col].nunique()) > 1:
            say(f"the {n} values of obs['{col}'] are pooled into one group; "
                f"pass celltype_col='{col}' (--celltype-col {col}) to score each.",
                who="statetx.evaluate")
            return


def _warn_few_perturbations(metrics: Sequence[str], n: int, per_cell_type: bool) -> None:
    """The discrimination scores rank a prediction among ``n`` real deltas, and
    pearson_edistance / clustering_agreement compare perturbations with each other: coarse or
    undefined for small n."""
    if n >= FEW_PERTURBATIONS:
        return
    where = " (in a cell type)" if per_cell_type else ""
    ranked = [m for m in metrics if m.startswith("discrimination_score_")]
    if ranked:
        warn(f"{', '.join(ranked)} rank each prediction among the real deltas of only "
             f"{n} perturbation(s){where}: the scores move in steps of 1/{max(n, 1)} "
             "and tell models apart poorly (even a constant prediction can score 1).", UserWarning)
    # (with one perturbation pearson_edistance cannot be computed: said as omitted)
    across = [m for m in ("pearson_edistance", "clustering_agreement") if m in metrics
              and not (m == "pearson_edistance" and n < 2)]
    if across and n < 3:
        how = {"pearson_edistance": "pearson_edistance is a correlation over them (±1 for two)",
               "clustering_agreement": "clustering_agreement clusters them (NaN below three)"}
        warn(f"{' and '.join(across)} compare"
             f"{'s' if len(across) == 1 else ''} the perturbations with each other, and "
             f"there are only {n}{where}: {', '.join(how[m] for m in across)}. Do not "
             f"read {'this value' if len(across) == 1 else 'these values'}.", UserWarning)


class NoSpreadWarning(UserWarning):
    """Predicted cells of a group are all one row (or, :class:`FewCellsWarning`, a group has
    too few cells): the DE-based metrics mean little for it."""


class FewCellsWarning(NoSpreadWarning):
    """A group of the DE test has fewer than :data:`FEW_CELLS` cells: its p-values are
    unreliable."""


def _de_metric_names(metrics: Sequence[str]) -> list[str]:
    """The DE metrics among ``metrics``, those of the minimal profile first."""
    return sorted((m for m in metrics if m in DE_METRICS or m in NSIG_PARTS),
                  key=lambda m: m not in PROFILES["minimal"])


def _warn_few_cells(outputs: list[tuple[str | None, EvalOutput]], metrics: Sequence[str]
                    ) -> set[tuple[str, str | None]]:
    """One warning for the groups of fewer than :data:`FEW_CELLS` cells whose DE was computed
    here, real and pred listed apart; returns the (group, cell type) pairs of pred it names."""
    sides = {}
    for side in ("real", "pred"):
        sides[side] = [(g, ct, n) for ct, o in outputs for g, n in o.few_cells.get(side, [])]
    if not any(sides.values()):
        return set()
    parts = [f"{side}: " + preview([f"{g}{'' if ct is None else f' in {ct}'} ({n} cell"
                                    f"{'s' if n > 1 else ''})" for g, ct, n in groups], 5)
             for side, groups in sides.items() if groups]
    de = _de_metric_names(metrics)
    warn(
        f"DE groups of fewer than {FEW_CELLS} cells: {'; '.join(parts)}. Their DE p-values are "
        "unreliable: the Mann–Whitney test's normal approximation (cell-eval's, kept as it is) "
        "can call genes significant on one or two cells"
        + (f", so the DE metrics ({preview(de, 4)}) of these perturbations mean little" if de
           else "") + ". Gather more cells per perturbation, or judge these on pearson_delta, "
        "mse and mae.", FewCellsWarning)
    return {(g, ct) for g, ct, _ in sides["pred"]}


def _warn_constant(outputs: list[tuple[str | None, EvalOutput]], metrics: Sequence[str],
                   control_pert: str, said: Collection[tuple[str, str | None]] = ()) -> None:
    """One warning for the predicted groups whose cells are all identical (a mean, or any one row,
    repeated): the DE metrics test them against varying cells, which is not meaningful. Groups in
    ``said`` (named already as too small) are left out."""
    where = [(n, ct) for ct, o in outputs for n in o.constant if (n, ct) not in said]
    if not where:
        return
    n_all = sum(len(o.table.index) for _, o in outputs)
    perts = [n if ct is None else f"{n} ({ct})" for n, ct in where if n != control_pert]
    ctrl = [ct for n, ct in where if n == control_pert]
    de = _de_metric_names(metrics)  # (the best known first)
    what = []
    if perts:
        what.append(f"the predicted cells of {len(perts)} of the {n_all} perturbation(s) are all "
                    f"identical (one row repeated, no spread across cells): {preview(perts, 5)}")
    if ctrl:
        what.append(f"the predicted control cells {control_pert!r}"
                    + ("" if ctrl == [None] else f" of cell type(s) {preview(ctrl, 5)}")
                    + " are all identical, and every perturbation's DE is taken against them")
    warn(
        "; ".join(what) + f". The DE-based metrics ({preview(de, 4)}) are not meaningful for "
        "them: the Wilcoxon test of a group without variance against varying cells calls a gene "
        "significant wherever the repeated value sits away from the other group's median, however "
        "small the shift, so a repeated control mean can score an overlap_at_N close to a trained "
        "model's. The values are cell-eval's, kept as they are; compare such predictions on "
        "pearson_delta, mse and mae, or predict cells with their spread (e.g. "
        "ControlMeanBaseline(mode='copy')).",
        NoSpreadWarning)


def _check_de_matches(de: pd.DataFrame, which: str, perts: set[str], genes: set[str]) -> None:
    """A supplied DE table must cover the evaluated perturbations and name the data's genes."""
    targets = set(de["target"].astype(str))
    missing = sorted(perts - targets)
    if missing:
        raise DataError(f"the supplied {which} DE table (de_{which}) has no rows for "
                        f"{len(missing)} of the {len(perts)} evaluated perturbation(s): "
                        f"{preview(missing, 10)} (its targets: {preview(sorted(targets), 10)}). "
                        f"Compute it on the same data, or leave de_{which} out to compute DE "
                        "here.")
    if not genes & set(de["feature"].astype(str)):
        raise DataError(f"the features of the supplied {which} DE table (de_{which}), e.g. "
                        f"{preview(de['feature'].astype(str).unique()[:3])}, are none of the "
                        f"data's genes (e.g. {preview(sorted(genes)[:3])}). Compute it on the "
                        f"same data, or leave de_{which} out.")


def _warn_other_cell_types(p: ad.AnnData, r: ad.AnnData) -> None:
    """Warn when a cell-type-like obs column of both inputs holds different values: the cells
    of the other cell types would be pooled into the comparison."""
    for col in p.obs.columns.intersection(r.obs.columns):
        name = str(col).lower().replace("_", "").replace(" ", "")
        if name not in ("celltype", "cellline", "celltypes"):
            continue
        vp, vr = set(p.obs[col].astype(str)), set(r.obs[col].astype(str))
        if vp != vr:
            extra = sorted(vr - vp) or sorted(vp - vr)
            side = "real" if vr - vp else "pred"
            warn(
                f"obs['{col}'] holds other values in pred ({preview(sorted(vp), 4)}) than in real "
                f"({preview(sorted(vr), 4)}): the {side} cells of {preview(extra, 4)} are pooled "
                "into the comparison. Subset both to the same cell types, or pass "
                f"celltype_col='{col}' to score each cell type separately.", UserWarning)


def evaluate(
    adata_pred: ad.AnnData | str | Path | None = None,
    adata_real: ad.AnnData | str | Path | None = None,
    pert_col: str | None = None,
    control_pert: str | None = None,
    celltype_col: str | None = None,
    *,
    profile: str = "full",
    outdir: str | Path | None = None,
    embed_key: str | None = None,
    skip_metrics: Sequence[str] = (),
    de_pred: pd.DataFrame | str | Path | None = None,
    de_real: pd.DataFrame | str | Path | None = None,
    num_threads: int | None = None,
    allow_discrete: bool = False,
    counts_target: str = "shared",
    epsilon: float = 0.0,
    de_mode: str = "pdex-0.3",
    ceiling: bool = False,
    ceiling_seed: int = 0,
    align_genes: bool = False,
    shared_only: bool = False,
    batch_size: int | None = None,
    pred: ad.AnnData | str | Path | None = None,
    real: ad.AnnData | str | Path | None = None,
    cell_type_key: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate a prediction against real data like ``cell-eval run`` (0.8.2).

    Parameters
    ----------
    adata_pred, adata_real
        The prediction and the real cells: AnnData or ``.h5ad`` paths with the same genes (in
        the same order unless ``align_genes``) and the same perturbation labels (unless
        ``shared_only``), each with its own control cells. ``pred`` / ``real`` are aliases.
    pert_col, control_pert
        The perturbation column and the control label; default: those statetx recorded in the
        prediction's ``uns["statetx"]`` (``predict``, ``predict_split``, the baselines), else
        cell-eval's ``target_gene`` and ``non-targeting``.
    celltype_col
        Score each value of this obs column separately (default: all cells pooled, said when
        obs has a cell-type-like column with several values). ``cell_type_key`` (the
        estimators' name) is an alias.
    profile
        The metric set: ``full`` (every cell-eval metric), ``minimal``, ``vcc``, ``de``,
        ``anndata``, ``pds`` or ``extended`` (``full`` + statetx's centroid metrics); see
        ``statetx.metrics.PROFILES``.
    skip_metrics
        Names of metrics of the profile to leave out (an unknown name is an error); the
        ``de_nsig_counts`` columns can be skipped one by one.
    outdir
        Write cell-eval's files there: ``results.csv``, ``agg_results.csv``, ``real_de.csv``,
        ``pred_de.csv`` (prefixed ``<celltype>_`` with ``celltype_col``). An earlier
        evaluation's files there that this one does not write again are removed (they are
        listed in ``.statetx_evaluate``); other files are left alone.
    embed_key
        An obsm key whose embedding the discrimination scores (l2, cosine) use.
    de_pred, de_real
        DE tables (cell-eval's layout, DataFrame or CSV) to use instead of computing them; they
        must cover the evaluated perturbations.
    num_threads
        DE threads (default None, and ``-1``: every CPU available to the process; unlike
        :func:`~statetx.metrics.wilcoxon_de`, where None means 1).
    allow_discrete
        Use integer (count) values, and values ≥ 15, as they are (by default integer X is
        normalised and log1p-transformed, with a warning).
    counts_target
        The total integer counts are normalised to before log1p: ``"shared"`` (default) brings
        both files to one scale (a count file paired with a log1p file to the counts per cell the
        log1p values stand for; two count files, and count-scale predictions with their real
        cells, to the real cells' median total); ``"own_median"`` normalises each count file to
        its own median cell total, cell-eval's rule (``sc.pp.normalize_total`` without a target),
        for numbers comparable with ``cell-eval run``: a file with other sequencing depth then
        sits on another scale.
    epsilon
        Pseudocount of the DE fold changes (cell-eval's, default 0).
    de_mode
        ``"pdex-0.3"`` (cell-eval 0.8.2) or ``"vcc-2025"`` (global BH, clipped fold change).
    ceiling, ceiling_seed
        Also score the real cells against themselves (cell-eval's ``--ceiling``, CLI
        ``--ceiling [--ceiling-seed]``): :func:`~statetx.metrics.ceiling` with the same options
        splits each (cell type,) perturbation's real cells into two random halves (seeded by
        ``ceiling_seed``) and evaluates one half against the other. ``outdir`` then also receives
        ``ceiling_results.csv`` and ``agg_ceiling_results.csv``; the ceiling (one row per cell
        type: Spearman–Brown-corrected mean r of the correlation metrics, NaN for the others)
        and the model's scores as a fraction of it (:func:`~statetx.metrics.fraction_of_ceiling`)
        are printed and returned in ``agg.attrs["ceiling"]`` and
        ``agg.attrs["fraction_of_ceiling"]`` (columns as lists: ``pd.DataFrame(agg.attrs[
        "ceiling"])``). The per-perturbation values of the halves are the files' only, or call
        ``ceiling()`` itself.
    align_genes
        Reorder the prediction's genes to the real order when the sets are equal.
    shared_only
        Evaluate only the perturbations both files have (the others are listed).
    batch_size
        Accepted for compatibility; it does not change results.

    Returns
    -------
    results, agg
        One row per non-control perturbation (first column ``perturbation``) and the
        ``describe()`` table (first column ``statistic``); with ``celltype_col`` both get a
        leading ``celltype`` column. Nulls (undefined values) and NaN are both NaN in the frames;
        the CSVs written to ``outdir`` keep them apart (empty field vs ``NaN``).
    """
    adata_pred, adata_real, celltype_col = _resolve_aliases(adata_pred, adata_real, pred, real,
                                                            celltype_col, cell_type_key)
    metrics, num_threads = _check_options(
        profile=profile, skip_metrics=skip_metrics, de_mode=de_mode, ceiling=ceiling,
        ceiling_seed=ceiling_seed, epsilon=epsilon, num_threads=num_threads,
        counts_target=counts_target, outdir=outdir)
    p, r = _load_pair(adata_pred, adata_real, ceiling)
    real_in = r  # (the ceiling halves the real cells as given)
    # (labels are compared as text: an integer control label is its str)
    pert_col, control_pert = recorded_labels(p, pert_col, control_pert)
    warn_untrained(p)
    p, r = on_log1p_scale(p, r, allow_discrete=allow_discrete, counts_target=counts_target)
    metrics, pseudobulk = _drop_cell_level_metrics(metrics, profile, p, r)
    p, r = align_pair(p, r, pert_col=pert_col, control_pert=control_pert,
                      celltype_col=celltype_col, embed_key=embed_key,
                      align_genes=align_genes, shared_only=shared_only)
    if celltype_col is None:
        _warn_other_cell_types(p, r)
        _say_pooled(r)
    dp, dr = _supplied_de(de_pred, de_real, r, pert_col, control_pert)
    kw = dict(pert_col=pert_col, control_pert=control_pert, metrics=metrics, embed_key=embed_key,
              de_pred=dp, de_real=dr, num_threads=num_threads, epsilon=epsilon,
              de_mode=de_mode,  # cell-eval writes the DE tables in every profile but pds
              de_tables=outdir is not None and profile != "pds" and not pseudobulk)
    fewest = _fewest_perturbations(r, pert_col, control_pert, celltype_col)
    if fewest is not None:  # (cell types with control cells only are left out, said below)
        _warn_few_perturbations(metrics, fewest, celltype_col is not None)
    outputs: list[tuple[str | None, EvalOutput]] = []
    if celltype_col is None:
        outputs.append((None, _evaluate_one(p, r, **kw)))
    else:
        rct = r.obs[celltype_col].astype(str).to_numpy()
        if outdir is not None:
            _check_prefixes(sorted(set(rct)), celltype_col)
        pct = p.obs[celltype_col].astype(str).to_numpy()
        ctrl_only = []  # (cell type, pred cells, real cells): nothing to evaluate there
        for ct in sorted(set(rct)):
            sub_p, sub_r = p[pct == ct], r[rct == ct]
            try:
                sub_p, sub_r = align_pair(sub_p, sub_r, pert_col=pert_col,
                                          control_pert=control_pert, shared_only=shared_only)
            except DataError as err:
                raise DataError(f"cell type {ct!r}: {err}") from None
            if set(sub_r.obs[pert_col].astype(str)) <= {control_pert}:
                ctrl_only.append((ct, sub_p.n_obs, sub_r.n_obs))
                continue
            outputs.append((ct, _evaluate_one(sub_p, sub_r, **kw)))
        _say_control_only(ctrl_only, celltype_col, pert_col, control_pert, bool(outputs))
    ceil = None
    if ceiling:  # (before the files are written: they are listed with the results')
        ceil = _evaluated_ceiling(
            real_in, outputs, pert_col=pert_col, control_pert=control_pert,
            celltype_col=celltype_col, seed=int(ceiling_seed), profile=profile,
            embed_key=embed_key, skip_metrics=skip_metrics, num_threads=num_threads,
            allow_discrete=allow_discrete, counts_target=counts_target, epsilon=epsilon,
            de_mode=de_mode, shared_only=shared_only)
    if outdir is not None:
        _write(Path(outdir), outputs, de_mode, ceil, celltype_col is not None)
    _warn_constant(outputs, metrics, control_pert, _warn_few_cells(outputs, metrics))
    skipped = _warn_skipped(outputs)
    return _result_frames(outputs, skipped, de_mode, ceil)


def _resolve_aliases(adata_pred: Any, adata_real: Any, pred: Any, real: Any,
                     celltype_col: str | None, cell_type_key: str | None
                     ) -> tuple[Any, Any, str | None]:
    """``(adata_pred, adata_real, celltype_col)`` as given or by their aliases (``pred``,
    ``real``, ``cell_type_key``); an error when one is given twice or an input is missing."""
    for name, a, alias in (("adata_pred", adata_pred, pred), ("adata_real", adata_real, real)):
        if a is not None and alias is not None:
            raise ConfigError(f"{name} and its alias {name[6:]} were both given; pass one.")
    adata_pred = adata_pred if adata_pred is not None else pred
    adata_real = adata_real if adata_real is not None else real
    celltype_col = cell_type_option("celltype_col", celltype_col, cell_type_key)
    if adata_pred is None or adata_real is None:
        raise ConfigError("evaluate needs a prediction (adata_pred) and real data (adata_real)")
    return adata_pred, adata_real, celltype_col


def _check_options(*, profile: str, skip_metrics: Sequence[str], de_mode: str, ceiling: Any,
                   ceiling_seed: Any, epsilon: Any, num_threads: int | None, counts_target: str,
                   outdir: str | Path | None) -> tuple[list[str], int]:
    """Check evaluate's options before any work; returns ``(metrics, num_threads)``: the
    profile's metrics less those skipped, and the DE threads (None: every CPU available)."""
    if de_mode not in DE_MODES:
        raise ConfigError(f"de_mode {de_mode!r} is not supported; use one of {list(DE_MODES)}")
    metrics = _metric_list(profile, skip_metrics)
    if not isinstance(ceiling, (bool, np.bool_)):
        raise ConfigError(f"ceiling={ceiling!r}: pass True or False.")
    if isinstance(ceiling_seed, (bool, np.bool_)) or not isinstance(
            ceiling_seed, (int, np.integer)) or ceiling_seed < 0:
        raise ConfigError(f"ceiling_seed={ceiling_seed!r}: give an integer >= 0 (the seed of the "
                          "ceiling's random halves).")
    if ceiling_seed != 0 and not ceiling:
        raise ConfigError(f"ceiling_seed={ceiling_seed} needs ceiling=True (it seeds the halves of "
                          "the data ceiling).")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number)) \
            or not np.isfinite(epsilon) or epsilon < 0:
        raise ConfigError(f"epsilon={epsilon!r} is invalid; expected a finite number >= 0 (the "
                          "pseudocount of the DE fold changes; cell-eval's default is 0).")
    if num_threads is None:
        num_threads = available_cpus()
    as_count("num_threads", num_threads, -1)
    if counts_target not in COUNTS_TARGETS:
        raise ConfigError(f"counts_target={counts_target!r}: use one of {list(COUNTS_TARGETS)} "
                          "('own_median' normalises each count file to its own median total, "
                          "as cell-eval).")
    if outdir is not None:
        check_folder(Path(outdir), "outdir")
    return metrics, num_threads


def _load_pair(adata_pred: ad.AnnData | str | Path, adata_real: ad.AnnData | str | Path,
               ceiling: bool) -> tuple[ad.AnnData, ad.AnnData]:
    """pred and real as AnnData (read when paths); the ceiling needs real cells, not
    pseudobulks."""
    p, r = load(adata_pred, "pred"), load(adata_real, "real")
    if ceiling and r.uns.get(PSEUDOBULK_FLAG, False):
        raise ConfigError("ceiling=True halves the real cells of each perturbation, and the real "
                          "data are pseudobulks (one row per group); pass the real cells.")
    return p, r


def _embedding(a: ad.AnnData, key: str) -> np.ndarray | sp.spmatrix:
    """``obsm[key]`` as :func:`group_means` takes it: sparse kept sparse, else an array."""
    e = a.obsm[key]
    return e if sp.issparse(e) else np.asarray(e)


def _drop_cell_level_metrics(metrics: list[str], profile: str, p: ad.AnnData, r: ad.AnnData
                             ) -> tuple[list[str], bool]:
    """``(metrics, pseudobulk)``: pseudobulk inputs (one row per group) leave out, said, the
    metrics that need the cells (an error when none is left)."""
    pseudobulk = any(a.uns.get(PSEUDOBULK_FLAG, False) for a in (p, r))  # one row per group
    if pseudobulk:
        cell_level = [m for m in metrics if m in CELL_LEVEL_METRICS]
        if cell_level:
            say("pseudobulk inputs (one row per group): metrics that need "
                f"the cells are skipped: {', '.join(cell_level)}", who="statetx.evaluate")
        metrics = [m for m in metrics if m not in CELL_LEVEL_METRICS]
        if not metrics:
            raise ConfigError(f"profile {profile!r} has only metrics that need the cells, and the "
                              "inputs are pseudobulks; use profile 'anndata', 'pds' or 'full'.")
    return metrics, pseudobulk


def _supplied_de(de_pred: pd.DataFrame | str | Path | None,
                 de_real: pd.DataFrame | str | Path | None, r: ad.AnnData, pert_col: str,
                 control_pert: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The DE tables given instead of computed here (None where not), read and checked against
    the real data and each other."""
    dp, dr = _read_de(de_pred, "pred"), _read_de(de_real, "real")
    perts = set(r.obs[pert_col].astype(str)) - {control_pert}
    for de, which in ((dp, "pred"), (dr, "real")):
        if de is not None:
            _check_de_matches(de, which, perts, set(r.var_names.astype(str)))
    if dp is not None and dr is not None:
        tp, tr = set(dp["target"].astype(str)), set(dr["target"].astype(str))
        if tp != tr:
            raise DataError(f"supplied DE tables have different targets: only in pred "
                            f"{sorted(tp - tr)[:10]}, only in real {sorted(tr - tp)[:10]}")
    return dp, dr


def _fewest_perturbations(r: ad.AnnData, pert_col: str, control_pert: str,
                          celltype_col: str | None) -> int | None:
    """The fewest perturbations (control aside) of an evaluated group: all cells pooled, else
    the cell types that hold one (None when none does)."""
    rl = r.obs[pert_col].astype(str).to_numpy()
    if celltype_col is None:
        return len(set(rl) - {control_pert})
    rct = r.obs[celltype_col].astype(str).to_numpy()
    n_perts = [n for ct in set(rct) if (n := len(set(rl[rct == ct]) - {control_pert}))]
    return min(n_perts) if n_perts else None


def _evaluated_ceiling(real: ad.AnnData, outputs: list[tuple[str | None, EvalOutput]], *,
                       pert_col: str, control_pert: str, **options: Any
                       ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """:func:`ceiling` (with ``options``) of the real cells of the perturbations evaluated
    (shared_only may have left some out); None, with a warning, when it cannot be computed."""
    scored = {n for _, o in outputs for n in o.table.index} | {str(control_pert)}
    keep = real.obs[pert_col].astype(str).isin(scored).to_numpy()
    try:
        return _data_ceiling(real if keep.all() else real[keep], pert_col=pert_col,
                             control_pert=control_pert, **options)
    except DataError as err:  # (e.g. groups too small to halve: the results stand)
        warn(f"the data ceiling could not be computed, so the results come without "
             f"it: {err}", UserWarning)
        return None


def _warn_skipped(outputs: list[tuple[str | None, EvalOutput]]) -> dict[str, str]:
    """The metrics that could not be computed (``{metric: why}``), said once per call however
    many cell types."""
    skipped = {m: why for _, o in outputs for m, why in o.skipped.items()}
    if skipped:
        warn("metrics omitted (they could not be computed): "
             + "; ".join(f"{m} ({why})" for m, why in skipped.items()), UserWarning)
    return skipped


def _result_frames(outputs: list[tuple[str | None, EvalOutput]], skipped: dict[str, str],
                   de_mode: str, ceil: tuple[pd.DataFrame, pd.DataFrame] | None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """evaluate's ``(results, agg)``: every cell type's tables (with a leading ``celltype``
    column when split), the omitted metrics, DE mode and ceiling in their ``attrs``."""
    res_parts, agg_parts = [], []
    for ct, out in outputs:
        res = out.table.to_frame()
        agg, _ = out.table.describe()
        if ct is not None:
            res.insert(0, "celltype", ct)
            agg.insert(0, "celltype", ct)
        res_parts.append(res)
        agg_parts.append(agg)
    results = pd.concat(res_parts, ignore_index=True)
    agg = pd.concat(agg_parts, ignore_index=True)
    results.attrs["skipped_metrics"] = skipped
    results.attrs["de_mode"] = agg.attrs["de_mode"] = de_mode
    if ceil is not None:
        _attach_ceiling(agg, ceil[1])
    return results, agg


def ceiling(adata_real: ad.AnnData | str | Path, pert_col: str | None = None,
            control_pert: str | None = None, celltype_col: str | None = None, *,
            seed: int = 0, outdir: str | Path | None = None, cell_type_key: str | None = None,
            **evaluate_options: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metrics of real cells against real cells: ``(results, agg)``.

    Each perturbation's (and the control's) cells are split at random into two disjoint halves
    of ⌊n/2⌋ cells (groups of a single cell are left out, with a warning) and evaluated half
    against half: how well a perfect model could score given the data's own noise.

    Parameters
    ----------
    adata_real
        The real cells: an AnnData or an ``.h5ad`` path.
    pert_col, control_pert
        Default to those statetx recorded in the data (``predict_split``'s real cells), else
        ``target_gene`` / ``non-targeting``.
    celltype_col
        Split and score each value of this obs column separately (default: all cells pooled).
        ``cell_type_key`` is an alias.
    seed
        Seeds the split into halves.
    outdir
        Receives ``ceiling_results.csv`` and ``agg_ceiling_results.csv`` (prefixed
        ``<celltype>_``, one pair per cell type, with ``celltype_col``).
    **evaluate_options
        Passed to :func:`~statetx.metrics.evaluate` (profile, skip_metrics, ...).

    Returns
    -------
    results, agg
        ``results``: per perturbation, as :func:`statetx.metrics.evaluate` (half against half);
        ``agg``: one row (per cell type) with the Spearman–Brown-corrected mean r of each
        correlation-type metric, 2r / (1 + r) (NaN unless r > 0), and NaN for the others.
    """
    for opt in ("ceiling", "ceiling_seed"):
        if opt in evaluate_options:
            raise ConfigError(f"ceiling() takes no {opt}= option (it is evaluate's, which calls "
                              "ceiling); pass the seed of the halves as seed=.")
    celltype_col = cell_type_option("celltype_col", celltype_col, cell_type_key)
    real = load(adata_real, "real data")
    pert_col, control_pert = recorded_labels(real, pert_col, control_pert)
    a, b = split_halves(real, pert_col, celltype_col, seed)
    results, _ = evaluate(a, b, pert_col=pert_col, control_pert=control_pert,
                          celltype_col=celltype_col, **evaluate_options)
    agg = spearman_brown(results, celltype_col is not None)
    if outdir is not None:
        for name, frame in ceiling_files(results, agg, celltype_col is not None):
            write_ceiling_csv(frame, Path(outdir) / name)
    return results, agg


_data_ceiling = ceiling  # (evaluate's parameter ``ceiling`` hides the function's name)


def _attach_ceiling(agg: pd.DataFrame, ceil_agg: pd.DataFrame) -> None:
    """The ceiling and the model's fraction of it, in ``agg.attrs`` (as lists: DataFrames there
    would break ``pd.concat`` of such tables) and said."""
    agg.attrs["ceiling"] = ceil_agg.to_dict(orient="list")
    if not any(m in agg.columns and m in ceil_agg.columns for m in RELIABILITY_METRICS):
        say(f"no correlation metric ({', '.join(RELIABILITY_METRICS)}) was computed, so no score "
            "is given as a fraction of the ceiling", who="statetx.evaluate")
        return
    frac = fraction_of_ceiling(agg, ceil_agg)
    agg.attrs["fraction_of_ceiling"] = frac.to_dict(orient="list")
    say("fraction of the data ceiling (correlation metrics):\n" + frac.to_string(index=False),
        who="statetx.evaluate")


#: the files an evaluation wrote to its folder (a JSON list of names): a later evaluation into the
#: same folder removes those it does not write again (a table of other cell types, other DE
#: settings), so that the folder holds one evaluation's results only
MANIFEST = ".statetx_evaluate"


def _check_prefixes(cell_types: list[str], celltype_col: str) -> None:
    """Cell types whose file prefixes coincide would overwrite each other's files."""
    by_prefix: dict[str, list[str]] = {}
    for ct in cell_types:
        by_prefix.setdefault(file_prefix(ct), []).append(ct)
    clash = [names for names in by_prefix.values() if len(names) > 1]
    if clash:
        raise DataError(f"cell types {preview(clash[0])} of obs['{celltype_col}'] would write "
                        f"the same files ({file_prefix(clash[0][0])}results.csv, ...): '/' "
                        "becomes '-' in file names. Rename one of them, or leave outdir out.")


def _write(outdir: Path, outputs: list[tuple[str | None, EvalOutput]], de_mode: str,
           ceil: tuple[pd.DataFrame, pd.DataFrame] | None = None,
           by_celltype: bool = False) -> None:
    """Write every file of every cell type (each replaced atomically), then remove the files of
    an earlier evaluation into ``outdir`` that this one did not write (see :data:`MANIFEST`)."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, writer: Any, *args: Any) -> None:  # writer(*args, path)
        writer(*args, outdir / name)
        written.append(name)

    def text(content: str, path: Path) -> None:
        atomic_write_text(path, content)

    for ct, out in outputs:
        pre = file_prefix(ct)
        put(f"{pre}results.csv", out.table.write)
        agg, nulls = out.table.describe()
        put(f"{pre}agg_results.csv", write_agg, agg, nulls)
        if out.real_de is not None:
            put(f"{pre}real_de.csv", write_de_csv, out.real_de)
        if out.pred_de is not None:
            put(f"{pre}pred_de.csv", write_de_csv, out.pred_de)
        if out.skipped:
            put(f"{pre}skipped_metrics.txt", text,
                "".join(f"{m}\t{why}\n" for m, why in out.skipped.items()))
    if de_mode != "pdex-0.3":  # numbers of another era: say so next to them
        put("de_mode.txt", text, f"{de_mode}\n")
    if ceil is not None:
        for name, frame in ceiling_files(*ceil, by_celltype):
            put(name, write_ceiling_csv, frame)
    manifest = outdir / MANIFEST
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else []
    except (json.JSONDecodeError, UnicodeDecodeError):
        earlier = []  # (not ours, or damaged: nothing is removed)
    gone = sorted(n for n in set(earlier if isinstance(earlier, list) else []) - set(written)
                  if isinstance(n, str) and (outdir / n).parent == outdir
                  and (outdir / n).is_file())
    for name in gone:
        (outdir / name).unlink()
    if gone:
        say(f"removed {len(gone)} result file(s) of an earlier evaluation in {outdir}: "
            f"{preview(gone, 6)}", who="statetx.evaluate")
    atomic_write_text(manifest, json.dumps(written))

