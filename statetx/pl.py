"""Plots for training and evaluation: loss curves, predicted vs real pseudobulk deltas (all genes or
the top genes of one perturbation), metric bars per model, and predicted and real cells in one
embedding.

Every plot takes ``ax=`` (default: a new figure), ``show=`` and ``save=``. ``save`` is the file
the figure is written to, in an existing folder, its format from the suffix (``.png``, ``.pdf``,
``.svg``, …; no suffix: matplotlib's default, png, is added); it is checked before anything is
drawn (``True``, a bare suffix such as ``".png"`` or an unknown format is an error). A figure made
by the plot (no ``ax``) is closed once saved unless ``show=True``, as in scanpy, so plots saved in
a loop do not pile up (in a notebook, with ``show`` left as None, it is shown first).

As scanpy's plots, each returns its Axes (:func:`metric_bars` with one panel per metric: an array
of them) to be adjusted further, or None when the figure was shown: with ``show=True``, or a
figure of its own saved in a notebook with ``show`` left as None.

The expression plots (:func:`delta_scatter`, :func:`top_genes`, :func:`embedding`) put pred and
real on the log1p scale by the rule :func:`statetx.evaluate` applies, with the same warnings: a
side holding raw counts is normalised to the counts per cell the other side's log1p values stand
for (both holding counts: to the real cells' median total), so that the plots show what the
metrics measure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from statetx._utils import (
    as_count,
    cell_type_option,
    did_you_mean,
    history_frame,
    names_list,
    preview,
    repeated,
    say,
    to_dense_f32,
    warn,
)
from statetx.errors import ConfigError, DataError
from statetx.metrics._inputs import (
    align_pair,
    check_obs_col,
    on_log1p_scale,
    recorded,
    recorded_labels,
)
from statetx.metrics.de import group_means
from statetx.metrics.vcc import BEST_ZERO, NO_BEST

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["delta_scatter", "embedding", "history", "metric_bars", "top_genes"]

_MAX_COLOURS = 20  # delta_scatter's series told apart by colour (matplotlib's tab20)
_MAX_LISTED = 30  # embedding's legend lists the categories of `color` up to this many


def _colours(n: int) -> list | None:
    """``n`` distinct colours: None (matplotlib's default cycle) up to 10, else
    :func:`_palette`'s."""
    return None if n <= 10 else _palette(n)


def _palette(n: int) -> list:
    """``n`` distinct colours for any ``n``: tab10 up to 10; tab20's dark ten, then its light ten
    (neighbours differ in hue, not only in shade) up to 20; then the shades of tab20b and tab20c
    taken a hue group at a time (60 in all); beyond, hues spaced by the golden angle at three
    lightnesses, so no two colours repeat."""
    import colorsys

    from matplotlib import colormaps

    if n <= 10:
        return list(colormaps["tab10"].colors)[:n]
    tab20 = list(colormaps["tab20"].colors)
    out = tab20[::2] + tab20[1::2]
    for shade in (0, 2, 1, 3):  # (each map: 5 hue groups of 4 shades, dark to light)
        for name in ("tab20b", "tab20c"):
            out += list(colormaps[name].colors)[shade::4]
    for i in range(max(0, n - len(out))):
        hue = (i * 0.6180339887498949) % 1.0
        out.append(colorsys.hls_to_rgb(hue, (0.45, 0.65, 0.3)[i % 3], 0.7))
    return out[:n]


def _uns_colours(adatas: Sequence[ad.AnnData], col: str, cats: Sequence[str]) -> list | None:
    """The colours scanpy keeps for the categories of ``obs[col]`` (``uns[f"{col}_colors"]``,
    one per category of a categorical column, as ``sc.pl`` plots set them) for ``cats``, from
    the first object that has them for a category; None unless every category of ``cats`` has
    one (the plot's own palette is used then)."""
    from matplotlib.colors import is_color_like, to_rgba

    found: dict[str, Any] = {}
    for a in adatas:
        colors = a.uns.get(f"{col}_colors")
        values = a.obs[col] if col in a.obs.columns else None
        if colors is None or values is None or not isinstance(values.dtype, pd.CategoricalDtype):
            continue
        colors = list(np.asarray(colors, dtype=object).ravel())
        categories = values.cat.categories.astype(str)
        if len(colors) != len(categories) or not all(
                isinstance(c, str) and is_color_like(c) for c in colors):
            continue  # (not one colour per category: stale, as scanpy would redraw them)
        for cat, c in zip(categories, colors):
            found.setdefault(cat, to_rgba(c))
    return [found[c] for c in cats] if all(c in found for c in cats) else None


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Axes, bool]:
    """The Axes to draw in, and whether it is on a figure made here (closed after saving)."""
    if ax is not None:
        return ax, False
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")  # saved figures keep labels
    return ax, True


def _save_path(save: str | os.PathLike | None) -> Path | None:
    """``save`` checked before anything is drawn (a bad value leaves no figure open): a file in
    an existing folder, its format from the suffix (none: matplotlib's default, png, appended)."""
    if save is None:
        return None
    if isinstance(save, bool) or not isinstance(save, (str, os.PathLike)):
        raise ConfigError(f"save={save!r}: give the file to write the figure to (e.g. "
                          "'figures/deltas.png'; the format follows its suffix).")
    path = Path(save)
    name = path.name
    if not name or (name.startswith(".") and "." not in name[1:]):
        what = "only a suffix" if name else "no file name"
        raise ConfigError(f"save={str(save)!r} holds {what}: give the file to write, e.g. "
                          "save='figures/deltas.png' (the format follows its suffix; a bare "
                          "suffix such as '.png' is not completed to a file name).")
    if path.is_dir():
        raise ConfigError(f"save={str(save)!r} is a folder; give a file in it, e.g. "
                          f"{str(path / 'deltas.png')!r}.")
    if not path.parent.is_dir():
        raise ConfigError(f"save={str(save)!r}: the folder {str(path.parent)!r} does "
                          "not exist; create it first.")
    fmt = path.suffix[1:].lower()
    if fmt:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if fmt not in formats:
            raise ConfigError(f"save={str(save)!r}: matplotlib cannot write {fmt!r} files; use "
                              f"one of the suffixes {', '.join(sorted(formats))}.")
    return path


