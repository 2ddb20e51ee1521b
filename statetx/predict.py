"""Applying a fitted network to cells: windows, basal draws, batched forward passes.

Both prediction paths — new data (``StateTransitionModel.predict``) and the held-out split
(``predict_split``) — group their cells with :func:`basal_groups` (cells that share a context and
a perturbation, plus the control pool they draw basal cells from) and run the resulting
:class:`Group` list through :func:`run_groups`. Sets never mix contexts or perturbations, windows
are balanced (sizes differ by at most one), nothing is zero-padded: windows of different lengths
share a forward pass through the network's ``valid_mask``.
"""

from __future__ import annotations

import contextlib
import hashlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from statetx._heap import retained_heap
from statetx._utils import (
    LOG1P_MAX,
    MATMUL_PRECISIONS,
    all_integers,
    as_count,
    cell_type_option,
    did_you_mean,
    log1p_depth,
    looks_log1p,
    matmul_precision_scope,
    preview,
    repeated,
    sample_rows,
    say,
    warn,
    warn_view_becomes_copy,
)
from statetx.config import ColumnMap, check_distinct_columns
from statetx.data import (
    PreparedData,
    SplitData,
    batch_in_context,
    group_labels,
    negative_values_message,
)
from statetx.errors import ConfigError, DataError
from statetx.io import control_like, gene_names, hvg_names, layer_hint, obs_labels
from statetx.nn import STOutput
from statetx.sets import pert_inputs
from statetx.vocab import Vocab

EXPRESSION_CLIP = (0.0, 14.0)


@dataclass
class Group:
    """Output rows of one (context, perturbation) group and the pool its basal cells come from
    (or, with ``basal``, each row's own basal cell: no draws)."""

    out_rows: np.ndarray    # positions in the output
    pool: np.ndarray        # row indices into the basal source matrix
    pert_index: int         # vocabulary index (-1 = zero vector)
    batch_index: np.ndarray  # per out row (int64), 0 when the model has no batch encoder
    key: str                # seeds the group's basal draws
    basal: np.ndarray | None = None  # fixed basal rows, one per out row


