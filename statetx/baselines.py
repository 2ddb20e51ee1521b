"""Baselines (metrics.md §13) as estimators with :class:`~statetx.StateTransitionModel`'s API.

``fit(adata, split_config)`` validates the data with :func:`statetx.data.prepare` (same split
spec, same checks, same vocabularies) and computes pseudobulk statistics of the **training split**;
``predict(adata)`` returns a new AnnData laid out like ST's (the input obs plus
``statetx_ctrl_barcode`` / ``statetx_set``, predictions in X, the feature names as var);
``predict_split(split)`` returns aligned ``(adata_pred, adata_real)`` for a split's cells.

Conventions shared by every baseline:

* Context = cell type label. Means are over the representation's values (log1p expression,
  ``X_hvg`` or an embedding), computed in float64 with cells weighted equally.
* Basal cells are drawn like ST: per (cell type, perturbation) group, seeded by ``seed`` and the
  group's labels, with replacement, from the control cells of the same cell type in the input
  (and, when ``batch_col`` is set, of the same batch where it has controls: ST's default
  pairing). A baseline and an ST model predicted with the same seed and pairing therefore start
  from the same cells.
* Control cells are returned unchanged (their own values; ``statetx_ctrl_barcode`` is the cell
  itself), as in the VCC baseline, so predicted and real controls coincide.
* ``clip="auto"``: [0, 14] for log1p expression (like ST), [0, ∞) for raw counts, none for
  embeddings.
* A **zero-shot** cell type is one without perturbed training cells (held out in ``[zeroshot]``,
  or a cell type first seen at prediction). Each baseline's docstring says what it predicts there;
  the fallback is printed and recorded in ``uns['statetx']['notes']``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.exceptions import NotFittedError

from statetx._params import Estimator
from statetx._utils import as_count, as_seed, deepcopy_sharing, did_you_mean, preview, say
from statetx.config import ColumnMap, SplitConfig
from statetx.data import (
    DataInput,
    PreparedData,
    prepare,
    split_cell_obs,
    split_datasets,
    warn_training_scale,
    with_training_var,
)
from statetx.errors import ConfigError, DataError
from statetx.model import StateTransitionModel
from statetx.predict import (
    basal_groups,
    check_input_scale,
    clip_range,
    encode_perturbations,
    group_key,
    group_rng,
    input_columns,
    input_labels,
    input_matrix,
    mark_scale,
    output_scale,
    pairing_batches,
    resolve_pool,
    split_groups,
)
from statetx.vocab import check_sep, feature_table, label_parts, load_pert_features

__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "AdditiveBaseline",
    "CellMeanBaseline",
    "ContextMeanBaseline",
    "ControlMeanBaseline",
    "LinearBaseline",
    "PerturbMeanBaseline",
    "fit_all_baselines",
]


@dataclass
class _Group:
    """Output rows of one (cell type, perturbation) group and the control pool of its context."""

    out_rows: np.ndarray  # positions in the output
    src_rows: np.ndarray  # rows of the source matrix holding these cells
    pool: np.ndarray      # source rows of the controls its basal cells are drawn from
    ctx_pool: np.ndarray  # source rows of the context's controls (its control mean)
    cell_type: str
    pert: str             # the label the baseline predicts for (may be unseen in training)
    key: str              # seeds the basal draws (same keys as ST)
    control: bool         # control cells are returned unchanged


class _Baseline(Estimator):
    """Shared fit / predict / predict_split machinery; subclasses define ``_predict_group``.

    The column parameters (``pert_col``, ``cell_type_key``, ``batch_col``, ``control_pert``,
    ``embed_key``, ``gene_name_col``) and ``seed`` mean what they mean for
    :class:`~statetx.StateTransitionModel`.
    """

    name: ClassVar[str] = "baseline"
    _PICKLED_FIT = ("columns_", "vocab_", "var_names_", "means_")
    #: whether the zero-shot rule is a fallback worth printing (it is always recorded in uns)
    _zeroshot_is_fallback: ClassVar[bool] = False

    def __init__(self, *, pert_col: str = "gene", cell_type_key: str = "cell_type",
                 batch_col: str | None = None, control_pert: str | None = None,
                 embed_key: str | None = None, gene_name_col: str | None = None,
                 seed: int = 42) -> None:
        self.pert_col = pert_col
        self.cell_type_key = cell_type_key
        self.batch_col = batch_col
        self.control_pert = control_pert
        self.embed_key = embed_key
        self.gene_name_col = gene_name_col
        self.seed = seed

    # ------------------------------------------------------------------ fit
    def _columns(self) -> ColumnMap:
        space = "gene" if self.embed_key in (None, "X_hvg") else "embedding"
        return ColumnMap.build(pert_col=self.pert_col, cell_type_key=self.cell_type_key,
                               batch_col=self.batch_col, control_pert=self.control_pert,
                               embed_key=self.embed_key, output_space=space,
                               gene_name_col=self.gene_name_col)

    def fit(self, adata: DataInput = None,
            split_config: SplitConfig | dict | str | Path | None = None, *,
            dataset_name: str | None = None) -> _Baseline:
        """Compute the baseline's statistics on the training split and return ``self``.

        Parameters
        ----------
        adata
            The training data, as in :meth:`StateTransitionModel.fit`.
        split_config
            The split spec assigning cells to train/val/test (default: every cell trains).
        dataset_name
            The spec's dataset a single AnnData stands for.
        """
        self._check_params()
        prepared = prepare(adata, split_config, self._columns(), dataset_name=dataset_name)
        warn_training_scale(prepared, f"the {self.name} baseline")
        return self._fit_prepared(prepared)

    def _check_params(self) -> None:
        """Check the parameters (before any data are read): the seed, then the baseline's own."""
        as_seed(self.seed)
        self._validate_params()

    def _validate_params(self) -> None:
        """Check the baseline's own option values."""

    def _data_options(self) -> dict:
        """How the split data are built (:func:`statetx.run.attach_data`): the defaults."""
        return {}

    def _fit_prepared(self, prepared: PreparedData) -> _Baseline:
        self._check_params()
        before = self._learned_state()
        try:
            return self._learn(prepared)
        except BaseException:  # a failed refit leaves the fitted baseline as it was
            self._restore_learned(before)
            raise

    def _learn(self, prepared: PreparedData) -> _Baseline:
        v, d = prepared.vocab, prepared.splits["train"]
        control = v.control_pert
        x = d.X.numpy()
        frame = pd.DataFrame({
            "cell_type": np.asarray(v.cell_types, dtype=object)[d.cell_type],
            "perturbation": np.asarray(v.perturbations, dtype=object)[d.pert],
        })
        means: dict[tuple[str, str], np.ndarray] = {}
        rows = []
        for (ct, p), idx in sorted(frame.groupby(["cell_type", "perturbation"]).indices.items()):
            means[(ct, p)] = x[idx].mean(0, dtype=np.float64)
            rows.append((ct, p, len(idx), p == control))
        self.vocab_ = v
        self.columns_ = prepared.columns
        self.var_names_ = list(prepared.feature_names)
        self.n_features_in_ = prepared.input_dim
        self.is_log1p_ = bool(prepared.is_log1p)
        self.split_summary_ = prepared.summary
        self.means_ = means
        self.groups_ = pd.DataFrame(rows, columns=["cell_type", "perturbation", "n_cells",
                                                   "is_control"])
        self.control_means_ = {ct: m for (ct, p), m in means.items() if p == control}
        self.deltas_ = {(ct, p): m - self.control_means_[ct] for (ct, p), m in means.items()
                        if p != control and ct in self.control_means_}
        self.perturbed_cell_types_ = sorted({ct for ct, p in means if p != control})
        self.split_config_ = prepared.config
        self._prepared = prepared
        self._fit_baseline()
        return self

    def _fit_baseline(self) -> None:
        """Subclass hook: derive the baseline's parameters from ``means_`` / ``deltas_``."""

    # ------------------------------------------------------------------ predict hooks
    def _knows(self, pert: str) -> bool:
        """Whether a label without training cells has its own prediction rule (not a
        fallback)."""
        return False

    def _predict_group(self, cell_type: str, pert: str, basal: np.ndarray,
                       ctrl_mean: np.ndarray) -> np.ndarray:
        """Prediction ``[n, D]`` (or ``[D]``, broadcast) for the perturbed cells of one group."""
        raise NotImplementedError

    def _check_perturbations(self, groups: set[tuple[str, str]]) -> list[str]:
        """Validate the (cell type, perturbation) groups to predict; return notes (e.g.
        fallbacks) to report."""
        return []

    def _zeroshot_rule(self) -> str:
        """What the baseline predicts for a cell type without perturbed training cells."""
        return "predicted as for any other cell type"

    def _context_mean(self, cell_type: str) -> np.ndarray | None:
        """Mean of all perturbed training cells of ``cell_type`` (None when it has none)."""
        keys = [(ct, p) for (ct, p) in self.means_ if ct == cell_type
                and p != self.vocab_.control_pert]
        if not keys:
            return None
        n = self._counts()
        w = np.array([n[k] for k in keys], dtype=np.float64)
        return np.einsum("i,ij->j", w / w.sum(), np.stack([self.means_[k] for k in keys]))

    def _counts(self) -> dict[tuple[str, str], int]:
        g = self.groups_
        return dict(zip(zip(g["cell_type"], g["perturbation"]), g["n_cells"].astype(int)))

    # ------------------------------------------------------------------ fitted state
    def _check_fitted(self) -> None:
        """Fitted, and its options (read again when predicting; set_params may have changed
        them) valid."""
        if not hasattr(self, "means_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet. Call fit(...) "
                                 "first.")
        self._validate_params()

    @property
    def _expression_output(self) -> bool:
        return self.columns_.embed_key in (None, "X_hvg")

    def _pool_mode(self, basal_pool: str | None, batch_col: str | None = None) -> str:
        """``basal_pool`` checked; by default ``batch`` when the baseline has a batch column (ST's
        default pairing, fixed at fit); ``batch_col`` names the input's column only."""
        return resolve_pool(basal_pool, "batch" if self.columns_.batch_col else "cell_type",
                            batch_col or self.columns_.batch_col)

    @property
    def _scale(self) -> str:
        return output_scale(self._expression_output, self.is_log1p_)

    def _clip(self, clip: Any) -> tuple[float, float] | None:
        return clip_range(clip, self._expression_output, self.is_log1p_)

    def _output(self, pred: np.ndarray, obs: pd.DataFrame, clip: Any) -> ad.AnnData:
        rng = self._clip(clip)
        if rng is not None:
            pred = np.clip(pred, *rng)
        names = self.var_names_ if self._expression_output else [
            f"emb_{i}" for i in range(pred.shape[1])]
        return mark_scale(ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(
            index=pd.Index(names, dtype=str))), self._scale)

    def _run(self, x: np.ndarray, groups: Sequence[_Group], n_out: int,
             seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Predictions, basal rows and set ids of every output row, plus notes."""
        notes = self._check_perturbations({(g.cell_type, g.pert) for g in groups
                                           if not g.control})
        pred = np.zeros((n_out, x.shape[1]), dtype=np.float32)
        basal_row = np.full(n_out, -1, dtype=np.int64)
        set_id = np.full(n_out, -1, dtype=np.int64)
        ctrl_means: dict[tuple[int, int, int], np.ndarray] = {}
        zeroshot = set()
        for i, g in enumerate(groups):
            set_id[g.out_rows] = i
            if g.control:
                pred[g.out_rows] = x[g.src_rows]
                basal_row[g.out_rows] = g.src_rows
                continue
            draws = g.pool[group_rng(seed, g.key).integers(len(g.pool), size=len(g.out_rows))]
            key = (len(g.ctx_pool), int(g.ctx_pool[0]), int(g.ctx_pool[-1]))
            if key not in ctrl_means:
                ctrl_means[key] = x[g.ctx_pool].mean(0, dtype=np.float64)
            basal = x[draws].astype(np.float64)
            pred[g.out_rows] = self._predict_group(g.cell_type, g.pert, basal, ctrl_means[key])
            basal_row[g.out_rows] = draws
            if g.cell_type not in self.perturbed_cell_types_:
                zeroshot.add(g.cell_type)
        for n in notes:
            say(n)
        if zeroshot:
            notes.append(f"{self.name}: cell type(s) without perturbed training cells "
                         f"(zero-shot): {preview(sorted(zeroshot))}; {self._zeroshot_rule()}.")
            if self._zeroshot_is_fallback:
                say(notes[-1])
        return pred, basal_row, set_id, notes

    # ------------------------------------------------------------------ predict
    def predict(self, adata: ad.AnnData, *, pert_col: str | None = None,
                cell_type_col: str | bool | None = None, control_pert: str | None = None,
                cell_type_key: str | bool | None = None,
                batch_col: str | None = None, basal_pool: str | None = None,
                seed: int | None = None, basal_fallback: str = "error",
                unknown_perturbation: str = "error", predict_controls: bool = True,
                clip: Any = "auto", missing_genes: str = "error") -> ad.AnnData:
        """Predict the perturbed state of the cells of ``adata`` (options as ST's ``predict``).

        Every cell needs a perturbation label and a cell type (a baseline fitted on one cell
        type takes every cell as that one when the column is absent); basal cells are drawn
        (``seed``, default the estimator's) from the input's controls of the same cell type,
        and of the same batch (where it has controls) when the baseline has a ``batch_col``
        (``basal_pool``: ``"cell_type"`` or ``"batch"`` to choose; ``batch_col`` names the
        input's column if it differs; ``basal_fallback='all_controls'`` uses every control
        when a cell type has none).
        Labels not in the fitted vocabulary raise (except those a :class:`LinearBaseline`'s
        ``pert_embedding`` has a vector for: predicted from it), or are predicted as the control
        (``unknown_perturbation='control'``: the basal cell itself) or as a perturbation without
        training cells (``'zeros'``). Control cells are copied into the output as they are,
        whatever ``predict_controls``.

        Parameters
        ----------
        adata
            Cells on the training scale, controls included; genes are matched by name.
        pert_col, cell_type_col, control_pert
            The input's obs columns and control label (default: the fitted ones);
            ``cell_type_col=False`` takes every cell as one context.
        cell_type_key
            Another name for ``cell_type_col``.
        batch_col, basal_pool, basal_fallback, seed
            How basal cells are drawn, as above.
        unknown_perturbation, predict_controls
            Labels outside the fitted vocabulary, and control cells, as above.
        clip
            ``"auto"`` (default), None or a ``(low, high)`` pair, as in
            :meth:`StateTransitionModel.predict`.
        missing_genes
            Fitted genes absent from the input: ``"error"`` (default) or ``"zero"``.
        """
        self._check_fitted()
        c = self.columns_
        cols = input_columns(c, pert_col, cell_type_col, cell_type_key, control_pert, basal_pool)
        pert_col, control, ct_col = cols.pert_col, cols.control, cols.cell_type_col
        seed = as_seed(self.seed if seed is None else seed)
        if basal_fallback not in ("error", "all_controls"):
            raise ConfigError(f"basal_fallback={basal_fallback!r} is invalid; expected 'error' "
                              "or 'all_controls'.")
        pool_mode = self._pool_mode(cols.basal_pool, batch_col)
        batch_col = batch_col or c.batch_col
        x = input_matrix(adata, self.var_names_, c.embed_key, missing_genes, c.gene_name_col)
        if self._expression_output:
            check_input_scale(x, self.is_log1p_)
        pert, ctx, is_ctrl = input_labels(adata, pert_col, ct_col, control,
                                          self.vocab_.cell_types, cols.cell_type_given,
                                          pool_mode == "all")
        batch = pairing_batches(adata, batch_col, pool_mode == "batch")
        model_pert = pert.copy()  # the label each cell is predicted as
        # labels outside the training data that the baseline still has a rule for (a linear
        # baseline's embedding table) are known; the others are checked
        known = np.isin(pert, [*self.vocab_.perturbations, *filter(
            self._knows, set(pert[~is_ctrl]) - set(self.vocab_.perturbations))])
        encode_perturbations(pert[~is_ctrl & ~known], self.vocab_, unknown_perturbation)
        if unknown_perturbation == "control":
            model_pert[~is_ctrl & ~known] = c.control_pert
        rows = np.arange(adata.n_obs)  # controls are copied either way (predict_controls)
        ctrl_rows = np.flatnonzero(is_ctrl)
        groups = [_Group(g.rows, g.rows, g.pool, g.ctx_pool, g.key[0],
                         str(model_pert[g.rows[0]]), group_key(*g.key), g.key[1] == control)
                  for g in basal_groups(ctx, pert, batch, rows, ctrl_rows, ctx, batch,
                                        pool_mode, basal_fallback, copied=control)]
        pred, basal_row, set_id, notes = self._run(x, groups, len(rows), seed)
        obs = adata.obs.iloc[rows].copy()
        obs["statetx_ctrl_barcode"] = np.asarray(adata.obs_names)[basal_row]
        obs["statetx_set"] = set_id
        out = self._output(pred, obs, clip)
        out.uns["statetx"] = {"baseline": self.name, "seed": seed, "basal_pool": pool_mode,
                              "control_pert": control, "pert_col": pert_col,
                              **({"celltype_col": ct_col} if ct_col in out.obs else {}),
                              "scale": self._scale, "notes": "\n".join(notes)}
        return out

    def predict_split(self, split: str = "test", *, seed: int | None = None,
                      basal_pool: str | None = None,
                      clip: Any = "auto") -> tuple[ad.AnnData, ad.AnnData]:
        """Predict the cells of a split of the fitted spec: ``(adata_pred, adata_real)``.

        Same cells in the same order in both, obs as in ST's ``predict_split`` (perturbation,
        cell type and, with ``batch_col``, batch columns, ``pert_cell_barcode`` /
        ``ctrl_cell_barcode``), var the training data's gene annotations; basal cells
        are drawn from the split's controls of the same context with ST's keys, within the batch
        when the baseline has a ``batch_col`` (``basal_pool``: ``"cell_type"`` or ``"batch"`` to
        choose, e.g. ``"cell_type"`` to match an ST model with
        ``basal_mapping_strategy="random"``); both matrices are clipped alike.

        Parameters
        ----------
        split
            The split of the fitted spec (default ``"test"``).
        seed
            Seeds the basal draws (default: the estimator's ``seed``).
        basal_pool
            ``"cell_type"`` or ``"batch"``, as above (default: ``"batch"`` with a ``batch_col``).
        clip
            ``"auto"`` (default), None or a ``(low, high)`` pair, applied to both matrices (as in
            :meth:`StateTransitionModel.predict`).
        """
        self._check_fitted()
        prepared = getattr(self, "_prepared", None)
        if prepared is None:
            raise DataError("predict_split needs the split data, which are not kept when a "
                            "baseline is pickled: statetx.run.attach_data(model, adata=...) "
                            "rebuilds them (or use predict(adata)).")
        if split not in prepared.splits:
            raise DataError(f"the fitted split spec has no '{split}' split (available: "
                            f"{', '.join(prepared.splits)}).")
        seed = as_seed(self.seed if seed is None else seed)
        d, v, c = prepared.splits[split], prepared.vocab, self.columns_
        perts = np.asarray(v.perturbations, dtype=object)
        cts = np.asarray(v.cell_types, dtype=object)
        cells, order = split_groups(prepared, d, self._pool_mode(basal_pool))
        groups = [_Group(rows, g.rows, g.pool, g.ctx_pool, str(cts[d.cell_type[g.rows[0]]]),
                         str(perts[g.key[1]]), key, bool(d.is_control[g.rows[0]]))
                  for rows, g, key in cells]
        x = d.X.numpy()
        pred, basal_row, set_id, notes = self._run(x, groups, len(order), seed)
        obs = split_cell_obs(prepared, d, order, basal_row,
                             split_datasets(prepared, d, order, cts[d.cell_type[order]]))
        out = with_training_var(self._output(pred, obs.copy(), clip), prepared)
        info = {"split": split, "seed": seed, "pert_col": c.pert_col,
                "control_pert": v.control_pert, "celltype_col": c.cell_type_key,
                "scale": self._scale}
        out.uns["statetx"] = {"baseline": self.name, **info, "notes": "\n".join(notes)}
        rng = self._clip(clip)
        real_x = np.asarray(x[order], dtype=np.float32)
        if rng is not None:
            real_x = np.clip(real_x, *rng)
        real = mark_scale(ad.AnnData(X=real_x, obs=obs.copy(), var=out.var.copy()), self._scale)
        real.uns["statetx"] = info
        return out, real

    # ST's score works unchanged on a baseline (it only uses predict and the fitted columns).
    score = StateTransitionModel.score
    feature_names_in_ = StateTransitionModel.feature_names_in_

    # ------------------------------------------------------------------ pickling
    def __deepcopy__(self, memo: dict) -> _Baseline:
        return deepcopy_sharing(self, memo)  # (the copy can predict_split: same data)


class ControlMeanBaseline(_Baseline):
    """The "no effect" floor: a perturbed cell is predicted as its control state.

    Uses no perturbed cells, so a zero-shot cell type is predicted exactly the same way.

    Parameters
    ----------
    mode
        ``"copy"`` (default, the identity model): its own sampled basal control cell;
        ``"mean"``: the mean of the input's control cells of its cell type (one constant per
        group).
    pert_col, cell_type_key, batch_col, control_pert
        obs columns holding the perturbation, the context (cell type) and (optionally) the
        batch; the control label (auto-detected among ``non-targeting`` / ``DMSO_TF`` when
        None). With ``batch_col``, basal cells are drawn from the controls of the same batch
        where it has some (ST's default pairing).
    embed_key
        Cell representation: None = X; else an obsm key, ``X_hvg`` (genes) or an embedding
        (outputs named ``emb_0``, ``emb_1``, ...).
    gene_name_col
        var column holding the gene names (e.g. symbols when ``var_names`` are Ensembl IDs);
        genes are matched and outputs named by it. None = ``var_names``.
    seed
        Seeds the basal draws: the default ``seed`` of :meth:`predict` and
        :meth:`predict_split`.

    Attributes
    ----------
    means_, groups_
        The mean (float64) of each (cell type, perturbation) group of the training split, keyed
        by that pair, and a table of the groups (``cell_type``, ``perturbation``, ``n_cells``,
        ``is_control``).
    control_means_, deltas_
        Each cell type's control mean, and each perturbed group's mean minus it.
    perturbed_cell_types_
        Cell types with perturbed training cells (the others are zero-shot).
    vocab_, columns_
        Perturbation / cell-type / batch vocabularies and the obs columns the baseline reads.
    var_names_, n_features_in_, is_log1p_
        Input features in training order, and whether the training expression was log1p.
    split_config_, split_summary_
        The validated split spec and the cells / perturbations per split and context.
    """

    name = "control_mean"

    def __init__(self, mode: str = "copy", *, pert_col: str = "gene",
                 cell_type_key: str = "cell_type", batch_col: str | None = None,
                 control_pert: str | None = None, embed_key: str | None = None,
                 gene_name_col: str | None = None, seed: int = 42) -> None:
        super().__init__(pert_col=pert_col, cell_type_key=cell_type_key, batch_col=batch_col,
                         control_pert=control_pert, embed_key=embed_key,
                         gene_name_col=gene_name_col, seed=seed)
        self.mode = mode

    def _validate_params(self) -> None:
        if self.mode not in ("copy", "mean"):
            raise ConfigError(f"mode={self.mode!r} is invalid; expected 'copy' or 'mean'.")

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        return basal if self.mode == "copy" else ctrl_mean

    def _zeroshot_rule(self) -> str:
        return "predicted like every cell type (controls only)"


class ContextMeanBaseline(_Baseline):
    """Every perturbed cell of cell type c = the mean of all perturbed training cells of c.

    Cells are weighted equally (perturbations pooled); controls are returned unchanged.

    Parameters
    ----------
    zeroshot_fallback
        The prediction for a zero-shot cell type (no perturbed training cells):
        ``"control_mean"`` (default, as arc-state 0.11.1; metrics.md §13) the mean of the
        input's control cells of c, i.e. no change at all, said in the prediction's notes;
        ``"train_mean"`` the unweighted mean over the training cell types of their
        perturbed-cell means (Systema's "train mean"; the control mean when no training cell
        type has perturbed cells).
    pert_col, cell_type_key, batch_col, control_pert, embed_key, gene_name_col, seed
        The data columns, control label, input representation and seed, as in
        :class:`ControlMeanBaseline`.

    Attributes
    ----------
    context_means_, train_mean_
        The mean of the perturbed training cells of each cell type that has some, and the
        unweighted mean of those means (None when there are none).
    means_, control_means_, deltas_, groups_, vocab_, columns_, var_names_
        The fitted attributes every baseline has (see :class:`ControlMeanBaseline`).
    """

    name = "context_mean"
    _zeroshot_is_fallback = True

    def __init__(self, zeroshot_fallback: str = "control_mean", *, pert_col: str = "gene",
                 cell_type_key: str = "cell_type", batch_col: str | None = None,
                 control_pert: str | None = None, embed_key: str | None = None,
                 gene_name_col: str | None = None, seed: int = 42) -> None:
        super().__init__(pert_col=pert_col, cell_type_key=cell_type_key, batch_col=batch_col,
                         control_pert=control_pert, embed_key=embed_key,
                         gene_name_col=gene_name_col, seed=seed)
        self.zeroshot_fallback = zeroshot_fallback

    def _validate_params(self) -> None:
        if self.zeroshot_fallback not in ("control_mean", "train_mean"):
            raise ConfigError(f"zeroshot_fallback={self.zeroshot_fallback!r} is invalid; "
                              "expected 'control_mean' or 'train_mean'.")

    def _fit_baseline(self) -> None:
        self.context_means_ = {ct: self._context_mean(ct) for ct in self.perturbed_cell_types_}
        self.train_mean_ = (np.mean(np.stack(list(self.context_means_.values())), 0)
                            if self.context_means_ else None)

    def _fallback(self, ctrl_mean: np.ndarray) -> np.ndarray:
        if self.zeroshot_fallback == "train_mean" and self.train_mean_ is not None:
            return self.train_mean_
        return ctrl_mean

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        if pert == self.vocab_.control_pert:
            return basal
        m = self.context_means_.get(cell_type)
        return self._fallback(ctrl_mean) if m is None else m

    def _zeroshot_rule(self) -> str:
        if self.zeroshot_fallback == "train_mean" and self.train_mean_ is not None:
            return "predicting the mean over training cell types of their perturbed-cell means"
        return "predicting the cell type's control mean"


class PerturbMeanBaseline(_Baseline):
    """Basal control cell + the perturbation's mean shift across training cell types.

    δ_p = average over the training cell types c where p occurs of (mean(c, p) − mean(c, control)).
    The shift does not depend on the cell type, so a zero-shot cell type gets its basal cells
    shifted by the same δ_p. A perturbation without perturbed training cells (in the vocabulary
    but only in held-out data, or mapped by ``unknown_perturbation='zeros'``) gets δ = 0, i.e. its
    basal cell (reported in the notes).

    Parameters
    ----------
    pert_col, cell_type_key, batch_col, control_pert, embed_key, gene_name_col, seed
        The data columns, control label, input representation and seed, as in
        :class:`ControlMeanBaseline`.

    Attributes
    ----------
    shifts_
        δ_p of every perturbation with perturbed training cells.
    means_, control_means_, deltas_, groups_, vocab_, columns_, var_names_
        The fitted attributes every baseline has (see :class:`ControlMeanBaseline`).
    """

    name = "perturb_mean"

    def _fit_baseline(self) -> None:
        by_pert: dict[str, list[np.ndarray]] = {}
        for (_, p), dlt in self.deltas_.items():
            by_pert.setdefault(p, []).append(dlt)
        self.shifts_ = {p: np.mean(np.stack(v), 0) for p, v in sorted(by_pert.items())}

    def _check_perturbations(self, groups: set[tuple[str, str]]) -> list[str]:
        unseen = sorted({p for _, p in groups if p not in self.shifts_
                         and p != self.vocab_.control_pert})
        return [f"{self.name}: perturbation(s) without perturbed training cells get a zero shift "
                f"(basal control cells): {preview(unseen)}."] if unseen else []

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        shift = self.shifts_.get(pert)
        return basal if shift is None else basal + shift

    def _zeroshot_rule(self) -> str:
        return "basal cells shifted by the perturbation's mean shift over training cell types"


class AdditiveBaseline(PerturbMeanBaseline):
    """The additive model of combinatorial perturbations: ``A+B`` = basal + δ_A + δ_B.

    Every label, single or combined, seen in training or not, is predicted as its basal control
    cell plus the sum of its parts' shifts. A part's shift in cell type c is its mean shift there
    when it has single-perturbation training cells in c, else its mean shift over the training
    cell types that have them (perturb_mean's δ; said in the notes). So single perturbations are
    predicted as by ``perturb_mean`` unless they trained in the very cell type predicted; a
    held-out pair is the sum of its singles, the reference that combinatorial models must beat
    (Norman et al. 2019; Ahlmann-Eltze, Huber & Anders 2025). Parts without single-perturbation
    training cells add nothing (said in the notes).

    Parameters
    ----------
    sep
        The (non-empty) string a label is split into its parts at. The control label and empty
        parts count as no perturbation, so GEARS' ``A+ctrl`` is the single ``A``.
    pert_col, cell_type_key, batch_col, control_pert, embed_key, gene_name_col, seed
        The data columns, control label, input representation and seed, as in
        :class:`ControlMeanBaseline`.

    Attributes
    ----------
    part_shifts_, part_deltas_
        Each part's mean shift over the training cell types, and its shift per cell type
        (keyed ``(cell type, part)``), from the labels naming it alone (``A``, or GEARS'
        ``A+ctrl``; the plain label wins where both exist).
    shifts_
        The :class:`PerturbMeanBaseline` shift of every label with perturbed training cells.
    means_, control_means_, deltas_, groups_, vocab_, columns_, var_names_
        The fitted attributes every baseline has (see :class:`ControlMeanBaseline`).
    """

    name = "additive"

    def __init__(self, sep: str = "+", *, pert_col: str = "gene",
                 cell_type_key: str = "cell_type", batch_col: str | None = None,
                 control_pert: str | None = None, embed_key: str | None = None,
                 gene_name_col: str | None = None, seed: int = 42) -> None:
        super().__init__(pert_col=pert_col, cell_type_key=cell_type_key, batch_col=batch_col,
                         control_pert=control_pert, embed_key=embed_key,
                         gene_name_col=gene_name_col, seed=seed)
        self.sep = sep

    def _validate_params(self) -> None:
        check_sep(self.sep)

    def _fit_baseline(self) -> None:
        super()._fit_baseline()
        # the parts' shifts: of labels naming one perturbation ("A", or GEARS' "A+ctrl"; the
        # plain label wins where both exist)
        single = {p: ps[0] for p in self.shifts_ if len(ps := self._parts(p)) == 1}
        plain_last = sorted(single, key=lambda p: p == single[p])
        self.part_shifts_ = {single[p]: self.shifts_[p] for p in plain_last}
        self.part_deltas_ = {(ct, single[p]): self.deltas_[(ct, p)] for p in plain_last
                             for ct in self.perturbed_cell_types_ if (ct, p) in self.deltas_}

    def _parts(self, pert: str) -> list[str]:
        return label_parts(pert, self.sep, self.vocab_.control_pert)

    def _knows(self, pert: str) -> bool:
        parts = self._parts(pert)
        return bool(parts) and all(q in self.part_shifts_ for q in parts)

    def _check_perturbations(self, groups: set[tuple[str, str]]) -> list[str]:
        parts = {(ct, q) for ct, p in groups for q in self._parts(p)}
        notes = []
        unseen = sorted({q for _, q in parts if q not in self.part_shifts_})
        if unseen:
            hint = did_you_mean(unseen[0], self.part_shifts_)
            joined = [c for c in ("+", "_", "|", ";", "/", "-") if c != self.sep
                      and any(c in q for q in unseen)]
            if joined and not any(self.sep in p for p in self.shifts_):
                hint += (f" No training label contains sep={self.sep!r}; if the labels are "
                         f"joined by {joined[0]!r}, pass sep={joined[0]!r}.")
            notes.append(f"{self.name}: part(s) without single-perturbation training cells add "
                         f"no shift: {preview(unseen)}.{hint}")
        borrowed: dict[str, set[str]] = {}
        for ct, q in parts:
            if q in self.part_shifts_ and (ct, q) not in self.part_deltas_:
                borrowed.setdefault(q, set()).add(ct)
        if borrowed:
            said = [f"{q} in {', '.join(sorted(cts))} (from "
                    f"{', '.join(c for c, q2 in self.part_deltas_ if q2 == q)})"
                    for q, cts in sorted(borrowed.items())]
            notes.append(f"{self.name}: part(s) without single-perturbation training cells in "
                         f"the cell type predicted take their mean shift over the cell types that "
                         f"have them: {preview(said)}.")
        return notes

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        shift = 0.0
        for q in self._parts(pert):
            d = self.part_deltas_.get((cell_type, q), self.part_shifts_.get(q))
            if d is not None:
                shift = shift + d
        return basal + shift

    def _zeroshot_rule(self) -> str:
        return "basal cells shifted by the sum of the parts' mean shifts over training cell types"


class CellMeanBaseline(_Baseline):
    """The VCC cell-mean baseline: every perturbed cell = one constant vector b.

    b = unweighted mean of the pseudobulks of all (cell type, perturbation) groups of the training
    split, **control groups included** (as ``cell-eval baseline``; with one cell type this is the
    VCC definition). Control cells are returned unchanged. b ignores the cell type, so a
    zero-shot cell type also gets b. The training split holds the held-out cell types' control
    cells too (by default, ``heldout_controls_in_train``), so their control groups are among
    the groups b averages.

    Parameters
    ----------
    pert_col, cell_type_key, batch_col, control_pert, embed_key, gene_name_col, seed
        The data columns, control label, input representation and seed, as in
        :class:`ControlMeanBaseline`.

    Attributes
    ----------
    cell_mean_
        b.
    means_, control_means_, deltas_, groups_, vocab_, columns_, var_names_
        The fitted attributes every baseline has (see :class:`ControlMeanBaseline`).
    """

    name = "cell_mean"

    def _fit_baseline(self) -> None:
        self.cell_mean_ = np.mean(np.stack(list(self.means_.values())), 0)

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        return basal if pert == self.vocab_.control_pert else self.cell_mean_

    def _zeroshot_rule(self) -> str:
        return "predicting the global cell mean, as everywhere"


class LinearBaseline(_Baseline):
    """Linear model of Ahlmann-Eltze, Huber & Anders (2025), on pseudobulk deltas.

    Y (features × N) holds one column per training (cell type, perturbation): its mean minus the
    cell type's control mean; b = row mean of Y. G = top-``n_components`` principal components
    (gene scores U·S) of Y − b1ᵀ; P (N × d) = the perturbation embedding of each column's
    perturbation; W = (GᵀG + λI)⁻¹ Gᵀ (Y − b1ᵀ) P (PᵀP + λI)⁻¹ with λ = ``ridge``. The predicted
    delta of perturbation p is ŷ_p = G W p⃗ + b. With a single perturbation (or one-hot vectors
    identical across cell types) the fit degrades to b, the perturb-mean shift.

    Zero-shot cell type: the model is fitted on the training cell types' deltas only and ŷ_p
    does not depend on the cell type, so the held-out cell type gets its basal cells (or its
    control mean) + ŷ_p.

    Parameters
    ----------
    n_components, ridge
        Principal components kept in G (at most the rank of Y − b1ᵀ), and λ ≥ 0, the ridge
        penalty of both solves.
    pert_embedding
        p⃗: ``"genes"`` (self-trained: the row of G of the gene p targets, for perturbations
        named after a measured feature), ``"onehot"`` (training perturbations; fitting a
        ridge-shrunk rank-K version of each perturbation's mean delta), a name → vector mapping
        or a feature file (``.pt``/``.npz``/``.csv``/``.safetensors``), or ``"auto"`` (default:
        ``"genes"`` when every training perturbation names a measured gene, else ``"onehot"``).
    cell_mode
        ``"basal_shift"`` (default): each basal cell + ŷ_p; ``"constant"``: every cell equals
        the cell type's control mean (input controls) + ŷ_p. Control cells are returned
        unchanged.
    on_missing
        Perturbations without a vector: ``"error"`` (default, listing them; with the one-hot
        embedding, whose held-out perturbations never have one, ``"mean"`` with a notice),
        ``"mean"`` (zero vector: ŷ = b, the average training delta) or ``"context_mean"`` (the
        mean of the cell type's perturbed training cells, as :class:`ContextMeanBaseline`; its
        control mean for a zero-shot cell type). Training perturbations without a vector in a
        given embedding are an error, or (``"mean"`` / ``"context_mean"``) left out of the fit.
    pert_col, cell_type_key, batch_col, control_pert, embed_key, gene_name_col, seed
        The data columns, control label, input representation and seed, as in
        :class:`ControlMeanBaseline`.

    Attributes
    ----------
    bias_, gene_embedding_, coef_
        b, G (features × k, k ≤ ``n_components``) and W (k × d).
    embedding_source_, pert_vectors_
        ``"genes"``, ``"onehot"`` or ``"external"`` (a given embedding), and the vectors p⃗ by
        perturbation (None for ``"genes"``: the rows of G).
    means_, control_means_, deltas_, groups_, vocab_, columns_, var_names_
        The fitted attributes every baseline has (see :class:`ControlMeanBaseline`).
    """

    name = "linear"

    def __init__(self, n_components: int = 10, ridge: float = 0.1,
                 pert_embedding: str | Mapping[str, Any] | Path = "auto",
                 cell_mode: str = "basal_shift", on_missing: str = "error", *,
                 pert_col: str = "gene", cell_type_key: str = "cell_type",
                 batch_col: str | None = None, control_pert: str | None = None,
                 embed_key: str | None = None, gene_name_col: str | None = None,
                 seed: int = 42) -> None:
        super().__init__(pert_col=pert_col, cell_type_key=cell_type_key, batch_col=batch_col,
                         control_pert=control_pert, embed_key=embed_key,
                         gene_name_col=gene_name_col, seed=seed)
        self.n_components = n_components
        self.ridge = ridge
        self.pert_embedding = pert_embedding
        self.cell_mode = cell_mode
        self.on_missing = on_missing

    def _validate_params(self) -> None:
        if self.cell_mode not in ("basal_shift", "constant"):
            raise ConfigError(f"cell_mode={self.cell_mode!r} is invalid; expected 'basal_shift' "
                              "or 'constant'.")
        if self.on_missing not in ("error", "mean", "context_mean"):
            raise ConfigError(f"on_missing={self.on_missing!r} is invalid; expected 'error', "
                              "'mean' or 'context_mean'.")
        as_count("n_components", self.n_components)
        if (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float, np.number))
                or not self.ridge >= 0):
            raise ConfigError(f"ridge={self.ridge!r} is invalid; expected a number >= 0.")
        e = self.pert_embedding
        if isinstance(e, str) and e in ("auto", "genes", "onehot"):
            return
        if not isinstance(e, (str, Path, Mapping)):
            raise ConfigError("pert_embedding must be 'auto', 'genes', 'onehot', a name -> vector "
                              f"mapping or a feature file path, got {type(e).__name__}.")

    def _fit_baseline(self) -> None:
        trained = sorted({p for _, p in self.deltas_})
        if not trained:
            raise DataError("LinearBaseline needs perturbed training cells (with controls of the "
                            "same cell type); the training split has none.")
        e = self.pert_embedding
        if isinstance(e, str) and e in ("auto", "genes", "onehot"):
            genes = set(self.var_names_) if self._expression_output else set()
            source = e if e != "auto" else ("genes" if set(trained) <= genes else "onehot")
            table = None
        else:
            raw = load_pert_features(e) if isinstance(e, (str, Path)) else dict(e)
            names, vectors = feature_table(raw, [], self.vocab_.control_pert)
            source, table = "external", dict(zip(names, vectors.astype(np.float64)))
        if source == "genes":
            absent = [p for p in trained if p not in self.var_names_]
            if absent:
                raise DataError(f"pert_embedding='genes' needs perturbations named after measured "
                                f"features; not among the features: {preview(absent)}. Use "
                                "'onehot' or give an embedding.")
        self.embedding_source_ = source
        self.pert_vectors_ = table if source == "external" else (
            {p: np.eye(len(trained))[i] for i, p in enumerate(trained)} if source == "onehot"
            else None)
        cols = sorted(k for k in self.deltas_ if source == "genes" or k[1] in self.pert_vectors_)
        dropped = sorted({p for _, p in self.deltas_} - {p for _, p in cols})
        if dropped and (self.on_missing == "error" or not cols):
            raise DataError(f"{len(dropped)} training perturbation(s) have no embedding vector: "
                            f"{preview(dropped)}. Add them, or pass on_missing='mean' / "
                            "'context_mean' to fit without them.")
        if dropped:
            say(f"linear: fitting without {len(dropped)} training perturbation(s) "
                f"that have no embedding: {preview(dropped)}.")
        y = np.stack([self.deltas_[k] for k in cols], 1)  # [D, N]
        self.bias_ = y.mean(1)
        u, s, _ = np.linalg.svd(y - self.bias_[:, None], full_matrices=False)
        k = int(min(int(self.n_components), int((s > max(s[0], 1e-300) * 1e-9).sum())))
        self.gene_embedding_ = u[:, :k] * s[:k]  # G [D, k]
        p_mat = np.stack([self._vector(p) for _, p in cols])  # [N, d]
        lam = float(self.ridge)
        g = self.gene_embedding_
        if k == 0:
            self.coef_ = np.zeros((0, p_mat.shape[1]))
        else:
            a = np.linalg.solve(g.T @ g + lam * np.eye(k), g.T @ (y - self.bias_[:, None]))
            pp = p_mat.T @ p_mat + lam * np.eye(p_mat.shape[1])
            self.coef_ = np.linalg.lstsq(pp, (a @ p_mat).T, rcond=None)[0].T  # W [k, d]

    def _vector(self, pert: str) -> np.ndarray | None:
        if self.embedding_source_ == "genes":
            try:
                return self.gene_embedding_[self.var_names_.index(pert)]
            except ValueError:
                return None
        return self.pert_vectors_.get(pert)

    def _knows(self, pert: str) -> bool:
        return self._vector(pert) is not None

    def _check_perturbations(self, groups: set[tuple[str, str]]) -> list[str]:
        missing = sorted({p for _, p in groups if p != self.vocab_.control_pert
                          and self._vector(p) is None})
        if not missing:
            return []
        if self.on_missing == "error" and self.embedding_source_ == "onehot":
            # a one-hot embedding has no vector for a perturbation without training cells by
            # construction: the average training delta, as perturb_mean's zero shift, said
            return [f"linear: perturbation(s) without training cells have no one-hot vector: "
                    f"{preview(missing)}; predicting the average training delta "
                    "(pass on_missing='context_mean' for the context-mean prediction instead)."]
        if self.on_missing == "error":
            raise DataError(
                f"LinearBaseline ({self.embedding_source_} embedding) has no vector for "
                f"{len(missing)} perturbation(s): {preview(missing)}. Give an embedding that "
                "covers them, or pass on_missing='mean' or 'context_mean'."
            )
        rule = ("the average training delta" if self.on_missing == "mean"
                else "the context-mean prediction")
        return [f"linear: no embedding vector for {preview(missing)}; predicting {rule}."]

    def delta(self, pert: str) -> np.ndarray:
        """Predicted mean shift ŷ_p (G W p⃗ + b) of the perturbation label ``pert``; a label
        without an embedding vector, or with a zero one, gives b."""
        self._check_fitted()
        vec = self._vector(pert)
        if vec is None:
            return self.bias_.copy()
        return self.gene_embedding_ @ (self.coef_ @ vec) + self.bias_

    def _predict_group(self, cell_type, pert, basal, ctrl_mean):
        if pert == self.vocab_.control_pert:
            return basal
        if self._vector(pert) is None and self.on_missing == "context_mean":
            m = self._context_mean(cell_type)
            return ctrl_mean if m is None else m
        shift = self.delta(pert)
        return basal + shift if self.cell_mode == "basal_shift" else ctrl_mean + shift

    def _zeroshot_rule(self) -> str:
        base = "basal cells" if self.cell_mode == "basal_shift" else "the control mean"
        return f"{base} + the delta fitted on the training cell types"


BASELINES: dict[str, type[_Baseline]] = {
    "control_mean": ControlMeanBaseline,
    "context_mean": ContextMeanBaseline,
    "perturb_mean": PerturbMeanBaseline,
    "cell_mean": CellMeanBaseline,
    "linear": LinearBaseline,
    "additive": AdditiveBaseline,
}
#: what :func:`fit_all_baselines` fits by default: ``additive`` predicts held-out single
#: perturbations as ``perturb_mean`` does (it differs only in cell types where the single
#: trained), so it is fitted when asked for (data with combined labels)
DEFAULT_BASELINES = ("control_mean", "context_mean", "perturb_mean", "cell_mean", "linear")


def fit_all_baselines(adata: DataInput = None,
                      split_config: SplitConfig | dict | str | Path | None = None, *,
                      dataset_name: str | None = None,
                      baselines: Sequence[str] | Mapping[str, dict] | None = None,
                      **columns: Any) -> dict[str, _Baseline]:
    """Fit several baselines on one prepared copy of the data; ``{name: fitted estimator}``.

    Parameters
    ----------
    adata, split_config, dataset_name
        As in :meth:`StateTransitionModel.fit`: one AnnData, a dict name → AnnData, or None for
        the spec's ``[datasets]`` files; the split spec (without it every cell trains); the
        spec's name for a single ``adata``. The data are read and checked once for all.
    baselines
        Names of :data:`BASELINES` (default :data:`DEFAULT_BASELINES`: all but ``additive``,
        which predicts held-out single perturbations as ``perturb_mean``), or a mapping of names
        to extra parameters, e.g. ``{"linear": {"ridge": 1.0}, "context_mean": {}}``.
    **columns
        The shared constructor parameters: ``pert_col``, ``cell_type_key``, ``batch_col``,
        ``control_pert``, ``embed_key``, ``gene_name_col``, ``seed`` (any other is an error).

    Returns
    -------
    dict
        ``{name: fitted estimator}``, in the order of ``baselines``.
    """
    allowed = {"pert_col", "cell_type_key", "batch_col", "control_pert", "embed_key",
               "gene_name_col", "seed"}
    bad = sorted(set(columns) - allowed)
    if bad:
        raise ConfigError(f"fit_all_baselines got unknown parameter(s) {', '.join(bad)}; shared "
                          f"parameters are {', '.join(sorted(allowed))} (per-baseline options go "
                          "in baselines={name: {...}}).")
    spec = dict(baselines) if isinstance(baselines, Mapping) else {
        n: {} for n in (baselines if baselines is not None else DEFAULT_BASELINES)}
    unknown = [n for n in spec if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {', '.join(map(repr, unknown))}; available: "
                          f"{', '.join(BASELINES)}.")
    models = {n: BASELINES[n](**columns, **(opts or {})) for n, opts in spec.items()}
    if not models:
        return {}
    for m in models.values():
        m._check_params()
    prepared = prepare(adata, split_config, next(iter(models.values()))._columns(),
                       dataset_name=dataset_name)
    warn_training_scale(prepared, "each baseline")
    return {n: m._fit_prepared(prepared) for n, m in models.items()}