def _finish(ax: Axes | np.ndarray, own: bool, show: bool | None, save: Path | None
            ) -> Axes | np.ndarray | None:
    """``show`` / ``save`` for a drawn plot (``save`` checked by :func:`_save_path`). A figure
    made here (``own``) is closed once saved unless shown, as scanpy does, so plots written in
    a loop do not pile up. Returns ``ax`` (an Axes, or an array of them), or None when the
    figure was shown (``show=True``; ``show=None`` with a saved figure of its own in a
    notebook), as scanpy's plots do."""
    import matplotlib.pyplot as plt

    fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
    if save is not None:
        try:
            fig.savefig(save, bbox_inches="tight")
        except BaseException:  # (e.g. a read-only folder: the figure is not left behind)
            if own:
                plt.close(fig)
            raise
    shown = bool(show)
    if show:
        plt.show()
    elif own and save is not None:
        if show is None and "inline" in plt.get_backend():  # a notebook: shown, then closed
            plt.show()
            shown = True
        plt.close(fig)
    return None if shown else ax


def _named_perts(perts: Sequence[str] | None) -> list[str] | None:
    """The perturbations a plot is asked for (None: all); an empty selection is an error."""
    if perts is None:
        return None
    named = names_list(perts)
    if not named:
        raise ConfigError("perts is empty: name at least one perturbation (or leave it out).")
    return named


def _celltype_col(pred: ad.AnnData, real: ad.AnnData, celltype_col: str | bool | None
                  ) -> str | None:
    """The cell-type column: as given (align_pair checks it; False = none, all cells pooled),
    else the one statetx recorded when both inputs have it, else None (pooled)."""
    if celltype_col is False:
        return None
    if celltype_col is True:
        raise ConfigError("celltype_col takes a column name, None (as recorded) or False.")
    if celltype_col is not None:
        return celltype_col
    col = recorded(pred).get("celltype_col")
    return str(col) if col and col in pred.obs and col in real.obs else None


def _series(real: ad.AnnData, pert_col: str, celltype_col: str | None, perts: Sequence[str]
            ) -> list[tuple[str, str]]:
    """(cell type, perturbation) pairs of ``perts`` with real cells (cell type "" = pooled)."""
    p = real.obs[pert_col].astype(str).to_numpy()
    ct = (real.obs[celltype_col].astype(str).to_numpy() if celltype_col
          else np.full(real.n_obs, "", dtype=object))
    present = set(zip(ct[np.isin(p, list(perts))], p[np.isin(p, list(perts))]))
    return [(c, q) for q in perts for c in sorted({c for c, x in present if x == q})]


def _deltas(a: ad.AnnData, pert_col: str, control: str, series: list[tuple[str, str]],
            celltype_col: str | None, which: str) -> np.ndarray:
    """Pseudobulk Δ of each (cell type, perturbation) series: its mean minus the mean of the
    same cell type's controls (all controls when there is no cell-type column)."""
    p = a.obs[pert_col].astype(str).to_numpy()
    ct = (a.obs[celltype_col].astype(str).to_numpy() if celltype_col
          else np.full(a.n_obs, "", dtype=object))
    cts = sorted({c for c, _ in series})
    keys = pd.MultiIndex.from_tuples(series + [(c, control) for c in cts])
    codes = keys.get_indexer(pd.MultiIndex.from_arrays([ct, p]))
    missing = [c for i, c in enumerate(cts) if not (codes == len(series) + i).any()]
    if missing:
        raise DataError(f"cell type(s) {preview(missing)} have no control cells "
                        f"('{control}') in {which} obs[{celltype_col!r}], so their deltas are "
                        "undefined. Subset both inputs to cell types with controls, or pass "
                        "celltype_col=False to take deltas against all controls pooled.")
    absent = [f"{q} ({c})" if c else q for i, (c, q) in enumerate(series)
              if not (codes == i).any()]
    if absent:
        raise DataError(f"{which} has no cells of {preview(absent)}, which real has; subset both "
                        "inputs to the same perturbations and cell types.")
    m = group_means(a.X, codes, len(keys), float64=True).astype(np.float32)
    ctrl = dict(zip(cts, m[len(series):]))
    return np.stack([m[i] - ctrl[c] for i, (c, _) in enumerate(series)]).astype(np.float64)


def _shared_genes(pred: ad.AnnData, real: ad.AnnData, who: str) -> pd.Index:
    """The gene names pred and real share, in pred's order (a model's genes, e.g. HVGs, against
    real cells with all genes); the genes left out are said once, and no shared gene is an
    error."""
    pg, rg = pred.var_names.astype(str), real.var_names.astype(str)
    for names, which in ((pg, "pred"), (rg, "real")):
        if names.has_duplicates:
            raise DataError(f"{which} var_names hold duplicated genes: "
                            f"[{preview(repeated(names), 10)}]; {who} pairs pred's and real's "
                            f"genes by name, so each name must be one gene: "
                            f"{which}.var_names_make_unique() (on both objects alike), or drop "
                            "the duplicates.")
    shared = pg[pg.isin(rg)]
    if shared.empty:
        raise DataError(f"pred and real share no gene name: pred has {len(pg)} genes (e.g. "
                        f"{preview(pg, 3)}), real has {len(rg)} (e.g. {preview(rg, 3)}). {who} "
                        "pairs genes by name: give both the same kind of names (e.g. both "
                        "Ensembl IDs, or symbols: adata.var_names = adata.var['<symbol column>']"
                        ").")
    left = [f"{n} only in {w}" for n, w in ((len(pg) - len(shared), "pred"),
                                            (len(rg) - len(shared), "real")) if n]
    if left:
        say(f"{who}: drawn on the {len(shared)} genes pred and real share (by name); left out: "
            f"{', '.join(left)}")
    return shared