def windows(n: int, set_len: int, mode: str = "balanced") -> list[np.ndarray]:
    """Split ``range(n)`` into ⌈n/S⌉ windows: balanced sizes, or reference-style chunks of S."""
    if mode == "balanced":
        return np.array_split(np.arange(n), max(1, -(-n // set_len)))
    if mode == "reference":
        return [np.arange(i, min(i + set_len, n)) for i in range(0, n, set_len)]
    raise ConfigError(f"windows={mode!r} is invalid; expected 'balanced' or 'reference'.")


def group_rng(seed: int, key: str) -> np.random.Generator:
    """Generator for one group: depends on the seed and the group's labels only."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def no_cell_types(cell_type_col: str | bool | None, basal_pool: str | None) -> str | None:
    """``cell_type_col=False`` (all cells one context) pools every control: ``basal_pool``
    becomes ``"all"``, and another explicit pool is an error."""
    if cell_type_col is not False:
        return basal_pool
    if basal_pool not in (None, "all"):
        raise ConfigError(f"cell_type_col=False makes all cells one context, which pools every "
                          f"control; it cannot go with basal_pool={basal_pool!r}.")
    return "all"


@dataclass(frozen=True)
class InputColumns:
    """What a prediction reads from its input: a call's options over the model's columns."""

    pert_col: str
    control: str
    cell_type_col: str | None  # None: all cells form one context (cell_type_col=False)
    cell_type_given: bool  # a cell-type column (or False) was passed: its absence is an error
    basal_pool: str | None


def input_columns(columns: ColumnMap, pert_col: str | None, cell_type_col: str | bool | None,
                  cell_type_key: str | bool | None, control_pert: str | None,
                  basal_pool: str | None) -> InputColumns:
    """The columns and control label of a ``predict`` (``score``, a baseline's ``predict``)
    call: the call's, else the model's (``cell_type_key`` is ``cell_type_col``'s other name)."""
    given = cell_type_option("cell_type_col", cell_type_col, cell_type_key)
    check_distinct_columns(pert_col or columns.pert_col,
                           None if given is False else (given or columns.cell_type_key), None,
                           "cell_type_col")
    return InputColumns(
        pert_col=pert_col or columns.pert_col,
        control=columns.control_pert if control_pert is None else str(control_pert),  # as fit
        cell_type_col=None if given is False else (given or columns.cell_type_key),
        cell_type_given=given is not None,
        basal_pool=no_cell_types(given, basal_pool))


def resolve_pool(basal_pool: str | None, default: str, batch_col: str | None,
                 choices: tuple[str, ...] = ("cell_type", "batch", "all")) -> str:
    """Where basal cells come from: ``basal_pool`` (else ``default``), checked; ``"batch"``
    needs a batch column."""
    mode = basal_pool or default
    if mode not in choices:
        raise ConfigError(f"basal_pool={mode!r} is invalid; expected "
                          f"{', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}.")
    if mode == "batch" and not batch_col:
        raise ConfigError("basal_pool='batch' needs a batch column (batch_col=<column>).")
    return mode


def pairing_batches(adata: ad.AnnData, batch_col: str | None, needed: bool) -> np.ndarray:
    """Each input cell's batch label where they are needed (pairing within batches, a batch
    encoder), else one batch for all; a missing column is an error naming both ways out."""
    if not (needed and batch_col):
        return np.full(adata.n_obs, "0", dtype=object)
    if batch_col not in adata.obs.columns:
        raise DataError(
            f"the input has no obs column '{batch_col}': basal cells are paired with controls of "
            f"the same batch.{did_you_mean(batch_col, map(str, adata.obs.columns))} Pass "
            "batch_col=<column>, or basal_pool='cell_type' to pair within the cell type.")
    return obs_labels(adata.obs, batch_col, "the input", "batch_col")


@dataclass
class BasalGroup:
    """Cells of one (context, perturbation[, batch]) group and the controls they start from."""

    key: tuple              # its labels: (context, perturbation) or (context, perturbation, batch)
    rows: np.ndarray        # its cells
    pool: np.ndarray        # control rows its basal cells are drawn from
    ctx_pool: np.ndarray    # control rows of its context (their mean: the context's control mean)


def basal_groups(ctx: np.ndarray, pert: np.ndarray, batch: np.ndarray | None, rows: np.ndarray,
                 ctrl_rows: np.ndarray, ctrl_ctx: np.ndarray, ctrl_batch: np.ndarray | None,
                 mode: str, fallback: str = "error", copied: object = None,
                 describe: Callable[[Any, Any], str] = "{1} in {0}".format
                 ) -> list[BasalGroup]:
    """Group the cells ``rows`` by (context, perturbation), and by batch under ``mode="batch"``,
    in sorted order, each with the control rows its basal cells are drawn from: the context's
    (``"cell_type"``), those of its batch where the context has some there, else the context's
    (``"batch"``), or every control (``"all"``). ``ctx`` / ``pert`` / ``batch`` are indexed by
    cell, ``ctrl_ctx`` / ``ctrl_batch`` by control row. A context without controls is an error,
    or draws from every control with ``fallback="all_controls"``; groups of the ``copied``
    perturbation (controls returned as they are) need no controls. Every prediction path (ST and
    the baselines, new data and splits) groups cells here, so ST and a baseline predicting the
    same cells with the same seed draw the same basal cells. Cells of a batch without controls
    of their context draw from the context's, which is said (``describe(context, batch)`` names
    them)."""
    by_batch = mode == "batch"
    frame = pd.DataFrame({"ctx": ctx[rows], "pert": pert[rows],
                          "batch": batch[rows] if by_batch else 0})
    # the control rows of each context, and of each (context, batch): computed once, shared by
    # the groups (no copy per group)
    no_rows = np.zeros(0, dtype=ctrl_rows.dtype)
    ctx_pools = {k: ctrl_rows[v] for k, v in pd.Series(ctrl_ctx[ctrl_rows]).groupby(
        ctrl_ctx[ctrl_rows], sort=False).indices.items()} if len(ctrl_rows) else {}
    batch_pools = ({k: ctrl_rows[v] for k, v in pd.DataFrame(
        {"c": ctrl_ctx[ctrl_rows], "b": ctrl_batch[ctrl_rows]}).groupby(
        ["c", "b"], sort=False).indices.items()} if by_batch and len(ctrl_rows) else {})
    out = []
    for (cx, p, bt), idx in sorted(frame.groupby(["ctx", "pert", "batch"]).indices.items()):
        ctx_pool = ctx_pools.get(cx, no_rows)
        pool = ctrl_rows if mode == "all" else ctx_pool
        if by_batch:
            pool = batch_pools.get((cx, bt), ctx_pool)
        if len(pool) == 0 and p != copied:
            if fallback != "all_controls":
                raise DataError(f"context '{cx}' has no control cells in the input, so basal "
                                "states cannot be drawn. Add controls for it or pass "
                                "basal_fallback='all_controls'.")
            pool = ctx_pool = ctrl_rows
        out.append(BasalGroup((cx, p, bt) if by_batch else (cx, p), rows[idx], pool, ctx_pool))
    if by_batch:
        drawn = rows if copied is None else rows[pert[rows] != copied]
        warn_batch_fallback(batches_without_controls(ctx, batch, drawn, ctrl_rows, ctrl_ctx,
                                                     ctrl_batch), describe)
    return out


def batches_without_controls(ctx: np.ndarray, batch: np.ndarray, rows: np.ndarray,
                             ctrl_rows: np.ndarray, ctrl_ctx: np.ndarray, ctrl_batch: np.ndarray
                             ) -> dict[tuple[Any, Any], int]:
    """Batch pairing's fallback: the (context, batch) pairs of the cells ``rows`` whose context
    has control rows (``ctrl_rows``) but none in that batch, with their numbers of cells, in
    sorted order; their basal cells are drawn from the context's controls of every batch.
    ``ctx`` / ``batch`` are indexed by cell, ``ctrl_ctx`` / ``ctrl_batch`` by control row."""
    if not len(rows) or not len(ctrl_rows):
        return {}
    have = set(zip(ctrl_ctx[ctrl_rows].tolist(), ctrl_batch[ctrl_rows].tolist()))
    has_controls = set(ctrl_ctx[ctrl_rows].tolist())
    pairs = pd.DataFrame({"c": ctx[rows], "b": batch[rows]}).value_counts(sort=False)
    return {(c, b): int(n) for (c, b), n in sorted(pairs.items())
            if c in has_controls and (c, b) not in have}


def warn_batch_fallback(elsewhere: dict[tuple[Any, Any], int],
                        describe: Callable[[Any, Any], str], what: str = "cells",
                        more: str = "") -> None:
    """Say the cells of :func:`batches_without_controls` (``describe(context, batch)`` names a
    pair; ``what`` the cells, ``more`` is added to the message)."""
    if elsewhere:
        warn(
            f"{sum(elsewhere.values()):,} {what} are in batches without control cells of their "
            f"context ({preview([describe(c, b) for c, b in elsewhere])}): their basal cells "
            f"are drawn from their context's controls of every batch.{more}", UserWarning)


def split_groups(prepared: PreparedData, split: SplitData, mode: str
                 ) -> tuple[list[tuple[np.ndarray, BasalGroup, str]], np.ndarray]:
    """A split's cells grouped for prediction (:func:`basal_groups` over its set cells, controls
    from the split's own): each group with its output rows (groups one after another) and the
    key that seeds its draws (its labels); and ``order``, the split row of each output row."""
    out, start = [], 0
    for g in basal_groups(split.context, split.pert, split.batch,
                          np.flatnonzero(split.is_target), np.flatnonzero(split.is_control),
                          split.context, split.batch, mode,
                          describe=batch_in_context(prepared, split)):
        key = group_key(*group_labels(prepared, split, g.rows[0], len(g.key) == 3))
        out.append((np.arange(start, start + len(g.rows)), g, key))
        start += len(g.rows)
    order = np.concatenate([g.rows for _, g, _ in out]) if out else np.zeros(0, np.int64)
    return out, order.astype(np.int64)


def group_key(*labels: object) -> str:
    """The string that seeds a group's basal draws (:func:`group_rng`)."""
    return "\x00".join(map(str, labels))


def output_scale(expression: bool, log1p: bool) -> str:
    """What a prediction's X holds, as recorded in ``uns["statetx"]["scale"]`` (read by
    :func:`statetx.evaluate`): ``log1p`` or ``counts`` expression, or an ``embedding``."""
    return "embedding" if not expression else ("log1p" if log1p else "counts")


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a network's weights (names, shapes, dtypes, values): the model id in
    predictions' provenance. Cached on the module until a parameter changes in place (torch
    counts in-place changes per tensor; changes through ``param.data`` or fused optimisers are
    not counted: statetx's trainer drops the cache after training)."""
    state = module.state_dict(keep_vars=True)
    key = tuple((n, t.data_ptr(), t._version) for n, t in state.items())
    cached = getattr(module, "_statetx_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.blake2b(digest_size=8)
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    digest = h.hexdigest()
    module._statetx_digest = (key, digest)
    return digest


def mark_scale(adata: ad.AnnData, scale: str) -> ad.AnnData:
    """Say a log1p output is log1p where scanpy looks (``uns["log1p"]``, natural log), so a
    second ``sc.pp.log1p`` warns."""
    if scale == "log1p":
        adata.uns["log1p"] = {"base": None}
    return adata


class GroupMeans:
    """Running per-group means of the network outputs (``pseudobulk`` prediction): no
    per-cell output matrix is held. ``row_group`` [n_out] maps output rows to ``n_groups``
    groups (every set lies in one group); ``clip`` bounds each cell's expression output
    (``counts`` when the network decodes genes, else ``pred``) before it is averaged."""

    def __init__(self, row_group: np.ndarray, n_groups: int,
                 clip: tuple[float, float] | None) -> None:
        self.row_group, self.clip = row_group, clip
        self.n_cells = np.bincount(row_group, minlength=n_groups)
        self.sums: dict[str, np.ndarray] = {}

    def add(self, name: str, rows: np.ndarray, x: np.ndarray, clipped: bool) -> None:
        if clipped and self.clip is not None:
            x = np.clip(x, *self.clip)
        total = self.sums.setdefault(name, np.zeros((len(self.n_cells), x.shape[1])))
        total[self.row_group[rows[0]]] += x.sum(0, dtype=np.float64)

    def means(self, name: str) -> np.ndarray | None:
        """[n_groups, D] float32 means (None when nothing was added under ``name``)."""
        if name not in self.sums:
            return None
        return (self.sums[name] / np.maximum(self.n_cells, 1)[:, None]).astype(np.float32)


@torch.no_grad()
def run_groups(network: torch.nn.Module, basal_source: np.ndarray | torch.Tensor,
               groups: Sequence[Group], pert_table: torch.Tensor | None, n_out: int, *,
               set_len: int, seed: int = 42, window_mode: str = "balanced", sets_per_pass: int = 64,
               device: torch.device | str = "cpu", matmul_precision: str = "highest",
               means: GroupMeans | None = None) -> dict[str, np.ndarray | None]:
    """Predict every group; returns ``pred`` [n_out, D_out], optional ``counts`` [n_out, G],
    ``basal_row`` [n_out] (row of basal_source used) and ``set_id`` [n_out]. The network runs
    at ``matmul_precision`` (validated by the caller, see :func:`check_matmul_precision`);
    ``pert_table`` is the vocabulary's (:func:`statetx.sets.pert_table`).
    With ``means`` the outputs go into it instead (``pred`` and ``counts`` are None)."""
    network.eval()
    src = basal_source if isinstance(basal_source, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(basal_source, dtype=np.float32))
    basal_row = np.full(n_out, -1, dtype=np.int64)
    set_id = np.full(n_out, -1, dtype=np.int64)
    sets = []  # (out rows, basal rows, pert index, batch indices)
    for g in groups:
        draws = g.basal if g.basal is not None else g.pool[
            group_rng(seed, g.key).integers(len(g.pool), size=len(g.out_rows))]
        for w in windows(len(g.out_rows), set_len, window_mode):
            rows = g.out_rows[w]
            basal_row[rows] = draws[w]
            set_id[rows] = len(sets)
            sets.append((rows, draws[w], g.pert_index, g.batch_index[w]))
    if not sets:
        raise DataError("nothing to predict: no cells were given.")
    # outputs allocated before the heap is retained: freed later, they go back to the kernel
    c_net = network.config
    decodes = getattr(network, "gene_decoder", None) is not None
    preds = counts = None
    if means is None:
        preds = np.zeros((n_out, c_net.output_dim), dtype=np.float32)
        counts = np.zeros((n_out, c_net.gene_dim), dtype=np.float32) if decodes else None
    order = sorted(range(len(sets)), key=lambda i: -len(sets[i][0]))  # similar lengths together
    heap = retained_heap() if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with heap, matmul_precision_scope(matmul_precision):
        for lo in range(0, len(order), sets_per_pass):
            chunk = [sets[i] for i in order[lo:lo + sets_per_pass]]
            out = _forward_chunk(network, src, pert_table, chunk, device)
            p = out.pred.float().cpu().numpy()
            c = out.counts.float().cpu().numpy() if decodes else None
            for j, (rows, *_rest) in enumerate(chunk):
                if means is not None:
                    means.add("pred", rows, p[j, :len(rows)], clipped=not decodes)
                    if c is not None:
                        means.add("counts", rows, c[j, :len(rows)], clipped=True)
                    continue
                preds[rows] = p[j, :len(rows)]
                if c is not None:
                    counts[rows] = c[j, :len(rows)]
    return {"pred": preds, "counts": counts, "basal_row": basal_row, "set_id": set_id}


#: ``untrained_perturbation=``: what predict does with one-hot perturbations that had no
#: training cells
UNTRAINED_MODES = ("control", "as_is")
#: the choices of predict's string options
PREDICT_CHOICES = {"basal_fallback": ("error", "all_controls"), "basal": ("sampled", "self"),
                   "unknown_perturbation": ("error", "control", "zeros"),
                   "unknown_batch": ("error", "first", "mean"),
                   "untrained_perturbation": UNTRAINED_MODES}


def check_predict_options(adata: Any, *, inplace: bool, layout: str, all_perts: bool,
                          min_cells: int | None, max_cells: int | None,
                          n_cells_per_pert: Any, perturbations: Any, set_len: int | None,
                          sets_per_pass: int, matmul_precision: str,
                          choices: Mapping[str, str]) -> str:
    """``StateTransitionModel.predict``'s options checked before any data are read; the layout
    to write (``inplace`` writes arc-state's, into ``adata``: a view is said to become a
    copy)."""
    if inplace:
        if all_perts or min_cells is not None or max_cells is not None:
            raise ConfigError("inplace=True writes one prediction per input cell into the "
                              "input; all_perts / min_cells / max_cells add or drop cells: "
                              "leave inplace out (a new AnnData is returned).")
        if adata.isbacked:
            raise ConfigError("inplace=True cannot write into a backed AnnData; load it "
                              "with adata.to_memory() first, or leave inplace out.")
        if adata.is_view:
            warn_view_becomes_copy("inplace=True", "predictions")
        layout = "arc"
    check_matmul_precision(matmul_precision)
    as_count("sets_per_pass", sets_per_pass)
    if layout not in ("statetx", "arc"):
        raise ConfigError(f"layout={layout!r} is invalid; expected 'statetx' or 'arc'.")
    as_count("set_len", set_len, optional=True)
    counts = n_cells_per_pert if isinstance(n_cells_per_pert, Mapping) else None
    if counts is None:
        as_count("n_cells_per_pert", n_cells_per_pert, optional=True)
    as_count("min_cells", min_cells, optional=True)
    as_count("max_cells", max_cells, optional=True)
    if min_cells is not None and max_cells is not None and min_cells > max_cells:
        raise ConfigError(f"min_cells={min_cells} is above max_cells={max_cells}.")
    for k, v in (counts or {}).items():
        as_count(f"n_cells_per_pert[{k!r}]", v, 0)
    if counts is not None and perturbations is not None and set(counts) != set(
            map(str, perturbations)):
        raise ConfigError("n_cells_per_pert (a mapping) must give a count for each of the "
                          "perturbations, and for no other; or leave perturbations out.")
    if (perturbations is not None or n_cells_per_pert is not None) and not all_perts:
        raise ConfigError("perturbations= and n_cells_per_pert= choose what all_perts=True "
                          "simulates; pass all_perts=True (or use simulate()).")
    for name, value in choices.items():
        if value not in PREDICT_CHOICES[name]:
            raise ConfigError(f"{name}={value!r} is invalid; expected one of "
                              f"{', '.join(map(repr, PREDICT_CHOICES[name]))}.")
    return layout


def check_matmul_precision(value: object) -> str:
    """Validate a prediction ``matmul_precision``: "highest" (default: full fp32, as the reference
    predicts), or "high" / "medium" (TF32 on GPUs; "medium" also bf16 products on CPUs with AMX:
    ~1.6x faster ``state_sm`` prediction on a 2-core CPU, outputs within ~0.5 % RMS)."""
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={value!r} is invalid; expected one of "
                          f"{', '.join(map(repr, MATMUL_PRECISIONS))} (\"highest\" = full fp32).")
    return str(value)


def _forward_chunk(network: torch.nn.Module, src: torch.Tensor, pert_table: torch.Tensor | None,
                   chunk: list[tuple], device: torch.device | str) -> STOutput:
    """One padded [B, S] pass over a chunk of sets (rows, basal rows, pert index, batches)."""
    s = max(len(c[0]) for c in chunk)
    b = len(chunk)
    idx = np.zeros((b, s), dtype=np.int64)
    bidx = np.zeros((b, s), dtype=np.int64)
    mask = np.zeros((b, s), dtype=bool)
    pidx = np.array([c[2] for c in chunk], dtype=np.int64)
    for j, (rows, brows, _, bi) in enumerate(chunk):
        idx[j, :len(rows)] = brows
        bidx[j, :len(rows)] = bi
        mask[j, :len(rows)] = True
    basal = src.index_select(0, torch.from_numpy(idx.reshape(-1))).view(b, s, -1).float()
    pert = pert_inputs(pert_table, torch.from_numpy(pidx))
    return network(basal.to(device), pert.to(device),
                   batch_index=torch.from_numpy(bidx).to(device),
                   valid_mask=None if mask.all() else torch.from_numpy(mask).to(device))


def clip_range(clip, expression: bool, log1p: bool = True) -> tuple[float, float] | None:
    """Resolve ``clip``: "auto" = [0, 14] for log1p expression outputs, [0, inf) for
    count-scale ones (only negative values are impossible), none for embeddings."""
    if isinstance(clip, str):
        if clip != "auto":
            raise ConfigError(f"clip={clip!r} is invalid; use 'auto', None or a (low, high) tuple.")
        if not expression:
            return None
        return EXPRESSION_CLIP if log1p else (0.0, float("inf"))
    if clip is None:
        return None
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ConfigError(f"clip={clip!r} is invalid; use 'auto', None or a (low, high) tuple "
                          "of numbers.") from None
    return low, high


# ---------------------------------------------------------------------- new data
def check_hvg_order(hvg: Any, x: Any, cols: np.ndarray, max_rows: int = 200) -> None:
    """Refuse an ``obsm['X_hvg']`` whose columns hold X's highly variable genes in another order
    than ``var['highly_variable']`` names them (``cols``: their X columns), as after reordering
    var (obsm does not follow var): read as it is, every gene would get another's values. Other
    values (another scale, other genes) are not judged here."""
    if (cols < 0).any() or len(cols) != np.shape(hvg)[1] or len(cols) < 2:
        return
    n = np.shape(x)[0]
    rows = np.linspace(0, n - 1, min(n, max_rows)).astype(np.int64)
    sub = x[rows]  # (in memory, or a backed dense / sparse dataset)
    sub = sub[:, cols] if sp.issparse(sub) else np.asarray(sub)[:, cols]
    # (float32: X_hvg is often a float32 copy of a float64 X)
    a = np.asarray(sample_rows(hvg, max_rows), dtype=np.float32)
    b = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)
    if np.array_equal(a, b):
        return
    where = {col.tobytes(): j for j, col in enumerate(b.T)}
    found = np.array([where.get(col.tobytes(), -1) for col in a.T])
    if (found >= 0).all():  # the same columns, in another order
        raise DataError("obsm['X_hvg'] holds X's highly variable genes in another order than "
                        "var['highly_variable'] names them (was var reordered after X_hvg was "
                        "made? obsm does not follow var): its genes would be read under other "
                        "genes' names. Rebuild it (adata.obsm['X_hvg'] = adata[:, "
                        "adata.var['highly_variable']].X), or set uns['X_hvg_var_names'] to its "
                        "column names.")


def align_genes(adata: ad.AnnData, genes: Sequence[str], embed_key: str | None,
                missing_genes: str = "error", gene_name_col: str | None = None) -> np.ndarray:
    """The model-input matrix of ``adata``, columns in the model's order.

    ``embed_key`` other than ``X_hvg``: ``obsm[embed_key]`` (width checked). Otherwise genes are
    matched by name: ``obsm['X_hvg']`` when it carries names (``uns['X_hvg_var_names']`` or
    ``var['highly_variable']``), else ``X`` and ``var_names`` (or the var column
    ``gene_name_col``). Extra genes are dropped; missing ones are an error listing them, or
    zeros with ``missing_genes="zero"``.
    """
    if missing_genes not in ("error", "zero"):
        raise ConfigError(f"missing_genes={missing_genes!r} is invalid; expected 'error' or "
                          "'zero'.")
    if embed_key not in (None, "X_hvg"):
        if embed_key not in adata.obsm:
            raise DataError(f"obsm['{embed_key}'] not found in the input (available: "
                            f"{preview(adata.obsm.keys()) or 'none'})."
                            + layer_hint(embed_key, list(adata.layers.keys())))
        m = adata.obsm[embed_key]  # sparse obsm: densified as fit reads it (io._dense)
        m = np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float32)
        if m.shape[1] != len(genes):
            raise DataError(f"obsm['{embed_key}'] has {m.shape[1]} columns but the model expects "
                            f"{len(genes)}.")
        return m
    x_names = list(map(str, gene_names(adata, gene_name_col, unique=False)))
    names, matrix, where = x_names, adata.X, "X"
    if embed_key == "X_hvg" and "X_hvg" in adata.obsm:
        matrix, where = adata.obsm["X_hvg"], "obsm['X_hvg']"
        names = hvg_names(adata, gene_name_col)
        width = np.shape(matrix)[1]
        if names is None:  # unnamed columns: by position, named as training names them
            names = [f"X_hvg_{i}" for i in range(width)]
        elif len(names) != width:
            raise DataError(f"the input's obsm['X_hvg'] has {width} columns but {len(names)} gene "
                            "names (uns['X_hvg_var_names'] or var['highly_variable']), so its "
                            "genes cannot be matched to the model's. Write it with "
                            "statetx.pp.preprocess_train, or set uns['X_hvg_var_names'] to its "
                            "column names.")
    index, x_index = pd.Index(names), pd.Index(x_names)
    if (where != "X" and "X_hvg_var_names" not in adata.uns and adata.X is not None
            and not x_index.has_duplicates and not index.has_duplicates):
        check_hvg_order(matrix, adata.X, x_index.get_indexer(names))
    in_x = ""  # why the model's genes were not read from X although X has them all
    if (where != "X" and adata.X is not None and not index.has_duplicates
            and not x_index.has_duplicates and (index.get_indexer(list(genes)) < 0).any()
            and (x_index.get_indexer(list(genes)) >= 0).all()):
        if looks_log1p(adata.X) == looks_log1p(matrix):
            warn("some of the model's genes are not among the input's obsm['X_hvg'] "
                 "columns (its highly variable genes were chosen on other data); all "
                 "of them are read from X by name instead.", UserWarning)
            index, matrix, where = x_index, adata.X, "X"
        else:
            in_x = (" X has them all, but not on the scale of obsm['X_hvg'] (raw counts next "
                    "to log1p?): normalise and log1p X to read them from there.")
    # names used twice matter only among the model's genes (others are dropped anyway)
    ambiguous = sorted(set(index[index.duplicated()]) & set(genes))
    if ambiguous:
        named_by = f"var['{gene_name_col}']" if gene_name_col and where == "X" else where
        raise DataError(f"the input names several genes alike in {named_by}, among them the "
                        f"model's gene(s) {preview(ambiguous)}: which column to read is "
                        "ambiguous. Make the names unique (adata.var_names_make_unique()) or "
                        "drop the extra copies.")
    pos = first_positions(index, genes)
    missing = [g for g, p in zip(genes, pos) if p < 0]
    if missing and len(missing) == len(genes):
        wanted = set(map(str, genes))
        cols = [str(k) for k, col in adata.var.items() if col.dtype == object or isinstance(
            col.dtype, pd.CategoricalDtype)]
        found = [k for k in cols if len(wanted & set(adata.var[k].astype(str))) > len(genes) / 2]
        hint = (f" var[{found[0]!r}] holds them: pass gene_name_col={found[0]!r} "
                f"(--gene-name-col {found[0]})." if found else
                " Are the genes named differently (symbols vs Ensembl IDs: gene_name_col=<var "
                "column>), or is this data of another panel?")
        raise DataError(
            f"none of the model's {len(genes)} genes is in the input's {where} (model: "
            f"{preview(list(genes))}; input: {preview(list(index))})" + (
                ", so filling the missing genes with 0 would predict from empty cells."
                if missing_genes == "zero" else ".") + in_x + hint)
    if missing and missing_genes == "error":
        raise DataError(
            f"{len(missing)} of the model's {len(genes)} genes are missing from the input's "
            f"{where}: {preview(missing)}.{in_x} Provide them, or pass missing_genes='zero' to "
            "fill them with 0."
        )
    if missing:
        warn(f"{len(missing)} of {len(genes)} model genes are missing from the input "
             f"and are filled with 0: {preview(missing)}.", UserWarning)
    if matrix is None:
        raise DataError("the input has no X (adata.X is None). Put the expression matrix in X, "
                        "e.g. adata.X = adata.layers['counts'].")
    sub = matrix[:, np.where(pos >= 0, pos, 0)]
    out = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)
    out[:, pos < 0] = 0.0
    return out


def first_positions(index: pd.Index, names: Sequence[str]) -> np.ndarray:
    """Position in ``index`` of each of ``names`` (its first occurrence; -1 if absent)."""
    first = np.flatnonzero(~index.duplicated())
    pos = index[first].get_indexer(list(names))
    return np.where(pos >= 0, first[np.maximum(pos, 0)] if len(first) else -1, -1)


def resize_groups(ctx: np.ndarray, pert: np.ndarray, control: str, min_cells: int | None,
                  max_cells: int | None, seed: int) -> np.ndarray:
    """Rows to predict when every (context, perturbation) group other than the control has at
    least ``min_cells`` (clones drawn with replacement) and at most ``max_cells`` (a seeded
    subsample): the kept rows in their order, then the clones. Each group draws from its own
    generator (seed and labels), so other groups in the input do not change its cells."""
    kept, clones = [], []
    frame = pd.DataFrame({"c": np.asarray(ctx, dtype=str), "p": np.asarray(pert, dtype=str)})
    for (c, p), pos in sorted(frame.groupby(["c", "p"]).indices.items()):
        if p == str(control):
            kept.append(pos)
            continue
        rng = group_rng(seed, group_key(c, p, "resize"))
        if max_cells is not None and len(pos) > max_cells:
            pos = rng.choice(pos, size=max_cells, replace=False)
        if min_cells is not None and len(pos) < min_cells:
            clones.append(rng.choice(pos, size=min_cells - len(pos)))
        kept.append(pos)
    return np.concatenate([np.sort(np.concatenate(kept)), *clones]).astype(np.int64)


def input_matrix(adata: ad.AnnData, genes: Sequence[str], embed_key: str | None,
                 missing_genes: str = "error", gene_name_col: str | None = None) -> np.ndarray:
    """The model's input features of every cell of ``adata`` (see :func:`align_genes`), checked:
    the input has cells, unique cell names and finite values."""
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"the input must be an AnnData (cells × genes, labels in obs), not "
                        f"{type(adata).__name__}; e.g. anndata.read_h5ad(path).")
    if adata.n_obs == 0:
        raise DataError("the input AnnData has no cells (n_obs = 0).")
    check_unique_cells(adata)
    x = align_genes(adata, genes, embed_key, missing_genes, gene_name_col)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        n = int(bad.sum())
        raise DataError(
            f"{n} input cell{'s' if n > 1 else ''} {'have' if n > 1 else 'has'} NaN or Inf "
            f"values in the model's input features ({embed_key or 'X'}), e.g. "
            f"{preview(adata.obs_names[bad], 5)}. Remove or repair them before predicting."
        )
    return x


def input_labels(adata: ad.AnnData, pert_col: str, ct_col: str | None, control: str,
                 trained_contexts: Sequence[str], ct_col_given: bool, pool_all: bool = False,
                 need_controls: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The input's perturbation and context labels and its control mask. Without the
    (default) cell-type column, or with none (``ct_col`` None), a model trained on one context
    treats every cell as that context, and every cell forms one context when controls are
    pooled across cell types anyway (``pool_all``: ``basal_pool="all"``); an input without
    control cells is an error when basal cells are drawn from them (``need_controls``)."""
    pert = obs_labels(adata.obs, pert_col, "the input", "pert_col")
    if ct_col is not None and ct_col in adata.obs:
        ctx = obs_labels(adata.obs, ct_col, "the input", "cell_type_col")
    elif (not ct_col_given and len(trained_contexts) == 1) or pool_all:
        only = str(trained_contexts[0]) if len(trained_contexts) == 1 else "all"
        say(("cell_type_col=False" if ct_col is None else f"no obs column '{ct_col}'")
            + ": all cells form one context"
            + (f", the model's only one ('{only}')." if only != "all" else
               " (basal_pool='all': every control can be any cell's basal cell)."))
        ctx = np.full(adata.n_obs, only, dtype=object)
    else:
        raise DataError(
            f"the input has no obs column '{ct_col}' (the context in which each cell is "
            f"paired with control cells; its columns: {preview(adata.obs.columns, 50)})."
            f"{did_you_mean(ct_col, map(str, adata.obs.columns))}"
            " Pass cell_type_key=<column>; to treat all cells as one context (controls of any"
            " cell type as basal cells), pass basal_pool='all'."
        )
    is_ctrl = pert == control
    if need_controls and not is_ctrl.any():
        labels = list(map(str, np.unique(pert)))
        hint = did_you_mean(str(control), labels) or (
            f" Values that look like controls: {preview(looks)}." if (looks := control_like(
                labels)) else "")
        raise DataError(f"the input has no control cells (obs['{pert_col}'] == '{control}'); "
                        "basal states are drawn from controls. Include control cells, or "
                        "name the control label with control_pert=<label> (--control-pert on "
                        "the command line); basal='self' predicts each cell from itself "
                        f"instead.{hint}")
    return pert, ctx, is_ctrl


def check_unique_cells(adata: ad.AnnData) -> None:
    """Predictions name each cell's basal control by its obs name: they must be unique."""
    names = pd.Index(adata.obs_names)
    if names.has_duplicates:
        raise DataError(
            f"the input has duplicate cell names (obs_names): "
            f"{preview(repeated(names), 5)}; the output refers to control "
            "cells by name (statetx_ctrl_barcode). Make them unique first "
            "(adata.obs_names_make_unique())."
        )


def control_depths(x: np.ndarray | torch.Tensor, cell_types: np.ndarray,
                   is_control: np.ndarray, min_cells: int = 20) -> dict[str, float]:
    """Per cell type with ``min_cells`` control cells or more: the median over (up to 1,000
    evenly spread) of its control cells of the counts per cell their log1p values ``x`` stand
    for over its columns (sum of ``expm1``). Controls of one cell type differ between datasets
    only by what normalisation put on them (the cell types, and perturbations, differ by
    themselves over a gene subset). A cell type whose median is 0 (most of its controls
    express none of the columns, e.g. a few genes) is left out: it has no depth to compare."""
    out = {}
    for ct in np.unique(cell_types[is_control]):
        rows = np.flatnonzero(is_control & (cell_types == ct))
        if len(rows) >= min_cells:
            pick = rows[np.linspace(0, len(rows) - 1, min(len(rows), 1000)).astype(np.int64)]
            sub = x[torch.from_numpy(pick) if isinstance(x, torch.Tensor) else pick]
            depth = log1p_depth(sub)
            if depth > 0:
                out[str(ct)] = depth
    return out


def check_input_scale(x: np.ndarray, trained_log1p: bool, where: str = "input",
                      target_sum: float | None = None,
                      trained_counts: bool | None = None) -> None:
    """Error when the input scale (counts, scaled or log1p) differs from the training data's
    (``target_sum``: the training data's normalisation total, named in the advice;
    ``trained_counts``: whether training data not on log1p scale held integers only, False
    refusing raw counts as a log1p model does, None not known)."""
    lowest = float(x.min(initial=0))
    if lowest < 0 and trained_log1p:
        raise DataError(negative_values_message(
            f"the {where}", lowest, "the model was trained on log1p-normalised values"))
    if lowest < 0:
        warn(f"the {where} has negative expression values (down to {lowest:.4g}); the "
             "model was trained on non-negative values.", UserWarning)
    s = sample_rows(x, 1000)
    top = float(s.max(initial=0))
    integers = all_integers(s)
    if trained_log1p and integers and top > 0:
        how = ("as the training data were: sc.pp.normalize_total(adata, target_sum=T) and "
               "sc.pp.log1p(adata), with T the total the training data were normalised to. "
               "The model records no T (its data were not normalised by statetx.pp), and "
               "scanpy's default T, each dataset's own median, differs between datasets; "
               "predict warns when the depths differ" if not target_sum
               else f"to the training data's total: statetx.pp.preprocess_train(adata, "
               f"target_sum={target_sum:g}), tx preprocess_train --target-sum "
               f"{target_sum:g}, or sc.pp.normalize_total(adata, target_sum={target_sum:g}) "
               "and sc.pp.log1p(adata)")
        raise DataError(f"the {where} looks like raw counts (integers, max {top:.0f}); the "
                        f"model was trained on log1p-normalised values. Normalise it first, "
                        f"{how}.")
    if trained_log1p and top >= LOG1P_MAX:
        raise DataError(f"the {where} has values up to {top:.4g}, far above log1p scale; "
                        "the model was trained on log1p-normalised values. If it is normalised "
                        "but not log-transformed, apply scanpy.pp.log1p (or "
                        "statetx.pp.preprocess_train) first.")
    if not trained_log1p and trained_counts is False and integers and top > 0:
        total = ("T, the total the training data were normalised to" if not target_sum
                 else f"T={target_sum:g}, the training data's total")
        raise DataError(f"the {where} looks like raw counts (integers, max {top:.0f}); the "
                        "model was trained on normalised values (not integers, not log1p). "
                        "Normalise it as the training data were, e.g. "
                        f"sc.pp.normalize_total(adata, target_sum=T) with {total}, or train "
                        "the model on raw counts.")
    if not trained_log1p and looks_log1p(s):
        scale = "normalised values (not log1p)" if trained_counts is False else "raw counts"
        raise DataError(f"the {where} looks log1p-normalised but the model was trained on "
                        f"{scale}; pass data on the training scale.")


def encode_perturbations(labels: np.ndarray, vocab: Vocab, unknown: str) -> np.ndarray:
    """Vocabulary indices; unknown labels → error (default), the control, or a zero vector (-1)."""
    if unknown not in ("error", "control", "zeros"):
        raise ConfigError(f"unknown_perturbation={unknown!r} is invalid; expected 'error', "
                          "'control' or 'zeros'.")
    codes = vocab.encode("pert", labels, on_unknown="ignore")
    bad = codes < 0
    if bad.any():
        counts = pd.Series(labels[bad]).value_counts()
        listing = preview(f"{k} ({v} cells)" for k, v in counts.items())
        if unknown == "error":
            raise DataError(
                f"{len(counts)} perturbation label(s) are not in the model's vocabulary: {listing}."
                f"{did_you_mean(counts.index[0], vocab.perturbations)} "
                + "Cells without a real perturbation (e.g. 'unassigned' guides) should be "
                "dropped first. "
                + ("The model reads perturbation features: give their vectors with "
                   "pert_features={label: vector}, or pass " if vocab.pert_features is not None
                   else "Pass ")
                + "unknown_perturbation='control' or 'zeros' to predict them anyway."
            )
        if unknown == "control":
            codes[bad] = vocab.perturbations.index(vocab.control_pert)
    return codes


def encode_batches(labels: np.ndarray, vocab: Vocab, unknown: str,
                   trained: Sequence[str] | None = None) -> np.ndarray:
    """Batch indices for a batch-encoder model. Labels outside the vocabulary, and those of
    batches outside ``trained`` (the batches with training cells, default all: the others'
    embedding rows never trained) → an error, the first trained batch ("first") or -1 ("mean":
    the network uses the mean embedding of the trained batches); ``unknown`` is checked by
    :meth:`StateTransitionModel.predict`."""
    codes = vocab.encode("batch", labels, on_unknown="ignore")
    known = np.arange(len(vocab.batches)) if trained is None else vocab.encode("batch", trained)
    new, untrained = codes < 0, (codes >= 0) & ~np.isin(codes, known)
    if unknown == "error" and (new.any() or untrained.any()):
        raise DataError(
            (f"batch label(s) not seen in training: {preview(np.unique(labels[new]))}. Known: "
             f"{preview(vocab.batches)}. " if new.any() else "")
            + (f"batch(es) {preview(np.unique(labels[untrained]))} had no training cells (e.g. "
               "held out as val/test): their embedding rows never trained. "
               if untrained.any() else "")
            + "Pass unknown_batch='mean' (the mean embedding of the trained batches) or 'first' "
            "(the first trained batch) to predict them anyway.")
    if untrained.any():
        say(f"batch(es) without training cells: {preview(np.unique(labels[untrained]))}; their "
            "cells get " + ("the mean embedding of the trained batches" if unknown == "mean"
                            else "the first trained batch's embedding")
            + f" (unknown_batch={unknown!r}).")
    codes[new | untrained] = int(known[0]) if unknown == "first" else -1
    return codes