def _log1p_pair(adata_pred: ad.AnnData, adata_real: ad.AnnData, pert_col: str,
                control_pert: str, ct_col: str | None, who: str
                ) -> tuple[ad.AnnData, ad.AnnData]:
    """The pair on the genes both share (by name, in pred's order) and shared labels, on the
    log1p scale deltas are drawn on, by :func:`statetx.evaluate`'s rule: a count side paired
    with a log1p side is normalised to the counts per cell the log1p side stands for, two count
    sides to the real cells' median total (taken on the genes drawn), each conversion warned of;
    other scales are refused."""
    adata_pred, adata_real = _on_shared_genes(adata_pred, adata_real, who, "pred")
    adata_pred, adata_real = on_log1p_scale(adata_pred, adata_real, plots=True)
    return align_pair(adata_pred, adata_real, pert_col=pert_col, control_pert=control_pert,
                      celltype_col=ct_col, shared_only=True)  # (genes matched above)


def _on_shared_genes(adata_pred: ad.AnnData, adata_real: ad.AnnData, who: str, order: str
                     ) -> tuple[ad.AnnData, ad.AnnData]:
    """Both objects on the genes they share (by name; the genes left out are said), in the
    gene order of ``order`` ("pred" or "real")."""
    genes = _shared_genes(adata_pred, adata_real, who)
    if order == "real":
        rg = adata_real.var_names.astype(str)
        genes = rg[rg.isin(genes)]

    def on_genes(a: ad.AnnData) -> ad.AnnData:
        names = a.var_names.astype(str)
        same = len(names) == len(genes) and np.array_equal(names, genes)
        return a if same else a[:, names.get_indexer(genes)]

    return on_genes(adata_pred), on_genes(adata_real)



def delta_scatter(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    pert_col: str | None = None,
    control_pert: str | None = None,
    *,
    perts: Sequence[str] | None = None,
    ax: Axes | None = None,
    celltype_col: str | bool | None = None,
    max_perts: int = 10,
    s: float = 6.0,
    cell_type_key: str | bool | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Scatter predicted vs real pseudobulk deltas (mean log1p − own control mean), one colour per
    perturbation (per cell type and perturbation when there are several cell types), with the
    identity line and each series' Pearson r in the legend.

    Parameters
    ----------
    adata_pred, adata_real
        The prediction and the real cells (e.g. ``predict_split``'s pair), each with its own
        control cells. Genes are paired by name: the deltas are drawn on the genes both share,
        in pred's order (e.g. a model's HVGs against real cells with all genes; the genes left
        out are said), and no shared gene is an error.
    pert_col, control_pert, celltype_col
        Default to those recorded by statetx's prediction (``uns["statetx"]``), else cell-eval's
        ``target_gene`` / ``non-targeting`` and no cell-type column (Δ against all controls
        pooled; ``celltype_col=False`` pools them whatever was recorded).
    cell_type_key
        An alias of ``celltype_col`` (the estimator's name); give one of the two.
    perts
        The perturbations to plot (default: the ``max_perts`` whose real shift is largest, said
        when some are left out).
    max_perts
        At most this many series (perturbation, or perturbation and cell type) are drawn, each
        in its own colour (up to 20): scanpy's colours of the perturbations
        (``uns[f"{pert_col}_colors"]`` of real or pred, one per category of a categorical
        ``pert_col``, as ``sc.pl`` plots set them) when there is one cell type, so that a
        perturbation keeps its colour from plot to plot; else colours in the order drawn.
    ax
        Axes to draw in (default: a new figure).
    s
        Marker size.
    show, save
        ``show=True`` calls ``plt.show()``; ``save``: the file to write the figure to (rules in
        the module docstring).

    Returns
    -------
    Axes or None
        The Axes drawn in; None when the figure was shown (as scanpy's plots).
    """
    save = _save_path(save)
    pert_col, control_pert = recorded_labels(adata_pred, pert_col, control_pert)
    ct_col = _celltype_col(adata_pred, adata_real,
                           cell_type_option("celltype_col", celltype_col, cell_type_key))
    pred, real = _log1p_pair(adata_pred, adata_real, pert_col, control_pert, ct_col,
                             "delta_scatter")
    max_perts = as_count("max_perts", max_perts)
    if max_perts > _MAX_COLOURS:
        raise ConfigError(f"max_perts={max_perts}: at most {_MAX_COLOURS} series can be told "
                          "apart by colour; plot several panels instead.")
    avail = sorted(set(real.obs[pert_col].astype(str)) - {control_pert})
    chosen = _named_perts(perts) or avail
    missing = [p for p in chosen if p not in avail]
    if missing:
        raise DataError(f"perturbation(s) {missing} not found in obs[{pert_col!r}] of both files; "
                        f"available: {avail[:20]}")
    series = _series(real, pert_col, ct_col, list(chosen))
    if len(series) > max_perts:  # the strongest real responses, in their sorted order
        norms = np.concatenate([  # (in blocks: a genome-wide screen's deltas need not fit)
            np.linalg.norm(_deltas(real, pert_col, control_pert, series[i:i + 256], ct_col,
                                   "real"), axis=1) for i in range(0, len(series), 256)])
        keep = np.sort(np.argsort(-norms, kind="stable")[:max_perts])
        say(f"delta_scatter: {max_perts} of {len(series)} series drawn, those with the largest "
            "real shift (perts= and max_perts= choose)")
        series = [series[i] for i in keep]
    dr = _deltas(real, pert_col, control_pert, series, ct_col, "real")
    dp = _deltas(pred, pert_col, control_pert, series, ct_col, "pred")
    several = len({c for c, _ in series}) > 1
    outside = len(series) > 6  # (the legend beside the axes: a wider figure keeps them square)
    ax, own = _axes(ax, (7.5, 5.0) if outside else (5.0, 5.0))
    colours = None if several else _uns_colours((adata_real, adata_pred), pert_col,
                                                [p for _, p in series])
    if colours is None:
        colours = _colours(len(series))
    for i, (c, p) in enumerate(series):
        r = np.corrcoef(dr[i], dp[i])[0, 1] if dr[i].std() > 0 and dp[i].std() > 0 else np.nan
        name = f"{p} · {c}" if several else p
        ax.scatter(dr[i], dp[i], s=s, alpha=0.6, label=f"{name} (r={r:.2f})",
                   color=None if colours is None else colours[i])
    lim = float(np.nanmax(np.abs(np.concatenate([dr.ravel(), dp.ravel()])))) if dr.size else 1.0
    lim = lim * 1.05 if lim > 0 else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="lightgrey", lw=0.5)
    ax.axvline(0, color="lightgrey", lw=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal", adjustable="box")  # (the identity line at 45°, legend or not)
    ax.set_xlabel("real Δ (mean log1p − control)")
    ax.set_ylabel("predicted Δ")
    ax.set_title("Pseudobulk deltas: predicted vs real")
    ax.legend(fontsize="small", markerscale=2, frameon=False,
              **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if outside else {}))
    return _finish(ax, own, show, save)


def _means(df: pd.DataFrame) -> pd.Series:
    """Metric -> value of one model's table: a results table (per-perturbation rows averaged),
    an agg table (its ``mean`` row) or a score table (``metric``, ``from_baseline``)."""
    if {"metric", "from_baseline"} <= set(df.columns):  # score_agg / vcc_score
        return pd.Series(pd.to_numeric(df["from_baseline"], errors="coerce").to_numpy(),
                         index=df["metric"].astype(str)).groupby(level=0, sort=False).mean()
    if "statistic" in df.columns:  # per cell type (celltype_col): means weighted by counts
        def rows(stat: str) -> pd.DataFrame:
            part = df[df["statistic"] == stat].drop(columns=["statistic", "celltype"],
                                                    errors="ignore")
            return part.apply(pd.to_numeric, errors="coerce").reset_index(drop=True)

        mean, count = rows("mean"), rows("count")
        if len(mean) > 1 and len(count) == len(mean):
            return (mean * count).sum() / count.sum()
        return mean.mean()
    return df.drop(columns=["perturbation", "celltype"], errors="ignore").mean(numeric_only=True)


def _is_score(tables: Mapping[str, pd.DataFrame] | pd.DataFrame) -> bool:
    """Whether the tables are scores against a baseline (score_agg / vcc_score)."""
    frames = tables.values() if isinstance(tables, Mapping) else [tables]
    return all({"metric", "from_baseline"} <= set(df.columns) for df in frames)


def _long(tables: Mapping[str, pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """Long table with columns model, metric, value, from any accepted input form."""
    if isinstance(tables, pd.DataFrame):
        if {"model", "metric", "value"} <= set(tables.columns):
            return tables[["model", "metric", "value"]]
        if "model" in tables.columns:  # tables of several models, concatenated
            tables = {str(m): part.drop(columns="model")
                      for m, part in tables.groupby("model", sort=False)}
        else:  # one model's table
            tables = {"model": tables}
    parts = []
    for model, df in tables.items():
        vals = _means(df)
        parts.append(pd.DataFrame({"model": model, "metric": vals.index, "value": vals.values}))
    if not parts:
        raise DataError("metric_bars needs at least one table")
    return pd.concat(parts, ignore_index=True)


#: metrics whose largest |mean| differ by more than this factor get one panel each
_SCALE_RATIO = 10.0


def _magnitude_ratio(piv: pd.DataFrame) -> float:
    """The ratio of the largest to the smallest metric magnitude (largest finite |value| over
    the models; metrics at 0 or undefined count as any scale), 1 for fewer than two."""
    mag = piv.abs().max(axis=1, skipna=True).to_numpy(float)
    mag = mag[np.isfinite(mag) & (mag > 0)]
    return float(mag.max() / mag.min()) if mag.size > 1 else 1.0


def _bars(ax: Axes, pos: np.ndarray, heights: np.ndarray, width: float, **kw: Any) -> None:
    """Bars, an undefined (NaN) value marked "n/a" rather than left as an empty slot."""
    ax.bar(pos, heights, width, **kw)
    for p in pos[np.isnan(heights)]:
        ax.text(p, 0, "n/a", ha="center", va="bottom", rotation=90, fontsize="x-small")


def metric_bars(
    tables: Mapping[str, pd.DataFrame] | pd.DataFrame,
    metrics: Sequence[str] = ("pearson_delta", "discrimination_score_l1", "overlap_at_N", "mae"),
    ax: Axes | None = None,
    *,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | np.ndarray | None:
    """Grouped bars of the mean of each metric, one bar per model (each model in its own
    colour).

    Metrics on a like scale share one y axis. When their magnitudes differ by more than 10×
    (e.g. ``de_nsig_counts_pred`` in the hundreds next to ``mse`` at 0.01, which would be
    flattened), each metric gets a small panel with its own y axis, in one figure.

    Parameters
    ----------
    tables
        ``{model: table}``, the tables concatenated with a ``model`` column, one table, or a
        long frame with columns model, metric, value. A table is a results frame
        (per-perturbation rows are averaged), an agg frame (its ``mean`` row; per cell type,
        the means weighted by their perturbation counts: the mean over all perturbations) or a
        score frame (:func:`~statetx.metrics.score_agg`, :func:`~statetx.metrics.vcc_score`:
        ``from_baseline`` per metric).
    metrics
        The metrics drawn, in this order.
    ax
        Axes to draw in (default: a new figure). Metrics of different scales given an ``ax``
        are drawn on it, on one y axis, with a warning (leave ``ax`` out for one panel per
        metric, or draw them in several calls).
    show, save
        ``show=True`` calls ``plt.show()``; ``save``: the file to write the figure to (rules in
        the module docstring).

    Returns
    -------
    Axes, array of Axes or None
        The Axes; with one panel per metric, a 1-d array of the panels' Axes, in the order of
        ``metrics``; None when the figure was shown (as scanpy's plots).
    """
    save = _save_path(save)
    long = _long(tables)
    metrics = names_list(metrics)
    absent = [m for m in metrics if m not in set(long["metric"])]
    if absent:
        raise ConfigError(f"metric(s) {absent} not found in the tables; available: "
                          f"{sorted(set(long['metric']))}")
    models = list(dict.fromkeys(long["model"]))
    piv = long.pivot_table(index="metric", columns="model", values="value", aggfunc="mean",
                           dropna=False).reindex(index=metrics, columns=models)
    scores = _is_score(tables)  # (scores against a baseline: higher is better for all)
    names = [m + ("" if m in NO_BEST else " ↓" if m in BEST_ZERO and not scores else " ↑")
             for m in metrics]
    ylabel = ("score vs the baseline\n(↑: higher is better)" if scores else
              "mean over perturbations\n(↑ / ↓: higher / lower is better)")
    colours = _colours(len(models))
    ratio = _magnitude_ratio(piv)
    if ratio > _SCALE_RATIO and ax is None:
        return _finish(_metric_panels(piv, names, models, colours, ylabel), True, show, save)
    if ratio > _SCALE_RATIO:
        warn(f"metric_bars: the metrics' magnitudes differ {ratio:.0f}-fold, and on the one Axes "
             "given (ax=) the small ones are flattened; leave ax out for one panel per metric, or "
             "draw metrics of one scale per call.", UserWarning)
    ax, own = _axes(ax, (max(4.0, 1.2 * len(metrics) * max(1, len(models)) / 2), 4.0))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for j, m in enumerate(models):
        _bars(ax, x + (j - (len(models) - 1) / 2) * width, piv[m].to_numpy(float), width,
              label=m, color=None if colours is None else colours[j])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel, fontsize="small")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, own, show, save)


def _metric_panels(piv: pd.DataFrame, names: list[str], models: list[str],
                   colours: list | None, ylabel: str) -> np.ndarray:
    """One small panel per metric (at most 4 a row), each model's bar in its colour and one legend
    for the figure, on a figure made here; returns the panels in the order of the metrics."""
    import matplotlib.pyplot as plt

    n = len(names)
    nrows = -(-n // 4)
    ncols = -(-n // nrows)  # (rows filled evenly: 5 metrics are 3 + 2, not 4 + 1)
    width = max(1.8, 0.3 * len(models) + 0.8)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.5, 2.8 * nrows + 0.4),
                             layout="constrained", squeeze=False)
    for extra in grid.flat[n:]:
        extra.remove()
    axes = grid.ravel()[:n]
    if colours is None:  # (matplotlib's default cycle, as the single-axis bars)
        cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        colours = [cycle[j % len(cycle)] for j in range(len(models))]
    x = np.arange(len(models))
    for a, name, metric in zip(axes, names, piv.index):
        _bars(a, x, piv.loc[metric].to_numpy(float), 0.8, color=colours)
        a.set_xticks([])
        a.set_xlim(-0.7, len(models) - 0.3)
        a.set_title(name, fontsize="medium")
        a.axhline(0, color="grey", lw=0.5)
    fig.supylabel(ylabel, fontsize="small")
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[j], label=m) for j, m in enumerate(models)]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize="small")
    return axes


# ---------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------

_DEFAULT_CURVES = ("train_loss", "train_loss_eval", "val_loss")


def _history(obj: Any) -> pd.DataFrame:
    """One row per step (the first value of each column at that step, as ``history_`` holds it)
    from a fitted model, a history frame, a ``metrics.csv`` path or a run directory."""
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if path.is_dir():
            path = path / "metrics.csv"
        if not path.is_file():
            raise DataError(f"metrics file {str(path)!r} does not exist; pass a run's "
                            "metrics.csv (or its run directory), a fitted model or its history_")
        frame = pd.read_csv(path)
        if {"key", "value"} <= set(frame.columns):  # the long format of earlier statetx runs
            frame = frame.pivot_table(index=["step", "epoch"], columns="key", values="value",
                                      aggfunc="first").reset_index()
            frame.columns.name = None
    elif isinstance(obj, pd.DataFrame):
        frame = obj
    else:
        frame = getattr(obj, "history_", None)
        if not isinstance(frame, pd.DataFrame):
            raise ConfigError(f"{type(obj).__name__} has no training history (history_); fit the "
                              "model first, or pass a history DataFrame or a run's metrics.csv")
    frame = history_frame(frame)  # metrics.csv: a step's training and validation rows merged
    if "step" not in frame.columns:
        raise DataError(f"the training history has no 'step' column (columns: "
                        f"{preview(frame.columns)}); pass a statetx history or metrics.csv")
    return frame


def history(
    model_or_history: Any,
    keys: Sequence[str] | None = None,
    ax: Axes | None = None,
    *,
    logy: bool = False,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Training curves against the step, one line per key.

    NaNs are skipped per series (validation rows are sparse); the lowest ``val_loss`` is marked
    with a star when it is plotted.

    Parameters
    ----------
    model_or_history
        A fitted ``StateTransitionModel`` (its ``history_``), a history DataFrame, or a run's
        ``metrics.csv`` (or the run directory).
    keys
        The columns plotted (default: those of ``train_loss``, ``train_loss_eval``,
        ``val_loss`` present).
    ax
        Axes to draw in (default: a new figure).
    logy
        Log-scale y axis.
    show, save
        ``show=True`` calls ``plt.show()``; ``save``: the file to write the figure to (rules in
        the module docstring).

    Returns
    -------
    Axes or None
        The Axes drawn in; None when the figure was shown (as scanpy's plots).
    """
    save = _save_path(save)
    frame = _history(model_or_history)
    available = [c for c in frame.columns if c not in ("step", "epoch")]
    if keys is None:
        keys = [k for k in _DEFAULT_CURVES if k in frame.columns and frame[k].notna().any()]
        if not keys:
            raise DataError(f"the training history has none of {list(_DEFAULT_CURVES)}; pass keys= "
                            f"from the available columns: {preview(available)}")
    keys = names_list(keys)
    absent = [k for k in keys if k not in frame.columns]
    if absent:
        hint = did_you_mean(absent[0], available)
        raise ConfigError(f"key(s) {absent} not found in the training history.{hint} Available "
                          f"columns: {preview(available)}")
    curves = [(k, pd.to_numeric(frame[k], errors="coerce")) for k in keys]
    for k, values in curves:  # (checked before a figure is made)
        if not values.notna().any():
            raise DataError(f"history column {k!r} has no numeric values; choose keys from "
                            f"{preview(c for c in available if frame[c].notna().any())}")
    ax, own = _axes(ax, (6.0, 4.0))
    for k, values in curves:
        ok = values.notna().to_numpy()
        x, y = frame["step"].to_numpy()[ok], values.to_numpy(float)[ok]
        ax.plot(x, y, label=k, marker="o" if ok.sum() <= 30 else None, ms=3)
        if k == "val_loss":
            i = int(np.argmin(y))
            ax.scatter([x[i]], [y[i]], marker="*", s=120, color="black", zorder=3,
                       label=f"best val_loss {y[i]:.4g} (step {int(x[i])})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    ax.set_title("Training history")
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, own, show, save)


# ---------------------------------------------------------------------------------------------
# top genes of one perturbation
# ---------------------------------------------------------------------------------------------


def _not_a_column(pred: ad.AnnData, real: ad.AnnData, perturbation: str, pert_col: str,
                  given_col: str | None, control_pert: str) -> None:
    """Error when the perturbation asked for is an obs column name and no label of
    ``pert_col``: the arguments of ``delta_scatter(pred, real, pert_col, control_pert)`` given
    to ``top_genes(pred, real, perturbation, pert_col, control_pert)``."""
    owner = next((a for a in (real, pred) if perturbation in a.obs.columns), None)
    if owner is None or any(perturbation in set(a.obs[pert_col].astype(str))
                            for a in (real, pred) if pert_col in a.obs.columns):
        return
    labels = sorted(set(owner.obs[perturbation].astype(str)))
    # (a control label given fourth, as delta_scatter's control_pert, lands in pert_col)
    ctrl = given_col if given_col is not None and given_col in labels else None
    example = next((x for x in labels if x not in (ctrl, control_pert)), "<perturbation>")
    call = (f"top_genes(pred, real, {example!r}, pert_col={perturbation!r}"
            + (f", control_pert={ctrl!r})" if ctrl is not None else ")"))
    raise ConfigError(
        f"perturbation={perturbation!r} is an obs column, not a perturbation label: top_genes "
        "takes the perturbation to draw third, top_genes(pred, real, perturbation, pert_col, "
        "control_pert), where delta_scatter and embedding take pert_col. Pass the column as "
        f"pert_col= and one of its labels, e.g. {call}. Labels of obs[{perturbation!r}]: "
        f"{preview(labels, 10)}")


def top_genes(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    perturbation: str | None = None,
    pert_col: str | None = None,
    control_pert: str | None = None,
    *,
    n_genes: int = 20,
    ax: Axes | None = None,
    celltype_col: str | bool | None = None,
    cell_type: str | None = None,
    gene_symbols: str | None = None,
    cell_type_key: str | bool | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Paired horizontal bars of the real and predicted pseudobulk delta (mean log1p − own control
    mean) of one perturbation, for the ``n_genes`` genes with the largest |real delta| (largest
    at the top); the title gives the Pearson r of the two deltas over all (shared) genes.

    Parameters
    ----------
    adata_pred, adata_real
        The prediction and the real cells, each with its own control cells; genes are paired
        by name as in :func:`delta_scatter` (the genes both share, in pred's order).
    perturbation
        The perturbation label to show (may be left out when the data hold one). Note the
        order: the perturbation comes third, before ``pert_col`` (which is third in
        :func:`delta_scatter` and :func:`embedding`); a column name given here is an error
        that says so.
    pert_col, control_pert, celltype_col
        As in :func:`delta_scatter`; a perturbation in several cell types shows the mean of its
        per-cell-type deltas, or those of ``cell_type``.
    cell_type
        Show the deltas of this cell type only (a value of the cell-type column).
    cell_type_key
        An alias of ``celltype_col`` (the estimator's name); give one of the two.
    n_genes
        How many genes (largest |real delta| first), 1 to 100.
    ax
        Axes to draw in (default: a new figure).
    gene_symbols
        A var column of ``adata_real`` to label the genes by (e.g. symbols next to Ensembl
        IDs), as in scanpy.
    show, save
        ``show=True`` calls ``plt.show()``; ``save``: the file to write the figure to (rules in
        the module docstring).

    Returns
    -------
    Axes or None
        The Axes drawn in; None when the figure was shown (as scanpy's plots).
    """
    save = _save_path(save)
    given_col = pert_col
    pert_col, control_pert = recorded_labels(adata_pred, pert_col, control_pert)
    if isinstance(n_genes, bool) or not isinstance(n_genes, (int, np.integer)) or not (
            1 <= n_genes <= 100):
        raise ConfigError(f"n_genes must be an integer from 1 to 100 (one bar pair per gene), "
                          f"got {n_genes!r}")
    if isinstance(perturbation, (list, tuple, set, np.ndarray, pd.Index, pd.Series)):
        raise ConfigError(f"top_genes draws one perturbation, got {perturbation!r}; "
                          "delta_scatter(perts=[...]) compares several.")
    if perturbation is not None:
        _not_a_column(adata_pred, adata_real, str(perturbation), pert_col, given_col,
                      control_pert)
    ct_col = _celltype_col(adata_pred, adata_real,
                           cell_type_option("celltype_col", celltype_col, cell_type_key))
    if cell_type is not None and ct_col is None:
        raise ConfigError("cell_type= needs a cell-type column: pass celltype_col=<column>.")
    pred, real = _log1p_pair(adata_pred, adata_real, pert_col, control_pert, ct_col,
                             "top_genes")
    avail = sorted(set(real.obs[pert_col].astype(str)) - {control_pert})
    if perturbation is None and len(avail) != 1:
        raise ConfigError(f"the data hold {len(avail)} perturbations: name one "
                          f"(perturbation=...). Available: {preview(avail)}")
    perturbation = avail[0] if perturbation is None else str(perturbation)
    if gene_symbols is not None and gene_symbols not in real.var.columns:
        raise DataError(f"gene_symbols={gene_symbols!r} is not a var column of the real data "
                        f"(columns: {preview(real.var.columns)})."
                        f"{did_you_mean(gene_symbols, real.var.columns)}")
    if perturbation == control_pert:
        raise ConfigError(f"{perturbation!r} is the control label: its shift from itself is 0. "
                          f"Name a perturbation: {preview(avail)}")
    if perturbation not in avail:
        raise DataError(f"perturbation {perturbation!r} not found in obs[{pert_col!r}] of both "
                        f"files.{did_you_mean(perturbation, avail)} Available: {preview(avail)}")
    series = _series(real, pert_col, ct_col, [perturbation])
    if cell_type is not None:
        cts = [c for c, _ in series]
        if str(cell_type) not in cts:
            raise DataError(f"perturbation {perturbation!r} has no real cells of cell type "
                            f"{cell_type!r} (it has: {preview(cts)}).")
        series = [(str(cell_type), perturbation)]
    dp = _deltas(pred, pert_col, control_pert, series, ct_col, "pred").mean(0)
    dr = _deltas(real, pert_col, control_pert, series, ct_col, "real").mean(0)
    r = np.corrcoef(dr, dp)[0, 1] if dr.std() > 0 and dp.std() > 0 else np.nan
    top = np.argsort(-np.abs(dr), kind="stable")[:int(n_genes)]
    names = real.var_names if gene_symbols is None else real.var[gene_symbols]
    genes = names.astype(str).to_numpy()[top]
    y = np.arange(top.size)
    h = 0.4
    ax, own = _axes(ax, (5.0, max(2.5, 0.28 * top.size + 1.0)))
    ax.barh(y - h / 2, dr[top], h, label="real", color="tab:blue")
    ax.barh(y + h / 2, dp[top], h, label="predicted", color="tab:orange")
    ax.set_yticks(y)
    ax.set_yticklabels(genes, fontsize="small")
    ax.set_ylim(top.size - 0.5, -0.5)  # the largest |real delta| at the top
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Δ (mean log1p − control)")
    where = (f" in {series[0][0]}" if len(series) == 1 and series[0][0]
             else f", mean of {len(series)} cell types" if len(series) > 1 else "")
    ax.set_title(f"{perturbation}{where}\ntop {top.size} genes by |real Δ| "
                 f"(r={r:.2f} over all {dr.size} genes)", fontsize="medium", wrap=True)
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, own, show, save)


# ---------------------------------------------------------------------------------------------
# predicted and real cells in one embedding
# ---------------------------------------------------------------------------------------------


def _subsample(n: int, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def _one_color(color: str | Sequence[str]) -> str:
    """``color`` as one name: scanpy's list form of one column is taken, several are refused
    (one embedding is drawn per call)."""
    if isinstance(color, str):
        return color
    if not isinstance(color, (list, tuple, pd.Index, pd.Series, np.ndarray)):
        raise ConfigError(f"color={color!r}: give 'source' (real / predicted) or an obs column "
                          "name of both objects.")
    names = names_list(color)
    if len(names) != 1:
        loop = (f" Draw one panel per column: fig, axes = plt.subplots(1, {len(names)}), then "
                "embedding(pred, real, color=c, ax=a) for each column c and Axes a."
                if names else "")
        raise ConfigError(f"color={names!r}: embedding colours by one column per call "
                          f"('source' or an obs column).{loop}")
    return names[0]


def embedding(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    pert_col: str | None = None,
    control_pert: str | None = None,
    *,
    color: str | Sequence[str] = "source",
    perts: Sequence[str] | None = None,
    basis: str = "pca",
    ax: Axes | None = None,
    max_cells: int = 5000,
    seed: int = 0,
    s: float = 6.0,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Predicted and real cells in one PCA fitted on the real cells only (on the genes both share,
    up to 50 components, the first two shown); predicted cells are projected into it.

    Parameters
    ----------
    adata_pred, adata_real
        The prediction and the real cells, on the genes both share (by name; the genes left
        out are said).
    pert_col, control_pert
        As in :func:`delta_scatter`.
    color
        ``"source"`` (real / predicted) or an obs column of both objects (e.g. ``pert_col``;
        real cells as dots, predicted as crosses). A one-element list (scanpy's form) is taken
        as its element; one column is drawn per call. Each category has its own colour:
        scanpy's (``uns[f"{color}_colors"]``, one per category of the categorical column, as
        ``sc.pl`` plots set them; real's first) when they cover every category drawn, else
        distinct colours for any number of categories. The legend lists up to 30 categories;
        above, it says how many.
    perts
        Keep those perturbations (plus ``control_pert``).
    basis
        ``"pca"``, or ``"umap"``: a UMAP (umap-learn, installed with scanpy) fitted on the real
        cells' PCA scores, the predicted cells placed with its ``transform``.
    ax
        Axes to draw in (default: a new figure).
    max_cells, seed
        Each source is subsampled to ``max_cells`` cells (seeded by ``seed``) before the PCA
        is fitted.
    s
        Marker size.
    show, save
        ``show=True`` calls ``plt.show()``; ``save``: the file to write the figure to (rules in
        the module docstring).

    Returns
    -------
    Axes or None
        The Axes drawn in; None when the figure was shown (as scanpy's plots).
    """
    save = _save_path(save)
    color = _one_color(color)
    pert_col, control_pert = recorded_labels(adata_pred, pert_col, control_pert)
    if basis not in ("pca", "umap"):
        raise ConfigError(f"basis {basis!r} is not supported; use 'pca' (the real cells' PCA, "
                          "into which the predicted cells are projected) or 'umap'")
    if isinstance(max_cells, bool) or not isinstance(max_cells, (int, np.integer)) or max_cells < 2:
        raise ConfigError(f"max_cells must be an integer >= 2, got {max_cells!r}")
    perts = _named_perts(perts)
    for a, which in ((adata_pred, "pred"), (adata_real, "real")):
        if a.uns.get("statetx_pseudobulk", False):
            raise DataError(f"{which} holds pseudobulks (one row per group): an embedding of "
                            "cells needs the cells (predict_split without pseudobulk=True).")
    for a, which in ((adata_pred, "pred"), (adata_real, "real")):
        check_obs_col(a, pert_col, which, "perturbation")
        if color != "source" and color not in a.obs.columns:
            common = [c for c in adata_real.obs.columns if c in adata_pred.obs.columns]
            raise DataError(f"color column {color!r} not found in {which} obs."
                            f"{did_you_mean(color, common)} Use color='source' or a column of "
                            f"both objects: {preview(common)}")
    given = adata_pred, adata_real  # (their uns may hold scanpy's colours of `color`)
    # the PCA's columns: the genes both share, in real's order
    adata_pred, adata_real = _on_shared_genes(adata_pred, adata_real, "embedding", "real")
    if adata_real.n_vars < 2:
        raise DataError(f"pred and real share {adata_real.n_vars} gene name(s); the embedding "
                        f"needs at least 2 (real genes: {preview(given[1].var_names, 5)}; pred "
                        f"genes: {preview(given[0].var_names, 5)})")
    # (expression on the log1p scale by evaluate's rule, as the other plots: counts converted
    # with a warning, scaled values refused; a model's embedding outputs are drawn as they are)
    if "embedding" not in (recorded(adata_pred).get("scale"), recorded(adata_real).get("scale")):
        adata_pred, adata_real = on_log1p_scale(adata_pred, adata_real, plots=True)
    labels = {w: a.obs[pert_col].astype(str).to_numpy()
              for w, a in (("pred", adata_pred), ("real", adata_real))}
    if perts is not None:
        avail = sorted(set(labels["real"]) | set(labels["pred"]))
        missing = [p for p in perts if p not in avail]
        if missing:
            raise DataError(f"perturbation(s) {missing} not found in obs[{pert_col!r}] of pred or "
                            f"real.{did_you_mean(missing[0], avail)} Available: {preview(avail)}")
        if control_pert not in avail:
            raise DataError(f"the control label {control_pert!r} is not in obs[{pert_col!r}] of "
                            f"pred or real.{did_you_mean(control_pert, avail)} Pass control_pert="
                            "(the controls are drawn with the perturbations in perts).")
        keep = set(perts) | {control_pert}
    rng = np.random.default_rng(seed)
    cells = {}
    for which, a in (("real", adata_real), ("pred", adata_pred)):
        idx = np.flatnonzero(np.isin(labels[which], list(keep))) if perts is not None \
            else np.arange(a.n_obs)
        idx = idx[_subsample(idx.size, int(max_cells), rng)]
        cells[which] = idx
    if cells["real"].size < 2:
        raise DataError(f"{cells['real'].size} real cell(s) left to fit the PCA; keep more "
                        "perturbations (perts=) or cells")
    from sklearn.decomposition import PCA

    x_real = to_dense_f32(adata_real[cells["real"]].X)
    pca = PCA(n_components=min(50, x_real.shape[0], adata_real.n_vars),
              random_state=seed).fit(x_real)
    scores = {"real": pca.transform(x_real),
              "pred": (pca.transform(to_dense_f32(adata_pred[cells["pred"]].X))
                       if cells["pred"].size else np.empty((0, pca.n_components_)))}
    if basis == "umap":
        import umap

        fitted = umap.UMAP(random_state=seed, n_jobs=1,
                           n_neighbors=min(15, cells["real"].size - 1))
        coords = {"real": fitted.fit_transform(scores["real"]),
                  "pred": (fitted.transform(scores["pred"]) if cells["pred"].size
                           else np.empty((0, 2)))}
    else:
        coords = {k: v[:, :2] for k, v in scores.items()}
    names = {"real": "real", "pred": "predicted"}
    if color == "source":
        ax, own = _axes(ax, (5.5, 5.0))
        for which, c in (("real", "tab:blue"), ("pred", "tab:orange")):
            ax.scatter(*coords[which].T, s=s, alpha=0.5, color=c, linewidths=0,
                       label=f"{names[which]} ({coords[which].shape[0]})")
        ax.legend(frameon=False, fontsize="small", markerscale=2)
    else:
        from matplotlib.lines import Line2D

        values = {"real": adata_real.obs[color].astype(str).to_numpy()[cells["real"]],
                  "pred": adata_pred.obs[color].astype(str).to_numpy()[cells["pred"]]}
        cats = sorted(set(values["real"]) | set(values["pred"]))
        colours = _uns_colours(given[::-1], color, cats) or _palette(len(cats))
        listed = len(cats) <= _MAX_LISTED
        outside = listed and len(cats) > 6  # (as delta_scatter: a long legend beside the axes)
        ax, own = _axes(ax, (8.0 if len(cats) > 15 else 7.0, 5.0) if outside else (5.5, 5.0))
        handles = []
        for cat, c in zip(cats, colours):
            # real cells as a faint cloud, predictions drawn over them as crosses
            for which, marker in (("real", "o"), ("pred", "x")):
                m = values[which] == cat
                if m.any():
                    ax.scatter(*coords[which][m].T, s=s if marker == "o" else 2 * s,
                               alpha=0.3 if marker == "o" else 0.85, color=c, marker=marker,
                               linewidths=0 if marker == "o" else 0.9,
                               zorder=2 if marker == "o" else 3)
            handles.append(Line2D([], [], ls="", marker="s", color=c, label=cat))
        handles += [Line2D([], [], ls="", marker=mk, color="grey", label=names[w])
                    for w, mk in (("real", "o"), ("pred", "x"))]
        if listed:
            ax.legend(handles=handles, frameon=False, fontsize="small", title=color,
                      ncols=2 if len(cats) > 15 else 1,
                      **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if outside
                         else {}))
        else:  # (too many to list: the markers, and how many colours there are)
            ax.legend(handles=handles[-2:], frameon=False, fontsize="small",
                      title=f"{color}: {len(cats)} values,\neach in its own colour")
    if basis == "umap":
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
    else:
        evr = pca.explained_variance_ratio_
        ax.set_xlabel(f"PC1 ({evr[0]:.1%})")
        ax.set_ylabel(f"PC2 ({evr[1]:.1%})")
    ax.set_title(f"Real cells' {basis.upper()}; predicted cells projected")
    return _finish(ax, own, show, save)
